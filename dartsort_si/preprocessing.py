"""Stage 1: input checks and preprocessing, built from spikeinterface.preprocessing.

Everything downstream assumes "SNR units": highpassed traces whose noise has
unit standard deviation on each channel. Preprocessing makes it so; with
preprocessing='none' we measure the noise and refuse input that is not.
"""

from __future__ import annotations

import logging
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from spikeinterface.preprocessing.basepreprocessor import BasePreprocessor, BasePreprocessorSegment

logger = logging.getLogger("dartsort_si")

MIN_DURATION_S = 1.0
# a channel whose noise is under 10% of the median channel's carries no signal (dead or
# disconnected); real low-impedance channels on Neuropixels sit within 0.5-2x of the median
DEAD_NOISE_RATIO = 0.1
# clipped channels sit at their rail for a large share of samples; on unclipped noise the
# extreme value occurs about once per chunk (1e-4 of samples or less at 10000-sample chunks)
SATURATED_FRACTION = 0.002
# a channel whose noise is over 5x the median channel's is noisy (SpikeInterface's default
# std_mad_threshold for detect_bad_channels(method="mad"))
NOISY_MAD_RATIO = 5.0
# common median reference: a spike's footprint (amplitude over ~30% of its peak) and the largest
# share of channels it may cover. Measured on SpikeInterface's generator (benchmarks/
# lab_recordings.py, seed 1): on the tetrode the median reference cut units' troughs 1.5-3x
# (20.6 -> 14.3, 11.3 -> 3.8 noise sd); on 32-ch two-column (31% covered) and 16-ch linear
# probes it changed them by under 10%.
CMR_FOOTPRINT_UM = 50.0
CMR_MAX_COVERED = 0.4
# the highpass: SpikeInterface's highpass_filter at its defaults (Butterworth of order 5 run
# forward and backward, margin 5 periods of the cutoff), applied as its squared gain in the
# frequency domain (ZeroPhaseHighpass): scipy's sosfiltfilt took 73% of preprocessing (py-spy,
# 300 s x 128 ch: 37 of 51 s), the FFT a tenth of that per chunk (0.04 against 0.45 s for
# 1 s x 128 ch, one thread), the same traces to 1e-4 of the noise sd inside the recording
HIGHPASS_HZ = 300.0
HIGHPASS_ORDER = 5
HIGHPASS_MARGIN_PERIODS = 5
# the preprocessed traces are kept in memory when they take at most this share of the memory
# available at the start (cache_in_memory). Every step that reads the recording (fit_models,
# subtraction, templates, matching's three passes) otherwise filters and median-references it
# again: 48% of all CPU samples of a 60 s x 128 ch sort (py-spy: sosfilt 25%, median 20%).
MEMORY_CACHE_FRACTION = 0.25
# and in anonymous memory of its own (mmap), not through numpy's allocator, which asks the kernel
# for huge pages on big arrays (madvise): where transparent huge pages are compacted at the fault
# ("defrag" set to madvise, the common default) and memory is fragmented (a page cache holding
# other files), each fault waits for a compaction. This VM: 2.3 GB filled in 8.0-10.6 s through
# numpy, 0.6-1.9 s through mmap; 57% of the 300 s x 128 ch sort's preprocessing samples (py-spy)
# were that fill.


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
    saturated = saturated_channels(_finite_chunks(rec))
    if preprocessing in ("ibllike", "ibllikecmr"):
        rec = ZeroPhaseHighpass(rec, freq_min=HIGHPASS_HZ)
        if rec.get_property("inter_sample_shift") is not None:
            rec = spre.phase_shift(rec)
    rec = leave_out_bad_channels(rec, saturated)
    if preprocessing == "ibllikecmr" and cmr_keeps_spikes(rec):
        rec = GlobalMedianReference(rec)
    rec = _standardize(rec)
    return spre.astype(rec, dtype) if dtype != "float32" else rec


class ZeroPhaseHighpass(BasePreprocessor):
    """A Butterworth highpass run forward and backward (spikeinterface.preprocessing
    .highpass_filter's default), computed as its squared gain on the FFT of each chunk with its
    margins. Odd extension at the margins' ends keeps the far ends' steps out of the chunk; a
    chunk at the recording's start or end is filtered by sosfiltfilt itself, whose edge
    convention (steady-state start) differs over the first and last 400 samples."""

    def __init__(self, recording, freq_min=HIGHPASS_HZ, order=HIGHPASS_ORDER):
        from scipy.signal import butter

        BasePreprocessor.__init__(self, recording, dtype="float32")
        self.annotate(is_filtered=True)
        fs = recording.get_sampling_frequency()
        sos = butter(order, freq_min, btype="highpass", fs=fs, output="sos")
        margin = int(HIGHPASS_MARGIN_PERIODS * fs / freq_min)
        for segment in recording.segments:
            self.add_recording_segment(_ZeroPhaseHighpassSegment(segment, sos, fs, margin))
        self._kwargs = dict(recording=recording, freq_min=float(freq_min), order=int(order))


