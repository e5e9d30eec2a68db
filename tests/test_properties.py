"""Property test: small random recordings and random valid configs never crash the sort, and
what comes out is well formed."""

import os

import numpy as np
import probeinterface as pi
import spikeinterface.full as si
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dartsort_si import dartsort

recordings = st.fixed_dictionaries(dict(
    layout=st.sampled_from(["tetrode", "two_columns"]),
    num_channels=st.sampled_from([8, 16]),
    num_units=st.integers(0, 4),
    sampling_frequency=st.sampled_from([15000.0, 20000.0, 30000.0, 50000.0]),
    durations=st.sampled_from([[2.0], [2.5], [1.5, 1.5]]),
    seed=st.integers(0, 2**16),
))
configs = st.fixed_dictionaries(dict(
    voltage_threshold=st.floats(3.0, 6.0),
    peak_sign=st.sampled_from(["neg", "both"]),
    rigid=st.booleans(),
    do_motion_estimation=st.booleans(),
    matching_iterations=st.integers(1, 2),
    preprocessing=st.sampled_from(["standardize", "ibllikecmr"]),
))


def _recording(layout, num_channels, num_units, sampling_frequency, durations, seed):
    kw = dict(durations=durations, sampling_frequency=sampling_frequency, num_channels=num_channels,
              num_units=max(num_units, 1), seed=seed)
    if layout == "tetrode":
        probe = pi.generate_tetrode()
        probe.set_device_channel_indices(np.arange(4))
        kw.update(num_channels=4, probe=probe)
    rec, _ = si.generate_ground_truth_recording(**kw)
    if num_units == 0:  # noise only, on the same probe
        noise = si.generate_recording(num_channels=rec.get_num_channels(), durations=durations,
                                      sampling_frequency=sampling_frequency, seed=seed)
        noise.set_probe(rec.get_probe(), )
        rec = noise
    return rec


# CI runs the same 6 examples every time (derandomize); to explore, run with
# HYPOTHESIS_PROFILE=explore (200 random examples, about 3 minutes on 2 cores)
settings.register_profile("ci", max_examples=6, derandomize=True)
settings.register_profile("explore", max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@settings(deadline=None, suppress_health_check=list(HealthCheck))
@given(rec_kw=recordings, cfg=configs)
def test_random_recordings_and_configs_give_well_formed_output(tmp_path_factory, rec_kw, cfg):
    rec = _recording(**rec_kw)
    fs = rec.sampling_frequency
    cfg = dict(cfg, nn_denoiser_class_name="SingleChannelWaveformDenoiser", chunk_length_samples=int(fs))
    res = dartsort(rec, tmp_path_factory.mktemp("prop"), cfg=cfg)
    sorting = res["sorting"]
    segment, times = sorting.segment_times()
    lengths = [rec.get_num_samples(s) for s in range(rec.get_num_segments())]
    assert np.all((times >= 0) & (times < np.take(lengths, segment)))
    assert sorting.labels is not None and np.all(sorting.labels >= -1)
    assert np.all(np.isfinite(sorting.point_source_localizations[sorting.labels >= 0]))
    out = sorting.to_numpy_sorting()
    assert out.get_num_segments() == rec.get_num_segments()
    for unit in out.unit_ids:
        for s in range(out.get_num_segments()):
            train = out.get_unit_spike_train(unit, segment_index=s)
            assert np.all(np.diff(train) >= 0)
