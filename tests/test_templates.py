"""Registered templates: kriging between the real probe at some drift and the registered
geometry, and templates of a drifting unit that agree across drift."""

import numpy as np
import pytest
import spikeinterface.core as sc
import torch
from dredge.motion_util import get_motion_estimate

from dartsort_si.motion_info import MotionInfo
from dartsort_si.refinement import template_distance
from dartsort_si.templates import Kriging, Templates, estimate_templates, interpolation_reach

FS = 30000.0
N_BEFORE, N_AFTER = 20, 40


def np1_geom(n_rows=24):
    """Neuropixels-1.0-like checkerboard: two contacts per 20 um row, x offsets alternate."""
    return np.array([[x + (16.0 if r % 2 else 0.0), 20.0 * r] for r in range(n_rows) for x in (11.0, 43.0)])


def footprint(geom, pos, height=30.0):
    """Amplitude of a point source `height` um off the probe plane, 1 at its closest."""
    return height / np.sqrt(((geom - pos) ** 2).sum(1) + height ** 2)


def test_kriging_is_exact_on_contacts_and_smooth_between():
    geom = np1_geom()
    reach = interpolation_reach(geom)
    kr = Kriging(geom, geom, reach)
    w, ok = kr.weights(0.0)
    assert ok.all()
    np.testing.assert_allclose(w, np.eye(len(geom)), atol=0.02)
    # a spike's footprint seen from the probe moved 10 um (a quarter of the 40 um pitch)
    field = footprint(geom, np.array([30.0, 230.0]))
    moved = geom + [0.0, 10.0]
    w, ok = kr.weights(10.0)
    truth = footprint(moved, np.array([30.0, 230.0]))
    err = np.abs(w @ field - truth).max() / truth.max()
    print(f"kriging, 10 um off the contacts: max error {err:.3f} of the peak")
    assert err < 0.12
    # far off the probe there is nothing to interpolate from
    w, ok = Kriging(geom, np.array([[30.0, 2000.0]]), reach).weights(0.0)
    assert not ok.any() and not w.any()


def drifting_recording(geom, drift_um, n_spikes=120, seed=0):
    """One unit at depth 230 um; the probe moves by drift_um halfway through (rigid)."""
    rng = np.random.default_rng(seed)
    duration = 12.0
    n = int(duration * FS)
    traces = 0.2 * rng.standard_normal((n, len(geom))).astype(np.float32)
    t = np.arange(-N_BEFORE, N_AFTER)
    shape = -np.exp(-0.5 * (t / 3.0) ** 2) + 0.3 * np.exp(-0.5 * ((t - 12) / 6.0) ** 2)
    times = np.sort(rng.choice(np.arange(1000, n - 1000, 200), n_spikes, replace=False))
    second = times >= n // 2
    for s, late in zip(times, second):
        # a probe moved up by drift_um sees the unit drift_um deeper in its own coordinates
        pos = np.array([30.0, 230.0 - (drift_um if late else 0.0)])
        traces[s - N_BEFORE: s + N_AFTER] += 10 * shape[:, None] * footprint(geom, pos)[None, :]
    rec = sc.NumpyRecording(traces, FS)
    rec.set_dummy_probe_from_locations(geom)
    bins = np.arange(0.5, duration, 1.0)
    est = get_motion_estimate(np.where(bins < duration / 2, 0.0, -drift_um), time_bin_centers_s=bins)
    depths = np.where(second, 230.0 - drift_um, 230.0)
    return rec, times, second.astype(int), depths, est


@pytest.mark.parametrize("drift_um", [10.0, 20.0])
def test_drifting_unit_has_one_registered_template(drift_um):
    """Spikes from before and after a sub-pitch drift, averaged as two labels, give the
    same registered template; without motion correction they do not."""
    geom = np1_geom()
    rec, times, labels, depths, est = drifting_recording(geom, drift_um)
    kw = dict(depths_um=depths, n_before=N_BEFORE, n_after=N_AFTER, job_kwargs=dict(n_jobs=1, progress_bar=False))
    motion = MotionInfo.from_motion_est(geom=geom, dredge_motion_est=est)
    temps = estimate_templates(rec, times, labels, motion, **kw)
    still = MotionInfo.from_motion_est(geom=geom, probe_boundary_padding_um=0.0)
    raw = estimate_templates(rec, times, labels, still, **kw)
    d_reg = template_distance(*torch.as_tensor(temps.data), 1.0, 0)
    d_raw = template_distance(*torch.as_tensor(raw.data), 1.0, 0)
    print(f"drift {drift_um} um: template distance registered {d_reg:.3f}, uncorrected {d_raw:.3f}")
    assert d_reg < 0.08
    assert d_raw > 2 * d_reg


