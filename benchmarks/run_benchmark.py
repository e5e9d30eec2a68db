#!/usr/bin/env python
r"""Benchmark dartsort-si against SpikeInterface's peer sorters on generated ground truth.

For every case (drift pattern x probe x duration x channel count) this script
generates -- once, cached under benchmarks/cache/ -- a ground-truth recording,
runs every sorter on that same data in its own subprocess under a wall-time
limit (measuring wall time and peak memory), scores each sorting against the
ground truth, measures the motion error of dartsort's own estimate and of
SpikeInterface's DREDge port (`estimate_motion(method="dredge_ap")`, the
yardstick row), and writes a markdown table, a JSON file and a PNG figure
under benchmarks/results/.

Each case can be run for several generator seeds (--seeds 1,2,3); the markdown then also has a
per-seed summary (well detected / GT units, and well detected among the GT units with SNR >= 5,
"det. well") with a mean over seeds per case. Every GT unit a sorter misses (accuracy < 0.8) is
listed under "Missed units" with its SNR, a kind (absent / merged / split / poor) and its nearest GT
neighbour. --reuse-peers reuses a peer's stored result for an identical run (same case, sorter,
params, n_jobs, SpikeInterface version) and reruns only dartsort.

Examples:
    python benchmarks/run_benchmark.py --quick
    python benchmarks/run_benchmark.py --medium --profile
    python benchmarks/run_benchmark.py --heldout --reuse-peers
    python benchmarks/run_benchmark.py --heldout --seeds 6,7 --sorters dartsort,spykingcircus2
    python benchmarks/run_benchmark.py --cases static,bump --probes 1,2 --durations 120 --channels 128 \
        --sorters dartsort,tridesclous2 --timeout-per-sorter 1800,dartsort=3600
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"
DEFAULT_RESULTS = HERE / "results"

OURS = "dartsort"
ALWAYS_PEERS = ("tridesclous2", "spykingcircus2")
OPTIONAL_PEERS = ("kilosort4", "mountainsort5")
SI_MOTION = "si_dredge_ap"  # the motion-only yardstick row
DRIFTS = ("static", "rigid", "nonrigid", "bump")
WELL_DETECTED = 0.8
DETECTABLE_SNR = 5.0  # GT units at or above this SNR count in "det. well"
MIN_AGREEMENT = 0.1  # agreement score below which a GT unit and a sorted unit are unrelated (loss kinds)
DEFAULT_DRIFT_UM = 20.0

# size presets: values any explicit flag overrides
PRESETS = {
    # dartsort first (after the cheap motion yardstick): on 2 cores the three sorters together need
    # more than the budget, and the run is for dartsort; what a peer cannot finish is a timeout row
    "quick": dict(cases=["rigid"], probes=[1], durations=[30.0], channels=[64],
                  timeout=100.0, timeouts={OURS: 160.0}, budget=285.0,
                  sorters=[OURS, "spykingcircus2", "tridesclous2"]),
    "medium": dict(cases=["rigid", "nonrigid"], probes=[1], durations=[300.0], channels=[128],
                   timeout=3600.0),
    "standard": dict(cases=list(DRIFTS), probes=[1], durations=[120.0], channels=[128], timeout=3600.0),
    "large": dict(cases=list(DRIFTS), probes=[1, 2], durations=[600.0], channels=[384], timeout=4 * 3600.0),
    # held-out check: nonrigid on NP1 and NP2, and the static twin on NP1 (same seed: same units and
    # spike trains), over 5 seeds; `pairs` (drift, probe) replaces the cases x probes product
    "heldout": dict(cases=["nonrigid", "static"], probes=[1, 2],
                    pairs=[("nonrigid", 1), ("nonrigid", 2), ("static", 1)],
                    durations=[60.0], channels=[128], num_units=40, seeds=[1, 2, 3, 4, 5], timeout=1800.0,
                    sorters=[OURS, "spykingcircus2", "tridesclous2"]),
}


# ---------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class Case:
    drift: str
    probe_version: int = 1
    duration: float = 30.0
    num_channels: int = 64
    num_units: int | None = None
    drift_um: float = DEFAULT_DRIFT_UM
    seed: int = 0
    amplitudes_uv: tuple[float, float] | None = None  # None: the generator's default range

    @property
    def name(self) -> str:
        units = "" if self.num_units is None else f"_{self.num_units}u"
        if self.amplitudes_uv is not None:
            units += "_amp" + "-".join(_fmt_num(a) for a in self.amplitudes_uv)
        if self.drift_um != DEFAULT_DRIFT_UM:  # so drifts do not share a cache folder
            units += f"_drift{_fmt_num(self.drift_um)}"
        return (f"{self.drift}_np{self.probe_version}_{_fmt_num(self.duration)}s_{self.num_channels}ch"
                f"{units}_seed{self.seed}")


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def make_cases(drifts, probes, durations, channels, *, pairs=None, num_units=None, drift_um=DEFAULT_DRIFT_UM,
               seed=0, seeds=None, amplitudes_uv=None) -> list[Case]:
    """Every (drift, probe) x duration x channel count, per seed (seeds outermost: one seed's cases
    run together). `pairs` [(drift, probe), ...] replaces the drifts x probes product; `seeds`
    replaces the single `seed`."""
    pairs = pairs or [(d, p) for p in probes for d in drifts]
    for d, _ in pairs:
        if d not in DRIFTS:
            raise SystemExit(f"unknown case {d!r}; choose from {', '.join(DRIFTS)}")
    return [Case(d, int(p), float(T), int(c), num_units, float(drift_um), int(s), amplitudes_uv)
            for s in (seeds or [seed]) for T in durations for c in channels for d, p in pairs]


def prepare_case(case: Case, cache_dir: Path = DEFAULT_CACHE, n_jobs: int = 1, log=print):
    """Generate (or load from the cache) a case; returns (recording, gt_sorting, info, folder)."""
    from dartsort_si.ground_truth import DEFAULT_AMPLITUDES_UV, generate_ground_truth

    folder = Path(cache_dir) / "gt" / case.name
    if not (folder / "info.json").exists():
        log(f"[{case.name}] generating ground truth ...")
        t0 = time.perf_counter()
    else:
        t0 = None
    rec, gt, info = generate_ground_truth(
        folder, duration=case.duration, num_channels=case.num_channels, num_units=case.num_units,
        drift=case.drift, drift_um=case.drift_um, probe_version=case.probe_version, seed=case.seed,
        n_jobs=n_jobs, amplitudes_uv=case.amplitudes_uv or DEFAULT_AMPLITUDES_UV,
    )
    if t0 is not None:
        log(f"[{case.name}] generated in {time.perf_counter() - t0:.1f} s")
    return rec, gt, info, folder


def gt_unit_snrs(rec, gt, folder: Path, n_jobs: int = 1) -> dict:
    """SNR (peak template amplitude / noise level, on the raw generated traces) per GT unit; cached."""
    path = Path(folder) / "gt_snr.json"
    if path.exists():
        return {str(k): v for k, v in json.loads(path.read_text()).items()}
    import spikeinterface.full as si

    from spikeinterface.core.globals import get_global_job_kwargs, set_global_job_kwargs

    saved = get_global_job_kwargs()
    set_global_job_kwargs(n_jobs=n_jobs, progress_bar=False)
    try:
        analyzer = si.create_sorting_analyzer(gt, rec, sparse=True, format="memory", return_in_uV=False)
        analyzer.compute("random_spikes", max_spikes_per_unit=300, seed=0)
        analyzer.compute("noise_levels")
        analyzer.compute("templates")
        snrs = si.compute_snrs(analyzer)
    finally:
        set_global_job_kwargs(**saved)
    snrs = {str(k): float(v) for k, v in snrs.items()}
    path.write_text(json.dumps(snrs))
    return snrs


# ---------------------------------------------------------------------------------------------
# running one sorter in a subprocess


def warm_page_cache(folder: Path, block: int = 1 << 24):
    """Read every file under folder once, so that each sorter starts with the recording in the
    page cache. Without it the first sorter of a case paid the cold read from disk for all: the
    300 s x 128 ch recording (4.3 GB) read at ~570 MB/s here, 8+ s of dartsort's preprocessing,
    which runs first, while the peers found it cached."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(block):
                    pass


