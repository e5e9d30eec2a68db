"""Recordings as labs have them, sorted with default parameters (the Decollider trained on the
recording, 'ibllikecmr' preprocessing) and checked against ground truth. Recordings are from
SpikeInterface's generator with its default unit and template parameters."""

import logging

import numpy as np
import spikeinterface.full as si

from dartsort_si.preprocessing import cmr_keeps_spikes
from dartsort_si.ground_truth import lab_recording, neuropixels_probe

DURATION_S = 12.0


def make(name, seed):
    """(recording, ground truth) of one case, as benchmarks/lab_recordings.py makes it, shorter."""
    return lab_recording(name, seed, duration_s=DURATION_S)


def sort(rec, folder):
    rec = rec.save(folder=folder / "rec", n_jobs=1, progress_bar=False)
    return si.run_sorter("dartsort", rec, folder=folder / "sort", verbose=False)


def well_detected(gt, sorting):
    cmp = si.compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True)
    return int(cmp.count_well_detected_units(0.8))


def test_common_reference_is_skipped_where_one_spike_covers_most_channels():
    tetrode, _ = make("tetrode", 0)
    assert not cmr_keeps_spikes(tetrode)
    rec32, _ = si.generate_ground_truth_recording(durations=[1.0], num_channels=32, num_units=2, seed=0)
    assert cmr_keeps_spikes(rec32)
    np1 = si.NumpyRecording(np.zeros((100, 128), "float32"), 30000.0)
    np1.set_probe(neuropixels_probe(128))
    assert cmr_keeps_spikes(np1)


def test_tetrode_at_25khz_finds_every_unit(tmp_path, caplog):
    # 1 of 3 when the common reference erased spikes and the Decollider started from random
    # weights; a drift estimate on the 20 um probe mixed units on another draw (seed 0)
    rec, gt = make("tetrode", 1)
    with caplog.at_level(logging.WARNING, logger="dartsort_si"):
        sorting = sort(rec, tmp_path)
    assert well_detected(gt, sorting) == 3
    assert any("too short to estimate drift" in r.getMessage() for r in caplog.records)


def test_20khz_with_the_default_decollider(tmp_path):
    # 6 of 8 when the Decollider was trained from random weights at 20 kHz
    rec, gt = make("fs20k", 1)
    assert well_detected(gt, sort(rec, tmp_path)) >= 7


def test_dead_noisy_and_saturated_channels_are_left_out_with_a_warning(tmp_path, caplog):
    rec, gt = make("dead_noisy", 1)
    with caplog.at_level(logging.WARNING, logger="dartsort_si"):
        sorting = sort(rec, tmp_path)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "dead: ['5']" in said and "noisy: ['20']" in said and "saturated: ['12']" in said
    assert well_detected(gt, sorting) >= 6


def test_int16_with_gains_is_scaled_to_microvolts(tmp_path):
    rec, gt = make("int16_gains", 1)
    assert rec.get_dtype() == np.int16
    sorting = sort(rec, tmp_path)
    assert well_detected(gt, sorting) >= 6
    # amplitudes in uV on the sorting: the generator's units are tens to hundreds of uV
    amp = sorting.get_property("amplitude_uv")
    assert amp is not None and np.all((amp > 10) & (amp < 2000))
