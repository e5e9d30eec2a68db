"""The plugin, end to end: registration, params, a whole sort with an accuracy floor, resume."""

import json
import shutil

import numpy as np
import pytest
import spikeinterface.full as si

import dartsort_si
from dartsort_si import SORTER_NAME, DARTsortSorter, DARTsortUserConfig, dartsort
from dartsort_si.pipeline import MARKER, prepare_output_dir

from conftest import FAST_PARAMS


def test_registered_in_spikeinterface():
    from spikeinterface.sorters import sorterlist

    assert sorterlist.sorter_dict["dartsort"] is DARTsortSorter
    assert DARTsortSorter in sorterlist.sorter_full_list
    assert "dartsort" in si.installed_sorters()
    assert si.get_sorter_version("dartsort") if hasattr(si, "get_sorter_version") else True


def test_params_round_trip():
    params = si.get_default_sorter_params("dartsort")
    desc = si.get_sorter_params_description("dartsort")
    fields = DARTsortUserConfig.field_defaults()
    for k, v in fields.items():
        assert params[k] == v, k
        assert isinstance(desc[k], str) and desc[k], k
    assert {"n_jobs", "chunk_duration", "progress_bar", "pool_engine"} <= set(params)
    from dartsort_si.sorter import config_from_params

    cfg = config_from_params({**params, "voltage_threshold": 4.5, "n_jobs": 2, "chunk_duration": "0.5s"}, 30000.0)
    assert cfg.voltage_threshold == 4.5 and cfg.n_jobs_cpu == 2 and cfg.chunk_length_samples == 15000
    # chunk_duration is a time: at 20 kHz, 0.5 s is 10000 samples (it was 15000 whatever the rate)
    assert config_from_params({**params, "chunk_duration": "500ms"}, 20000.0).chunk_length_samples == 10000


def test_bad_param_is_refused(gt_data, tmp_path):
    rec, _, _ = gt_data
    with pytest.raises(Exception, match="voltage_threshold"):
        si.run_sorter("dartsort", rec, folder=tmp_path / "x", voltage_threshold=-2.0)
    with pytest.raises(ValueError, match="Invalid parameters"):
        si.run_sorter("dartsort", rec, folder=tmp_path / "y", voltage_treshold=4.0)


def test_end_to_end_accuracy(sorted_with_run_sorter, gt_data):
    sorting, folder = sorted_with_run_sorter
    rec, gt, _ = gt_data
    perf = si.compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True).get_performance()
    well = int((perf["accuracy"].astype(float) >= 0.8).sum())
    print(f"well detected: {well} of {len(perf)}")
    assert well >= len(perf) // 3
    assert sorting.get_num_units() >= well
    main = sorting.get_property("main_channel_id")
    assert main is not None and set(main) <= set(rec.channel_ids)


def test_unit_properties_on_the_sorting(sorted_with_run_sorter, gt_data):
    sorting, _ = sorted_with_run_sorter
    rec, gt, _ = gt_data
    n = sorting.get_num_units()
    assert (sorting.get_property("amplitude_uv") is None) == (not rec.has_scaleable_traces())
    for key in ["x_um", "depth_um", "registered_depth_um", "snr", "firing_rate_hz"]:
        values = sorting.get_property(key)
        assert values is not None and values.shape == (n,) and np.all(np.isfinite(values)), key
    spikes = [len(sorting.get_unit_spike_train(u)) for u in sorting.unit_ids]
    assert np.allclose(sorting.get_property("firing_rate_hz"), np.array(spikes) / rec.get_total_duration())
    depth = rec.get_channel_locations()[:, 1]
    assert np.all((sorting.get_property("depth_um") > depth.min() - 100) & (sorting.get_property("depth_um") < depth.max() + 100))
    assert np.all(sorting.get_property("snr") > 2)
    # the unit's main channel sits near its localized depth
    main = rec.get_channel_locations()[rec.ids_to_indices(sorting.get_property("main_channel_id")), 1]
    assert np.median(np.abs(main - sorting.get_property("depth_um"))) < 40


def test_outputs_on_disk(sorted_with_run_sorter):
    from spikeinterface.core.motion import Motion

    _, folder = sorted_with_run_sorter
    out = folder / "sorter_output" / "dartsort"
    for name in ["subtraction.h5", "matching1.h5", "dartsort_sorting.npz", "motion_info.npz",
                 "models.pt", "templates1.npz", "drift_raster.png", MARKER, "timings.json"]:
        assert (out / name).exists(), name
    motion = Motion.load(out / "si_motion")
    assert motion.displacement[0].shape[0] == len(motion.temporal_bins_s[0])
    loaded = dartsort_si.DARTsortSorting.load(out / "dartsort_sorting.npz")
    assert loaded.point_source_localizations.shape == (len(loaded), 4)