def run_in_subprocess(kind: str, sorter: str, recording_folder: Path, out_folder: Path, *,
                      params: dict | None = None, timeout: float = 3600.0, n_jobs: int = 1,
                      sample_interval: float = 0.25, log=print) -> dict:
    """Run `sorter` (kind="sorter") or the SI motion yardstick (kind="motion") in a child process.

    Returns a dict: status ("ok" | "timeout" | "error"), wall_s (time of the sorting call
    itself, measured in the child; the whole child's time on timeout/error), process_s
    (child's whole life, imports included), peak_mem_gb, error (traceback text or None),
    and the paths the child wrote (sorting_path / motion_path).
    """
    out_folder = Path(out_folder)
    if out_folder.exists():
        shutil.rmtree(out_folder)
    out_folder.mkdir(parents=True)
    spec = dict(kind=kind, sorter=sorter, recording_folder=str(recording_folder), out_folder=str(out_folder),
                params=params or {}, n_jobs=int(n_jobs))
    spec_path = out_folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    result_path = out_folder / "result.json"
    log_path = out_folder / "child.log"

    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_child", str(spec_path)],
                                stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = _MemorySampler(proc.pid, sample_interval)
        sampler.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc)
        finally:
            sampler.stop()
    process_s = time.perf_counter() - t0

    child = json.loads(result_path.read_text()) if result_path.exists() else {}
    peak_bytes = max(sampler.peak_bytes, child.get("self_maxrss_bytes", 0))
    res = dict(status="ok", wall_s=child.get("wall_s"), process_s=process_s,
               peak_mem_gb=peak_bytes / 2**30 if peak_bytes else None, error=None,
               sorting_path=child.get("sorting_path"), motion_path=child.get("motion_path"),
               returncode=proc.returncode, log_path=str(log_path))
    if timed_out:
        res.update(status="timeout", wall_s=process_s, error=f"killed after the {timeout:.0f} s limit")
    elif child.get("status") != "ok":
        tail = _tail(log_path, 4000)
        res.update(status="error", wall_s=child.get("wall_s") or process_s,
                   error=child.get("error") or f"child exited with code {proc.returncode}:\n{tail}")
    return res


class _MemorySampler(threading.Thread):
    """Peak of the summed RSS over a process and all its descendants, sampled periodically."""

    def __init__(self, pid, interval):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_bytes = 0
        self._stop_evt = threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop_evt.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop_evt.wait(self.interval)

    def stop(self):
        self._stop_evt.set()
        self.join(timeout=5)


def _kill_tree(proc: subprocess.Popen):
    """Kill the child we started and its descendants (it leads its own process group)."""
    try:
        import psutil

        kids = psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        kids = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for k in kids:  # descendants that left the group
        try:
            k.kill()
        except Exception:
            pass
    proc.wait()


def _tail(path: Path, n: int) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    # progress bars write carriage returns: keep only the last state of each line
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines())
    return text[-n:]


def _child_main(spec_path: str) -> int:
    """Entry point of the child process: run one sorter (or SI motion) and write result.json."""
    import resource

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out_folder"])
    result = dict(status="error", wall_s=None)
    t0 = None
    try:
        import spikeinterface.full as si

        import dartsort_si  # noqa: F401  (registers our sorter under "dartsort")

        si.set_global_job_kwargs(n_jobs=spec["n_jobs"], progress_bar=False)
        rec = si.load(spec["recording_folder"])
        if spec["kind"] == "sorter":
            params = dict(spec["params"])
            if spec["sorter"] == OURS:
                params.setdefault("n_jobs", spec["n_jobs"])
            t0 = time.perf_counter()
            sorting = si.run_sorter(spec["sorter"], rec, folder=out / "sorter", remove_existing_folder=True,
                                    verbose=False, raise_error=True, **params)
            result["wall_s"] = time.perf_counter() - t0
            sorting_path = out / "sorting.npz"
            si.NpzSortingExtractor.write_sorting(sorting, sorting_path)
            result["sorting_path"] = str(sorting_path)
        elif spec["kind"] == "motion":
            t0 = time.perf_counter()
            motion_folder = si_motion_yardstick(rec, out / "si_motion_info", **spec["params"])
            result["wall_s"] = time.perf_counter() - t0
            result["motion_path"] = str(motion_folder)
        else:
            raise ValueError(f"unknown kind {spec['kind']!r}")
        result["status"] = "ok"
    except BaseException:
        result["error"] = traceback.format_exc()
        if t0 is not None:
            result["wall_s"] = time.perf_counter() - t0
    ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    ru_kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result["self_maxrss_bytes"] = max(ru_self, ru_kids)
    (out / "result.json").write_text(json.dumps(result))
    if result["status"] != "ok":
        print(result["error"], file=sys.stderr)
    return 0 if result["status"] == "ok" else 1


