"""Our stages as SpikeInterface components, registered on `import dartsort_si`:

    from spikeinterface.sortingcomponents.peak_detection import detect_peaks
    peaks = detect_peaks(recording, method="dartsort_subtraction", method_kwargs=dict(detect_threshold=4))

The recording is filtered (not necessarily standardized: traces are divided by SpikeInterface's
noise levels on the fly). Detection is DARTsort's NN-denoised subtraction with the shipped
single-channel denoiser; temporal PCAs are fitted on threshold crossings of the recording when the
node is built.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import load_config
from .subtraction import Denoiser, Geometry, SnippetWindow, SubtractionPeeler


class DARTsortSubtractionDetector(SubtractionPeeler):
    """`detect_peaks(..., method="dartsort_subtraction")`: the peaks subtraction finds (their
    `amplitude` is the denoised peak-to-peak, in noise standard deviations)."""

    name = "dartsort_subtraction"
    engine = "torch"
    need_noise_levels = True
    preferred_mp_context = None
    need_first_call_before_pipeline = False
    params_doc = """
    detect_threshold: float
        Threshold crossings looked at, in noise standard deviations (DARTsort's voltage_threshold).
    peak_sign: "neg" | "both" | "pos"
    initial_threshold: float
        A spike is subtracted when the residual's norm drops by this much (squared-norm drop >= its square).
    noise_levels: array
        Per-channel noise (given by detect_peaks).
    """

    def __init__(self, recording, detect_threshold=4.0, peak_sign="neg", initial_threshold=10.0,
                 noise_levels=None, return_output=True):
        import spikeinterface.preprocessing as spre

        from . import denoisers, steps

        cfg = load_config(dict(voltage_threshold=detect_threshold, peak_sign=peak_sign,
                               initial_threshold=initial_threshold))
        self.noise_levels = np.asarray(noise_levels, dtype=np.float32)
        fs = recording.sampling_frequency
        geometry = Geometry.build(recording.get_channel_locations(), cfg, "cpu")
        window = SnippetWindow.from_config(cfg, fs)
        standardized = spre.scale(recording, gain=1.0 / self.noise_levels, dtype="float32")
        ctx = steps.Context(standardized, None, cfg, torch.device("cpu"), {},
                            geometry, window, None)
        spikes, _ = steps.sample_snippets(ctx)
        if len(spikes) < 10:
            raise ValueError(f"dartsort_subtraction: only {len(spikes)} threshold crossings to fit on.")
        tpca, feature_tpca = steps.fit_temporal_pcas(spikes, window, cfg.temporal_pca_rank)
        nn = denoisers.make_denoiser("SingleChannelWaveformDenoiser", spike_length_samples=window.length,
                                     sampling_frequency=fs, device="cpu")
        super().__init__(recording, geometry, window, Denoiser(tpca, nn), feature_tpca, cfg,
                         ctx.dedup_samples, "cpu")
        self.return_output = return_output
        self._kwargs = dict(detect_threshold=detect_threshold, peak_sign=peak_sign,
                            initial_threshold=initial_threshold)

    def compute(self, traces, start_frame, end_frame, segment_index, max_margin):
        peaks, *_ = super().compute(traces / self.noise_levels, start_frame, end_frame, segment_index, max_margin)
        # alignment moves times by up to a few samples: SpikeInterface expects them in order
        return (peaks[np.argsort(peaks["sample_index"], kind="stable")],)


def register():
    try:
        from spikeinterface.sortingcomponents.peak_detection import detect_peak_methods
    except ImportError:  # SpikeInterface without its sortingcomponents: the sorter still works
        return
    detect_peak_methods[DARTsortSubtractionDetector.name] = DARTsortSubtractionDetector
