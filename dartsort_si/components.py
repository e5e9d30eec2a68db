"""Our stages as SpikeInterface components, registered on `import dartsort_si`:

    from spikeinterface.sortingcomponents.peak_detection import detect_peaks
    from spikeinterface.sortingcomponents.peak_localization import localize_peaks
    peaks = detect_peaks(recording, method="dartsort_subtraction", method_kwargs=dict(detect_threshold=4))
    locations = localize_peaks(recording, peaks, method="dartsort", ms_before=1.0, ms_after=1.5)
    spikes = find_spikes_from_templates(recording, templates, method="dartsort",
                                        method_kwargs=dict(noise_levels=get_noise_levels(recording)))

The recording is filtered (not necessarily standardized: traces are divided by SpikeInterface's
noise levels on the fly). Detection is DARTsort's NN-denoised subtraction with the shipped
single-channel denoiser; temporal PCAs are fitted on threshold crossings of the recording when the
node is built. Localization is our point-source fit on each peak's peak-to-peak amplitudes.
Matching is our matching pursuit (amplitude-scaled, temporally upsampled templates, objective
updated locally) with SpikeInterface `Templates`, on a recording without drift correction.
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
        nn = denoisers.make_denoiser("SingleChannelWaveformDenoiser", spike_length_samples=window.length,
                                     sampling_frequency=fs, device="cpu")
        tpca, _ = steps.fit_temporal_pcas(spikes, window, cfg.temporal_pca_rank, nn)
        super().__init__(recording, geometry, window, Denoiser(tpca, nn), cfg, ctx.dedup_samples, "cpu",
                         return_output=return_output)
        self._kwargs = dict(detect_threshold=detect_threshold, peak_sign=peak_sign,
                            initial_threshold=initial_threshold)

    def compute(self, traces, start_frame, end_frame, segment_index, max_margin):
        peaks, *_ = super().compute(traces / self.noise_levels, start_frame, end_frame, segment_index, max_margin)
        # alignment moves times by up to a few samples: SpikeInterface expects them in order
        return (peaks[np.argsort(peaks["sample_index"], kind="stable")],)


def _localizer_class():
    """Built on first registration: its base class lives in SpikeInterface's sortingcomponents."""
    from spikeinterface.core.node_pipeline import WaveformsNode, find_parent_of_type
    from spikeinterface.sortingcomponents.peak_localization.base import LocalizeBase

    from .channels import make_channel_index
    from .localization import localize_amplitude_vectors

    class DARTsortLocalizer(LocalizeBase):
        """`localize_peaks(..., method="dartsort")`: DARTsort's point-source fit (or the
        exponential-decay one) on each peak's peak-to-peak amplitudes within radius_um.
        Coordinates follow SpikeInterface: x, y in the probe plane (y along the shank), z the
        distance from the probe plane, alpha the source's amplitude scale."""

        name = "dartsort"
        params_doc = """
        radius_um: float
            Channels within this distance of the peak's channel enter the fit.
        model: "pointsource" | "exponential"
            Amplitude fall-off with distance: 1/r, or alpha * exp(-r / s) with s fitted.
        """

        def __init__(self, recording, parents, return_output=True, radius_um=100.0, model="pointsource"):
            super().__init__(recording, parents=parents, return_output=return_output, radius_um=radius_um)
            if find_parent_of_type(self.parents, WaveformsNode) is None:
                raise TypeError(f"{self.name} needs a {WaveformsNode.__name__} among its parents")
            self.model = model
            self.channel_index = make_channel_index(self.contact_locations, radius_um)
            self._dtype = np.dtype([(k, "float32") for k in ("x", "y", "z", "alpha")])
            self._kwargs.update(model=model)

        def compute(self, traces, peaks, waveforms):
            chans = peaks["channel_index"]
            padded = np.concatenate([waveforms, np.full(waveforms.shape[:2] + (1,), np.nan, waveforms.dtype)], 2)
            local = np.take_along_axis(padded, self.channel_index[chans][:, None, :], axis=2)
            amps = np.ptp(local, axis=1)
            fit = localize_amplitude_vectors(amps, chans, self.contact_locations, self.channel_index,
                                             radius_um=self.radius_um, model=self.model)
            out = np.zeros(len(peaks), dtype=self._dtype)
            # ours: x, distance from the plane, depth, alpha
            out["x"], out["z"], out["y"], out["alpha"] = fit[:, 0], fit[:, 1], fit[:, 2], fit[:, 3]
            return out

    return DARTsortLocalizer


def _matcher_class():
    from spikeinterface.sortingcomponents.matching.base import BaseTemplateMatching

    from .motion_info import MotionInfo
    from .matching import TemplateMatcher
    from .templates import Templates

    class DARTsortMatching(BaseTemplateMatching):
        """`find_spikes_from_templates(..., method="dartsort")`: DARTsort's template matching.
        `amplitude` is each spike's fitted scale (1 = the template's own size)."""

        name = "dartsort"
        need_noise_levels = True
        params_doc = """
        noise_levels: array
            Per-channel noise; traces and templates are divided by it (matching works in noise units).
        matching_threshold: float
            A spike is subtracted when the residual's norm drops by this much (squared-norm drop >= its square).
        amplitude_scaling_stddev: float
            Prior spread of a spike's amplitude around its template's (0: no scaling).
        """

        def __init__(self, recording, templates, noise_levels=None, matching_threshold=8.0,
                     amplitude_scaling_stddev=0.1, return_output=True):
            super().__init__(recording, templates, return_output=return_output)
            cfg = load_config(dict(matching_threshold=matching_threshold,
                                   amplitude_scaling_stddev=amplitude_scaling_stddev))
            self.noise_levels = np.asarray(noise_levels, dtype=np.float32)
            geom = recording.get_channel_locations()
            data = templates.get_dense_templates() / self.noise_levels
            k = len(data)
            # how many spikes each template averages is not known: counts 0 (see matching.low_rank_factors)
            ours = Templates(data.astype(np.float32), np.arange(k), np.zeros(k, np.int64), templates.nbefore)
            motion = MotionInfo.from_motion_est(geom=geom, rgeom=geom)  # no drift: registered = real
            self.matcher = TemplateMatcher(recording, ours, motion, cfg, Geometry.build(geom, cfg, "cpu"),
                                           "cpu", with_features=False)
            self._kwargs.update(noise_levels=noise_levels, matching_threshold=matching_threshold,
                                amplitude_scaling_stddev=amplitude_scaling_stddev)

        def get_margin(self):
            return self.matcher.get_margin()

        def compute_matching(self, traces, start_frame, end_frame, segment_index):
            (ours,) = self.matcher.compute(traces / self.noise_levels, start_frame, end_frame, segment_index, None)
            out = np.zeros(len(ours), dtype=self.get_dtype())
            out["sample_index"] = ours["sample_index"]
            out["channel_index"] = ours["channel_index"]
            out["cluster_index"] = ours["unit_index"]
            out["amplitude"] = ours["scale"]
            return out

    return DARTsortMatching


def register():
    try:
        from spikeinterface.sortingcomponents.peak_detection import detect_peak_methods
        from spikeinterface.sortingcomponents.matching.method_list import matching_methods
        from spikeinterface.sortingcomponents.peak_localization import peak_localization_methods
    except ImportError:  # SpikeInterface without its sortingcomponents: the sorter still works
        return
    detect_peak_methods[DARTsortSubtractionDetector.name] = DARTsortSubtractionDetector
    peak_localization_methods["dartsort"] = _localizer_class()
    matching_methods["dartsort"] = _matcher_class()