def si_motion_yardstick(rec, folder, preset="dredge_fast", rigid=None, **estimate_motion_kwargs):
    """SpikeInterface's own DREDge ("dredge_ap") on the preprocessed recording; returns the motion folder.

    Preprocessing is SpikeInterface's usual one for motion estimation: bandpass 300-6000 Hz and
    common median reference (no whitening). compute_motion runs detect_peaks (locally_exclusive) +
    localize_peaks (grid_convolution for "dredge_fast") + estimate_motion(method="dredge_ap").
    """
    import spikeinterface.full as si

    pre = si.common_reference(si.bandpass_filter(rec, freq_min=300.0, freq_max=6000.0), operator="median")
    kwargs = dict(estimate_motion_kwargs)
    if rigid is not None:
        kwargs["rigid"] = rigid
    si.compute_motion(pre, preset=preset, folder=folder, overwrite=True, estimate_motion_kwargs=kwargs)
    return Path(folder)


# ---------------------------------------------------------------------------------------------
# scoring


def score_sorting(gt, sorting, snrs: dict | None = None, info: dict | None = None) -> dict:
    """compare_sorter_to_ground_truth (exhaustive_gt=True) summary + per-GT-unit accuracy and SNR.

    With `snrs`: also detectable_well_detected / n_detectable (the GT units with SNR >= 5). `losses`
    lists the GT units with accuracy < 0.8 (see unit_losses); `info["unit_locations"]` (rows in
    gt.unit_ids order) gives each one's nearest GT neighbour.
    """
    import spikeinterface.full as si

    cmp = si.compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True)
    perf = cmp.get_performance(method="by_unit")
    unit_ids = [str(u) for u in perf.index]
    acc = perf["accuracy"].to_numpy(dtype=float)
    snr = [(snrs or {}).get(u, math.nan) for u in unit_ids]
    return dict(
        n_units=int(len(sorting.unit_ids)),
        n_gt_units=int(len(gt.unit_ids)),
        well_detected=int(cmp.count_well_detected_units(WELL_DETECTED)),
        mean_accuracy=float(np.nanmean(acc)) if len(acc) else 0.0,
        mean_precision=float(np.nanmean(perf["precision"].to_numpy(dtype=float))) if len(acc) else 0.0,
        mean_recall=float(np.nanmean(perf["recall"].to_numpy(dtype=float))) if len(acc) else 0.0,
        false_positive_units=int(cmp.count_false_positive_units()),
        redundant_units=int(cmp.count_redundant_units()),
        overmerged_units=int(cmp.count_overmerged_units()),
        per_unit=dict(unit_ids=unit_ids, accuracy=acc.tolist(), snr=snr),
        **detectable_counts(acc, snr if snrs is not None else None),
        losses=unit_losses(cmp, dict(zip(unit_ids, acc.tolist())), snrs or {}, info),
    )


def detectable_counts(acc, snr) -> dict:
    """Of the GT units with SNR >= DETECTABLE_SNR, how many have accuracy >= WELL_DETECTED (None without SNRs)."""
    if snr is None:
        return dict(detectable_well_detected=None, n_detectable=None)
    detectable = np.asarray(snr, dtype=float) >= DETECTABLE_SNR  # NaN SNR: not counted
    well = np.asarray(acc, dtype=float) >= WELL_DETECTED
    return dict(detectable_well_detected=int((detectable & well).sum()), n_detectable=int(detectable.sum()))


def unit_losses(cmp, accuracy: dict, snrs: dict, info: dict | None) -> list[dict]:
    """One dict per GT unit with accuracy < WELL_DETECTED: unit, snr, accuracy, kind (see loss_kind)
    and its nearest GT neighbour (neighbour, neighbour_um, neighbour_snr) when unit locations are known."""
    agree = cmp.agreement_scores
    agree = agree.set_axis([str(u) for u in agree.index], axis=0).set_axis([str(u) for u in agree.columns], axis=1)
    near = nearest_gt_units([str(u) for u in cmp.sorting1.unit_ids], info, snrs)
    losses = []
    for unit, acc in accuracy.items():
        if acc >= WELL_DETECTED:
            continue
        loss = dict(unit=unit, snr=snrs.get(unit), accuracy=float(acc), **loss_kind(agree, unit))
        losses.append(loss | near.get(unit, {}))
    return losses


def loss_kind(agree, unit: str) -> dict:
    """How a GT unit is lost, from the agreement scores (GT x sorted):
    absent: no sorted unit agrees > MIN_AGREEMENT; merged: its best sorted unit also agrees with other
    GT units (with_gt); split: 2+ sorted units agree with it (n_units); else poor."""
    scores = agree.loc[unit] if unit in agree.index else None
    if scores is None or not len(scores) or scores.max() < MIN_AGREEMENT:
        return dict(kind="absent")
    best = scores.idxmax()
    others = [g for g in agree.index if g != unit and agree.at[g, best] > MIN_AGREEMENT]
    if others:
        return dict(kind="merged", with_gt=others)
    hits = int((scores > MIN_AGREEMENT).sum())
    if hits >= 2:
        return dict(kind="split", n_units=hits)
    return dict(kind="poor")


def nearest_gt_units(gt_ids: list[str], info: dict | None, snrs: dict) -> dict:
    """{unit: dict(neighbour, neighbour_um, neighbour_snr)}: nearest other GT unit in (x, y) on the probe."""
    locs = None if info is None else info.get("unit_locations")
    if locs is None or len(locs) != len(gt_ids) or len(gt_ids) < 2:
        return {}
    xy = np.asarray(locs, dtype=float)[:, :2]
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    out = {}
    for i, j in enumerate(dist.argmin(axis=1)):
        out[gt_ids[i]] = dict(neighbour=gt_ids[j], neighbour_um=float(dist[i, j]), neighbour_snr=snrs.get(gt_ids[j]))
    return out


def loss_text(loss: dict) -> str:
    """'GT 12: SNR 4.2, acc 0.31, merged with GT 5; nearest GT 5 at 18 um (SNR 9.1)'."""
    kind = loss["kind"]
    if kind == "merged":
        kind = "merged with GT " + ",".join(loss["with_gt"])
    elif kind == "split":
        kind = f"split into {loss['n_units']} units"
    text = f"GT {loss['unit']}: SNR {_f(loss.get('snr'), '.1f')}, acc {loss['accuracy']:.2f}, {kind}"
    if loss.get("neighbour") is not None:
        text += (f"; nearest GT {loss['neighbour']} at {loss['neighbour_um']:.0f} um "
                 f"(SNR {_f(loss.get('neighbour_snr'), '.1f')})")
    return text


