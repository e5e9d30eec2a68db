"""Bad input fails fast with a message that says what to do, and no data is lost."""

import numpy as np
import pytest
import torch
import spikeinterface.full as si

from dartsort_si import dartsort
from dartsort_si.ground_truth import neuropixels_probe

from conftest import FAST_PARAMS


def _rec(duration=2.0, n_channels=16, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    traces = (rng.standard_normal((int(duration * 30000), n_channels)) * scale).astype("float32")
    return with_probe(si.NumpyRecording(traces, sampling_frequency=30000.0))


def with_probe(rec):
    rec.set_probe(neuropixels_probe(rec.get_num_channels()))
    return rec


def test_no_probe(tmp_path):
    rec = si.NumpyRecording(np.zeros((60000, 4), "float32"), sampling_frequency=30000.0)
    with pytest.raises(ValueError, match="no probe"):
        dartsort(rec, tmp_path / "out")


def _lab_recording(seed=0, **kwargs):
    """SpikeInterface's own generator with its default unit and template parameters."""
    kw = dict(durations=[10.0], num_channels=32, num_units=6, seed=seed, sampling_frequency=30000.0)
    kw.update(kwargs)
    return si.generate_ground_truth_recording(**kw)


def _well_detected(gt, sorting):
    cmp = si.compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True)
    return int(cmp.count_well_detected_units(0.8))


def test_segments_are_sorted_together_with_times_per_segment(tmp_path):
    rec, gt = _lab_recording(durations=[8.0, 6.0])
    rec = rec.save(folder=tmp_path / "rec", n_jobs=1, progress_bar=False)
    sorting = si.run_sorter("dartsort", rec, folder=tmp_path / "s", verbose=False, **FAST_PARAMS)
    assert sorting.get_num_segments() == 2
    for s in range(2):
        times = sorting.to_spike_vector()
        seg_times = times["sample_index"][times["segment_index"] == s]
        assert len(seg_times) > 0 and seg_times.max() < rec.get_num_samples(s)
    # the same unit ids across segments, and units found in both: they are one time axis
    assert _well_detected(gt, sorting) >= 4


def test_too_short(tmp_path):
    with pytest.raises(ValueError, match="at least"):
        dartsort(_rec(duration=0.5), tmp_path / "out")


def test_bad_dtype(tmp_path):
    rec = with_probe(si.NumpyRecording(np.zeros((60000, 16), dtype=bool), sampling_frequency=30000.0))
    with pytest.raises(ValueError, match="dtype"):
        dartsort(rec, tmp_path / "out")


def test_not_standardized_with_preprocessing_none(tmp_path):
    with pytest.raises(ValueError, match="preprocessing='standardize'"):
        dartsort(_rec(scale=50.0), tmp_path / "out", cfg=dict(preprocessing="none"))


@pytest.mark.parametrize("preprocessing", ["none", "ibllikecmr"])
def test_nans(tmp_path, preprocessing):
    rec = _rec()
    traces = rec.get_traces().copy()
    traces[100:200, 3] = np.nan
    bad = with_probe(si.NumpyRecording(traces, sampling_frequency=30000.0))
    with pytest.raises(ValueError, match="NaN"):
        dartsort(bad, tmp_path / "out", cfg=dict(preprocessing=preprocessing))


def test_folder_not_ours_is_left_alone(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "data.bin").write_bytes(b"keep me")
    with pytest.raises(ValueError, match="not a dartsort-si output folder"):
        dartsort(_rec(), out, overwrite=True)
    assert (out / "data.bin").read_bytes() == b"keep me"


def test_bad_device(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="CUDA is not available"):
        dartsort(_rec(), tmp_path / "out", cfg=dict(device="cuda", preprocessing="standardize"))


def test_unknown_initial_detection_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="initial_detection must be one of"):
        dartsort(_rec(), tmp_path / "out", initial_detection="nn")
    assert not (tmp_path / "out").exists()


def test_recording_without_spikes_gives_an_empty_sorting_and_a_warning(tmp_path, caplog):
    noise = with_probe(si.generate_recording(num_channels=16, durations=[4.0], sampling_frequency=30000.0, seed=0))
    with caplog.at_level("WARNING", logger="dartsort_si"):
        res = dartsort(noise, tmp_path / "out", cfg=FAST_PARAMS)
    assert res["sorting"].n_units == 0
    assert any("no unit found" in r.getMessage() for r in caplog.records)
    sorting = res["sorting"].to_numpy_sorting()
    assert sorting.get_num_units() == 0 and sorting.get_num_segments() == 1