class _ZeroPhaseHighpassSegment(BasePreprocessorSegment):
    def __init__(self, parent, sos, fs, margin):
        BasePreprocessorSegment.__init__(self, parent)
        self.sos, self.fs, self.margin = sos, fs, margin
        self._gains = {}

    def get_traces(self, start_frame, end_frame, channel_indices):
        from scipy.signal import sosfiltfilt
        from spikeinterface.core import get_chunk_with_margin

        x, left, right = get_chunk_with_margin(self.parent_recording_segment, start_frame, end_frame,
                                               channel_indices, self.margin)
        x = x.astype(np.float32, copy=False)
        if left < self.margin or right < self.margin or len(x) <= 2 * self.margin:
            y = sosfiltfilt(self.sos, x, axis=0).astype(np.float32)
        else:
            y = self._filtered(x)
        return y[left: len(y) - right]

    def _filtered(self, x):
        import scipy.fft as sfft

        m = self.margin
        x = x - x.mean(0)
        x = np.concatenate([2 * x[:1] - x[m:0:-1], x, 2 * x[-1:] - x[-2:-m - 2:-1]])
        size = sfft.next_fast_len(len(x), real=True)
        if size not in self._gains:
            from scipy.signal import sosfreqz

            _, h = sosfreqz(self.sos, worN=np.fft.rfftfreq(size, 1 / self.fs), fs=self.fs)
            self._gains[size] = (np.abs(h) ** 2).astype(np.float32)[:, None]
        spectrum = sfft.rfft(x, n=size, axis=0)
        spectrum *= self._gains[size]
        return sfft.irfft(spectrum, n=size, axis=0)[m: len(x) - m]


class GlobalMedianReference(BasePreprocessor):
    """spikeinterface.preprocessing.common_reference(operator="median", reference="global"): each
    sample's median over all channels subtracted from every channel. The median is read off a
    sort of the sample's channels: numpy's sort is vectorized (AVX-512) where its partition,
    which np.median uses, is not; one 1 s x 128 ch chunk 4.7 against 50 ms, the same values
    (a sample with a NaN: the median of its other channels, where np.median gives NaN).
    gain (C,): then also multiplied by it per channel, as spikeinterface.preprocessing.scale
    would after it (the same float32 products), without that step's two more passes and copy
    over the chunk."""

    def __init__(self, recording, gain=None):
        BasePreprocessor.__init__(self, recording, dtype="float32")
        gain = None if gain is None else np.asarray(gain, dtype=np.float32)
        for segment in recording.segments:
            self.add_recording_segment(_GlobalMedianReferenceSegment(segment, gain))
        self._kwargs = dict(recording=recording, gain=None if gain is None else gain.tolist())


class _GlobalMedianReferenceSegment(BasePreprocessorSegment):
    def __init__(self, parent, gain):
        BasePreprocessorSegment.__init__(self, parent)
        self.gain = gain

    def get_traces(self, start_frame, end_frame, channel_indices):
        traces = self.parent_recording_segment.get_traces(start_frame, end_frame, slice(None))
        traces = traces.astype(np.float32, copy=False)
        ordered = np.sort(traces, axis=1)
        m = traces.shape[1] // 2
        # np.median's mean of the two middle values, in the same float32 arithmetic
        median = ordered[:, m] if traces.shape[1] % 2 else (ordered[:, m - 1] + ordered[:, m]) / np.float32(2)
        out = traces[:, channel_indices] - median[:, None]
        if self.gain is not None:
            out *= self.gain[channel_indices]
        return out


def cmr_keeps_spikes(rec) -> bool:
    """The global median is blind to a spike only if the spike covers under half the channels.
    On a tetrode or a small dense probe one spike is on most channels, so the median holds
    it and subtracting the median erases it: there the common reference is skipped."""
    loc = rec.get_channel_locations()
    dist = np.linalg.norm(loc[:, None] - loc[None], axis=-1)
    covered = float((dist <= CMR_FOOTPRINT_UM).mean(axis=1).max())
    if covered > CMR_MAX_COVERED:
        logger.info("Common median reference skipped: one spike covers up to %.0f%% of this probe's "
                    "channels, so the median would hold the spikes.", 100 * covered)
        return False
    return True