def truth_grid(info: dict, recording) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times_s (T,), unit depths (U,), true displacement (T, U)) of the units on the probe."""
    t = np.asarray(info["displacement_times_s"], dtype=float)
    disp = np.asarray(info["displacement_um"], dtype=float)
    z = np.asarray(info["unit_locations"], dtype=float)[:, 1]
    keep_t = t <= recording.get_duration() + 1e-9
    geom_z = recording.get_channel_locations()[:, 1]
    keep_u = (z >= geom_z.min()) & (z <= geom_z.max())
    if not keep_u.any():
        keep_u[:] = True
    return t[keep_t], z[keep_u], disp[np.ix_(keep_t, keep_u)]


def motion_error(estimate: np.ndarray, truth: np.ndarray) -> dict:
    """Mean absolute error (um) between estimated and true displacement on a (time, depth) grid.

    Motion is only defined up to a constant (each method picks its own reference), so the median of
    (estimate - truth) over the grid is removed first; that constant is reported as offset_um.
    Also reported: the error with a per-depth constant removed (depthwise_mae_um), the error if
    the estimate's sign were flipped (flipped_mae_um: a much smaller value flags a sign-convention
    bug), and the error of a zero estimate (no correction; zero_mae_um) for scale.
    """
    estimate, truth = np.asarray(estimate, float), np.asarray(truth, float)

    def _mae(e):
        d = e - truth
        return float(np.mean(np.abs(d - np.median(d)))), float(np.median(d))

    mae, offset = _mae(estimate)
    d = estimate - truth
    depthwise = float(np.mean(np.abs(d - np.median(d, axis=0, keepdims=True))))
    return dict(mae_um=mae, offset_um=offset, depthwise_mae_um=depthwise, flipped_mae_um=_mae(-estimate)[0],
                zero_mae_um=_mae(np.zeros_like(truth))[0], max_abs_err_um=float(np.abs(d - offset).max()))


def evaluate_si_motion(motion, times, depths) -> np.ndarray:
    """A SpikeInterface Motion evaluated on the grid -> (T, U)."""
    T, Z = np.meshgrid(times, depths, indexing="ij")
    est = motion.get_displacement_at_time_and_depth(T.ravel(), Z.ravel(), segment_index=0)
    return np.asarray(est, dtype=float).reshape(T.shape)


def dartsort_motion_estimate(sorter_output: Path, times, depths) -> tuple[np.ndarray | None, str]:
    """dartsort's own motion on the grid, from si_motion/ (or motion_info.npz). (None, why) if absent."""
    work = Path(sorter_output) / "dartsort"
    si_motion = work / "si_motion"
    if si_motion.exists():
        from spikeinterface.core.motion import Motion

        return evaluate_si_motion(Motion.load(si_motion), times, depths), "si_motion"
    npz = work / "motion_info.npz"
    if npz.exists():
        from dartsort_si import MotionInfo

        mi = MotionInfo.load(npz)
        T, Z = np.meshgrid(times, depths, indexing="ij")
        return np.asarray(mi.disp_at_s(T, Z), dtype=float).reshape(T.shape), "motion_info.npz"
    return None, "no motion output"


def load_si_motion(folder: Path):
    from spikeinterface.core.motion import Motion

    return Motion.load(Path(folder) / "motion")


def read_timings(sorter_output: Path) -> dict | None:
    path = Path(sorter_output) / "dartsort" / "timings.json"
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------
# one case, all sorters


@dataclass
class Row:
    case: str
    sorter: str
    status: str
    wall_s: float | None = None
    peak_mem_gb: float | None = None
    time_ratio: float | None = None
    n_units: int | None = None
    n_gt_units: int | None = None
    well_detected: int | None = None
    detectable_well_detected: int | None = None  # of the n_detectable GT units with SNR >= 5
    n_detectable: int | None = None
    mean_accuracy: float | None = None
    mean_precision: float | None = None
    mean_recall: float | None = None
    false_positive_units: int | None = None
    redundant_units: int | None = None
    overmerged_units: int | None = None
    motion: dict | None = None
    error: str | None = None
    per_unit: dict | None = field(default=None, repr=False)
    motion_trace: dict | None = field(default=None, repr=False)
    timings: dict | None = None
    reused: bool = False  # a peer's stored result (--reuse-peers), scored again
    losses: list | None = field(default=None, repr=False)  # GT units with accuracy < 0.8 (unit_losses)


def reuse_key(sorter: str, params: dict | None, n_jobs: int) -> dict:
    """What must match for a stored peer result to stand in for a new run (reuse_key.json)."""
    import spikeinterface

    key = dict(sorter=sorter, params=params or {}, n_jobs=int(n_jobs), spikeinterface=spikeinterface.__version__)
    return json.loads(json.dumps(key))  # tuples -> lists, as read back


def save_run_stats(folder: Path, res: dict, key: dict):
    """Write row_stats.json (status, times, peak memory) and reuse_key.json beside a run's result.json."""
    folder = Path(folder)
    stats = {k: res.get(k) for k in ("status", "wall_s", "process_s", "peak_mem_gb")}
    (folder / "row_stats.json").write_text(json.dumps(stats))
    (folder / "reuse_key.json").write_text(json.dumps(key))


def load_reusable(folder: Path, key: dict) -> dict | None:
    """A finished run's result (as run_in_subprocess returns it, reused=True) if `folder` holds one
    whose reuse_key.json equals `key`; else None."""
    folder = Path(folder)
    try:
        result = json.loads((folder / "result.json").read_text())
        stats = json.loads((folder / "row_stats.json").read_text())
        stored_key = json.loads((folder / "reuse_key.json").read_text())
    except (OSError, ValueError):
        return None
    ok = result.get("status") == "ok" and stats.get("status") == "ok" and (folder / "sorting.npz").exists()
    if not ok or stored_key != key:
        return None
    return dict(status="ok", wall_s=stats.get("wall_s"), process_s=stats.get("process_s"),
                peak_mem_gb=stats.get("peak_mem_gb"), error=None, sorting_path=str(folder / "sorting.npz"),
                motion_path=None, reused=True)


def run_limit(name: str, later_jobs: int, timeouts: dict, default_timeout: float,
              deadline: float | None, reserve_s: float) -> float | None:
    """A run's wall-time limit: its timeout, cut to what is left of the budget (keeping reserve_s for
    each of the `later_jobs` runs from this one on, and the report); None when no time is left."""
    limit = float(timeouts.get(name, default_timeout))
    if deadline is None:
        return limit
    left = deadline - time.time() - reserve_s * later_jobs
    return None if left < min(limit, 10.0) else min(limit, left)