@pytest.mark.parametrize("content, words", [(None, "not found"), (b"not a model", "Could not load")])
def test_bad_pretrained_model_is_refused_before_anything_is_written(tmp_path, content, words):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=words):
        dartsort(_rec(), tmp_path / "out", cfg=dict(nn_denoiser_pretrained_path=str(path)))
    assert not (tmp_path / "out").exists()


def test_shorter_than_one_chunk_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shorter than one chunk.*chunk_length_samples"):
        dartsort(_rec(duration=1.5), tmp_path / "out", cfg=dict(chunk_length_samples=60000))
    assert not (tmp_path / "out").exists()


def test_preprocessed_traces_are_kept_in_memory_when_they_fit(gt_data, monkeypatch):
    """The cache holds what the preprocessing gives (float32 rounding at chunk edges aside) with
    the probe; over the memory budget, or with process workers, the recording is read through."""
    from dartsort_si import preprocessing as pre

    rec = pre.preprocess(gt_data[0], "standardize")
    cached = pre.cache_in_memory(rec, 2, 10_000)
    assert type(cached).__name__ == "NumpyRecording"
    np.testing.assert_allclose(cached.get_traces(start_frame=5_000, end_frame=25_000),
                               rec.get_traces(start_frame=5_000, end_frame=25_000), atol=1e-3)
    np.testing.assert_array_equal(cached.get_channel_locations(), rec.get_channel_locations())
    assert pre.cache_in_memory(rec, 2, 10_000, threads=False) is rec
    monkeypatch.setattr(pre, "available_memory_bytes", lambda: 1_000_000)
    assert pre.cache_in_memory(rec, 2, 10_000) is rec


def test_mad_noise_levels_are_spikeinterfaces(gt_data):
    """mad_noise_levels measures what get_noise_levels(method="mad") does, on the same chunks:
    the same values, on a highpassed recording whose channels differ in noise."""
    from spikeinterface.core import get_noise_levels

    from dartsort_si import preprocessing as pre

    rec = pre.ZeroPhaseHighpass(gt_data[0], freq_min=pre.HIGHPASS_HZ)
    expected = get_noise_levels(rec, method="mad", return_in_uV=False,
                                random_slices_kwargs=pre._noise_slices(rec), progress_bar=False)
    got = pre.mad_noise_levels(rec)
    assert got.shape == (rec.get_num_channels(),) and np.all(got > 0)
    np.testing.assert_array_equal(got, expected)


def test_highpass_matches_spikeinterfaces_and_survives_a_dc_offset():
    """ZeroPhaseHighpass is highpass_filter's Butterworth (order 5, forward and backward) through
    the FFT: the same traces inside the recording, bit for bit at its ends (sosfiltfilt there),
    and a large DC offset with slow drift leaves no step at the chunks' edges. It saves and loads
    as SpikeInterface recordings do."""
    from dartsort_si.preprocessing import ZeroPhaseHighpass

    rng = np.random.default_rng(0)
    n = 150_000
    slow = np.cumsum(rng.standard_normal((n, 4)), axis=0) * 3
    traces = (1000 + slow + 10 * rng.standard_normal((n, 4))).astype("float32")
    rec = si.NumpyRecording(traces, sampling_frequency=30000.0)
    ours, theirs = ZeroPhaseHighpass(rec), si.highpass_filter(rec, freq_min=300.0)
    for start, end in [(30_000, 60_000), (12_345, 100_000), (0, 30_000), (140_000, 150_000)]:
        a = ours.get_traces(start_frame=start, end_frame=end)
        b = theirs.get_traces(start_frame=start, end_frame=end)
        assert a.dtype == np.float32 and a.shape == b.shape
        # noise sd 10: agreement to 1e-3 of it
        assert np.abs(a - b).max() < 1e-2, (start, end)
        if start == 0 or end == n:
            np.testing.assert_array_equal(a, b)
    loaded = si.load(ours.to_dict())
    np.testing.assert_array_equal(loaded.get_traces(start_frame=40_000, end_frame=50_000),
                                  ours.get_traces(start_frame=40_000, end_frame=50_000))