def _standardize(rec):
    """Scale each channel so its noise (MAD estimate) has unit std."""
    import spikeinterface.preprocessing as spre

    noise = mad_noise_levels(rec)
    noise = np.where(noise > 0, noise, 1.0)
    if isinstance(rec, GlobalMedianReference):  # the scaling joins the median reference's pass
        return GlobalMedianReference(rec._kwargs["recording"], gain=1.0 / noise)
    return spre.scale(rec, gain=1.0 / noise, dtype="float32")


def _finite_chunks(rec) -> np.ndarray:
    """Random raw chunks of rec (the noise slices), refused if they hold NaN or infinite samples."""
    from spikeinterface.core import get_random_data_chunks

    chunks = get_random_data_chunks(rec, return_in_uV=False, **_noise_slices(rec))
    if not np.all(np.isfinite(chunks)):
        raise ValueError("The recording contains NaN or infinite samples; fix or remove them before sorting.")
    return chunks


def saturated_channels(chunks: np.ndarray) -> np.ndarray:
    """Indices of channels clipped at the amplifier's rail: many raw samples (chunks, (T, C))
    sit exactly at the channel's extreme value (noise reaches its own maximum about once)."""
    at_max = (chunks == chunks.max(axis=0)).mean(axis=0)
    at_min = (chunks == chunks.min(axis=0)).mean(axis=0)
    flat = chunks.max(axis=0) == chunks.min(axis=0)  # dead, not saturated
    return np.flatnonzero((np.maximum(at_max, at_min) > SATURATED_FRACTION) & ~flat)


def bad_channels(rec, saturated=()) -> dict[str, np.ndarray]:
    """Channel indices by reason: 'dead' (noise under DEAD_NOISE_RATIO of the median channel's),
    'noisy' (SpikeInterface's MAD rule: noise over median + 5 MADs, or the IBL
    coherence+psd labels where that method applies), 'saturated' (see saturated_channels).
    `rec` is highpassed."""
    import spikeinterface.preprocessing as spre

    noise = mad_noise_levels(rec)
    dead = np.flatnonzero(noise < DEAD_NOISE_RATIO * np.median(noise))
    # SpikeInterface's "mad" rule (detect_bad_channels: MAD over NOISY_MAD_RATIO x the median
    # channel's) on the noise just measured: its own call read and filtered 20 more chunks
    noisy = set(np.flatnonzero(noise > NOISY_MAD_RATIO * np.median(noise)).tolist())
    if rec.has_scaleable_traces() and rec.get_num_channels() >= 32:
        try:  # the IBL method (dead, noisy, outside the brain), tuned on Neuropixels in uV
            _, labels = spre.detect_bad_channels(rec, method="coherence+psd", seed=0, num_random_chunks=20)
            noisy |= set(np.flatnonzero(labels == "noise"))
            dead = np.union1d(dead, np.flatnonzero(labels == "dead"))
        except Exception as err:  # short recording, unusual layout
            logger.info("coherence+psd bad channel detection skipped: %s", err)
    noisy = np.setdiff1d(sorted(noisy), dead)
    saturated = np.setdiff1d(np.asarray(saturated, dtype=np.int64), np.union1d(dead, noisy))
    return dict(dead=dead, noisy=noisy, saturated=saturated)


def leave_out_bad_channels(rec, saturated=()):
    """Replace dead, noisy and saturated channels by interpolation from their neighbours (the
    channel count and order stay, so main channels keep their meaning), with a warning."""
    import spikeinterface.preprocessing as spre

    found = bad_channels(rec, saturated)
    bad = np.concatenate(list(found.values())).astype(np.int64)
    if len(bad) == 0:
        return rec
    ids = rec.channel_ids
    which = "; ".join(f"{why}: {[str(i) for i in ids[idx]]}" for why, idx in found.items() if len(idx))
    if len(bad) > rec.get_num_channels() // 2:
        logger.warning("dartsort: %d of %d channels look bad (%s); too many to leave out, sorting them "
                       "as they are. Check the recording.", len(bad), rec.get_num_channels(), which)
        return rec
    logger.warning("dartsort: bad channels left out of the sort (%s); they are replaced by interpolation "
                   "from neighbouring channels.", which)
    return spre.interpolate_bad_channels(rec, ids[np.sort(bad)])


# the noise level check takes every CHECK_STRIDE-th sample: the medians of all 200,000 samples
# per channel took 1.5 s of a 60 s x 128 ch sort's 4.4 s of preprocessing (py-spy)
CHECK_STRIDE = 5


