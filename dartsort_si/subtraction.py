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

import copy
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.distance import cdist
from spikeinterface.core.node_pipeline import PeakDetector, PipelineNode, base_peak_dtype

from . import waveforms as wf
from .channels import make_channel_index
from .denoisers import Decollider, SingleChannelWaveformDenoiser
from .localization import localize_amplitude_vectors

MAX_PEEL_ITERATIONS = 50
CHANNEL_GATE = 2.0
PREFILTER_FRACTION = 0.5
# candidates cut per block in the prefilter: a whole chunk's crossings at once (~9,000 on 60 s x
# 128 ch NP1, 8 channels x 121 samples each: 35 MB) is memory the allocator maps and faults in
# afresh every round
PREFILTER_BLOCK = 1024
MIN_NN_BATCH = 4
# rows per NN call. On one thread the net took 4.2 us per row in batches of 256-512 against
# 14.7 us in batches of 4096 (its activations then outgrow the cache); NP2 drifting seed 4's
# subtraction (60 s x 128 ch, 2 workers): 32.8 s with 4096, 26.1 s with 512, 25.7 s with 256,
# the same spikes (a row's output does not depend on its batch, see _batch_invariant)
NN_BATCH = 256
# On CPUs with native bfloat16 arithmetic (oneDNN: AVX512-BF16 or AMX) the NN's two convolutions
# run in bfloat16 and its last (folded) layer in float32. One thread, batches of 128-512 rows
# (the two-conv net at 121 samples): 4.6-5.5 us per row against 7.3-7.8 us in float32; the
# convolutions' output then differs by 0.36% of its norm (relative), far under the noise the
# net removes. A row's output still does not depend on its batch. Elsewhere (no native bfloat16,
# CUDA) the net runs in float32.
NN_BFLOAT16 = True


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

    Peeling works on temporal-PCA features: the decrease a projected waveform
    brings is a function of the features (x . C'f = Cx . f), so only the
    accepted spikes are turned back into waveforms.
    """

    def __init__(self, tpca: wf.TemporalPCA, nn_model=None, device="cpu"):
        if tpca.centred:
            raise ValueError("the subtraction denoiser needs an uncentred temporal PCA (TemporalPCA.fit)")
        self.tpca = tpca.to(device)
        self.nn_model = nn_model.to(device) if nn_model is not None else None
        self.nn_features = None if nn_model is None else ProjectedNN(
            self.nn_model, self.tpca.components, bfloat16=NN_BFLOAT16 and native_bfloat16(device))
        self.device = device
        comp = self.tpca.components
        self.gram = comp @ comp.T  # (rank, rank): |C'f|^2 = f'Gf

    def __call__(self, snippets: torch.Tensor, mask: torch.Tensor):
        """Denoised snippets (zeros on gated channels)."""
        return self.tpca.inverse(self.features(snippets, mask)[0])

    def features(self, snippets, mask, min_decrease=None, memo=None, keys=None):
        """Temporal-PCA features of the denoised snippets (zeros on gated channels) and
        the drop in squared norm that subtracting them brings, per snippet.
        With min_decrease, snippets whose cheap temporal-PCA-only decrease is under it
        skip the NN (and come back as zeros): the NN mostly lowers that figure, so they
        would fail anyway. memo (NNMemo) and keys ((n, K) int64, NNMemo.keys_of): reuse
        the NN's output for channels whose input it has seen unchanged."""
        x = self.tpca.transform(snippets)
        feats, decrease = self._gate(x, x, mask)
        if self.nn_model is None:
            return feats, decrease
        todo = decrease > min_decrease if min_decrease is not None else torch.ones_like(decrease, dtype=torch.bool)
        # the NN only sees channels that carry signal after the cheap projection
        signal = (feats != 0).any(1) & mask
        feats, decrease = torch.zeros_like(feats), torch.zeros_like(decrease)
        if todo.any():
            sub, sig = snippets[todo], signal[todo]
            nn_feats = self._nn_features(sub, sig, memo, keys[todo] if keys is not None else None)
            feats[todo], decrease[todo] = self._gate(x[todo], nn_feats, sig)
        return feats, decrease

    def cheap_decrease(self, snippets, mask):
        """The decrease of the temporal-PCA projection alone (no NN)."""
        x = self.tpca.transform(snippets)
        return self._gate(x, x, mask)[1]

    def denoise_ungated(self, snippets, mask):
        """NN (if any) then temporal PCA on every real channel, no channel gate."""
        if self.nn_model is None:
            return self.tpca.project(snippets) * mask[:, None, :]
        return self.tpca.inverse(self._nn_features(snippets, mask, None, None))

    def _nn_flat(self, snippets, mask, memo=None, keys=None):
        """Temporal-PCA features (n_valid, rank) of the NN's output on the real channels' rows."""
        flat = snippets.permute(0, 2, 1)[mask]  # (n_valid, L)
        if memo is None:
            return apply_nn(self.nn_features, flat)
        return memo.apply(lambda x: apply_nn(self.nn_features, x), flat, keys[mask])

    def _nn_features(self, snippets, mask, memo, keys):
        n, _, k = snippets.shape
        out = torch.zeros((n, k, self.tpca.rank), device=snippets.device)
        out[mask] = self._nn_flat(snippets, mask, memo, keys)
        return out.permute(0, 2, 1)

    def _gate(self, x, feats, mask):
        """feats on mask, zeroed on channels whose own decrease 2 x.f - f'Gf (x: the
        snippet's features) is under the gate; and the summed decrease."""
        feats = feats * mask[:, None, :]
        per_channel = 2 * (x * feats).sum(1) - ((self.gram @ feats) * feats).sum(1)
        keep = per_channel > CHANNEL_GATE * self.tpca.rank
        return feats * keep[:, None, :], (per_channel * keep).sum(1)


class ProjectedNN(torch.nn.Module):
    """A single-channel NN denoiser followed by the temporal PCA's projection: (B, L) -> (B,
    rank). For the two-convolution net the projection folds into its last linear layer, whose
    L outputs were otherwise computed only to be projected on rank components (that layer was
    40% of the net's multiply-adds: 104k of 265k per row at 121 samples). bfloat16: the folded
    net's convolutions run in bfloat16 (NN_BFLOAT16)."""

    def __init__(self, model, components: torch.Tensor, bfloat16: bool = False):
        super().__init__()
        self.model, self.components, self.folded, self.low = model, components, None, None
        if type(model) in (SingleChannelWaveformDenoiser, Decollider):
            last = model.out
            self.folded = torch.nn.Linear(last.in_features, len(components)).to(components.device)
            with torch.no_grad():
                self.folded.weight.copy_(components @ last.weight)
                self.folded.bias.copy_(components @ last.bias)
            if bfloat16:
                self.low = copy.deepcopy(model).to(torch.bfloat16)

    def forward(self, x):
        if self.folded is None:
            return self.model(x) @ self.components.T
        if self.low is not None:
            return self.folded(self.low.hidden(x.to(torch.bfloat16)).float())
        return self.folded(self.model.hidden(x))


def native_bfloat16(device) -> bool:
    """Whether the CPU does bfloat16 convolutions natively (on a CPU without it oneDNN
    emulates them, slower than float32)."""
    if torch.device(device).type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def apply_nn(model, flat, batch=NN_BATCH):
    """The NN denoiser on single-channel rows (n, L), in batches, no gradients."""
    denoise = getattr(model, "denoise", None) or model
    with torch.no_grad():
        if not len(flat):  # as wide as the model's output, which need not be the input's
            return _batch_invariant(denoise, flat.new_zeros((1, flat.shape[1])))[:0]
        return torch.cat([_batch_invariant(denoise, flat[i: i + batch]) for i in range(0, len(flat), batch)])


def _batch_invariant(fn, x):
    """fn(x), padded to MIN_NN_BATCH rows: on the CPU, torch's conv1d rounds batches of
    1-3 rows otherwise than bigger ones (seen up to 7e-7), and a row's output must not
    depend on its batch, or reusing it (NNMemo) would change the sorting."""
    if len(x) >= MIN_NN_BATCH:
        return fn(x)
    pad = x[:1].expand(MIN_NN_BATCH - len(x), -1)
    return fn(torch.cat([x, pad]))[: len(x)]


class NNMemo:
    """The NN's output per (time, channel) within one chunk's peeling.

    The NN denoises each channel of a snippet on its own, and each peeling round
    looks again at the candidates near what it subtracted: a candidate that lost
    only to a bigger neighbour comes back with most of its channels untouched.
    On NP2 seed 4 (6 chunks) 52% of the NN's inputs were exact repeats of an
    earlier round's. An output is reused only if nothing was subtracted on its
    channel within its window since it was computed, so it is the same output.
    """

    def __init__(self, n_samples, n_channels, offsets, width=None):
        """width: length of the outputs kept (default: the snippet's)."""
        device = offsets.device
        self.n_channels = n_channels
        self.offsets = offsets
        # the round that last changed each residual sample (0: none yet)
        self.changed = torch.zeros((n_samples, n_channels), dtype=torch.int32, device=device)
        self.round = 0
        self.keys = torch.zeros(0, dtype=torch.long, device=device)  # sorted
        self.slots = torch.zeros(0, dtype=torch.long, device=device)  # row of each key's output
        self.rounds = torch.zeros(0, dtype=torch.int32, device=device)  # round it was computed in
        # outputs are appended, never moved: re-sorting them each round cost 8% of subtraction
        self.outputs = torch.zeros((1024, width or len(offsets)), device=device)
        self.used = 0

    def keys_of(self, times, cols):
        """(n, K) keys of snippets at times on absolute channels cols (padding: any value)."""
        return times[:, None] * self.n_channels + cols.clamp(max=self.n_channels - 1)

    def apply(self, fn, flat, keys):
        """fn(flat) row by row, from memory where the input is known unchanged."""
        idx, hit = self._lookup(keys)
        out = flat.new_empty((len(flat), self.outputs.shape[1]))
        out[hit] = self.outputs[self.slots[idx[hit]]]
        miss = ~hit
        if miss.any():
            out[miss] = fn(flat[miss])
            self._store(keys[miss], out[miss])
        return out

    def subtracted(self, times, cols):
        """Record that the residual changed at times + offsets on channels cols (n, K)."""
        self.round += 1
        wf.fill(self.changed, times, cols, self.offsets, self.round)

    def _lookup(self, keys):
        hit = torch.zeros(len(keys), dtype=torch.bool, device=keys.device)
        if not len(self.keys):
            return torch.zeros_like(keys), hit
        idx = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        found = torch.nonzero(self.keys[idx] == keys)[:, 0]
        k = keys[found]
        rows = k[:, None] // self.n_channels + self.offsets
        last_change = self.changed[rows, (k % self.n_channels)[:, None]].amax(1)
        hit[found] = last_change <= self.rounds[idx[found]]
        return idx, hit

    def _store(self, keys, outputs):
        end = self.used + len(outputs)
        if end > len(self.outputs):
            grown = torch.zeros((max(end, 2 * len(self.outputs)), self.outputs.shape[1]), device=outputs.device)
            grown[: self.used] = self.outputs[: self.used]
            self.outputs = grown
        self.outputs[self.used: end] = outputs
        slots = torch.arange(self.used, end, device=keys.device)
        self.used = end
        old = ~torch.isin(self.keys, keys)
        rounds = torch.full((len(keys),), self.round, dtype=torch.int32, device=keys.device)
        keys = torch.cat([self.keys[old], keys])
        order = torch.argsort(keys)
        self.keys = keys[order]
        self.slots = torch.cat([self.slots[old], slots])[order]
        self.rounds = torch.cat([self.rounds[old], rounds])[order]


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
    """Chunk traces as float32 torch; NaN/inf anywhere is an error, not garbage spikes. Checked
    in numpy: torch's isfinite + all took 8.4 ms per 1 s x 128 ch chunk (one thread), numpy's 0.6."""
    traces = np.asarray(traces, dtype=np.float32)
    if not np.isfinite(traces).all():
        raise ValueError(
            f"The recording contains NaN or infinite samples (near sample {start_frame}); fix or "
            "remove them before sorting."
        )
    return torch.as_tensor(traces, device=device)


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
        # (T, C) laid out channel by channel: peel's cuts read each channel's samples in a run
        # (wf.cut_channel_major) straight from it, where a (C, T) copy of the residual every
        # round took 3% of a 300 s sort (py-spy)
        residual, by_channel = wf.with_zero_channel(x)
        times, chans, waves = self.peel(residual, by_channel) if self.subtract else self.detect(residual)
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

    def peel(self, residual, by_channel=None):
        """by_channel: the residual laid out (C, T), with a row of zeros after the last channel
        (wf.with_zero_channel) or without."""
        g, w = self.geometry, self.window
        by_channel = residual.T if by_channel is None else by_channel
        offsets = w.offsets(self.device)
        valid = (w.n_before, len(residual) - w.n_after)
        last = None
        found = []
        memo = NNMemo(len(residual), residual.shape[1], offsets, width=self.denoiser.tpca.rank)
        for _ in range(MAX_PEEL_ITERATIONS):
            rows = None if last is None else wf.rows_near(last[0], w.length, len(residual))
            t, c, _ = wf.find_peaks(residual, self.threshold, self.peak_sign, g.dedup_index,
                                    self.dedup_samples, valid=valid, rows=rows)
            if last is not None:
                # only near what we just subtracted can the residual hold something new
                near = _near(t, c, *last, g.conflicts, w.length)
                t, c = t[near], c[near]
            if not len(t):
                break
            t, c = self.prefilter(by_channel, t, c)
            if not len(t):
                break
            snips = wf.cut_channel_major(by_channel, t, c, g.subtraction_index, offsets)
            mask = wf.neighbour_mask(g.subtraction_index, c)
            keys = memo.keys_of(t, g.subtraction_index[c])
            feats, decrease = self.denoiser.features(snips, mask, min_decrease=self.accept, memo=memo, keys=keys)
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
            t, c, clean = t[ok], c[ok], self.denoiser.tpca.inverse(feats[ok])
            wf.add(residual, t, c, g.subtraction_index, offsets, -clean)
            memo.subtracted(t, g.subtraction_index[c])
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

    def prefilter(self, by_channel, t, c):
        """Drop candidates whose cheap projection on the few channels around the peak
        explains under PREFILTER_FRACTION of the acceptance threshold: most threshold
        crossings are noise, and the full neighbourhood costs ~5x more to look at.
        by_channel: the residual laid out (C, T)."""
        g = self.geometry
        offsets = self.window.offsets(self.device)
        keep = torch.cat([
            self.denoiser.cheap_decrease(wf.cut_channel_major(by_channel, tb, cb, g.dedup_index, offsets),
                                         wf.neighbour_mask(g.dedup_index, cb)) > PREFILTER_FRACTION * self.accept
            for tb, cb in zip(t.split(PREFILTER_BLOCK), c.split(PREFILTER_BLOCK))])
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


def _near(times, chans, ref_times, ref_chans, conflicts, window):
    """True for (times, chans) within +-window samples of a ref spike on a conflicting channel."""
    out = torch.zeros(len(times), dtype=torch.bool, device=times.device)
    for rows, _, close in wf.conflicting_in_time(times, chans, ref_times, ref_chans, conflicts, window):
        out[rows] = close.any(1)
    return out