def run_case(case: Case, sorters: list[str], *, cache_dir: Path = DEFAULT_CACHE, params: dict | None = None,
             timeouts: dict | None = None, default_timeout: float = 3600.0, n_jobs: int = 1,
             si_motion: bool = True, profile: bool = False, clean_outputs: bool = False,
             deadline: float | None = None, reserve_s: float = 4.0, reuse_peers: bool = False,
             log=print) -> list[Row]:
    """Generate/load `case`, run each sorter (+ the SI motion yardstick) and score them all.

    deadline: a time.time() by which every run must be over (from --budget); each run's limit is
    then cut to what is left, keeping `reserve_s` per later run, and runs with no time left are
    reported as "skipped".
    reuse_peers: a peer (not dartsort) with a stored ok result for the same run (load_reusable) is
    not run again; its stored sorting, wall time and peak memory are used and scored again.
    """
    import spikeinterface.full as si

    params, timeouts = params or {}, timeouts or {}
    rec, gt, info, gt_folder = prepare_case(case, cache_dir, n_jobs=n_jobs, log=log)
    snrs = gt_unit_snrs(rec, gt, gt_folder, n_jobs=n_jobs)
    times, depths, truth = truth_grid(info, rec)
    runs_dir = Path(cache_dir) / "runs" / case.name
    rows = []

    # the motion yardstick is cheap: run it first so a tight --budget never starves it
    jobs = ([("motion", SI_MOTION)] if si_motion else []) + [("sorter", s) for s in sorters]
    for i, (kind, name) in enumerate(jobs):
        key = reuse_key(name, params.get(name), n_jobs)
        res = None
        if reuse_peers and kind == "sorter" and name != OURS:
            res = load_reusable(runs_dir / name, key)
            if res is not None:
                log(f"[{case.name}] {name}: reused the stored result in {runs_dir / name}")
        if res is None:
            limit = run_limit(name, len(jobs) - i, timeouts, default_timeout, deadline, reserve_s)
            if limit is None:
                log(f"[{case.name}] {name}: skipped, no time left in the budget")
                rows.append(Row(case=case.name, sorter=name, status="skipped",
                                error="not run: no time left in the --budget"))
                continue
            log(f"[{case.name}] {name}: running (limit {limit:.0f} s) ...")
            warm_page_cache(gt_folder / "recording")
            res = run_in_subprocess(kind, name, gt_folder / "recording", runs_dir / name,
                                    params=params.get(name), timeout=limit, n_jobs=n_jobs, log=log)
            save_run_stats(runs_dir / name, res, key)
        row = Row(case=case.name, sorter=name, status=res["status"], wall_s=res["wall_s"],
                  peak_mem_gb=res["peak_mem_gb"], error=res["error"], reused=bool(res.get("reused")))
        try:
            if res["status"] == "ok" and kind == "sorter":
                sorting = si.NpzSortingExtractor(res["sorting_path"])
                scores = score_sorting(gt, sorting, snrs, info)
                for k, v in scores.items():
                    setattr(row, k, v)
            est = None
            if kind == "sorter" and name == OURS:
                sorter_output = runs_dir / name / "sorter" / "sorter_output"
                row.timings = read_timings(sorter_output)  # partial on timeout/error: still telling
                # the motion files are written atomically once that stage is done, so a run killed
                # later (timeout) still has a motion estimate worth scoring
                est, source = dartsort_motion_estimate(sorter_output, times, depths)
                if est is None and res["status"] == "ok":
                    log(f"[{case.name}] {name}: {source}; no motion error")
            elif kind == "motion" and res["status"] == "ok":
                est = evaluate_si_motion(load_si_motion(res["motion_path"]), times, depths)
            if est is not None:
                row.motion = motion_error(est, truth)
                row.motion_trace = dict(estimate=(est - row.motion["offset_um"]).tolist())
        except Exception:
            row.status, row.error = "error", "evaluation failed:\n" + traceback.format_exc()
        log(f"[{case.name}] {name}: {row.status}"
            + (f" in {row.wall_s:.1f} s" if row.wall_s is not None else "")
            + (" (reused)" if row.reused else "")
            + (f", {row.well_detected}/{row.n_gt_units} well detected" if row.well_detected is not None else "")
            + (f" ({row.detectable_well_detected}/{row.n_detectable} with SNR >= {DETECTABLE_SNR:g})"
               if row.n_detectable is not None else "")
            + (f", motion error {row.motion['mae_um']:.2f} um" if row.motion else ""))
        if row.error:
            log(f"[{case.name}] {name}: {row.status}: {_last_lines(row.error, 6)}")
        if profile and name == OURS:
            print_profile(row.timings, case.name, log)
        rows.append(row)
        if clean_outputs:
            shutil.rmtree(runs_dir / name / "sorter", ignore_errors=True)

    # time ratio to the fastest peer that finished
    peer_times = [r.wall_s for r in rows if r.sorter not in (OURS, SI_MOTION) and r.status == "ok" and r.wall_s]
    if peer_times:
        fastest = min(peer_times)
        for r in rows:
            if r.status == "ok" and r.wall_s and r.sorter != SI_MOTION:
                r.time_ratio = r.wall_s / fastest
    # truth for the figure (a few depths are enough, but keep them all: U is small)
    for r in rows:
        if r.motion_trace is not None:
            r.motion_trace.update(times_s=times.tolist(), depths_um=depths.tolist(), truth=truth.tolist())
    return rows


def _last_lines(text: str, n: int) -> str:
    lines = [x for x in (text or "").strip().splitlines() if x.strip()]
    return " | ".join(lines[-n:])


def print_profile(timings: dict | None, case_name: str, log=print):
    if not timings:
        log(f"[{case_name}] dartsort profile: no timings.json")
        return
    total = sum(timings.values())
    log(f"[{case_name}] dartsort time per stage (timings.json):")
    for k, v in timings.items():
        log(f"    {k:<32s} {v:8.1f} s  {100 * v / total:5.1f}%")
    log(f"    {'total':<32s} {total:8.1f} s")


# ---------------------------------------------------------------------------------------------
# reporting

COLUMNS = ["case", "sorter", "status", "units", "well det.", "det. well", "mean acc", "mean prec", "mean rec", "FP units",
           "redundant", "wall s", "x fastest peer", "peak GB", "motion err um"]


