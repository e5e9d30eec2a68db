"""Stages 2-3: threshold detection and NN-denoised subtraction, as SpikeInterface
PipelineNodes (PeakDetector) so chunking, n_jobs and progress bars come from
`run_node_pipeline`.

Subtraction: find threshold crossings on the residual, cut a snippet around
each on the subtraction neighbourhood, denoise it (NN, then temporal PCA),
and accept it if subtracting the denoised waveform lowers the residual's
squared norm by more than initial_threshold**2. Subtract the accepted ones
and look again, so spikes hidden under bigger ones get their turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.distance import cdist
from spikeinterface.core.node_pipeline import PeakDetector, PipelineNode, base_peak_dtype

from . import waveforms as wf
from .channels import make_channel_index
from .localization import localize_amplitude_vectors

MAX_PEEL_ITERATIONS = 50
CHANNEL_GATE = 2.0
PREFILTER_FRACTION = 0.5


@dataclass
class Geometry:
    """Probe geometry plus the neighbourhoods every stage uses (torch, on device)."""

    geom: np.ndarray
    subtraction_index: torch.Tensor
    dedup_index: torch.Tensor
    localization_index: torch.Tensor
    featurization_index: torch.Tensor
    conflicts: torch.Tensor  # (C, C) bool: within 2x the subtraction radius; one spike per round
    loc_in_sub: torch.Tensor  # where each localization channel sits in the subtraction row
    feat_in_sub: torch.Tensor

    @classmethod
    def build(cls, geom, cfg, device="cpu"):
        sub = make_channel_index(geom, cfg.subtraction_radius_um)
        loc = make_channel_index(geom, cfg.localization_radius_um)
        feat = make_channel_index(geom, cfg.featurization_radius_um)
        dedup = make_channel_index(geom, cfg.deduplication_radius_um)
        t = lambda a: torch.as_tensor(a, device=device)
        conflicts = cdist(geom, geom) <= 2 * cfg.subtraction_radius_um
        return cls(np.asarray(geom, float), t(sub), t(dedup), t(loc), t(feat), t(conflicts),
                   t(_positions(loc, sub)), t(_positions(feat, sub)))


def _positions(small: np.ndarray, big: np.ndarray) -> np.ndarray:
    """For each row, where small[c, j] sits in big[c] (big.shape[1] for padding)."""
    n_chans, width = big.shape
    out = np.full(small.shape, width, dtype=np.int64)
    for c in range(n_chans):
        where = {ch: j for j, ch in enumerate(big[c]) if ch < n_chans}
        for j, ch in enumerate(small[c]):
            if ch < n_chans:
                out[c, j] = where[ch]
    return out


def take_channels(snippets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Re-index (n, L, K_big) snippets onto a smaller neighbourhood via positions (n, K_small)."""
    padded = torch.cat([snippets, torch.zeros_like(snippets[:, :, :1])], dim=2)
    return torch.gather(padded, 2, positions[:, None, :].expand(-1, snippets.shape[1], -1))


@dataclass
class SnippetWindow:
    n_before: int
    n_after: int
    feature_start: int  # feature window inside the snippet
    feature_end: int

    @classmethod
    def from_config(cls, cfg, fs):
        nb = int(round(cfg.ms_before * fs / 1000))
        na = int(round(cfg.ms_after * fs / 1000))
        fb = int(round(cfg.feature_ms_before * fs / 1000))
        fa = int(round(cfg.feature_ms_after * fs / 1000))
        return cls(nb, na, nb - fb, nb + fa)

    @property
    def length(self):
        return self.n_before + self.n_after

    def offsets(self, device="cpu"):
        return torch.arange(-self.n_before, self.n_after, device=device)


