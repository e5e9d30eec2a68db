"""Generated ground-truth recordings for tests, examples and benchmarks.

SpikeInterface's `generate_drifting_recording` fetches named probes from the
internet, and its recordings cannot be handed to `run_sorter` directly. Here
we build Neuropixels-like probes offline, save the recording to binary once,
and keep the ground-truth sorting and true displacement beside it, so every
caller sorts the same cached data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

DRIFT_CASES = ("static", "rigid", "nonrigid", "bump")
# the generator's default range of unit amplitudes (uV at the soma); noise is 6-8 uV, so with it
# most units sit far above threshold. A lower range gives the near-threshold units real data has.
DEFAULT_AMPLITUDES_UV = (100.0, 500.0)


def neuropixels_probe(num_channels: int = 128, version: int = 1):
    """A Neuropixels 1.0 ("NP1000") or 2.0 ("NP2000") probe with its first channels, built offline."""
    from probeinterface.neuropixels_tools import build_neuropixels_probe

    probe = build_neuropixels_probe("NP1000" if version == 1 else "NP2000")
    probe = probe.get_slice(np.arange(num_channels))
    probe.set_device_channel_indices(np.arange(num_channels))
    return probe


def _motion_list(drift: str, duration: float):
    start = min(5.0, duration / 10)
    if drift == "static":
        return []
    if drift in ("rigid", "nonrigid"):
        return [
            dict(
                drift_mode="zigzag",
                amplitude_factor=1.0,
                non_rigid_gradient=0.5 if drift == "nonrigid" else None,
                t_start_drift=start,
                t_end_drift=None,
                period_s=max(20.0, duration / 2),
            )
        ]
    if drift == "bump":
        return [
            dict(
                drift_mode="bump",
                amplitude_factor=1.0,
                non_rigid_gradient=None,
                t_start_drift=start,
                t_end_drift=None,
                bump_interval_s=(duration / 4, duration / 2),
            )
        ]
    raise ValueError(f"drift must be one of {DRIFT_CASES}, not {drift!r}")


def generate_ground_truth(
    folder,
    *,
    duration: float = 60.0,
    num_channels: int = 128,
    num_units: int | None = None,
    drift: str = "rigid",
    drift_um: float = 20.0,
    probe_version: int = 1,
    amplitudes_uv: tuple[float, float] = DEFAULT_AMPLITUDES_UV,
    seed: int = 0,
    n_jobs: int = 1,
):
    """Generate (or load from `folder`) a drifting ground-truth recording.

    Returns (recording, gt_sorting, info) where the recording is saved binary
    (so it is serializable for run_sorter) and `info` holds the true motion:
    `displacement_times_s` and `displacement_um` (n_times, n_units) per unit.
    `amplitudes_uv` is the (low, high) range of unit amplitudes the generator draws from.
    """
    import spikeinterface.full as si
    from spikeinterface.generation import generate_drifting_recording

    folder = Path(folder)
    done = folder / "info.json"
    if done.exists():
        return _load_ground_truth(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    if num_units is None:
        num_units = max(4, num_channels // 3)
    probe = neuropixels_probe(num_channels, probe_version)
    motions = _motion_list(drift, duration)
    displacement_kwargs = dict(
        displacement_sampling_frequency=5.0,
        drift_start_um=[0, drift_um],
        drift_stop_um=[0, -drift_um],
        drift_step_um=1,
        motion_list=motions,
    )
    if not motions:
        # a single step of zero displacement: the generator still wants a list
        displacement_kwargs.update(
            drift_start_um=[0, 0.0], drift_stop_um=[0, 0.0],
            motion_list=[dict(drift_mode="zigzag", amplitude_factor=0.0, non_rigid_gradient=None,
                              t_start_drift=0.0, t_end_drift=None, period_s=duration)],
        )
    _, rec, gt, extra = generate_drifting_recording(
        num_units=num_units,
        duration=duration,
        probe=probe,
        generate_displacement_vector_kwargs=displacement_kwargs,
        generate_sorting_kwargs=dict(firing_rates=(2.0, 8.0), refractory_period_ms=4.0),
        generate_templates_kwargs=dict(
            ms_before=1.5, ms_after=3.0, mode="ellipsoid",
            unit_params=dict(alpha=tuple(map(float, amplitudes_uv)), spatial_decay=(10, 45),
                             ellipse_shrink=(0.4, 1), ellipse_angle=(0, np.pi * 2)),
        ),
        extra_outputs=True,
        seed=seed,
    )
    rec.save(folder=folder / "recording", n_jobs=n_jobs, chunk_duration="1s", progress_bar=False)
    si.NpzSortingExtractor.write_sorting(gt, folder / "gt_sorting.npz")
    fs_disp = extra["displacement_sampling_frequency"]
    unit_disp = extra["unit_displacements"]  # (n_times, n_units, 2) in (x, z)
    np.savez(
        folder / "motion_truth.npz",
        displacement_times_s=np.arange(unit_disp.shape[0]) / fs_disp,
        displacement_um=unit_disp[..., 1],
        unit_locations=extra["unit_locations"],
    )
    info = dict(duration=duration, num_channels=num_channels, num_units=num_units, drift=drift,
                drift_um=drift_um, probe_version=probe_version, amplitudes_uv=list(amplitudes_uv), seed=seed)
    done.write_text(json.dumps(info))
    return _load_ground_truth(folder)


def _load_ground_truth(folder: Path):
    import spikeinterface.full as si

    rec = si.load(folder / "recording")
    gt = si.NpzSortingExtractor(folder / "gt_sorting.npz")
    info = json.loads((folder / "info.json").read_text())
    with np.load(folder / "motion_truth.npz") as f:
        info.update({k: f[k] for k in f.files})
    return rec, gt, info


def true_displacement_at(info: dict, times_s: np.ndarray, depths_um: np.ndarray) -> np.ndarray:
    """True displacement at (time, depth), interpolated from the per-unit displacements.

    The generator moves each unit by its own amount (non-rigid drift); we
    interpolate linearly in time between displacement steps, then over unit
    depths (constant beyond the shallowest / deepest unit).
    """
    t = np.asarray(info["displacement_times_s"], dtype=float)
    disp = np.asarray(info["displacement_um"], dtype=float)
    unit_z = np.asarray(info["unit_locations"])[:, 1]
    order = np.argsort(unit_z)
    times_s, depths_um = np.broadcast_arrays(np.asarray(times_s, dtype=float), np.asarray(depths_um, dtype=float))
    flat_t, flat_z = times_s.ravel(), depths_um.ravel()
    # (n_query, n_units): each unit's displacement at the query times
    per_unit = np.stack([np.interp(flat_t, t, disp[:, u]) for u in order], axis=1)
    out = np.array([np.interp(z, unit_z[order], row) for z, row in zip(flat_z, per_unit)])
    return out.reshape(times_s.shape)


def lab_recording(name: str, seed: int, duration_s: float = 20.0):
    """(recording, gt_sorting) of a recording as labs have them (benchmarks/lab_recordings.py lists
    the cases), from SpikeInterface's generator with its default units and templates, 25 kHz unless
    named: fs15k/fs20k/fs50k, tetrode, linear16, dead_noisy, int16_gains, two_segments, noise_only."""
    import probeinterface as pi
    import spikeinterface.full as si

    kw = dict(durations=[duration_s], num_channels=32, num_units=8, seed=seed)
    if name.startswith("fs"):
        kw["sampling_frequency"] = float(name[2:-1]) * 1000
    elif name == "tetrode":
        probe = pi.generate_tetrode()
        probe.set_device_channel_indices(np.arange(4))
        kw.update(num_channels=4, num_units=3, probe=probe)
    elif name == "linear16":
        # contacts 20 um apart except two 40 um gaps: a layout no template grid assumes
        y = np.cumsum([0] + [20] * 5 + [40] + [20] * 5 + [40] + [20] * 3).astype(float)
        probe = pi.Probe(ndim=2)
        probe.set_contacts(positions=np.c_[np.zeros(16), y], shapes="circle", shape_params={"radius": 6})
        probe.set_device_channel_indices(np.arange(16))
        kw.update(num_channels=16, num_units=5, probe=probe)
    elif name == "two_segments":
        kw["durations"] = [0.75 * duration_s] * 2  # 15 s each at the default 20
    elif name == "noise_only":
        rec, gt = si.generate_ground_truth_recording(**kw)
        gt = si.NumpySorting.from_unit_dict([{}], sampling_frequency=rec.sampling_frequency)
        noise = si.generate_recording(num_channels=32, durations=[duration_s], sampling_frequency=rec.sampling_frequency,
                                      seed=seed)
        return _with_probe(noise, rec.get_probe()), gt
    rec, gt = si.generate_ground_truth_recording(**kw)
    if name == "dead_noisy":
        traces = rec.get_traces().copy()
        traces[:, 5] = 0.0
        traces[:, 20] *= 10.0
        rail = 1.5 * traces[:, 12].std()  # an amplifier clipping channel 12 at +-1.5 sd
        traces[:, 12] = np.clip(traces[:, 12], -rail, rail)
        rec = _with_probe(si.NumpyRecording(traces, rec.sampling_frequency), rec.get_probe())
    elif name == "int16_gains":
        gain = 0.195
        traces = np.round(rec.get_traces() / gain).astype("int16")
        rec16 = _with_probe(si.NumpyRecording(traces, rec.sampling_frequency), rec.get_probe())
        rec16.set_channel_gains(gain)
        rec16.set_channel_offsets(0.0)
        rec = rec16
    return rec, gt


def _with_probe(rec, probe):
    rec.set_probe(probe, in_place=True)
    return rec
