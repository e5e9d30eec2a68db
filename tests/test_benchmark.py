"""Smoke test of the benchmark harness (benchmarks/run_benchmark.py) on a tiny case.

Checks the plumbing, not the numbers: one row per sorter, statuses from the allowed set,
scores and times in sane ranges, the timeout path, reuse of a peer's stored result, and the written
table/JSON/PNG. The scoring extras (SNR >= 5 counts, missed-unit kinds, per-seed summary) are
checked on hand-made sortings.
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
    # drift other than 20 um gets its own name (and cache folder); the default keeps the old names
    assert rb.Case("nonrigid", 1, 60.0, 128, 40, seed=11).name == "nonrigid_np1_60s_128ch_40u_seed11"
    assert rb.Case("nonrigid", 1, 60.0, 128, 40, drift_um=35.0, seed=2).name == "nonrigid_np1_60s_128ch_40u_drift35_seed2"
    seeded = rb.make_cases(["static", "rigid"], [1], [10], [32], seeds=[3, 4])
    assert [c.name for c in seeded] == ["static_np1_10s_32ch_seed3", "rigid_np1_10s_32ch_seed3",
                                        "static_np1_10s_32ch_seed4", "rigid_np1_10s_32ch_seed4"]
    assert rb.split_seed("rigid_np1_10s_32ch_seed12") == ("rigid_np1_10s_32ch", 12)


def test_heldout_preset_and_overrides(rb):
    plan = rb.plan_from_args(rb.build_parser().parse_args(["--heldout"]))
    names = [c.name for c in plan["cases"]]
    assert len(names) == 15 and plan["seeds"] == [1, 2, 3, 4, 5]
    assert names[:3] == ["nonrigid_np1_60s_128ch_40u_seed1", "nonrigid_np2_60s_128ch_40u_seed1",
                         "static_np1_60s_128ch_40u_seed1"]
    assert plan["sorters"] == ["dartsort", "spykingcircus2", "tridesclous2"]
    assert plan["default_timeout"] == 1800.0 and plan["tag"] == "heldout"
    plan = rb.plan_from_args(rb.build_parser().parse_args(["--heldout", "--seeds", "7,8", "--num-units", "20",
                                                           "--drift-um", "30", "--probes", "1"]))
    assert [c.name for c in plan["cases"]] == [f"{d}_np1_60s_128ch_20u_drift30_seed{s}"
                                               for s in (7, 8) for d in ("nonrigid", "static")]
    plan = rb.plan_from_args(rb.build_parser().parse_args(["--quick", "--seed", "5"]))
    assert [c.name for c in plan["cases"]] == ["rigid_np1_30s_64ch_seed5"]


@pytest.fixture(scope="module")
def bad_sorting_case():
    """A GT sorting of 6 units and a deliberately bad sorting of it: unit 0 dropped, units 1 and 2
    merged into one, unit 3 split in two halves, unit 4 with a third of its spikes, unit 5 exact."""
    from spikeinterface.core import NumpySorting, generate_sorting

    gt = generate_sorting(num_units=6, durations=[30.0], firing_rates=10.0, seed=0)
    ids = list(gt.unit_ids)
    train = {u: gt.get_unit_spike_train(u) for u in ids}
    bad = {"m12": np.unique(np.concatenate([train[ids[1]], train[ids[2]]])),
           "s3a": train[ids[3]][::2], "s3b": train[ids[3]][1::2],
           "p4": train[ids[4]][::3], "ok5": train[ids[5]]}
    sorting = NumpySorting.from_unit_dict([bad], gt.sampling_frequency)
    snrs = {str(u): snr for u, snr in zip(ids, [8.0, 3.0, 12.0, 6.0, 4.0, 20.0])}
    # unit 1's nearest unit is 2 (10 um away); the others are far apart on the probe
    info = dict(unit_locations=np.array([[0, 0, 5], [0, 500, 5], [10, 500, 5], [0, 1000, 5],
                                         [0, 1500, 5], [0, 2000, 5]], dtype=float))
    return gt, sorting, snrs, info


def test_score_sorting_detectable_and_losses(rb, bad_sorting_case):
    gt, sorting, snrs, info = bad_sorting_case
    ids = [str(u) for u in gt.unit_ids]
    s = rb.score_sorting(gt, sorting, snrs, info)
    assert s["well_detected"] == 1
    # SNR >= 5: units 0, 2, 3, 5; only 5 is well detected
    assert (s["detectable_well_detected"], s["n_detectable"]) == (1, 4)
    losses = {x["unit"]: x for x in s["losses"]}
    assert set(losses) == set(ids[:5])
    assert all(x["kind"] in ("absent", "merged", "split", "poor") for x in losses.values())
    assert losses[ids[0]]["kind"] == "absent"
    assert losses[ids[1]]["kind"] == "merged" and losses[ids[1]]["with_gt"] == [ids[2]]
    assert losses[ids[2]]["kind"] == "merged" and losses[ids[2]]["with_gt"] == [ids[1]]
    assert losses[ids[3]]["kind"] == "split" and losses[ids[3]]["n_units"] == 2
    assert losses[ids[4]]["kind"] == "poor"
    near = losses[ids[1]]
    assert near["neighbour"] == ids[2] and abs(near["neighbour_um"] - 10.0) < 1e-6 and near["neighbour_snr"] == 12.0
    assert losses[ids[0]]["snr"] == 8.0 and 0.0 <= losses[ids[4]]["accuracy"] < 0.8
    text = rb.loss_text(losses[ids[1]])
    assert text.startswith(f"GT {ids[1]}: SNR 3.0") and f"merged with GT {ids[2]}" in text
    assert f"nearest GT {ids[2]} at 10 um (SNR 12.0)" in text
    assert "split into 2 units" in rb.loss_text(losses[ids[3]])
    # without SNRs or locations: no detectable counts, no neighbours, same kinds
    bare = rb.score_sorting(gt, sorting)
    assert bare["n_detectable"] is None and bare["detectable_well_detected"] is None
    assert [x["kind"] for x in bare["losses"]] == [x["kind"] for x in s["losses"]]
    assert all("neighbour" not in x for x in bare["losses"])


def test_seed_summary_and_missed_units_report(rb, bad_sorting_case, tmp_path):
    gt, sorting, snrs, info = bad_sorting_case
    scores = rb.score_sorting(gt, sorting, snrs, info)
    rows = []
    for seed, well in [(1, 3), (2, 4)]:
        case = f"nonrigid_np1_60s_128ch_40u_seed{seed}"
        rows.append(rb.Row(case=case, sorter="dartsort", status="ok", **{**scores, "well_detected": well}))
        rows.append(rb.Row(case=case, sorter="spykingcircus2", status="ok" if seed == 1 else "timeout",
                           **(scores if seed == 1 else {})))
        rows.append(rb.Row(case=case, sorter=rb.SI_MOTION, status="ok"))
    rows.append(rb.Row(case="static_np1_60s_128ch_40u_seed1", sorter="dartsort", status="ok", **scores))

    summary = rb.seed_summary_markdown(rows).splitlines()
    assert summary[0] == "| case | seed | dartsort | spykingcircus2 |"
    assert summary[2] == "| nonrigid_np1_60s_128ch_40u | 1 | 3/6 (1/4 det.) | 1/6 (1/4 det.) |"
    assert summary[3] == "| nonrigid_np1_60s_128ch_40u | 2 | 4/6 (1/4 det.) | timeout |"
    assert summary[4] == "| nonrigid_np1_60s_128ch_40u | mean | 3.5/6 (1/4 det.) | 1/6 (1/4 det.) n=1 |"
    assert summary[5] == "| static_np1_60s_128ch_40u | 1 | 1/6 (1/4 det.) | – |"
    assert len(summary) == 6  # a single seed gets no mean line

    table = rb.rows_to_markdown(rows).splitlines()
    assert "| det. well |" in table[0] and "| 3/6 | 1/4 |" in table[2]

    meta = dict(started="now", total_s=1.0, host_cpus=2, n_jobs=1, sorters=["dartsort", "spykingcircus2"])
    out = rb.write_results(rows, tmp_path, "units", meta)
    md = Path(out["markdown"]).read_text()
    assert md.index(out["table"]) < md.index(out["seeds"]) < md.index("## Missed units")
    missed = md.split("## Missed units", 1)[1]
    assert "### nonrigid_np1_60s_128ch_40u_seed1" in missed and "### static_np1_60s_128ch_40u_seed1" in missed
    assert "**dartsort**: 5 of 6 GT units below 0.8:" in missed
    assert missed.count("merged with GT") == 2 * 4 and missed.count(", absent;") == 4
    assert max(len(line) for line in out["losses"].splitlines()) < 100
    # the JSON round trip (--from-json) keeps the losses and the new counts
    back = [rb.Row(**r) for r in json.loads(Path(out["json"]).read_text())["rows"]]
    assert rb.seed_summary_markdown(back) == out["seeds"] and rb.losses_markdown(back) == out["losses"]


def test_reuse_key_and_stored_result(rb, bad_sorting_case, tmp_path):
    import spikeinterface.full as si

    gt, sorting, _, _ = bad_sorting_case
    folder = tmp_path / "runs" / "case" / "spykingcircus2"
    folder.mkdir(parents=True)
    key = rb.reuse_key("spykingcircus2", {"a": (1, 2)}, 2)
    assert key["params"] == {"a": [1, 2]} and key["spikeinterface"] == si.__version__
    assert rb.load_reusable(folder, key) is None  # nothing stored
    (folder / "result.json").write_text(json.dumps(dict(status="ok", wall_s=12.5)))
    si.NpzSortingExtractor.write_sorting(sorting, folder / "sorting.npz")
    rb.save_run_stats(folder, dict(status="ok", wall_s=12.5, process_s=20.0, peak_mem_gb=1.5), key)
    res = rb.load_reusable(folder, key)
    assert res["status"] == "ok" and res["reused"] and res["wall_s"] == 12.5 and res["peak_mem_gb"] == 1.5
    assert len(si.NpzSortingExtractor(res["sorting_path"]).unit_ids) == len(sorting.unit_ids)
    assert rb.load_reusable(folder, rb.reuse_key("spykingcircus2", {"a": (1, 2)}, 1)) is None  # n_jobs
    assert rb.load_reusable(folder, rb.reuse_key("spykingcircus2", {}, 2)) is None  # params
    rb.save_run_stats(folder, dict(status="timeout", wall_s=30.0), key)  # killed after writing result.json
    assert rb.load_reusable(folder, key) is None


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
    # --reuse-peers: the finished peer is not rerun (its stored result is scored again)
    logged = []
    again = rb.run_case(case, ["spykingcircus2"], cache_dir=tmp_path / "cache", default_timeout=150.0, n_jobs=2,
                        si_motion=False, reuse_peers=True, log=logged.append)

    by_sorter = {r.sorter: r for r in rows}
    assert set(by_sorter) == {*sorters, "tridesclous2", rb.SI_MOTION}
    assert by_sorter["tridesclous2"].status == "timeout"
    sc2 = by_sorter["spykingcircus2"]
    if sc2.status == "ok":
        assert again[0].reused and any("reused" in m for m in logged), logged
        assert (again[0].wall_s, again[0].peak_mem_gb, again[0].well_detected) == \
            (sc2.wall_s, sc2.peak_mem_gb, sc2.well_detected)
    else:
        assert not again[0].reused
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
        assert 0 <= r.detectable_well_detected <= r.n_detectable <= 8
        assert len(r.losses) == sum(a < 0.8 for a in r.per_unit["accuracy"])
        assert all(x["kind"] in ("absent", "merged", "split", "poor") and "neighbour_um" in x for x in r.losses)
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


def test_profile_summary_splits_samples_by_stage(tmp_path, capsys):
    """profile_sort.py summary: a worker thread's samples go to the stage of the node they ran in,
    with self time per function and the stage function's lines with what they called."""
    spec = importlib.util.spec_from_file_location("profile_sort", ROOT / "benchmarks" / "profile_sort.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    raw = tmp_path / "prof.txt"
    raw.write_text(
        "process 1:\"python\";_worker (thread.py:80);SubtractionPeeler.compute (/x/subtraction.py:410);"
        "find_peaks (/x/waveforms.py:28) 30\n"
        "process 1:\"python\";_worker (thread.py:80);SubtractionPeeler.compute (/x/subtraction.py:417);"
        "cut (/x/waveforms.py:60) 10\n"
        "process 1:\"python\";_worker (thread.py:80);TemplateMatcher.compute (/x/matching.py:217);"
        "TemplateMatcher.peel (/x/matching.py:314) 60\n")
    mod.summary(str(raw))
    out = capsys.readouterr().out
    assert "## subtraction: 40 samples, 40.0% of all" in out
    assert "75.0%  find_peaks (waveforms.py)" in out and "75.0%  line 410 -> find_peaks" in out
    assert "## matching: 60 samples, 60.0% of all" in out
    assert "## preprocessing" not in out


def test_template_fit_excess_aligns_and_scales(rb):
    """template_fit.excess: snippets holding a scaled, shifted copy of the template leave nothing
    over the noise once aligned and scaled; a template of another shape leaves its misfit."""
    spec = importlib.util.spec_from_file_location("template_fit", ROOT / "benchmarks" / "template_fit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    length, chans, m = 30, 4, mod.MAX_SHIFT
    template = np.zeros((length, chans))
    template[10:14, :2] = [[-1.0, -0.5], [-3.0, -1.5], [-2.0, -1.0], [1.0, 0.5]]
    snippets = np.zeros((6, length + 2 * m, chans))
    for i, shift in enumerate([-3, -1, 0, 0, 2, 4]):
        snippets[i, m + shift:m + shift + length] = 1.5 * template
    left, scale = mod.excess(snippets, template)
    support = 2 * length  # the template's two channels
    assert scale == pytest.approx(1.5)
    assert left == pytest.approx(-support)  # no residual: minus the noise the support would hold
    other = template + rng.normal(0, 0.5, template.shape) * (np.abs(template) > 0)
    assert mod.excess(snippets, other)[0] > -support + 0.5