def test_analyzer_from_our_outputs(sorted_with_run_sorter, gt_data):
    from dartsort_si import to_sorting_analyzer

    sorting, folder = sorted_with_run_sorter
    rec, _, _ = gt_data
    analyzer = to_sorting_analyzer(folder, rec)
    assert list(analyzer.unit_ids) == list(sorting.unit_ids)
    ours = analyzer.get_extension("templates").get_data()
    # the same spikes' templates computed by SpikeInterface from the sorted recording agree with ours
    plain = si.create_sorting_analyzer(sorting, analyzer.recording, sparse=False)
    window = {k: analyzer.get_extension("templates").params[k] for k in ("ms_before", "ms_after")}
    plain.compute(["random_spikes", "templates"], extension_params=dict(templates=window))
    theirs = plain.get_extension("templates").get_data()
    assert ours.shape == theirs.shape
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, theirs)]
    assert np.median(corr) > 0.9, corr
    amps = analyzer.get_extension("spike_amplitudes").get_data()
    vector = sorting.to_spike_vector()
    assert len(amps) == len(vector) and np.median(amps) < -3  # troughs, in noise units
    locs = analyzer.get_extension("spike_locations").get_data()
    depth = sorting.get_property("depth_um")
    unit_of = np.searchsorted(sorting.unit_ids, sorting.unit_ids[vector["unit_index"]])
    assert np.median(np.abs(locs["y"] - depth[unit_of])) < 15
    # SpikeInterface's tools run on it as on any analyzer
    metrics = si.compute_quality_metrics(analyzer, metric_names=["snr", "amplitude_cutoff", "isi_violation"])
    assert len(metrics) == len(sorting.unit_ids) and np.all(metrics["snr"] > 2)


def test_phy_export_and_quality_metrics(sorted_with_run_sorter, gt_data, tmp_path):
    from spikeinterface.exporters import export_to_phy

    sorting, _ = sorted_with_run_sorter
    rec, _, _ = gt_data
    analyzer = si.create_sorting_analyzer(sorting, rec, sparse=True)
    analyzer.compute(["random_spikes", "templates", "noise_levels", "spike_amplitudes"])
    metrics = si.compute_quality_metrics(analyzer, metric_names=["snr", "firing_rate", "isi_violation"])
    assert len(metrics) == sorting.get_num_units() and np.all(metrics["snr"] > 2)
    export_to_phy(analyzer, tmp_path / "phy", compute_pc_features=False, copy_binary=False, verbose=False)
    times = np.load(tmp_path / "phy" / "spike_times.npy").ravel()
    clusters = np.load(tmp_path / "phy" / "spike_clusters.npy").ravel()
    assert len(times) == len(clusters) == len(sorting.to_spike_vector())
    assert len(np.unique(clusters)) == sorting.get_num_units()


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file() and p.name != MARKER}


def test_resume_does_nothing_when_finished(sorted_with_run_sorter, gt_data, tmp_path):
    _, folder = sorted_with_run_sorter
    rec, _, _ = gt_data
    out = shutil.copytree(folder / "sorter_output" / "dartsort", tmp_path / "copy")
    before = _mtimes(out)
    cfg = {**FAST_PARAMS}
    res = dartsort(rec, out, cfg=cfg)
    assert _mtimes(out) == before
    assert res["sorting"].n_units > 0 and res["motion"] is not None and res["si_motion"] is not None


def test_work_in_tmpdir_returns_the_result_from_the_output_folder(sorted_with_run_sorter, gt_data, tmp_path):
    _, folder = sorted_with_run_sorter
    rec, _, _ = gt_data
    out = shutil.copytree(folder / "sorter_output" / "dartsort", tmp_path / "copy")
    reference = dartsort_si.DARTsortSorting.load(out / "dartsort_sorting.npz")
    res = dartsort(rec, out, cfg={**FAST_PARAMS, "work_in_tmpdir": True, "tmpdir_parent": str(tmp_path)})
    np.testing.assert_array_equal(res["sorting"].labels, reference.labels)
    assert res["sorting"].parent_h5_path.parent == out