def _f(x, fmt):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def rows_to_markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        name = r.sorter + (" (ours)" if r.sorter == OURS else " (motion only)" if r.sorter == SI_MOTION else "")
        name += " (reused)" if r.reused else ""
        well = f"{r.well_detected}/{r.n_gt_units}" if r.well_detected is not None else "–"
        det = f"{r.detectable_well_detected}/{r.n_detectable}" if r.n_detectable is not None else "–"
        cells = [r.case, name, r.status, _f(r.n_units, "d"), well, det, _f(r.mean_accuracy, ".3f"),
                 _f(r.mean_precision, ".3f"), _f(r.mean_recall, ".3f"), _f(r.false_positive_units, "d"),
                 _f(r.redundant_units, "d"), _f(r.wall_s, ".1f"), _f(r.time_ratio, ".2f"),
                 _f(r.peak_mem_gb, ".2f"), _f(r.motion["mae_um"] if r.motion else None, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_seed(case_name: str) -> tuple[str, int | None]:
    """'nonrigid_np1_60s_128ch_40u_seed3' -> ('nonrigid_np1_60s_128ch_40u', 3)."""
    m = re.fullmatch(r"(.*)_seed(\d+)", case_name)
    return (m[1], int(m[2])) if m else (case_name, None)


def seed_cell(r: Row | None) -> str:
    """'33/40 (31/33 det.)': well detected / GT units (of the GT units with SNR >= 5)."""
    if r is None:
        return "–"
    if r.well_detected is None:
        return r.status
    det = f" ({r.detectable_well_detected}/{r.n_detectable} det.)" if r.n_detectable is not None else ""
    return f"{r.well_detected}/{r.n_gt_units}{det}"


def mean_cell(rows: list[Row | None]) -> str:
    """seed_cell's numbers averaged over the seeds a sorter finished (' n=2' when not all)."""
    done = [r for r in rows if r is not None and r.well_detected is not None]
    if not done:
        return "–"

    def avg(attr):
        x = float(np.mean([getattr(r, attr) for r in done]))
        return _fmt_num(x) if x.is_integer() else f"{x:.1f}"

    text = f"{avg('well_detected')}/{avg('n_gt_units')}"
    if all(r.n_detectable is not None for r in done):
        text += f" ({avg('detectable_well_detected')}/{avg('n_detectable')} det.)"
    return text + (f" n={len(done)}" if len(done) < len(rows) else "")


def seed_summary_markdown(rows: list[Row]) -> str:
    """One line per (case without seed, seed), a cell per sorter (seed_cell), then a 'mean' line per
    case run with 2+ seeds."""
    sorters = list(dict.fromkeys(r.sorter for r in rows if r.sorter != SI_MOTION))
    if not sorters:
        return ""
    groups: dict[str, dict] = {}
    for r in rows:
        base, seed = split_seed(r.case)
        groups.setdefault(base, {}).setdefault(seed, {})[r.sorter] = r
    cols = ["case", "seed", *sorters]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for base, by_seed in groups.items():
        for seed in sorted(by_seed, key=lambda x: -1 if x is None else x):
            cells = [base, _f(seed, "d"), *(seed_cell(by_seed[seed].get(s)) for s in sorters)]
            lines.append("| " + " | ".join(cells) + " |")
        if len(by_seed) > 1:
            cells = [base, "mean", *(mean_cell([by_seed[x].get(s) for x in by_seed]) for s in sorters)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def losses_markdown(rows: list[Row]) -> str:
    """The GT units each sorter lost (accuracy < 0.8), grouped by case then sorter, a line each."""
    by_case: dict[str, list[Row]] = {}
    for r in rows:
        if r.losses is not None:
            by_case.setdefault(r.case, []).append(r)
    out = []
    for case, crow in by_case.items():
        out += [f"### {case}", ""]
        for r in crow:
            head = f"**{r.sorter}**: {len(r.losses)} of {r.n_gt_units} GT units below {WELL_DETECTED:g}"
            out += [head + (":" if r.losses else ""), ""]
            if r.losses:
                out += [f"- {loss_text(x)}" for x in r.losses] + [""]
    return "\n".join(out).rstrip()


def motion_notes(rows: list[Row]) -> str:
    out = []
    seen = set()
    for r in rows:
        if r.motion and r.case not in seen:
            seen.add(r.case)
            out.append(f"- {r.case}: a zero estimate (no correction) would score {r.motion['zero_mae_um']:.2f} um.")
    for r in rows:
        if r.motion and r.motion["flipped_mae_um"] < 0.5 * r.motion["mae_um"]:
            out.append(f"- WARNING {r.case} / {r.sorter}: the sign-flipped estimate fits the truth better "
                       f"({r.motion['flipped_mae_um']:.2f} vs {r.motion['mae_um']:.2f} um): sign convention?")
    return "\n".join(out)


def make_figure(rows: list[Row], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows))
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 4.2 * len(cases)), squeeze=False)
    markers = "os^Dvx*P"
    for i, case in enumerate(cases):
        crow = [r for r in rows if r.case == case]
        ax = axes[i, 0]
        for j, r in enumerate(x for x in crow if x.per_unit):
            snr = np.asarray(r.per_unit["snr"], float)
            ax.scatter(snr, r.per_unit["accuracy"], marker=markers[j % len(markers)], alpha=0.75,
                       label=f"{r.sorter} ({r.well_detected}/{r.n_gt_units})")
        if not any(x.per_unit for x in crow):
            ax.text(0.5, 0.5, "no sorting finished", ha="center", va="center", transform=ax.transAxes)
        ax.axhline(WELL_DETECTED, color="gray", lw=0.8, ls=":")
        ax.set(xlabel="GT unit SNR", ylabel="accuracy", ylim=(-0.03, 1.03), title=f"{case}: accuracy vs SNR")
        if any(x.per_unit for x in crow):
            ax.legend(fontsize=8, loc="lower right")

        ax = axes[i, 1]
        mrows = [r for r in crow if r.motion_trace]
        if mrows:
            tr = mrows[0].motion_trace
            t, z, truth = np.asarray(tr["times_s"]), np.asarray(tr["depths_um"]), np.asarray(tr["truth"])
            order = np.argsort(z)
            pick = order[np.unique(np.linspace(0, len(z) - 1, min(4, len(z))).round().astype(int))]
            colors = plt.cm.viridis(np.linspace(0, 0.9, len(pick)))
            styles = {OURS: "--", SI_MOTION: ":"}
            # one trace per picked depth, stacked: displacement + a fixed spacing, so errors are visible
            spacing = 2.5 * max(float(np.abs(truth).max()), 5.0)
            for k, (c, u) in enumerate(zip(colors, pick)):
                ax.plot(t, truth[:, u] + k * spacing, color=c, lw=4, alpha=0.35)
                for r in mrows:
                    est = np.asarray(r.motion_trace["estimate"])
                    ax.plot(t, est[:, u] + k * spacing, color=c, lw=1.3, ls=styles.get(r.sorter, "-."))
            ax.set_yticks([k * spacing for k in range(len(pick))], [f"z={z[u]:.0f}" for u in pick])
            handles = [plt.Line2D([], [], color="gray", lw=4, alpha=0.35, label="truth")]
            handles += [plt.Line2D([], [], color="k", lw=1.3, ls=styles.get(r.sorter, "-."),
                                   label=f"{r.sorter} ({r.motion['mae_um']:.2f} um MAE)") for r in mrows]
            ax.legend(handles=handles, fontsize=8, loc="upper right")
            ax.set(xlabel="time (s)", ylabel=f"displacement (um; traces {spacing:.0f} um apart) at unit depth",
                   title=f"{case}: motion vs truth (offset removed)")
        else:
            ax.text(0.5, 0.5, "no motion estimate", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_results(rows: list[Row], results_dir: Path, tag: str, meta: dict) -> dict:
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    table = rows_to_markdown(rows)
    seeds = seed_summary_markdown(rows)
    losses = losses_markdown(rows)
    notes = motion_notes(rows)
    png = make_figure(rows, results_dir / f"{tag}.png")
    md = [f"# dartsort-si benchmark: {tag}", "",
          f"{meta['started']}, {meta['host_cpus']} CPUs (1-min load average {meta.get('load_avg_start', 0):.1f} "
          f"at start, {meta.get('load_avg_end', 0):.1f} at end), total {meta['total_s']:.0f} s. "
          f"Sorters: {', '.join(meta['sorters'])}. n_jobs={meta['n_jobs']}.", "", table, ""]
    if seeds:
        md += [f"Per seed: well detected / GT units (accuracy >= {WELL_DETECTED:g}), and in brackets of the GT "
               f"units with SNR >= {DETECTABLE_SNR:g}; 'mean' averages over the seeds each sorter finished "
               "(n= when not all).", "", seeds, ""]
    if notes:
        md += ["Motion error = mean |estimate - truth| (um) over a grid of displacement times x GT unit depths, "
               "after removing the median offset.", "", notes, ""]
    errs = [r for r in rows if r.error]
    if errs:
        md += ["## Errors and timeouts", ""]
        for r in errs:
            md += [f"### {r.case} / {r.sorter}: {r.status}", "", "```", _tail_text(r.error, 3000), "```", ""]
    if losses:
        md += ["## Missed units", "",
               f"GT units with accuracy < {WELL_DETECTED:g}. absent: no sorted unit agrees > {MIN_AGREEMENT:g}; "
               f"merged: its best sorted unit also agrees > {MIN_AGREEMENT:g} with the GT units named; split: "
               f"2+ sorted units agree > {MIN_AGREEMENT:g}; poor: otherwise. Nearest GT unit: in x, y on the probe.",
               "", losses, ""]
    md += [f"![figure]({png.name})", ""]
    (results_dir / f"{tag}.md").write_text("\n".join(md))
    data = dict(meta=meta, rows=[asdict(r) for r in rows])
    (results_dir / f"{tag}.json").write_text(json.dumps(data, indent=1, default=_json_default))
    return dict(markdown=results_dir / f"{tag}.md", json=results_dir / f"{tag}.json", png=png, table=table,
                seeds=seeds, losses=losses, notes=notes)


def _tail_text(text, n):
    return text if len(text) <= n else "...\n" + text[-n:]


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ---------------------------------------------------------------------------------------------
# command line


def available_sorters(requested: list[str] | None = None) -> list[str]:
    import spikeinterface.sorters as ss

    import dartsort_si  # noqa: F401

    installed = set(ss.installed_sorters())
    if requested:
        return requested
    return [OURS, *ALWAYS_PEERS, *[s for s in OPTIONAL_PEERS if s in installed]]


def _csv(text, cast=str):
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def parse_timeouts(text: str | None, fallback: float) -> tuple[float, dict]:
    """'600' or '600,kilosort4=3600,dartsort=1200' -> (default, {sorter: limit})."""
    default, per = fallback, {}
    for item in _csv(text or ""):
        if "=" in item:
            k, v = item.split("=", 1)
            per[k.strip()] = float(v)
        else:
            default = float(item)
    return default, per


def parse_params(items: list[str] | None) -> dict:
    """['dartsort={"n_jobs": 2}', ...] -> {sorter: params}."""
    out = {}
    for item in items or []:
        k, v = item.split("=", 1)
        out[k.strip()] = json.loads(v)
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one 30 s x 64 ch rigid-drift case, dartsort + "
                      "tridesclous2 + spykingcircus2, short limits (< 5 min on 2 cores)")
    size.add_argument("--medium", action="store_true", help="300 s x 128 ch, rigid + nonrigid drift")
    size.add_argument("--standard", action="store_true", help="120 s x 128 ch, all four drift cases (default)")
    size.add_argument("--large", action="store_true", help="600 s x 384 ch, all drift cases, NP1 and NP2")
    size.add_argument("--heldout", action="store_true", help="60 s x 128 ch, 40 units, 20 um drift: nonrigid on "
                      "NP1 and NP2 and static on NP1 (the same units and spike trains), seeds 1-5; dartsort, "
                      "spykingcircus2, tridesclous2; 1800 s per run")
    p.add_argument("--cases", help=f"comma list of drift cases: {','.join(DRIFTS)}")
    p.add_argument("--probes", help="comma list of probe versions: 1 (Neuropixels 1.0) and/or 2 (2.0)")
    p.add_argument("--durations", help="comma list of durations in s")
    p.add_argument("--channels", help="comma list of channel counts")
    p.add_argument("--num-units", type=int, default=None, help="GT units (default: channels // 3; --heldout: 40)")
    p.add_argument("--drift-um", type=float, default=None, help=f"drift amplitude in um (default "
                   f"{_fmt_num(DEFAULT_DRIFT_UM)}; any other value adds _drift<um> to the case names)")
    p.add_argument("--seed", type=int, default=None, help="generator seed of every case (default 0)")
    p.add_argument("--seeds", help="comma list of seeds: every case is run once per seed, and the markdown "
                   "gets a per-seed summary with a mean over seeds (default: --seed; --heldout: 1,2,3,4,5)")
    p.add_argument("--amplitudes", metavar="LOW,HIGH", help="range of unit amplitudes in uV (generator "
                   "default 100,500 over 6-8 uV noise; 50,250 puts half the units near threshold)")
    p.add_argument("--sorters", help=f"comma list (default: {OURS}, {', '.join(ALWAYS_PEERS)}, and "
                   f"{', '.join(OPTIONAL_PEERS)} when installed)")
    p.add_argument("--timeout-per-sorter", help="wall-time limit in s per sorter run; '1800' or "
                   "'1800,kilosort4=7200' (per-sorter overrides)")
    p.add_argument("--budget", type=float, default=None, help="total wall-time budget in s for the whole "
                   "run (generation included): each run's limit is cut to what is left; runs with no time "
                   "left are 'skipped' (--quick: 285)")
    p.add_argument("--params", action="append", metavar='SORTER=JSON',
                   help='sorter params, e.g. dartsort=\'{"matching_iterations": 2}\' (repeatable)')
    p.add_argument("--reuse-peers", action="store_true", help="do not rerun a peer (any sorter but dartsort) "
                   "that already has an ok result for the same case in cache-dir/runs/<case>/<sorter>/ with the "
                   "same params, n_jobs and SpikeInterface version: score its stored sorting again, with its "
                   "stored wall time and peak memory. dartsort always reruns")
    p.add_argument("--no-si-motion", action="store_true", help="skip the SpikeInterface dredge_ap motion row")
    p.add_argument("--profile", action="store_true", help="print dartsort's time per stage after each run")
    p.add_argument("--n-jobs", type=int, default=os.cpu_count() or 1, help="workers per sorter (default: all CPUs)")
    p.add_argument("--tag", help="results file name stem (default: the preset name, or 'custom')")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--clean-outputs", action="store_true", help="delete sorter output folders after scoring")
    p.add_argument("--from-json", type=Path, help="no runs: rebuild the markdown and PNG of a results JSON")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p