def test_channels_within_noise_of_a_mean_template_are_zeroed():
    """A low-amplitude unit averaged over 400 spikes: its footprint stays, the noise left on
    every other channel (and the fragments of far units it averaged in) goes."""
    rng = np.random.default_rng(3)
    geom = np1_geom()
    n_spikes, length = 400, N_BEFORE + N_AFTER
    t = np.arange(length)
    shape = -np.exp(-0.5 * ((t - N_BEFORE) / 2.0) ** 2)
    signal = 6.0 * shape[:, None] * footprint(geom, np.array([27.0, 100.0]))[None, :] ** 3
    mean_noise = rng.standard_normal((length, len(geom))) / np.sqrt(n_spikes)
    data = (signal + mean_noise)[None].astype(np.float32)
    temps = Templates(data, np.array([0]), np.array([n_spikes]), N_BEFORE).without_noise_channels(geom, 100.0)
    ptp = temps.data[0].max(0) - temps.data[0].min(0)
    strong = np.ptp(signal, axis=0) >= 1.5
    distance = np.linalg.norm(geom - [27.0, 100.0], axis=1)
    assert strong.sum() >= 3 and (ptp[strong] > 0).all()
    assert (ptp[distance > 150] == 0).all()
    assert (ptp[distance < 60] > 0).all()  # weak values near the unit stay


def test_a_drifted_unit_is_matched_with_its_own_footprint_there():
    """A unit 10 um off the contacts it was first seen on (half the 20 um row spacing): the
    kriged registered template loses energy there (interpolation smooths a sharp footprint);
    the drift-binned template, read on channels moved by whole pitches, keeps the real one."""
    from dartsort_si.config import load_config
    from dartsort_si.matching import TemplateMatcher
    from dartsort_si.subtraction import Geometry

    geom, drift_um, height = np1_geom(), 10.0, 12.0
    rng = np.random.default_rng(1)
    n = int(12.0 * FS)
    traces = 0.2 * rng.standard_normal((n, len(geom))).astype(np.float32)
    t = np.arange(-N_BEFORE, N_AFTER)
    shape = -np.exp(-0.5 * (t / 3.0) ** 2) + 0.3 * np.exp(-0.5 * ((t - 12) / 6.0) ** 2)
    times = np.sort(rng.choice(np.arange(1000, n - 1000, 200), 300, replace=False))
    late = times >= n // 2
    wave = {False: 10 * shape[:, None] * footprint(geom, np.array([30.0, 230.0]), height)[None, :],
            True: 10 * shape[:, None] * footprint(geom, np.array([30.0, 230.0 - drift_um]), height)[None, :]}
    for s, is_late in zip(times, late):
        traces[s - N_BEFORE: s + N_AFTER] += wave[bool(is_late)]
    rec = sc.NumpyRecording(traces, FS)
    rec.set_dummy_probe_from_locations(geom)
    bins = np.arange(0.5, 12.0, 1.0)
    est = get_motion_estimate(np.where(bins < 6.0, 0.0, -drift_um), time_bin_centers_s=bins)
    motion = MotionInfo.from_motion_est(geom=geom, dredge_motion_est=est)
    temps = estimate_templates(rec, times, np.zeros(len(times), int), motion,
                               depths_um=np.where(late, 230.0 - drift_um, 230.0), n_before=N_BEFORE,
                               n_after=N_AFTER, job_kwargs=dict(n_jobs=1, progress_bar=False))
    cfg = load_config({})

    def error_late(templates):
        matcher = TemplateMatcher(rec, templates, motion, cfg, Geometry.build(geom, cfg))
        placed = matcher.chunk_templates(9.0).base()[0].numpy()
        truth = wave[True]
        return np.linalg.norm(placed - truth) / np.linalg.norm(truth), (placed ** 2).sum() / (truth ** 2).sum()

    binned, binned_energy = error_late(temps)
    kriged, kriged_energy = error_late(Templates(temps.data, temps.unit_ids, temps.counts, temps.n_before))
    print(f"10 um off: relative error binned {binned:.3f} (energy {binned_energy:.2f}), "
          f"kriged {kriged:.3f} (energy {kriged_energy:.2f})")
    assert binned < 0.1 and binned_energy > 0.9
    assert kriged > 2 * binned
