"""Bad input fails fast with a message that says what to do, and no data is lost."""

import numpy as np
import pytest
import spikeinterface.full as si

from dartsort_si import dartsort
from dartsort_si.ground_truth import neuropixels_probe


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


def test_multi_segment(tmp_path):
    rng = np.random.default_rng(0)
    rec = with_probe(si.NumpyRecording([rng.standard_normal((60000, 16)).astype("float32")] * 2,
                                       sampling_frequency=30000.0))
    with pytest.raises(ValueError, match="2 segments"):
        dartsort(rec, tmp_path / "out")


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


def test_nans(tmp_path):
    rec = _rec()
    traces = rec.get_traces().copy()
    traces[100:200, 3] = np.nan
    bad = with_probe(si.NumpyRecording(traces, sampling_frequency=30000.0))
    with pytest.raises(ValueError, match="NaN"):
        dartsort(bad, tmp_path / "out", cfg=dict(preprocessing="none"))


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