class Denoiser:
    """NN denoiser (optional) followed by temporal-PCA projection, per channel.

    A projection of pure noise still "explains" about `rank` units of squared
    norm per channel, which over ~40 channels would pass any threshold; so
    channels whose own decrease is under CHANNEL_GATE * rank are zeroed, which
    keeps the denoised waveform on the channels that carry the spike.
    """

    def __init__(self, tpca: wf.TemporalPCA, nn_model=None, device="cpu"):
        self.tpca = tpca.to(device)
        self.nn_model = nn_model.to(device) if nn_model is not None else None
        self.device = device

    def __call__(self, snippets: torch.Tensor, mask: torch.Tensor, min_decrease=None):
        """Denoised snippets (zeros on gated channels). With min_decrease, snippets
        whose cheap temporal-PCA-only decrease is under it skip the NN (and come
        back as zeros): the NN mostly lowers that figure, so they would fail anyway."""
        out = self._project(snippets, snippets, mask)
        if self.nn_model is None:
            return out
        todo = torch.ones(len(snippets), dtype=torch.bool, device=snippets.device)
        if min_decrease is not None:
            todo = _decrease(snippets, out) > min_decrease
        # the NN only sees channels that carry signal after the cheap projection
        signal = (out != 0).any(1) & mask
        clean = torch.zeros_like(snippets)
        if todo.any():
            sub, sig = snippets[todo], signal[todo]
            clean[todo] = self._project(sub, self._nn(sub, sig), sig)
        return clean

    def denoise_ungated(self, snippets, mask):
        """NN (if any) then temporal PCA on every real channel, no channel gate."""
        out = self._nn(snippets, mask) if self.nn_model is not None else snippets
        return self._project_ungated(out, mask)

    def project_only(self, snippets, mask):
        return self._project(snippets, snippets, mask)

    def _nn(self, snippets, mask):
        flat = snippets.permute(0, 2, 1)[mask]  # (n_valid, L)
        with torch.no_grad():
            clean = _apply_nn(self.nn_model, flat)
        out = torch.zeros_like(snippets).permute(0, 2, 1).clone()
        out[mask] = clean
        return out.permute(0, 2, 1)

    def _project_ungated(self, denoised, mask):
        return self.tpca.project(denoised) * mask[:, None, :]

    def _project(self, snippets, denoised, mask):
        out = self._project_ungated(denoised, mask)
        per_channel = 2 * (snippets * out).sum(1) - (out * out).sum(1)
        return out * (per_channel > CHANNEL_GATE * self.tpca.rank)[:, None, :]


def _decrease(snippets, clean):
    """Drop in squared norm from subtracting clean from snippets, per snippet."""
    return 2 * (snippets * clean).sum((1, 2)) - (clean * clean).sum((1, 2))


def _apply_nn(model, flat, batch=4096):
    denoise = getattr(model, "denoise", None) or model
    return torch.cat([denoise(flat[i: i + batch]) for i in range(0, len(flat), batch)]) if len(flat) else flat


class ThresholdDetector(PeakDetector):
    """Plain threshold detection with spatio-temporal deduplication.

    Used for the quick full-coverage grab for motion estimation: returns the
    peaks and an exponential-decay localization (x, y, z, alpha, decay) from
    the raw amplitudes (see localization.py for why not the point source).
    """

    def __init__(self, recording, geometry: Geometry, window: SnippetWindow, threshold: float,
                 peak_sign: str, dedup_samples: int, device="cpu", localize=True):
        super().__init__(recording, return_output=True)
        self.geometry = geometry
        self.window = window
        self.threshold = threshold
        self.peak_sign = peak_sign
        self.dedup_samples = dedup_samples
        self.device = device
        self.localize = localize

    def get_margin(self):
        return self.window.length + self.dedup_samples

    def get_dtype(self):
        return base_peak_dtype

    def compute(self, traces, start_frame, end_frame, segment_index, max_margin):
        g = self.geometry
        x = as_finite_tensor(traces, start_frame, self.device)
        margin = self.get_margin()
        t, c, e = wf.find_peaks(x, self.threshold, self.peak_sign, g.dedup_index, self.dedup_samples,
                                valid=(margin, len(x) - margin))
        peaks = _peak_array(t, c, x[t, c], segment_index)
        if not self.localize:
            return (peaks,)
        offsets = self.window.offsets(self.device)
        snips = wf.cut(x, t, c, g.localization_index, offsets)
        amps = wf.ptp(snips)
        amps = torch.where(wf.neighbour_mask(g.localization_index, c), amps, torch.nan)
        locs = localize_amplitude_vectors(amps, c.cpu().numpy(), g.geom, g.localization_index.cpu().numpy(),
                                          device=self.device, model="exponential")
        return peaks, locs.astype(np.float32)


