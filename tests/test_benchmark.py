"""Smoke test of the benchmark harness (benchmarks/run_benchmark.py) on a tiny case.

Checks the plumbing, not the numbers: one row per sorter, statuses from the allowed set,
scores and times in sane ranges, the timeout path, and the written table/JSON/PNG.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rb():
    spec = importlib.util.spec_from_file_location("run_benchmark", ROOT / "benchmarks" / "run_benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_benchmark"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_motion_error_removes_constant_offset(rb):
    t = np.linspace(0, 10, 51)
    truth = np.outer(10 * np.sin(t), np.ones(5))
    err = rb.motion_error(truth + 7.0, truth)
    assert err["mae_um"] < 1e-9 and abs(err["offset_um"] - 7.0) < 1e-9
    assert err["flipped_mae_um"] > 1.0 and err["zero_mae_um"] > 1.0
    noisy = rb.motion_error(truth + 1.0 + np.random.default_rng(0).normal(0, 1, truth.shape), truth)
    assert 0.3 < noisy["mae_um"] < 1.5


def test_parsers(rb):
    assert rb.parse_timeouts("600,kilosort4=1800", 10.0) == (600.0, {"kilosort4": 1800.0})
    assert rb.parse_timeouts(None, 10.0) == (10.0, {})
    assert rb.parse_params(['dartsort={"n_jobs": 1}']) == {"dartsort": {"n_jobs": 1}}
    cases = rb.make_cases(["static", "bump"], [1, 2], [10], [32])
    assert len(cases) == 4 and len({c.name for c in cases}) == 4
    low = rb.make_cases(["rigid"], [1], [10], [32], amplitudes_uv=(50.0, 250.0))[0]
    assert low.name == "rigid_np1_10s_32ch_amp50-250_seed0"


def test_amplitude_range_scales_the_spikes(tmp_path):
    """A lower amplitude range gives smaller spikes, same units and spike times otherwise."""
    from dartsort_si.ground_truth import generate_ground_truth

    peaks = {}
    for amps in [(100.0, 500.0), (20.0, 40.0)]:
        rec, gt, info = generate_ground_truth(tmp_path / f"amp{amps[0]:g}", duration=3.0, num_channels=16,
                                              num_units=4, drift="static", amplitudes_uv=amps, seed=3)
        assert info["amplitudes_uv"] == list(amps)
        times = np.sort(np.concatenate([gt.get_unit_spike_train(u) for u in gt.unit_ids]))
        peaks[amps] = times, np.median(np.abs(rec.get_traces()[times]).max(axis=1))
    (t_hi, p_hi), (t_lo, p_lo) = peaks.values()
    assert np.array_equal(t_hi, t_lo)
    assert p_lo < 0.5 * p_hi, (p_lo, p_hi)


def test_harness_tiny_case(rb, tmp_path):
    sorters = ["dartsort", "spykingcircus2"]
    case = rb.Case("rigid", probe_version=1, duration=10.0, num_channels=32, num_units=8, seed=1)
    params = {"dartsort": {"nn_denoiser_class_name": "SingleChannelWaveformDenoiser", "preprocessing": "standardize"}}
    rows = rb.run_case(case, sorters, cache_dir=tmp_path / "cache", params=params, default_timeout=150.0,
                       n_jobs=2, si_motion=True, log=print)
    # and one run cut by its wall-time limit: reported, not raised
    rows += rb.run_case(case, ["tridesclous2"], cache_dir=tmp_path / "cache", default_timeout=2.0, n_jobs=1,
                        si_motion=False, log=print)

    by_sorter = {r.sorter: r for r in rows}
    assert set(by_sorter) == {*sorters, "tridesclous2", rb.SI_MOTION}
    assert by_sorter["tridesclous2"].status == "timeout"
    for r in rows:
        assert r.status in ("ok", "timeout", "error"), r
        assert r.wall_s is not None and r.wall_s > 0
        if r.status == "error":
            print(f"{r.sorter} failed:\n{r.error}")
    scored = [r for r in rows if r.status == "ok" and r.sorter != rb.SI_MOTION]
    assert scored, "no sorter finished"
    for r in scored:
        assert 0.0 <= r.mean_accuracy <= 1.0
        assert 0.0 <= r.mean_precision <= 1.0 and 0.0 <= r.mean_recall <= 1.0
        assert 0 <= r.well_detected <= r.n_gt_units == 8
        assert r.peak_mem_gb is not None and r.peak_mem_gb > 0
        assert all(0.0 <= a <= 1.0 for a in r.per_unit["accuracy"])
        assert r.time_ratio is None or r.time_ratio > 0
    for r in rows:
        if r.motion is not None:
            assert 0.0 <= r.motion["mae_um"] < 100.0
    if by_sorter[rb.SI_MOTION].status == "ok":
        assert by_sorter[rb.SI_MOTION].motion is not None
    if by_sorter["dartsort"].status == "ok":
        assert by_sorter["dartsort"].timings, "dartsort wrote no timings.json"

    meta = dict(started="now", total_s=1.0, host_cpus=2, n_jobs=1, sorters=sorters)
    out = rb.write_results(rows, tmp_path / "results", "smoke", meta)
    table = out["table"].splitlines()
    assert len(table) == 2 + len(rows)
    for name in by_sorter:
        assert sum(f"| {name}" in line for line in table) == 1
    data = json.loads(Path(out["json"]).read_text())
    assert len(data["rows"]) == len(rows)
    assert Path(out["png"]).stat().st_size > 0
    assert all(not (isinstance(r["wall_s"], float) and math.isnan(r["wall_s"])) for r in data["rows"])


@pytest.fixture(scope="module")
def dr(rb):
    """benchmarks/detection_recall.py (imports run_benchmark, which the rb fixture registered)."""
    spec = importlib.util.spec_from_file_location("detection_recall", ROOT / "benchmarks" / "detection_recall.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_subtraction_recalls_more_than_threshold_near_threshold(dr, tmp_path):
    """Issue 4's yardstick on a tiny near-threshold case: at no more false positives than
    subtraction, plain threshold crossings reach a lower median unit recall."""
    from dartsort_si.ground_truth import generate_ground_truth

    rec, gt, info = generate_ground_truth(tmp_path / "gt", duration=10.0, num_channels=32, num_units=10,
                                          drift="rigid", amplitudes_uv=(50.0, 250.0), seed=4)
    sub, rows = dr.compare_detectors(rec, gt, info, tmp_path / "det", "SingleChannelWaveformDenoiser",
                                     thresholds=np.arange(4.0, 10.01, 1.0))
    thr, fair = next((t, s) for t, s in rows if s["fp"] <= sub["fp"])
    print(f"subtraction {sub}, threshold {thr}: {fair}")
    assert sub["median"] > fair["median"] + 0.05
    assert sub["mean"] > fair["mean"]