def test_median_reference_equals_spikeinterfaces_on_even_and_odd_channel_counts():
    """GlobalMedianReference reads the median off a sort: the same traces as common_reference's
    np.median, bit for bit, for all channels or some, and it saves and loads."""
    from dartsort_si.preprocessing import GlobalMedianReference

    rng = np.random.default_rng(1)
    traces = (rng.standard_normal((20_000, 9)) * [1, 2, 3, 4, 5, 6, 7, 8, 9]).astype("float32")
    for rec in (si.NumpyRecording(traces, 30000.0), si.NumpyRecording(traces[:, :8].copy(), 30000.0)):
        ours = GlobalMedianReference(rec)
        theirs = si.common_reference(rec, operator="median", reference="global")
        np.testing.assert_array_equal(ours.get_traces(), theirs.get_traces())
        some = rec.channel_ids[[0, 3, 5]]
        np.testing.assert_array_equal(ours.get_traces(channel_ids=some, start_frame=100, end_frame=900),
                                      theirs.get_traces(channel_ids=some, start_frame=100, end_frame=900))
        np.testing.assert_array_equal(si.load(ours.to_dict()).get_traces(end_frame=500), ours.get_traces(end_frame=500))
        # with a gain: what spikeinterface's scale gives after it, bit for bit
        gain = rng.uniform(0.2, 3, rec.get_num_channels()).astype("float32")
        scaled = GlobalMedianReference(rec, gain=gain)
        np.testing.assert_array_equal(scaled.get_traces(), si.scale(theirs, gain=gain, dtype="float32").get_traces())
        assert not np.array_equal(scaled.get_traces(), ours.get_traces())
        np.testing.assert_array_equal(si.load(scaled.to_dict()).get_traces(channel_ids=some),
                                      scaled.get_traces(channel_ids=some))


def test_malloc_settings_are_restored_after_the_sort_even_when_it_fails(monkeypatch):
    from dartsort_si import allocation

    calls = []

    class FakeGlibc:
        def mallopt(self, param, value):
            calls.append((param, value))

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    monkeypatch.setattr(allocation, "_glibc", lambda: FakeGlibc())
    with pytest.raises(RuntimeError):
        with allocation.memory_kept_in_process():
            assert calls == [(allocation.M_MMAP_MAX, 0), (allocation.M_TRIM_THRESHOLD, allocation.SORT_TRIM_THRESHOLD)]
            raise RuntimeError("a step failed")
    assert calls[2:] == [(allocation.M_MMAP_MAX, allocation.DEFAULT_MMAP_MAX),
                         (allocation.M_TRIM_THRESHOLD, allocation.DEFAULT_TRIM_THRESHOLD), ("trim", 0)]
    monkeypatch.setattr(allocation, "_glibc", lambda: None)
    with allocation.memory_kept_in_process():  # no glibc: nothing to set
        pass


def test_thread_workers_leave_the_thread_pools_alone_per_chunk(gt_data, monkeypatch):
    """Within chunk_limits_off, SpikeInterface's executor calls no threadpool_limits around the
    chunks of thread workers (it did on every chunk, with the global default of 1); the global
    default is back after, and process workers keep their limit."""
    import spikeinterface.core.job_tools as job_tools
    from spikeinterface.core import get_global_job_kwargs
    from spikeinterface.core.node_pipeline import run_node_pipeline
    from spikeinterface.sortingcomponents.peak_detection.locally_exclusive import LocallyExclusivePeakDetector

    from dartsort_si.pipeline import chunk_limits_off, job_kwargs_from_config
    from dartsort_si.config import DARTsortUserConfig

    rec = gt_data[0]
    calls = []
    real = job_tools.threadpool_limits
    monkeypatch.setattr(job_tools, "threadpool_limits", lambda *a, **k: calls.append(1) or real(*a, **k))
    job_kwargs = job_kwargs_from_config(DARTsortUserConfig(n_jobs_cpu=2), torch.device("cpu"))
    node = LocallyExclusivePeakDetector(rec, detect_threshold=5, noise_levels=np.ones(rec.get_num_channels()))
    before = get_global_job_kwargs()["max_threads_per_worker"]
    with chunk_limits_off(job_kwargs):
        run_node_pipeline(rec, [node], dict(job_kwargs, progress_bar=False))
    assert calls == []
    assert get_global_job_kwargs()["max_threads_per_worker"] == before
    run_node_pipeline(rec, [node], dict(job_kwargs, progress_bar=False))  # SpikeInterface's own default
    assert len(calls) > 1
    with chunk_limits_off(dict(job_kwargs, max_threads_per_worker=1)):
        assert get_global_job_kwargs()["max_threads_per_worker"] == before


def test_steps_of_the_main_thread_alone_use_every_core_and_give_them_back():
    import os

    from threadpoolctl import threadpool_info

    from dartsort_si.steps import all_cores

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with all_cores(torch.device("cpu")):
            assert torch.get_num_threads() == (os.cpu_count() or 1)
            assert all(p["num_threads"] <= (os.cpu_count() or 1) for p in threadpool_info())
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError):
            with all_cores(torch.device("cpu")):
                raise RuntimeError("a step failed")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