def as_finite_tensor(traces, start_frame, device):
    """Chunk traces as float32 torch; NaN/inf anywhere is an error, not garbage spikes."""
    x = torch.as_tensor(np.asarray(traces, dtype=np.float32), device=device)
    if not torch.isfinite(x).all():
        raise ValueError(
            f"The recording contains NaN or infinite samples (near sample {start_frame}); fix or "
            "remove them before sorting."
        )
    return x


def _peak_array(times, chans, amplitudes, segment_index):
    peaks = np.zeros(len(times), dtype=base_peak_dtype)
    peaks["sample_index"] = times.cpu().numpy()
    peaks["channel_index"] = chans.cpu().numpy()
    peaks["amplitude"] = amplitudes.cpu().numpy()
    peaks["segment_index"] = segment_index
    return peaks


def subtraction_nodes(recording, geometry, window, denoiser, feature_tpca, cfg, dedup_samples, device="cpu",
                      subtract=True) -> list:
    """The subtraction pipeline: the peeler, then localization and featurization as nodes of
    their own. Outputs per spike: peaks, denoised ptp amplitude vector on the localization
    neighbourhood (n, K_loc), point-source localization (n, 4) and collision-cleaned temporal
    PCA features on the featurization neighbourhood (n, rank, K_feat)."""
    peeler = SubtractionPeeler(recording, geometry, window, denoiser, cfg, dedup_samples, device, subtract)
    return [peeler, PointSourceLocalizer(recording, peeler, geometry, device),
            CollisionCleanedFeatures(recording, peeler, geometry, window, feature_tpca, device)]