def plan_from_args(args) -> dict:
    """The run's plan from the flags over the preset (default "standard"): explicit flags win."""
    preset_name = next((n for n in PRESETS if getattr(args, n)), None)
    custom = any(getattr(args, a) for a in ("cases", "probes", "durations", "channels"))
    preset = dict(PRESETS[preset_name or "standard"])
    if args.seeds:
        seeds = _csv(args.seeds, int)
    else:
        seeds = [args.seed] if args.seed is not None else preset.get("seeds", [0])
    cases = make_cases(
        _csv(args.cases) if args.cases else preset["cases"],
        _csv(args.probes, int) if args.probes else preset["probes"],
        _csv(args.durations, float) if args.durations else preset["durations"],
        _csv(args.channels, int) if args.channels else preset["channels"],
        pairs=None if args.cases or args.probes else preset.get("pairs"),
        num_units=args.num_units if args.num_units is not None else preset.get("num_units"),
        drift_um=args.drift_um if args.drift_um is not None else preset.get("drift_um", DEFAULT_DRIFT_UM),
        seeds=seeds,
        amplitudes_uv=tuple(_csv(args.amplitudes, float)) if args.amplitudes else None,
    )
    default_timeout, timeouts = parse_timeouts(args.timeout_per_sorter, preset["timeout"])
    if not args.timeout_per_sorter:
        timeouts = dict(preset.get("timeouts", {}))
    return dict(
        cases=cases, seeds=seeds, default_timeout=default_timeout, timeouts=timeouts,
        sorters=available_sorters(_csv(args.sorters) if args.sorters else preset.get("sorters")),
        params={**preset.get("params", {}), **parse_params(args.params)},
        tag=args.tag or (preset_name or "standard") + ("_custom" if custom else ""),
        budget=args.budget if args.budget is not None else preset.get("budget"),
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args._child:
        return _child_main(args._child)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        rows = [Row(**r) for r in data["rows"]]
        out = write_results(rows, args.from_json.parent, args.tag or args.from_json.stem, data["meta"])
        print_report(out)
        return 0

    plan = plan_from_args(args)
    cases, sorters, tag, budget = plan["cases"], plan["sorters"], plan["tag"], plan["budget"]
    default_timeout, timeouts, params = plan["default_timeout"], plan["timeouts"], plan["params"]
    deadline = time.time() + budget if budget else None
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = os.getloadavg()[0]
    if load_start > 0.75 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load_start:.1f} on {os.cpu_count()} CPUs: other jobs are running, "
              "times will be inflated", flush=True)
    t0 = time.perf_counter()
    print(f"benchmark {tag}: {len(cases)} case(s) (seeds {','.join(map(str, plan['seeds']))}) x sorters "
          f"{', '.join(sorters)}{' + ' + SI_MOTION if not args.no_si_motion else ''}; limit {default_timeout:.0f} s "
          f"per run{' ' + str(timeouts) if timeouts else ''}{f'; budget {budget:.0f} s' if budget else ''}; "
          f"n_jobs={args.n_jobs}{'; reusing peer results' if args.reuse_peers else ''}", flush=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows = []
    for case in cases:
        rows += run_case(case, sorters, cache_dir=args.cache_dir, params=params, timeouts=timeouts,
                         default_timeout=default_timeout, n_jobs=args.n_jobs, si_motion=not args.no_si_motion,
                         profile=args.profile, clean_outputs=args.clean_outputs, deadline=deadline,
                         reuse_peers=args.reuse_peers, log=log)
    total = time.perf_counter() - t0
    meta = dict(tag=tag, started=started, total_s=total, host_cpus=os.cpu_count(), n_jobs=args.n_jobs,
                load_avg_start=load_start, load_avg_end=os.getloadavg()[0], seeds=plan["seeds"],
                reuse_peers=args.reuse_peers, sorters=sorters, params=params,
                timeouts=dict(default=default_timeout, **timeouts), budget_s=budget,
                cases=[asdict(c) | dict(name=c.name) for c in cases], argv=sys.argv[1:])
    out = write_results(rows, args.results_dir, tag, meta)
    print_report(out)
    print(f"\ntotal time {total:.1f} s; wrote {out['markdown']}, {out['json']}, {out['png']}")
    return 0


def print_report(out: dict):
    """The main table, the per-seed summary, the motion notes and the missed units, as written."""
    print()
    print(out["table"])
    for key, head in (("seeds", "\nper seed:"), ("notes", ""), ("losses", "\nmissed units:")):
        if out.get(key):
            if head:
                print(head)
            print(out[key])


if __name__ == "__main__":
    sys.exit(main())
