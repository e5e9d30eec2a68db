"""Our stages through SpikeInterface's own entry points."""

import numpy as np
import pytest
import spikeinterface.full as si
from spikeinterface.sortingcomponents.peak_detection import detect_peaks

import dartsort_si  # noqa: F401  (registers the components)


def test_detect_peaks_with_dartsort_subtraction():
    rec, gt = si.generate_ground_truth_recording(durations=[10.0], num_channels=32, num_units=6, seed=2)
    rec = si.highpass_filter(rec, freq_min=300.0)
    peaks = detect_peaks(rec, method="dartsort_subtraction", method_kwargs=dict(detect_threshold=4.0),
                         job_kwargs=dict(n_jobs=2, progress_bar=False))  # workers get a pickled node
    assert peaks.dtype.names[:2] == ("sample_index", "channel_index")
    assert len(peaks) and np.all(np.diff(peaks["sample_index"]) >= 0)
    # every clearly visible unit's spikes are found near their times
    analyzer = si.create_sorting_analyzer(gt, rec, sparse=False)
    analyzer.compute(["random_spikes", "templates", "noise_levels"])
    snr = si.compute_quality_metrics(analyzer, metric_names=["snr"])["snr"]
    visible = gt.unit_ids[snr.to_numpy() > 8]
    assert len(visible) >= 2
    for unit in visible:
        train = gt.get_unit_spike_train(unit)
        i = np.clip(np.searchsorted(peaks["sample_index"], train), 1, len(peaks) - 1)
        gap = np.minimum(np.abs(peaks["sample_index"][i] - train), np.abs(peaks["sample_index"][i - 1] - train))
        assert np.mean(gap <= 10) > 0.9, unit


def test_localize_peaks_with_dartsort():
    from spikeinterface.sortingcomponents.peak_localization import localize_peaks

    rec, gt = si.generate_ground_truth_recording(durations=[10.0], num_channels=32, num_units=6, seed=2)
    rec = si.highpass_filter(rec, freq_min=300.0)
    peaks = detect_peaks(rec, method="locally_exclusive", method_kwargs=dict(detect_threshold=6.0),
                         job_kwargs=dict(n_jobs=1, progress_bar=False))
    locs = localize_peaks(rec, peaks, method="dartsort", ms_before=1.0, ms_after=1.5,
                          job_kwargs=dict(n_jobs=2, progress_bar=False))
    assert locs.dtype.names == ("x", "y", "z", "alpha") and len(locs) == len(peaks)
    # the peaks near a unit's spikes sit close to where the generator put it
    unit_xyz = gt.get_property("gt_unit_locations")
    spikes = gt.to_spike_vector()
    i = np.clip(np.searchsorted(peaks["sample_index"], spikes["sample_index"]), 0, len(peaks) - 1)
    hit = np.abs(peaks["sample_index"][i] - spikes["sample_index"]) <= 2
    truth = unit_xyz[spikes["unit_index"][hit]]
    err = np.hypot(locs["x"][i[hit]] - truth[:, 0], locs["y"][i[hit]] - truth[:, 1])
    assert hit.sum() > 100
    assert np.median(err) < 15.0, np.median(err)
    assert np.all(locs["z"][i[hit]] > 0)


def test_find_spikes_from_templates_with_dartsort():
    from spikeinterface.core import get_noise_levels
    from spikeinterface.sortingcomponents.matching import find_spikes_from_templates

    rec, gt = si.generate_ground_truth_recording(durations=[10.0], num_channels=32, num_units=6, seed=2)
    rec = si.highpass_filter(rec, freq_min=300.0)
    analyzer = si.create_sorting_analyzer(gt, rec, sparse=False)
    analyzer.compute(["random_spikes", "templates", "noise_levels"])
    templates = analyzer.get_extension("templates").get_data(outputs="Templates")
    snr = si.compute_quality_metrics(analyzer, metric_names=["snr"])["snr"].to_numpy()
    spikes = find_spikes_from_templates(
        rec, templates, method="dartsort",
        method_kwargs=dict(noise_levels=get_noise_levels(rec, return_in_uV=False)),
        job_kwargs=dict(n_jobs=2, progress_bar=False))
    assert set(np.unique(spikes["cluster_index"])) <= set(range(len(gt.unit_ids)))
    found = si.NumpySorting.from_samples_and_labels(
        [spikes["sample_index"]], [spikes["cluster_index"]], rec.sampling_frequency, unit_ids=np.arange(len(gt.unit_ids)))
    cmp = si.compare_sorter_to_ground_truth(gt, found, exhaustive_gt=True)
    perf = cmp.get_performance(method="raw_count")
    # matching with the true templates: each clear unit is recovered, with its own label
    for i, unit in enumerate(gt.unit_ids):
        if snr[i] > 5:
            assert cmp.get_ordered_agreement_scores().loc[unit, i] > 0.9, (unit, snr[i], perf.loc[unit])
    assert np.median(spikes["amplitude"]) == pytest.approx(1.0, abs=0.15)


def test_templates_averaged_from_few_spikes_still_match_their_units():
    # A template averaged from 8 spikes carries noise of energy ~90 x 32 / 8 = 360 (noise units
    # squared), more than a small unit's own (~200). Counted in the template's norm while the
    # objective's low-rank convolution did not see it, it kept every spike of such units from
    # being taken (recall 0 for the three units of energy ~200, before matching used the
    # low-rank templates throughout)
    from spikeinterface.core import get_noise_levels
    from spikeinterface.sortingcomponents.matching import find_spikes_from_templates

    rec, gt = si.generate_ground_truth_recording(durations=[20.0], num_channels=32, num_units=8, seed=3,
                                                 generate_templates_kwargs=dict(unit_params=dict(alpha=(50.0, 150.0))))
    rec = si.highpass_filter(rec, freq_min=300.0)
    noise = get_noise_levels(rec, return_in_uV=False)
    clean = si.create_sorting_analyzer(gt, rec, sparse=False)
    clean.compute("random_spikes", max_spikes_per_unit=1000, seed=0)
    clean.compute("templates")
    energy = ((clean.get_extension("templates").get_data() / noise) ** 2).sum((1, 2))
    few = si.create_sorting_analyzer(gt, rec, sparse=False)
    few.compute("random_spikes", max_spikes_per_unit=8, seed=0)
    few.compute("templates")
    spikes = find_spikes_from_templates(
        rec, few.get_extension("templates").get_data(outputs="Templates"), method="dartsort",
        method_kwargs=dict(noise_levels=noise), job_kwargs=dict(n_jobs=2, progress_bar=False))
    found = si.NumpySorting.from_samples_and_labels(
        [spikes["sample_index"]], [spikes["cluster_index"]], rec.sampling_frequency, unit_ids=np.arange(len(gt.unit_ids)))
    recall = si.compare_sorter_to_ground_truth(gt, found, exhaustive_gt=True).get_performance()["recall"]
    assert (energy > 150).sum() == 7
    for i, unit in enumerate(gt.unit_ids):
        if energy[i] > 150:
            assert recall[unit] > 0.9, (unit, energy[i], recall[unit])