class SubtractionPeeler(PeakDetector):
    """NN-denoised subtraction on each chunk; outputs per spike: peaks (amplitude: the denoised
    peak-to-peak), the denoised ptp amplitude vector on the localization neighbourhood (n, K_loc),
    and, for its child nodes only, the collision-cleaned snippet (residual + own waveform) on the
    subtraction neighbourhood (n, L, K_sub).
    """

    def __init__(self, recording, geometry: Geometry, window: SnippetWindow, denoiser: Denoiser,
                 cfg, dedup_samples: int, device="cpu", subtract=True, return_output=(True, True, False)):
        super().__init__(recording, return_output=return_output)
        # subtract=False: plain threshold detection with the same features (the yardstick
        # subtraction is measured against in benchmarks/detection_recall.py)
        self.subtract = subtract
        self.geometry = geometry
        self.window = window
        self.denoiser = denoiser
        self.threshold = cfg.voltage_threshold
        self.peak_sign = cfg.peak_sign
        self.accept = cfg.initial_threshold ** 2
        self.dedup_samples = dedup_samples
        self.device = device
        self.max_shift = int(round(cfg.alignment_ms * recording.sampling_frequency / 1000))

    def get_margin(self):
        return 2 * self.window.length

    def get_dtype(self):
        return base_peak_dtype

    def compute(self, traces, start_frame, end_frame, segment_index, max_margin):
        x = as_finite_tensor(traces, start_frame, self.device)
        residual = x.clone()
        times, chans, waves = self.peel(residual) if self.subtract else self.detect(residual)
        times, waves = self.align(times, waves)
        margin = self.get_margin()
        keep = (times >= margin) & (times < len(x) - margin)
        times, chans, waves = times[keep], chans[keep], waves[keep]
        if not self.subtract:
            waves = torch.zeros_like(waves)  # nothing was subtracted: the residual is the data
        return self.collision_cleaned(residual, times, chans, waves, segment_index)

    def detect(self, residual):
        """Threshold crossings and their denoised waveforms (used to align them), nothing subtracted."""
        g, w = self.geometry, self.window
        t, c, _ = wf.find_peaks(residual, self.threshold, self.peak_sign, g.dedup_index, self.dedup_samples,
                                valid=(w.n_before, len(residual) - w.n_after))
        snips = wf.cut(residual, t, c, g.subtraction_index, w.offsets(self.device))
        return t, c, self.denoiser(snips, wf.neighbour_mask(g.subtraction_index, c))

    def peel(self, residual):
        g, w = self.geometry, self.window
        offsets = w.offsets(self.device)
        valid = (w.n_before, len(residual) - w.n_after)
        last = None
        found = []
        for _ in range(MAX_PEEL_ITERATIONS):
            rows = None if last is None else _rows_near(last[0], w.length, len(residual))
            t, c, _ = wf.find_peaks(residual, self.threshold, self.peak_sign, g.dedup_index,
                                    self.dedup_samples, valid=valid, rows=rows)
            if last is not None:
                # only near what we just subtracted can the residual hold something new
                near = _near(t, c, *last, g.conflicts, w.length)
                t, c = t[near], c[near]
            t, c = self.prefilter(residual, t, c)
            if not len(t):
                break
            snips = wf.cut(residual, t, c, g.subtraction_index, offsets)
            mask = wf.neighbour_mask(g.subtraction_index, c)
            clean = self.denoiser(snips, mask, min_decrease=self.accept)
            decrease = _decrease(snips, clean)
            # accepted snippets of one round must not overlap (or a big spike seen
            # from two candidates is subtracted twice): keep the biggest within a
            # snippet length and twice the subtraction radius. Overlapping spikes
            # are found in the next rounds, on the residual.
            ok = decrease > self.accept
            if not ok.any():
                break
            # the next round looks near everything accepted here, and near what lost only
            # to a bigger neighbour: in a chain A > B > S, B waits for A, but S is too far
            # from A to be looked at again unless it is remembered itself
            last = (t[ok], c[ok])
            ok[ok.clone()] = wf.strongest(decrease[ok], t[ok], c[ok], g.conflicts, w.length)
            t, c, clean = t[ok], c[ok], clean[ok]
            wf.add(residual, t, c, g.subtraction_index, offsets, -clean)
            found.append((t, c, clean))
        if not found:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return empty, empty, torch.zeros((0, w.length, g.subtraction_index.shape[1]), device=self.device)
        t, c, clean = (torch.cat(z) for z in zip(*found))
        order = torch.argsort(t)
        return t[order], c[order], clean[order]

    def align(self, times, waves):
        """Move each spike's time to the trough (peak for peak_sign='pos') of its denoised
        waveform on its biggest channel, shifting the waveform along. With peak_sign='both'
        detection can land on the positive after-peak; templates and reported times should
        sit on the trough, up to alignment_ms away. An event detected on a trough only moves
        within the deduplication window: the deepest point further away is more likely a
        colliding neighbour's trough than its own."""
        if not len(times):
            return times, waves
        n = len(times)
        sign = 1.0 if self.peak_sign == "pos" else -1.0
        big = wf.ptp(waves).argmax(1)
        main = sign * waves[torch.arange(n), :, big]  # (n, L): the extreme we align to is a max
        nb = self.window.n_before
        lags = torch.arange(main.shape[1], device=waves.device) - nb
        on_extreme = main[:, nb] > 0
        reach = torch.where(on_extreme, self.dedup_samples, self.max_shift)
        allowed = lags[None, :].abs() <= reach[:, None]
        shift = lags[main.masked_fill(~allowed, -torch.inf).argmax(1)]
        idx = torch.arange(waves.shape[1], device=waves.device)[None, :] + shift[:, None]
        ok = (idx >= 0) & (idx < waves.shape[1])
        rolled = torch.gather(waves, 1, idx.clamp(0, waves.shape[1] - 1)[:, :, None].expand_as(waves))
        return times + shift, rolled * ok[:, :, None]

    def prefilter(self, residual, t, c):
        """Drop candidates whose cheap projection on the few channels around the peak
        explains under PREFILTER_FRACTION of the acceptance threshold: most threshold
        crossings are noise, and the full neighbourhood costs ~5x more to look at."""
        g = self.geometry
        snips = wf.cut(residual, t, c, g.dedup_index, self.window.offsets(self.device))
        cheap = self.denoiser.project_only(snips, wf.neighbour_mask(g.dedup_index, c))
        keep = _decrease(snips, cheap) > PREFILTER_FRACTION * self.accept
        return t[keep], c[keep]

    def collision_cleaned(self, residual, times, chans, waves, segment_index):
        """Peaks, denoised amplitude vectors and the collision-cleaned snippets (residual + own
        waveform) on the subtraction neighbourhood."""
        g = self.geometry
        cleaned = wf.cut(residual, times, chans, g.subtraction_index, self.window.offsets(self.device)) + waves
        # amplitudes denoised without the channel gate: small channels matter to the point-source fit
        loc_mask = wf.neighbour_mask(g.localization_index, chans)
        on_loc = take_channels(cleaned, g.loc_in_sub[chans])
        amps = wf.ptp(self.denoiser.denoise_ungated(on_loc, loc_mask))
        amps = torch.where(loc_mask, amps, torch.nan)
        main_amp = torch.nan_to_num(amps, nan=0.0).amax(1) if len(amps) else torch.zeros(0, device=self.device)
        peaks = _peak_array(times, chans, main_amp, segment_index)
        return peaks, amps.cpu().numpy().astype(np.float32), cleaned


