"""Stage 1: input checks and preprocessing, built from spikeinterface.preprocessing.

Everything downstream assumes "SNR units": highpassed traces whose noise has
unit standard deviation on each channel. Preprocessing makes it so; with
preprocessing='none' we measure the noise and refuse input that is not.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger("dartsort_si")

MIN_DURATION_S = 1.0


def check_recording(recording, chunk_length_samples: int | None = None):
    """Refuse input we cannot sort, with a message that says what to do."""
    from spikeinterface.core import BaseRecording

    if not isinstance(recording, BaseRecording):
        raise TypeError(f"dartsort needs a SpikeInterface recording, got {type(recording).__name__}.")
    if not recording.has_probe() and recording.get_property("location") is None:
        raise ValueError(
            "The recording has no probe / channel locations. Attach one with "
            "recording.set_probe(probe) (probeinterface) before sorting."
        )
    locations = recording.get_channel_locations()
    if locations.shape[1] != 2:
        raise ValueError(f"dartsort needs 2D channel locations, got shape {locations.shape}.")
    if len(np.unique(locations, axis=0)) != len(locations):
        raise ValueError("Two or more channels share the same location: the probe is wrong.")
    if recording.get_num_channels() < 2:
        raise ValueError("dartsort needs a multi-channel probe (at least 2 channels).")
    dtype = np.dtype(recording.get_dtype())
    if dtype.kind not in "iuf":
        raise ValueError(f"Unsupported trace dtype {dtype}: need integer or float samples.")
    duration = recording.get_total_duration()
    if duration < MIN_DURATION_S:
        raise ValueError(
            f"The recording is {duration:.2f} s long; dartsort needs at least {MIN_DURATION_S} s."
        )
    n = recording.get_total_samples()
    if chunk_length_samples is not None and n < chunk_length_samples:
        raise ValueError(
            f"The recording ({n} samples) is shorter than one chunk (chunk_length_samples="
            f"{chunk_length_samples}); pass a smaller chunk_length_samples (or chunk_duration in "
            "run_sorter), at most the recording's length."
        )


def join_segments(rec):
    """One time axis for a multi-segment recording: its segments end to end, each preprocessed
    on its own first (filters do not run across a gap). Units are the same neurons in every
    segment, so they are sorted together; segment_lengths maps spike times back."""
    if rec.get_num_segments() == 1:
        return rec
    from spikeinterface.core import concatenate_recordings

    logger.info("Sorting %d segments together (%s samples).", rec.get_num_segments(),
                ", ".join(str(n) for n in segment_lengths(rec)))
    return concatenate_recordings([rec])


def segment_lengths(rec):
    return np.array([rec.get_num_samples(i) for i in range(rec.get_num_segments())], dtype=np.int64)


def preprocess(recording, preprocessing: str, dtype: str = "float32"):
    """Apply the configured preprocessing chain; returns a float recording in SNR units."""
    import spikeinterface.preprocessing as spre

    if preprocessing == "none":
        return recording
    rec = recording
    if np.dtype(rec.get_dtype()).kind in "iu":
        rec = spre.astype(rec, "float32")
    if preprocessing in ("ibllike", "ibllikecmr"):
        rec = spre.highpass_filter(rec, freq_min=300.0)
        if rec.get_property("inter_sample_shift") is not None:
            rec = spre.phase_shift(rec)
        rec = _interpolate_bad_channels(rec)
        if preprocessing == "ibllikecmr":
            rec = spre.common_reference(rec, operator="median", reference="global")
    rec = _standardize(rec)
    return spre.astype(rec, dtype) if dtype != "float32" else rec


def _standardize(rec):
    """Scale each channel so its noise (MAD estimate) has unit std."""
    import spikeinterface.preprocessing as spre
    from spikeinterface.core import get_noise_levels

    noise = get_noise_levels(rec, method="mad", return_in_uV=False, random_slices_kwargs=_noise_slices(rec))
    noise = np.where(noise > 0, noise, 1.0)
    return spre.scale(rec, gain=1.0 / noise, dtype="float32")


def _interpolate_bad_channels(rec):
    import spikeinterface.preprocessing as spre

    try:
        bad, _ = spre.detect_bad_channels(rec, method="coherence+psd")
    except Exception as err:  # too few channels or too short for the PSD method
        logger.info("Bad channel detection skipped: %s", err)
        return rec
    if len(bad) == 0:
        return rec
    if len(bad) > rec.get_num_channels() // 2:
        logger.warning("%d of %d channels flagged bad; not interpolating.", len(bad), rec.get_num_channels())
        return rec
    logger.info("Interpolating %d bad channels: %s", len(bad), list(bad))
    return spre.interpolate_bad_channels(rec, bad)


def _noise_slices(rec):
    n = rec.get_num_samples(0)
    chunk = min(10000, n)
    return dict(num_chunks_per_segment=min(20, max(1, n // chunk)), chunk_size=chunk, seed=0)


def check_standardized(rec, tolerance: float = 0.5):
    """Measure noise on a few chunks: refuse data far from unit noise, or with NaNs."""
    from spikeinterface.core import get_random_data_chunks

    chunks = get_random_data_chunks(rec, return_in_uV=False, **_noise_slices(rec))
    if not np.all(np.isfinite(chunks)):
        raise ValueError("The recording contains NaN or infinite samples; fix or remove them before sorting.")
    mad = np.median(np.abs(chunks - np.median(chunks, axis=0)), axis=0) / 0.6745
    level = float(np.median(mad))
    if not (1 - tolerance <= level <= 1 + tolerance):
        raise ValueError(
            f"With preprocessing='none' dartsort expects standardized traces (noise std ~1 per "
            f"channel), but the median noise level is {level:.3g}. Pass "
            "preprocessing='standardize' (already filtered data) or 'ibllikecmr' (raw data)."
        )
    return level