def mad_noise_levels(rec, n_threads: int | None = None) -> np.ndarray:
    """Per channel noise sd as SpikeInterface's get_noise_levels(method="mad") measures it (the
    same chunks, the same values): the mean over random chunks of each channel's median absolute
    deviation / 0.6745. The medians run along channels laid out in rows, where SpikeInterface's
    run down the columns of (T, C) chunks, one chunk at a time: 2.0 s of the 60 s x 128 ch
    sort's preprocessing (two calls, 1.4 s of it in numpy's partition) against 0.4 s."""
    from spikeinterface.core.recording_tools import get_random_sample_slices

    slices = get_random_sample_slices(rec, **_noise_slices(rec))

    def chunk_mad(sl):
        segment, start, end = sl
        x = np.ascontiguousarray(rec.get_traces(segment_index=segment, start_frame=start, end_frame=end).T)
        med = np.median(x, axis=1, keepdims=True)
        return np.median(np.abs(x - med), axis=1) / 0.6744897501960817

    # filtering, the median reference and numpy's partition release the GIL
    with ThreadPoolExecutor(max(1, n_threads or os.cpu_count() or 1)) as pool:
        return np.mean(np.stack(list(pool.map(chunk_mad, slices))), axis=0)


def _noise_slices(rec):
    n = rec.get_num_samples(0)
    chunk = min(10000, n)
    return dict(num_chunks_per_segment=min(20, max(1, n // chunk)), chunk_size=chunk, seed=0)


def check_standardized(rec, tolerance: float = 0.5):
    """Measure noise on a few chunks: refuse data far from unit noise, or with NaNs (for
    preprocessing='none'; the other modes standardize the traces themselves)."""
    chunks = _finite_chunks(rec)[::CHECK_STRIDE]
    mad = np.median(np.abs(chunks - np.median(chunks, axis=0)), axis=0) / 0.6745
    level = float(np.median(mad))
    if not (1 - tolerance <= level <= 1 + tolerance):
        raise ValueError(
            f"With preprocessing='none' dartsort expects standardized traces (noise std ~1 per "
            f"channel), but the median noise level is {level:.3g}. Pass "
            "preprocessing='standardize' (already filtered data) or 'ibllikecmr' (raw data)."
        )
    return level


def available_memory_bytes() -> int | None:
    """Memory the system can give without swapping, or None where it cannot be told."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def cache_in_memory(rec, n_threads: int, chunk_size: int, threads: bool = True):
    """The preprocessed recording computed once into memory (a NumpyRecording with rec's probe
    and properties), or rec itself when its traces would take over MEMORY_CACHE_FRACTION of the
    available memory or the workers are processes (each would get its own copy); then every
    step recomputes the preprocessing on its reads and memory stays flat with duration."""
    from spikeinterface.core import NumpyRecording
    from tqdm.auto import tqdm

    n, c = rec.get_num_samples(0), rec.get_num_channels()
    size = n * c * np.dtype(rec.get_dtype()).itemsize
    available = available_memory_bytes()
    if not threads or available is None or size > MEMORY_CACHE_FRACTION * available:
        why = "the workers are processes" if not threads else (
            "the available memory is unknown" if available is None else
            f"over {MEMORY_CACHE_FRACTION:.0%} of the {available / 1e9:.1f} GB available")
        logger.info("Preprocessed traces (%.1f GB) not kept in memory (%s): each step filters its reads "
                    "again. copy_recording_to_tmpdir=True saves them to disk once instead.", size / 1e9, why)
        return rec
    traces = np.frombuffer(mmap.mmap(-1, size), dtype=rec.get_dtype()).reshape(n, c) if size else \
        np.empty((n, c), dtype=rec.get_dtype())
    starts = range(0, n, chunk_size)

    def fill(start):
        end = min(start + chunk_size, n)
        traces[start:end] = rec.get_traces(start_frame=start, end_frame=end)

    # filtering and the median reference release the GIL: threads fill chunks side by side
    with ThreadPoolExecutor(max(1, n_threads)) as pool:
        for _ in tqdm(pool.map(fill, starts), total=len(starts), desc="preprocess (kept in memory)",
                      leave=False):
            pass
    cached = NumpyRecording([traces], rec.get_sampling_frequency(), channel_ids=rec.channel_ids)
    rec.copy_metadata(cached)
    logger.info("Preprocessed traces kept in memory (%.1f GB of %.1f GB available).", size / 1e9, available / 1e9)
    return cached
