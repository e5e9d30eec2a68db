"""Our stages through SpikeInterface's own entry points."""

import numpy as np
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