def test_killed_run_restarts_cleanly(sorted_with_run_sorter, gt_data, tmp_path):
    _, folder = sorted_with_run_sorter
    rec, _, _ = gt_data
    out = shutil.copytree(folder / "sorter_output" / "dartsort", tmp_path / "copy")
    reference = dartsort_si.DARTsortSorting.load(out / "dartsort_sorting.npz")
    # as if killed while writing matching1.h5: no final file, a half-written temp beside it
    (out / "matching1.h5").unlink()
    (out / "dartsort_sorting.npz").unlink()
    (out / ".matching1.h5.abc123.tmp.h5").write_bytes(b"half a file")
    kept = {n: (out / n).stat().st_mtime_ns for n in ["models.pt", "subtraction.h5", "templates1.npz"]}
    res = dartsort(rec, out, cfg=FAST_PARAMS)
    for n, t in kept.items():
        assert (out / n).stat().st_mtime_ns == t, f"{n} was recomputed"
    assert (out / "matching1.h5").exists()
    np.testing.assert_array_equal(res["sorting"].times_samples, reference.times_samples)
    np.testing.assert_array_equal(res["sorting"].labels, reference.labels)


def test_changed_settings_need_overwrite(tmp_path):
    out = tmp_path / "o"
    prepare_output_dir(out, DARTsortUserConfig(), overwrite=False)
    (out / "subtraction.h5").write_bytes(b"x")
    (out / "mine.txt").write_text("user file")
    with pytest.raises(ValueError, match="voltage_threshold"):
        prepare_output_dir(out, DARTsortUserConfig(voltage_threshold=4.0), overwrite=False)
    # runtime-only fields may change on resume
    prepare_output_dir(out, DARTsortUserConfig(n_jobs_cpu=2), overwrite=False)
    prepare_output_dir(out, DARTsortUserConfig(voltage_threshold=4.0), overwrite=True)
    assert not (out / "subtraction.h5").exists()
    assert json.loads((out / MARKER).read_text())["config"]["voltage_threshold"] == 4.0


@pytest.fixture(scope="module")
def two_saved_recordings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    recs = []
    for seed in (0, 1):
        rec, _ = si.generate_ground_truth_recording(durations=[4.0], num_channels=16, num_units=3, seed=seed)
        recs.append(rec.save(folder=folder / f"rec{seed}", n_jobs=1, progress_bar=False))
    return recs


def _jobs(recs, sorter_name, folder):
    return [dict(sorter_name=sorter_name, recording=rec, folder=folder / f"sort{i}", verbose=False,
                 nn_denoiser_class_name="SingleChannelWaveformDenoiser", preprocessing="standardize")
            for i, rec in enumerate(recs)]


def test_run_sorter_jobs(two_saved_recordings, tmp_path):
    # several recordings through SpikeInterface's job runner, as a lab sorts a batch of sessions
    sortings = si.run_sorter_jobs(_jobs(two_saved_recordings, "dartsort", tmp_path), engine="loop",
                                  return_output=True)
    assert len(sortings) == 2 and all(s.get_num_units() > 0 for s in sortings)
    assert all((tmp_path / f"sort{i}" / "sorter_output" / "final_sorting").exists() for i in range(2))


def test_run_sorter_jobs_with_joblib_workers(two_saved_recordings, tmp_path):
    # joblib's loky workers are fresh interpreters: the plain name "dartsort" is unknown there,
    # dartsort_si.SORTER_NAME registers the sorter where the job is unpickled
    import pickle

    assert pickle.loads(pickle.dumps(SORTER_NAME)) == "dartsort"
    jobs = _jobs(two_saved_recordings, SORTER_NAME, tmp_path)
    sortings = si.run_sorter_jobs(jobs, engine="joblib", engine_kwargs=dict(n_jobs=2), return_output=True)
    assert len(sortings) == 2 and all(s.get_num_units() > 0 for s in sortings)
    assert all((tmp_path / f"sort{i}" / "sorter_output" / "final_sorting").exists() for i in range(2))


def test_result_opens_in_spikeinterface_gui(sorted_with_run_sorter, gt_data, monkeypatch):
    """The GUI's main window builds (Qt offscreen) on the analyzer made from our outputs."""
    gui = pytest.importorskip("spikeinterface_gui")
    pytest.importorskip("PySide6")
    pytest.importorskip("pyqtgraph")
    from dartsort_si import to_sorting_analyzer

    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    sorting, folder = sorted_with_run_sorter
    rec, _, _ = gt_data
    analyzer = to_sorting_analyzer(folder, rec)
    analyzer.compute(["unit_locations", "template_similarity", "correlograms", "quality_metrics"])
    win = gui.run_mainwindow(analyzer, mode="desktop", start_app=False, verbose=False)
    controller = win.controller
    assert list(controller.unit_ids) == list(sorting.unit_ids)
    assert len(win.views) >= 5, win.views.keys()
    win.close()