class PointSourceLocalizer(PipelineNode):
    """Child of SubtractionPeeler: the point-source fit (x, y, z, alpha) of each spike's denoised
    amplitude vector (localization.py)."""

    def __init__(self, recording, parent: SubtractionPeeler, geometry: Geometry, device="cpu"):
        super().__init__(recording, return_output=True, parents=[parent])
        self.geometry = geometry
        self.device = device

    def get_dtype(self):
        return np.dtype("float32")

    def compute(self, traces, peaks, amps, cleaned):
        g = self.geometry
        locs = localize_amplitude_vectors(amps, peaks["channel_index"], g.geom,
                                          g.localization_index.cpu().numpy(), device=self.device)
        return locs.astype(np.float32)


class CollisionCleanedFeatures(PipelineNode):
    """Child of SubtractionPeeler: temporal-PCA features of each spike's collision-cleaned snippet
    on the featurization neighbourhood (n, rank, K_feat), zero on padding channels."""

    def __init__(self, recording, parent: SubtractionPeeler, geometry: Geometry, window: SnippetWindow,
                 feature_tpca: wf.TemporalPCA, device="cpu"):
        super().__init__(recording, return_output=True, parents=[parent])
        self.geometry = geometry
        self.window = window
        self.feature_tpca = feature_tpca.to(device)
        self.device = device

    def get_dtype(self):
        return np.dtype("float32")

    def compute(self, traces, peaks, amps, cleaned):
        g, w = self.geometry, self.window
        chans = torch.as_tensor(peaks["channel_index"], device=self.device)
        on_feat = take_channels(cleaned, g.feat_in_sub[chans])[:, w.feature_start: w.feature_end]
        feats = self.feature_tpca.transform(on_feat) * wf.neighbour_mask(g.featurization_index, chans)[:, None, :]
        return feats.cpu().numpy().astype(np.float32)


def _rows_near(times, window, n_rows):
    """Sorted sample indices within +-window of any of times, or None when they cover
    most of the chunk (then one search of the whole chunk is cheaper). Looking only there
    finds what _near keeps: a whole-chunk search each round was 7% of a sort (py-spy)."""
    if len(times) * (2 * window + 1) > n_rows // 2:
        return None
    rows = (times[:, None] + torch.arange(-window, window + 1, device=times.device)).reshape(-1)
    return torch.unique(rows.clamp(0, n_rows - 1))


def _near(times, chans, ref_times, ref_chans, conflicts, window, batch=4096):
    """True for (times, chans) within +-window samples of a ref spike on a conflicting channel."""
    out = torch.zeros(len(times), dtype=torch.bool, device=times.device)
    for i in range(0, len(times), batch):
        t, c = times[i: i + batch], chans[i: i + batch]
        close = ((t[:, None] - ref_times[None, :]).abs() <= window) & conflicts[c[:, None], ref_chans[None, :]]
        out[i: i + batch] = close.any(1)
    return out
