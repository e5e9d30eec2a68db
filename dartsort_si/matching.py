"""Stage 9: template matching (matching pursuit) as a SpikeInterface PeakDetector.

Per chunk: place every unit's registered template on the real probe at the
chunk's drift, compress it to low rank, and compute for all units and times
the decrease in the residual's squared norm from subtracting the template
with its best amplitude scale (Gaussian prior around 1, clipped to
1 +/- boundary). Greedily take the peaks above matching_threshold**2,
pick the best sub-sample shift among `temporal_upsamples` versions,
subtract, update the objective from the templates' pairwise cross-correlations,
and repeat until nothing is left. Units found among a pass's
leftovers (filter_units) are also taken where their matched filter
reaches filter_threshold times its noise sd (matched_filter_thresholds).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from spikeinterface.core.node_pipeline import PeakDetector

from . import waveforms as wf
from .localization import localize_amplitude_vectors
from .templates import DRIFT_STEP_UM, Kriging, Templates, drift_steps, interpolation_reach, superres_bins

spike_dtype = np.dtype([
    ("sample_index", "int64"), ("channel_index", "int64"), ("amplitude", "float32"),
    ("segment_index", "int64"), ("unit_index", "int64"), ("scale", "float32"),
    ("upsample_index", "int16"),
])

leftover_dtype = np.dtype([
    ("sample_index", "int64"), ("channel_index", "int64"), ("amplitude", "float32"),
    ("x", "float32"), ("z", "float32"), ("score", "float32"),
])

SVD_RANK = 5
# low_rank_factors drops a template's components whose singular value is under this many times
# the largest singular value of the noise left in an average of its spikes. At 1x, components at
# the noise's own level stayed (217 of the 225 rows of the 45 templates of the 300 s NP1 case; 170
# at 1.5x, 135 at 2x): they add noise to a template and to its squared norm, which matching's
# threshold and scale read, and every row costs a projection and a convolution of the chunk.
# Rematch from templates1 of the 24 draws (well detected): 1x 870; 2x 878, +1 on NP1 seeds 1, 2,
# 3, 7, 8 and NP2 seeds 3, 7, +2 on static seed 7 (units of SNR 2-4 taken more often), -1 on
# static seed 5 (GT 11, SNR 2.3, 0.80 -> 0.68: its unit took 56 false spikes); 1.5x 877, no draw
# lower, but the 300 s NP1 case lost GT 16 (SNR 5.3, merged with GT 17: 36/40, 37 at 1x and 2x);
# 3x 877, NP1 seed 1 35 against 37. Matching's first pass on the 300 s NP1 case, one thread:
# 185-202 ms per chunk at 1x, 167 at 1.5x, 160 at 2x.
NOISE_COMPONENT_FACTOR = 2.0
# a unit's drift-binned mean of n spikes (templates.SUPERRES_BIN_UM) is weighted n / (n + this)
# against its kriged registered template where the unit sits in that bin: a bin of 20 spikes
# counts half. Not tuned; a bin's mean is projected on the unit's SVD_RANK temporal factors, so
# its noise (about rank x channels / n in squared norm) is small next to a unit's energy
SUPERRES_PRIOR_SPIKES = 20.0
MAX_ITERATIONS = 200
# pair_correlations: pairs per block (its complex intermediates are block x U x r x 129 at L = 121);
# only pairs whose spatial factors overlap: the norm of their Gram matrix over PAIR_OVERLAP times
# the product of their norms (a left-out pair's update would have been about that share of the
# two templates' norms, or less). This once applied only past 256 MB of correlations (hundreds of
# units on long probes); below that every pair was kept, and 45% of the pairs of a 60 s x 128 ch
# NP1 case's 39 units updated the objective for nothing. Applied always (rematch from templates1
# of the 24 held-out draws and the 300 s case): the same accuracy for every ground-truth unit,
# matching 309 against 330 s in all, 45.8 against 50.8 s at 300 s.
PAIR_BLOCK = 512
PAIR_OVERLAP = 1e-3
REFRACTORY_SAMPLES = 10
OVERLAP_PTP = 0.5
# The leftover search after matching looks for spikes with a matched filter: the residual is
# correlated in time with the units' mean waveform and summed over nearby channels (Gaussian
# weights), so a spike too small to cross a voltage threshold on any one channel still stands out
# by its energy over time and channels. The threshold (steps.LEFTOVER_THRESHOLD) was measured.
# A second, 40 um width (for distant units spread thinly over many channels) lost an SNR-7 unit
# on NP1 drifting seed 5 and found none: one width, one Neuropixels row pitch.
LEFTOVER_SIGMA_UM = 20.0
MAD_STRIDE = 5
# matching's objective after a round's subtractions is updated from the templates' pairwise
# cross-correlations (pair_correlations, computed once per chunk for the templates at its drift):
# subtracting version j of unit u at time s lowers unit k's dot product at s + d by the
# correlation of the two templates at lag d. Its earlier form, re-convolving the residual's
# projection around each spike, cost 0.24 ms per spike (one thread, 45 units x rank 5) and was
# 22-28% of matching's samples (py-spy, 300 s NP1 and 60 s NP2 sorts).
# The units found among the leftovers (filter units) are taken by their matched filter measured
# in the noise-whitened metric, <P t, r> with P the inverse of the noise's spatial covariance
# (WhitenedFilter): channels of standardized noise are correlated (SpikeInterface's generator
# draws it with a 25 um spatial decay, neighbours correlate at ~0.27 after the common median,
# and real probes share noise too). With the plain dot product a small unit's filter has sd
# 1.4-1.9 sqrt(norm) on noise and its true spikes stand at 4.7-5.8 sd; whitened, 5.3-7.5 sd (four
# units of SNR 2.3-3.8 matched with 56-78% of their spikes, static NP1 seeds 6 and 8, their mean
# waveforms as templates). The whole objective in the whitened metric was worse: at the same
# matching_threshold small first-pass units lost most of their spikes (rematch from templates1 of
# the 24 draws: 10 draws lost a unit, 3 gained one). The covariance is measured on samples where
# no channel passes NOISE_QUIET_Z; NOISE_RIDGE (in noise variance) keeps its inverse stable on
# probes with few or nearly dependent channels.
NOISE_QUIET_Z = 5.0
NOISE_RIDGE = 0.05
# A unit's size on the probe changes as it drifts: between contacts a unit has a fraction of the
# energy it has on them. NP1 drifting seed 1: GT 16's (SNR 5.8) true mean waveform has a rank-5
# energy of 180-209 at displacements 0 to +5 um and 73 at -10 um; its unit took all its spikes at 0 to +10
# and 32% at -10, where the objective's threshold (matching_threshold^2 = 64) is about its
# energy; GT 23 (SNR 2.4) 100% at 0 and 25% at -10. So in a chunk where a unit's template, moved
# by the drift, has a squared norm under SMALL_UNIT_FACTOR x the threshold, it is taken by its
# matched filter as the filter units are. Rematch from matching1 of the 24 held-out draws: NP1
# seeds 1, 2 and 7 +1 well-detected unit each, no draw lower, false-positive plus redundant units
# 22 -> 19. Its cost: NP1 seed 1's GT 16, whose template is small in every chunk (squared norm
# 89-138), also took 107 spikes of GT 17 (SNR 2.2, 25 um away) and fell from 0.80 to 0.64. Requiring
# such a unit's spikes to bring the residual down by half the template's squared norm (filter units
# need only a decrease) kept GT 16 at 0.78 but undid the gains of NP1 seeds 1 and 2 (10 draws run).
# Part of that smallness was kriging's (templates.SUPERRES_BIN_UM: GT 16's template now has squared
# norms 90-182 over the recording, against 89-138); with the drift-binned templates this filter
# still pays: without it (rematch from templates1 of the 24 draws) NP1 seeds 2 and 7 lost a unit
# (GT 25, SNR 2.3, split; GT 32, SNR 4.1, 0.89 -> 0.78) and seed 1 gained one (GT 16).
SMALL_UNIT_FACTOR = 2.0


def fractional_shifts(data: np.ndarray, n_up: int) -> np.ndarray:
    """(K, L, C) -> (K, n_up, L, C): versions delayed by (j - n_up//2)/n_up samples (FFT shift)."""
    k, length, c = data.shape
    pad = length
    x = torch.as_tensor(data, dtype=torch.float64)
    x = F.pad(x.permute(0, 2, 1), (pad, pad))  # (K, C, L + 2 pad)
    n = x.shape[-1]
    spec = torch.fft.rfft(x, dim=-1)
    freqs = torch.fft.rfftfreq(n, dtype=torch.float64)
    outs = []
    for j in range(n_up):
        delay = (j - n_up // 2) / n_up
        phase = torch.exp(-2j * torch.pi * freqs * delay)
        y = torch.fft.irfft(spec * phase, n=n, dim=-1)[..., pad: pad + length]
        outs.append(y.permute(0, 2, 1))
    return torch.stack(outs, dim=1).float().numpy()


class TemplateMatcher(PeakDetector):
    def __init__(self, recording, templates: Templates, motion_info, cfg, geometry, device="cpu",
                 with_features=True, leftover_threshold=None, dedup_samples=7, known=None, match_units=None,
                 filter_units=None, filter_threshold=None, precision=None, small_unit_factor=0.0,
                 leftover_chunks=None):
        """leftover_threshold: also return the residual's threshold crossings at this level
        (after matching: events no template explains) as a third output, with their
        amplitude and point-source (x, z) on the residual.
        known: spikes (spike_dtype, absolute sample indices, sorted, unit_index into templates)
        already matched, subtracted from each chunk before matching; match_units: indices of
        the templates to look for (default: all). Together they match new templates on the
        residual of an earlier pass without redoing it.
        filter_units: indices of templates taken when their matched filter on the residual is
        over filter_threshold (in noise sd) as well (matched_filter_thresholds).
        precision: (C, C) inverse noise covariance (noise_precision): the filter units' matched
        filter is then measured in the noise-whitened metric (WhitenedFilter).
        leftover_chunks: (chunk_size, stride): look for leftover events only in the chunks
        (start_frame // chunk_size) that are multiples of stride (None: in all)."""
        super().__init__(recording, return_output=True)
        self.filter_mask = torch.zeros(templates.n_units, dtype=torch.bool, device=device)
        if filter_units is not None:
            self.filter_mask[torch.as_tensor(np.asarray(filter_units, dtype=np.int64), device=device)] = True
        self.filter_threshold = filter_threshold
        self.small_unit_factor = small_unit_factor
        self.precision = None if precision is None else torch.as_tensor(precision, device=device)
        self.known = known
        self.match_units = None if match_units is None else torch.as_tensor(np.asarray(match_units), device=device)
        self.leftover_threshold = leftover_threshold
        self.leftover_chunks = leftover_chunks
        # the prototype has the units' polarity, so their spikes score positive
        self.leftover_sign = "both" if cfg.peak_sign == "both" else "pos"
        self.dedup_samples = dedup_samples
        self.fs = recording.sampling_frequency
        self.templates = templates
        self.motion_info = motion_info
        self.geometry = geometry
        self.device = device
        self.with_features = with_features
        self.n_before = templates.n_before
        self.length = templates.data.shape[1]
        self.threshold = cfg.matching_threshold ** 2
        self.prior = 0.0 if cfg.amplitude_scaling_stddev == 0 else 1.0 / cfg.amplitude_scaling_stddev ** 2
        self.boundary = cfg.amplitude_scaling_boundary
        # matched as their rank-SVD_RANK approximations, which the objective's low-rank
        # convolution sees: the full templates' norms also counted their noise, which the
        # convolution does not see, and for a unit of ~150 spikes over 150 channels that noise
        # (~120, in noise units squared) outweighed its signal, so no spike of it was ever
        # taken (static NP1 seed 1: four units found among the leftovers matched 26-84 spikes
        # of their 146-180). Components under the templates' own noise are dropped as well.
        temporal, self.spatial_reg = low_rank_factors(templates.data, SVD_RANK, templates.counts)
        # a time shift acts on the temporal factors only: shifted versions share the spatial ones
        self.temporal_up = torch.as_tensor(fractional_shifts(temporal.transpose(0, 2, 1), cfg.temporal_upsamples),
                                           device=device)  # (K, U, L, r)
        rgeom = motion_info.rgeom
        self.unit_reg_depths = rgeom[templates.main_channels(), 1]
        # real channel c of a unit displaced by d reads the registered template at geom[c] - d
        self.kriging = Kriging(rgeom, motion_info.geom, interpolation_reach(motion_info.geom))
        self.bin_spatial, self.bin_weight = superres_factors(templates, temporal, self.spatial_reg)
        self._pitch_maps = {}
        if leftover_threshold is not None:
            self.prototype = torch.as_tensor(prototype_waveform(templates), device=device)
            self.spatial = torch.as_tensor(gaussian_weights(motion_info.geom, LEFTOVER_SIGMA_UM), device=device)

    def get_margin(self):
        return 2 * self.length

    def get_dtype(self):
        return spike_dtype

    # -- templates for this chunk
    def chunk_templates(self, t_mid_s) -> "LowRankTemplates":
        """The templates on the real probe at time t_mid_s: real channel c of a unit displaced
        by d shows the registered template at geom[c] - d. Kriging acts on channels, so only
        the spatial factors move."""
        drift = drift_steps(self.motion_info, np.full(self.templates.n_units, t_mid_s), self.unit_reg_depths)
        out = np.zeros(self.spatial_reg.shape[:2] + (len(self.motion_info.geom),), np.float32)
        for d in np.unique(drift):
            out[drift == d] = self.kriging.at_drift(self.spatial_reg[drift == d], d)
        if self.bin_spatial is not None:
            self._with_drift_bins(out, drift)
        return LowRankTemplates(self.temporal_up, torch.as_tensor(out, device=self.device))

    def _with_drift_bins(self, out, drift):
        """Blend into out (K, r, C) each unit's drift-binned template (superres_factors) for the
        bin its drift falls in, moved by whole pitches onto the real channels."""
        pitches, bins = superres_bins(drift * DRIFT_STEP_UM, self.motion_info.pitch)
        for k in np.unique(pitches):
            if int(k) not in self._pitch_maps:
                self._pitch_maps[int(k)] = self.motion_info.registered_channel_map(int(k))
            chans = self._pitch_maps[int(k)]
            on = np.flatnonzero(chans >= 0)
            units = np.flatnonzero(pitches == k)
            w = self.bin_weight[units, bins[units]][:, None, None]
            binned = self.bin_spatial[units, bins[units]][:, :, chans[on]]
            out[units[:, None, None], np.arange(out.shape[1])[None, :, None], on[None, None, :]] = (
                w * binned + (1 - w) * out[units][:, :, on])

    def compute(self, traces, start_frame, end_frame, segment_index, max_margin):
        x = torch.as_tensor(np.asarray(traces, dtype=np.float32), device=self.device)
        empty = np.zeros(0, dtype=spike_dtype)
        residual = x.clone()
        if self.templates.n_units == 0:
            out = (empty, np.zeros((0, 4), np.float32)) if self.with_features else (empty,)
            return self._with_leftovers(out, residual, start_frame)
        temps = self.chunk_templates((start_frame + end_frame) / 2 / self.fs)
        if self.known is not None:
            self.subtract_known(residual, temps, start_frame)
        if self.match_units is None:
            times, units, scales, ups = self.peel(residual, temps, self.filter_mask)
        else:
            times, units, scales, ups = self.peel(residual, temps.subset(self.match_units),
                                                  self.filter_mask[self.match_units])
            units = self.match_units[units]
        margin = self.get_margin()
        keep = (times >= margin) & (times < len(x) - margin)
        times, units, scales, ups = times[keep], units[keep], scales[keep], ups[keep]
        base = temps.base()
        main = wf.ptp(base).argmax(1)  # (K,) main real channel per unit
        spikes = np.zeros(len(times), dtype=spike_dtype)
        spikes["sample_index"] = times.cpu().numpy()
        spikes["unit_index"] = units.cpu().numpy()
        spikes["channel_index"] = main[units].cpu().numpy()
        spikes["scale"] = scales.cpu().numpy()
        spikes["amplitude"] = (scales * wf.ptp(base).amax(1)[units]).cpu().numpy()
        spikes["upsample_index"] = ups.cpu().numpy()
        spikes["segment_index"] = segment_index
        if not self.with_features:
            return self._with_leftovers((spikes,), residual, start_frame)
        out = (spikes, self.localize(residual, temps, times, units, scales, ups, main[units]))
        return self._with_leftovers(out, residual, start_frame)

    def subtract_known(self, residual, temps, start_frame):
        """Subtract the known spikes whose waveforms reach into this chunk (margins included)."""
        first = start_frame - self.get_margin()  # absolute sample of residual[0]
        times = self.known["sample_index"]
        lo = np.searchsorted(times, first + self.n_before - self.length, side="right")
        hi = np.searchsorted(times, first + self.n_before + len(residual))
        k = self.known[lo:hi]
        if not len(k):
            return
        dev = residual.device
        starts = torch.as_tensor(k["sample_index"] - self.n_before - first, device=dev)
        units = torch.as_tensor(np.ascontiguousarray(k["unit_index"]), device=dev)
        ups = torch.as_tensor(k["upsample_index"].astype(np.int64), device=dev)
        scales = torch.as_tensor(np.ascontiguousarray(k["scale"]), device=dev)
        subtract_waveforms(residual, temps.waveforms(units, ups) * scales[:, None, None], starts)

    def _with_leftovers(self, out, residual, start_frame):
        if self.leftover_threshold is None:
            return out
        if self.leftover_chunks is not None:
            size, stride = self.leftover_chunks
            if (start_frame // size) % stride:
                return out + (np.zeros(0, dtype=leftover_dtype),)
        return out + (self.leftovers(residual, start_frame),)

    def leftovers(self, residual, start_frame):
        """Spikes the templates did not explain: peaks of the residual's matched-filter score
        (matched_filter_score) above leftover_threshold, with amplitudes and point-source (x, z)
        from the prototype's least-squares amplitude on each channel, which noise disturbs far
        less than a peak-to-peak would at these sizes. Sample indices are absolute (the
        pipeline only shifts the first output)."""
        g = self.geometry
        margin = self.get_margin()
        per_channel, score = matched_filter_score(residual, self.prototype, self.spatial, self.n_before)
        t, c, _ = wf.find_peaks(score, self.leftover_threshold, self.leftover_sign, g.dedup_index,
                                self.dedup_samples, valid=(margin, len(residual) - margin))
        # least-squares amplitude of the (unit-norm) prototype, as a peak-to-peak
        ptp = float(self.prototype.max() - self.prototype.min())
        cols = g.localization_index[c]
        sign = torch.sign(score[t, c])[:, None]  # a spike of the other polarity scores negative
        amps = (per_channel[t[:, None], cols.clamp(max=residual.shape[1] - 1)] * sign).clamp(min=0) * ptp
        amps = torch.where(wf.neighbour_mask(g.localization_index, c), amps, torch.nan)
        locs = localize_amplitude_vectors(amps, c.cpu().numpy(), g.geom, g.localization_index.cpu().numpy(),
                                          device=self.device)
        out = np.zeros(len(t), dtype=leftover_dtype)
        out["sample_index"] = t.cpu().numpy() - margin + start_frame
        out["channel_index"] = c.cpu().numpy()
        out["amplitude"] = torch.nan_to_num(amps, nan=0.0).amax(1).cpu().numpy() if len(t) else 0.0
        out["x"], out["z"] = locs[:, 0], locs[:, 2]
        out["score"] = score[t, c].abs().cpu().numpy()
        return out

    def localize(self, residual, temps, times, units, scales, ups, chans):
        """Point-source fit on the collision-cleaned waveform: residual + own scaled template."""
        g = self.geometry
        offsets = torch.arange(-self.n_before, self.length - self.n_before, device=self.device)
        cols = g.localization_index[chans]  # (n, K_loc), padding: C
        # each spike's own template on its localization channels only (K_loc of C)
        spatial = torch.cat([temps.spatial, torch.zeros_like(temps.spatial[:, :, :1])], dim=2)[units]
        spatial = torch.gather(spatial, 2, cols[:, None, :].expand(-1, spatial.shape[1], -1))  # (n, r, K_loc)
        own = (temps.temporal[units, ups] @ spatial) * scales[:, None, None]  # (n, L, K_loc)
        cleaned = wf.cut(residual, times, chans, g.localization_index, offsets) + own
        amps = torch.where(wf.neighbour_mask(g.localization_index, chans), wf.ptp(cleaned), torch.nan)
        locs = localize_amplitude_vectors(amps, chans.cpu().numpy(), g.geom,
                                          g.localization_index.cpu().numpy(), device=self.device)
        return locs.astype(np.float32)

    # -- matching pursuit
    def peel(self, residual, temps: "LowRankTemplates", filter_mask=None):
        n_units, n_up, length, n_chans = temps.shape
        temporal = temps.temporal[:, n_up // 2].permute(0, 2, 1)  # (K, r, L)
        spatial = temps.spatial  # (K, r, C)
        norms = temps.norms()  # (K, U)
        base_norm = norms[:, n_up // 2]
        n_t = len(residual) - length + 1
        blocked = torch.zeros((n_units, n_t), dtype=torch.bool, device=residual.device)
        overlap = unit_overlaps(temps.base())
        found = []
        conv = objective(residual, temporal, spatial)  # (K, n_t)
        xc = pair_correlations(temporal, spatial, temps.temporal, spatial)
        # a unit may take a spike when its gain passes its own threshold (the same for all but
        # filter units), and among those the biggest gain wins. Competing on the gain over one's own
        # threshold let a filter unit, whose threshold is lower, win spikes that an old unit
        # explained better (static NP1 seed 1, objective whitened: a new unit took 290 spikes of
        # GT 38 and 132 of GT 4, both SNR ~3 and well detected before)
        thresholds = torch.full_like(base_norm, self.threshold)
        white = None
        filter_mask = self.filter_units_here(base_norm, filter_mask)
        if filter_mask.any():
            if self.precision is None:
                thresholds[filter_mask] = matched_filter_thresholds(base_norm[filter_mask], conv[filter_mask],
                                                                    self.filter_threshold, self.threshold)
            else:
                white = WhitenedFilter(residual, temporal[filter_mask], spatial[filter_mask], temps,
                                       self.precision, self.filter_threshold)
        def best_units(cols=None):
            """The biggest gain at each time (at cols only, if given) among the units allowed
            there, and its unit."""
            _, gain = self.best_scale(conv if cols is None else conv[:, cols], base_norm[:, None])
            passes = gain >= thresholds[:, None]
            if white is not None:
                # and only where subtracting the spike makes the residual smaller: without it a new
                # unit of 108 leftover events passed on 14,852 samples (NP1 drifting seed 2)
                passes[filter_mask] |= white.passes(cols) & (gain[filter_mask] >= 0)
            return gain.masked_fill((blocked if cols is None else blocked[:, cols]) | ~passes, -torch.inf).max(0)

        best, best_unit = best_units()
        for _ in range(MAX_ITERATIONS):
            # one spike per ~quarter template: overlapping ones wait for the next round
            radius = length // 4
            pooled = F.max_pool1d(best[None, None], 2 * radius + 1, 1, radius)[0, 0]
            pick = torch.nonzero(torch.isfinite(best) & (best == pooled), as_tuple=True)[0]
            if not len(pick):
                break
            unit = best_unit[pick]
            # picks whose templates overlap in time and channels: only the biggest this round.
            # Fitted on a residual that still holds the bigger spike, a smaller unit's template
            # takes part of it (the "echoes" at fixed lags, see ECHO_RATIO)
            keep = wf.strongest(best[pick], pick, unit, overlap, length - 1)
            pick, unit = pick[keep], unit[keep]
            t, a, j = self.refine(residual, temps, norms, pick, unit)
            subtract_waveforms(residual, temps.waveforms(unit, j) * a[:, None, None], t)
            update_objective(conv, *xc, t, unit, j, a)
            if white is not None:
                white.update(t, unit, j, a)
            lo = (t - REFRACTORY_SAMPLES).clamp(0, n_t)
            around = (lo[:, None] + torch.arange(2 * REFRACTORY_SAMPLES + 1, device=t.device)).clamp(max=n_t - 1)
            blocked.view(-1).index_fill_(0, (unit[:, None] * n_t + around).reshape(-1), True)
            # the objective (and the blocks) changed within a template's length of each spike:
            # the best units are recomputed there only (the same values; all of them every
            # round took 15% of matching's first pass, py-spy)
            cols = wf.rows_near(t, length - 1, n_t)
            if cols is None:
                best, best_unit = best_units()
            else:
                best[cols], best_unit[cols] = best_units(cols)
            found.append((t + self.n_before, unit, a, j))
        if not found:
            z = torch.zeros(0, dtype=torch.long, device=residual.device)
            return z, z, torch.zeros(0, device=residual.device), z
        t, u_, a, j = (torch.cat(v) for v in zip(*found))
        order = torch.argsort(t)
        return t[order], u_[order], a[order], j[order]

    def filter_units_here(self, base_norm, filter_mask=None):
        """(K,) mask of the units taken by their matched filter in this chunk: the given filter
        units and those whose template here is small (small_unit_factor)."""
        small = base_norm < self.small_unit_factor * self.threshold
        return small if filter_mask is None else filter_mask | small

    @staticmethod
    def convolve(proj, temporal):
        """(K, n_t) dot products of the residual with each unit's low-rank template at every
        time, from proj (T, K r): the residual projected on the templates' spatial components."""
        n_units, rank, length = temporal.shape
        out = F.conv1d(proj.T[None], temporal.reshape(-1, 1, length), groups=n_units * rank)[0]
        return out.reshape(n_units, rank, -1).sum(1)

    def best_scale(self, dot, norm):
        """Scale maximizing 2 a dot - a^2 norm - prior (a - 1)^2, clipped; returns (a, decrease)."""
        if self.prior == 0 and self.boundary == 0:
            a = torch.ones_like(dot)
        else:
            a = (dot + self.prior) / (norm + self.prior)
            a = a.clamp(1 - self.boundary, 1 + self.boundary)
        return a, 2 * a * dot - a * a * norm

    def refine(self, residual, temps, norms, t, unit):
        """Best sub-sample version and scale for each picked (time, unit). The residual's dot
        product with a version is its temporal factors against the residual's window projected
        on the unit's spatial factors."""
        length = temps.temporal.shape[2]
        rows = t[:, None] + torch.arange(length, device=residual.device)[None, :]
        windows = torch.einsum("nlc,nrc->nlr", residual[rows], temps.spatial[unit])  # (n, L, r)
        dots = torch.einsum("nlr,nulr->nu", windows, temps.temporal[unit])
        a, gain = self.best_scale(dots, norms[unit])
        j = gain.argmax(1)
        return t, a[torch.arange(len(t)), j], j


def pair_correlations(temporal, spatial, versions, spatial_right):
    """Cross-correlations of low-rank templates, as (xc (P, U, 2L - 1), index (K1, K2)): row
    index[k, u] of xc holds, at [j, d + L - 1], the dot product of template k (temporal
    (K1, r, L) @ spatial (K1, r, C)) with version j of template u (versions (K2, U, L, r) @
    spatial_right (K2, r, C)) started d samples later, i.e. how much subtracting that version at
    time s lowers k's matched filter at s + d. Only the pairs whose spatial factors overlap
    (PAIR_OVERLAP) are kept, the others' index is -1. Through the FFT, summing over the rank
    after the spatial Gram matrices, PAIR_BLOCK pairs at a time."""
    k1, rank, length = temporal.shape
    k2, n_up = versions.shape[:2]
    n = 1 << (2 * length - 2).bit_length()  # n >= 2L - 1: no circular wrap
    gram = torch.einsum("arc,bsc->abrs", spatial, spatial_right)  # (K1, K2, r, r)
    size = gram.square().sum((2, 3))
    scale = torch.sqrt(spatial.square().sum((1, 2))[:, None] * spatial_right.square().sum((1, 2))[None, :])
    keep = size.sqrt() > PAIR_OVERLAP * scale
    a_all, b_all = torch.nonzero(keep, as_tuple=True)
    index = torch.full((k1, k2), -1, dtype=torch.long, device=temporal.device)
    index[a_all, b_all] = torch.arange(len(a_all), device=temporal.device)
    right = torch.fft.rfft(versions.transpose(2, 3), n=n)  # (K2, U, r, F)
    left = torch.fft.rfft(temporal, n=n).conj()  # (K1, r, F)
    if keep.all():
        return _all_pairs(left, gram, right, n, length), index
    return _some_pairs(left, gram, right, n, length, a_all, b_all), index


def _lags(full, n, length):
    """(..., 2 length - 1) lags -(length - 1)..length - 1 of inverse FFTs of size n (lag d at d mod n)."""
    return torch.cat([full[..., n - (length - 1):], full[..., :length]], dim=-1)


def _all_pairs(left, gram, right, n, length):
    """(K1 K2, U, 2L - 1) pair_correlations for every pair, k1-major, a block of
    units of left at a time against all of right, as matrix products: batched over the pairs (the
    products of gathered rows) took 3x longer (60 against 19 ms, 40 units x rank 5, 4 versions)."""
    k1, k2, n_up = left.shape[0], right.shape[0], right.shape[1]
    right = right.permute(0, 3, 2, 1)  # (K2, F, r, U)
    step = max(1, PAIR_BLOCK // k2)
    out = []
    for i in range(0, k1, step):
        mixed = torch.matmul(gram[i: i + step].transpose(2, 3).to(left.dtype), left[i: i + step, None])  # (A, K2, r, F)
        prod = torch.matmul(mixed.permute(1, 3, 0, 2), right)  # (K2, F, A, U)
        out.append(_lags(torch.fft.irfft(prod.permute(2, 0, 3, 1), n=n), n, length).reshape(-1, n_up, 2 * length - 1))
    return torch.cat(out) if out else torch.zeros((0, n_up, 2 * length - 1), device=left.device)


def _some_pairs(left, gram, right, n, length, a_all, b_all):
    """(P, U, 2L - 1) as _all_pairs for the pairs (a_all, b_all), PAIR_BLOCK at a time."""
    out = [torch.zeros((0, right.shape[1], 2 * length - 1), device=left.device)]
    for i in range(0, len(a_all), PAIR_BLOCK):
        a, b = a_all[i: i + PAIR_BLOCK], b_all[i: i + PAIR_BLOCK]
        mixed = torch.bmm(gram[a, b].transpose(1, 2).to(left.dtype), left[a])  # (p, r, F)
        out.append(_lags(torch.fft.irfft((right[b] * mixed[:, None]).sum(2), n=n), n, length))
    return torch.cat(out)


def update_objective(conv, xc, index, t, unit, j, a):
    """conv (K, n_t) after subtracting version j of unit, scaled by a, at times t (n,): each
    subtraction lowers the dot products around it of every unit paired with it by the pair's
    cross-correlation (xc, index: pair_correlations). In place."""
    n_t, span = conv.shape[1], xc.shape[-1]
    rows = index[:, unit]  # (K, n)
    k, i = torch.nonzero(rows >= 0, as_tuple=True)
    pos = t[i, None] + torch.arange(-(span // 2), span // 2 + 1, device=t.device)  # (m, 2L - 1)
    ok = (pos >= 0) & (pos < n_t)
    values = xc[rows[k, i], j[i]] * a[i, None]  # (m, 2L - 1)
    at = k[:, None] * n_t + pos
    if conv.device.type == "cpu":  # masked and added in numpy (wf.index_add)
        at, values, ok = at.numpy(), values.numpy(), ok.numpy()
    wf.index_add(conv.view(-1), at[ok], values[ok], alpha=-1)
    return conv


def noise_precision(chunks, quiet_z: float = NOISE_QUIET_Z, ridge: float = NOISE_RIDGE):
    """(C, C) inverse spatial covariance of the noise, from (T, C) standardized traces: the
    samples where no channel passes quiet_z (spikes left out), plus ridge on the diagonal.
    None (match with the plain norm) if under 10 quiet samples per channel."""
    total, count = 0.0, 0
    for x in chunks:
        x = torch.as_tensor(x, dtype=torch.float64)
        quiet = x[(x.abs() < quiet_z).all(1)]
        total = total + quiet.T @ quiet
        count += len(quiet)
    if not count or count < 10 * total.shape[-1]:
        return None
    cov = total / count
    return torch.linalg.inv(cov + ridge * torch.eye(len(cov), dtype=cov.dtype)).float()


def objective(residual, temporal, spatial):
    """(K, n_t) dot products of residual (T, C) with each low-rank template (temporal (K, r, L),
    spatial (K, r, C)) at every time: the residual projected on the spatial factors and
    convolved with the temporal ones, for the (unit, component) rows whose spatial factor is not
    zero only (low_rank_factors zeroes the components under the templates' noise; kriging and
    the drift bins keep them zero), the rows of a unit then summed."""
    n_units, rank, n_chans = spatial.shape
    flat = spatial.reshape(-1, n_chans)
    live = torch.nonzero(flat.abs().amax(1) > 0, as_tuple=True)[0]
    if len(live) == len(flat):  # nothing dropped (or no units): the plain projection and convolution
        return TemplateMatcher.convolve(project(residual, spatial), temporal)
    length = temporal.shape[2]
    if not len(live):
        return residual.new_zeros((n_units, len(residual) - length + 1))
    proj = wf.matmul(flat[live], residual.T)  # (P, T)
    rows = F.conv1d(proj[None], temporal.reshape(-1, 1, length)[live], groups=len(live))[0]
    out = rows.new_zeros((n_units, rows.shape[1]))
    return out.index_add_(0, live // rank, rows)


def project(residual, spatial):
    """(T, K r) residual (T, C) projected on spatial components (K, r, C), as the transposed view
    of a (K r, T) product: convolve's conv1d reads that layout as it is, where it copied a (T, K r)
    product into it first (60 s x 128 ch NP1, 45 units x rank 5, one thread: projection and
    convolution 92 against 124 ms per chunk, the same values)."""
    return wf.matmul(spatial.reshape(-1, residual.shape[1]), residual.T).T


class WhitenedFilter:
    """Matched filters <P t, r> of some templates on the residual in the noise-whitened metric
    (P: noise_precision), kept up to date as matching subtracts spikes; a template passes where
    its filter is over z times its noise sd (the filter's MAD over the chunk)."""

    def __init__(self, residual, temporal, spatial, temps, precision, z):
        white = wf.matmul(spatial, precision)  # (k, r, C)
        self.conv = objective(residual, temporal, white)  # (k, n_t)
        self.xc = pair_correlations(temporal, white, temps.temporal, temps.spatial)
        self.level = z * filter_noise_sd(self.conv)[:, None]

    def passes(self, cols=None):
        return (self.conv if cols is None else self.conv[:, cols]) >= self.level

    def update(self, t, unit, j, a):
        """After subtracting version j of unit (indices into the matched templates) at times t, scaled by a."""
        update_objective(self.conv, *self.xc, t, unit, j, a)


def matched_filter_thresholds(norms, conv, z, threshold):
    """Per template of squared norm n, the decrease 2 a<t, r> - a^2 n (a = 1) at which its matched
    filter <t, r> (conv: (K, n_t), on this chunk's residual) reaches z times its own noise sd:
    2 z sd - n, kept within [0, threshold]. The sd is measured (the filter's MAD over the chunk),
    not sqrt(n): the noise is not white, and the filters of five units found among the leftovers
    (static NP1 seeds 1 and 8) had sd 1.27-1.56 sqrt(n); at 5 sqrt(n) one of them took 654 spikes,
    413 of them no GT spike.
    A template of squared norm 50 meets threshold = 64 only when its filter is at 8.1 sqrt(n), and
    its spikes average 7.1 sqrt(n): it takes a fifth of them (units of SNR 2.5-4 found among the
    leftovers)."""
    return (2 * z * filter_noise_sd(conv) - norms).clamp(0, threshold)


def filter_noise_sd(conv):
    """(K,) noise sd of each row of (K, n_t) matched-filter outputs: their MAD, which the
    spikes in them barely move."""
    return 1.4826 * row_mads(conv)


class LowRankTemplates:
    """Templates as factors: version j of unit k is temporal[k, j] (L, r) @ spatial[k] (r, C)."""

    def __init__(self, temporal: torch.Tensor, spatial: torch.Tensor):
        self.temporal = temporal  # (K, U, L, r)
        self.spatial = spatial  # (K, r, C)
        self.shape = (temporal.shape[0], temporal.shape[1], temporal.shape[2], spatial.shape[2])

    @classmethod
    def from_dense(cls, data: torch.Tensor, rank: int = SVD_RANK) -> "LowRankTemplates":
        """From (K, U, L, C) versions that are time shifts of each other (the middle one's
        spatial factors serve all)."""
        _, s, vh = torch.linalg.svd(data[:, data.shape[1] // 2], full_matrices=False)
        # orthonormal rows, so each version's temporal factors are its projection on them
        spatial = vh[:, : min(rank, s.shape[1])]
        return cls(data @ spatial[:, None].transpose(2, 3), spatial)

    def subset(self, units) -> "LowRankTemplates":
        return LowRankTemplates(self.temporal[units], self.spatial[units])

    def waveforms(self, units, ups):
        """(n, L, C) versions ups of units."""
        return self.temporal[units, ups] @ self.spatial[units]

    def base(self):
        """(K, L, C) the unshifted versions."""
        return self.temporal[:, self.shape[1] // 2] @ self.spatial

    def norms(self):
        """(K, U) squared norms, from the factors' Gram matrices."""
        gram_t = self.temporal.transpose(2, 3) @ self.temporal  # (K, U, r, r)
        gram_s = self.spatial @ self.spatial.transpose(1, 2)  # (K, r, r)
        return (gram_t * gram_s[:, None]).sum((2, 3))


def subtract_waveforms(residual: torch.Tensor, waves: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """residual (T, C) -= waves (n, L, C) placed at rows starts (n,) on; rows outside the
    residual are left out. Returns the (n, L) rows, clipped to the residual."""
    n, length, n_chans = waves.shape
    rows = starts[:, None] + torch.arange(length, device=residual.device)[None, :]
    inside = (rows >= 0) & (rows < len(residual))
    if not inside.all():
        waves = waves * inside[:, :, None]
        rows = rows.clamp(0, len(residual) - 1)
    # whole rows at once: index_put_ with an index per sample and channel took 10x longer
    # (5.5 against 0.5 ms for 60 spikes of 121 x 128 samples on one thread)
    residual.index_add_(0, rows.reshape(-1), waves.reshape(-1, n_chans), alpha=-1)
    return rows


def low_rank_factors(data: np.ndarray, rank: int, counts=None):
    """(K, L, C) templates, each replaced by its best approximation (time x channels) of rank at
    most `rank`, as factors: temporal (K, r, L), orthonormal rows, and spatial (K, r, C). With
    counts (spikes averaged per template, 0 for unknown), components under the noise of an
    average of that many snippets are dropped too (their spatial rows zeroed): those under
    NOISE_COMPONENT_FACTOR times the largest singular value of an L x C
    matrix of white noise of sd 1/sqrt(count), about (sqrt(L) + sqrt(C)) / sqrt(count)."""
    u, s, vh = np.linalg.svd(data.astype(np.float64), full_matrices=False)
    r = min(rank, s.shape[1])
    u, s, vh = u[:, :, :r], s[:, :r], vh[:, :r]
    if counts is not None:
        counts = np.asarray(counts, dtype=np.float64)
        n_chans = (np.abs(data).max(1) > 0).sum(1)
        floor = np.where(counts > 0, (np.sqrt(data.shape[1]) + np.sqrt(n_chans)) / np.sqrt(np.maximum(counts, 1)), 0.0)
        keep = s > NOISE_COMPONENT_FACTOR * floor[:, None]
        keep[:, 0] = True
        s = s * keep
    return u.transpose(0, 2, 1).astype(np.float32), (s[:, :, None] * vh).astype(np.float32)


def superres_factors(templates: Templates, temporal: np.ndarray, spatial: np.ndarray):
    """(spatial factors (K, B, r, R) of the drift-binned templates on the units' temporal factors
    (K, r, L), weights (K, B) of the bins against the kriged template) or (None, None) without bins.
    Components dropped from the unit's template (low_rank_factors) stay dropped."""
    if templates.bins is None or not templates.n_units:
        return None, None
    binned = np.einsum("krl,kblc->kbrc", temporal, templates.bins).astype(np.float32)
    binned *= (np.abs(spatial).sum(-1) > 0)[:, None, :, None]
    n = np.asarray(templates.bin_counts, np.float32)
    return binned, n / (n + SUPERRES_PRIOR_SPIKES)


def prototype_waveform(templates: Templates) -> np.ndarray:
    """(L,) unit-norm mean of the units' main-channel waveforms, each unit-norm and turned to the
    polarity most units have at n_before (trough or peak; with peak_sign='both' they differ)."""
    data = templates.data[np.arange(templates.n_units), :, templates.main_channels()]  # (K, L)
    polarity = np.where(data[:, templates.n_before] < 0, -1.0, 1.0)
    data = data * (polarity * np.sign(polarity.sum() or 1.0))[:, None]
    data = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-9)
    mean = data.mean(0)
    return (mean / max(np.linalg.norm(mean), 1e-9)).astype(np.float32)


def gaussian_weights(geom: np.ndarray, sigma_um: float) -> np.ndarray:
    """(C, C) exp(-d^2 / 2 sigma^2) between channels, zero beyond 3 sigma."""
    d = np.linalg.norm(geom[:, None] - geom[None], axis=2)
    return np.where(d <= 3 * sigma_um, np.exp(-0.5 * (d / sigma_um) ** 2), 0.0).astype(np.float32)


def matched_filter_score(traces: torch.Tensor, prototype: torch.Tensor, spatial: torch.Tensor, n_before: int):
    """(per channel, score), both (T, C). per channel: the traces correlated with the prototype,
    its trough at n_before aligned on each time (the least-squares amplitude of the unit-norm
    prototype there). score: per channel summed over nearby channels with weights `spatial`,
    in units of its own noise (median absolute deviation, per channel, on every MAD_STRIDE-th
    sample of the chunk). The correlation runs through the FFT: as a per-channel convolution
    it took 1.4 s per 1 s x 128 ch chunk, through the FFT 0.15 s."""
    n, length = len(traces), len(prototype)
    size = 1 << (n + length - 2).bit_length()
    # along rows of a (C, T) copy: the FFTs down the columns of (T, C) took 10% longer
    spectrum = torch.fft.rfft(traces.T.contiguous(), n=size, dim=1) * torch.fft.rfft(prototype.flip(0), n=size)
    full = torch.fft.irfft(spectrum, n=size, dim=1)
    per_channel = full[:, length - 1 - n_before: length - 1 - n_before + n].T
    score = wf.matmul(per_channel, spatial)
    sample = score[::MAD_STRIDE].T.contiguous()
    mad = row_mads(sample) / 0.6745
    return per_channel, score / mad.clamp(min=1e-6)


def row_mads(x: torch.Tensor) -> torch.Tensor:
    """(n,) median absolute deviation of each row of (n, m) from its median (row_medians)."""
    return row_medians((x - row_medians(x)[:, None]).abs())


def row_medians(x: torch.Tensor) -> torch.Tensor:
    """(n,) torch.median of each row of (n, m) (the lower middle value for even m). On the CPU
    through numpy's partition: 4.8 against 10 ms for 128 rows of 6097 (one thread), a third
    of the leftover score's time."""
    if x.device.type != "cpu" or x.requires_grad:
        return x.median(1).values
    k = (x.shape[1] - 1) // 2
    return torch.from_numpy(np.partition(x.numpy(), k, axis=1)[:, k].copy())


def could_take_spikes(old: torch.Tensor, new: torch.Tensor, threshold, boundary: float,
                      noise_sds: float = 3.0) -> torch.Tensor:
    """(K_old,) bool: old templates (K_old, L, C) that matching could fit to a spike of one of
    the new templates (K_new, L, C): at the best lag and a scale within 1 +/- boundary, the
    decrease 2 a <new, old> - a^2 |old|^2, plus noise_sds times the sd that unit noise adds to it
    (2 a |old|), reaches threshold (a squared norm; one for all, or (K_old,) one per old unit)."""
    length = old.shape[1]
    dots = F.conv1d(new.permute(0, 2, 1), old.permute(0, 2, 1), padding=length - 1).amax(2)  # (K_new, K_old)
    norm = old.square().sum((1, 2))
    scales = torch.linspace(1 - boundary, 1 + boundary, 5)[:, None, None]
    gain = 2 * scales * (dots + noise_sds * norm.sqrt()) - scales ** 2 * norm
    return (gain >= torch.as_tensor(threshold, dtype=gain.dtype)).any(0).any(0)


def unit_overlaps(templates: torch.Tensor) -> torch.Tensor:
    """(K, K) bool: units whose templates (K, L, C) share a channel where both exceed
    OVERLAP_PTP (noise units)."""
    support = (wf.ptp(templates) >= OVERLAP_PTP).float()
    return (support @ support.T) > 0


# -- echoes of big units among the matched spikes

# A small unit's matched spikes that pile up at one lag from a bigger unit's spikes are what
# subtracting the big unit's template left behind, not the small unit firing. On held-out draws
# (60 s x 128 ch) two real units next to an SNR-40 one took 1100-1600 false spikes this way, at
# lags of -54, -40, -18, +17 and +34 samples, 50-230 spikes per lag where chance gives 0.1 per lag;
# on a static draw, clusters of an SNR-36 unit's echoes took 7000. Distance does not protect: an
# SNR-7 unit took 220 spikes of an SNR-39 unit 300 um away, all at lags -45..-43, through the
# noise its template holds on the far channels. A lag is "hot" when the small unit's spikes
# there (with the lags either side) number at least ECHO_MIN_COUNT and ECHO_EXCESS times what
# chance gives; the small unit's spikes at hot lags are dropped. The small unit's real spikes
# fall at a hot lag by chance only (0.1-0.3 per lag here). Caveat for real data: a small unit
# driven at a fixed short lag by a 2x bigger one (a strong monosynaptic link) loses those spikes.
# ECHO_RATIO 3 missed an SNR-9 unit taking 88 spikes of an SNR-30 one (template peak-to-peaks 11.7
# and 34.9, NP2 drifting seed 2).
ECHO_RATIO = 2.0
ECHO_MIN_COUNT = 10
ECHO_EXCESS = 10.0


def time_locked_echoes(times, templates, ptps, units_of, *, window, duration):
    """True for matched spikes that are echoes of a bigger unit (see ECHO_EXCESS).

    times: (n,) sorted sample times; templates: (n,) template index of each spike; ptps: (K,)
    each template's peak-to-peak; units_of: (K,) output unit of each template (pieces of one
    unit are never each other's echoes); window: largest lag looked at; duration: samples
    the spikes cover."""
    times, templates, ptps = np.asarray(times), np.asarray(templates), np.asarray(ptps)
    echo = np.zeros(len(times), dtype=bool)
    members = [np.flatnonzero(templates == k) for k in range(len(ptps))]
    for b in np.argsort(-ptps):
        small = np.flatnonzero((ptps * ECHO_RATIO <= ptps[b]) & (units_of != units_of[b]))
        tb = times[members[b]]
        for a in small:
            idx = members[a]
            which, hot, _ = hot_lag_pairs(times[idx], tb, window, duration)
            echo[idx[which[hot]]] = True
    return echo


def hot_lag_pairs(ta, tb, window, duration):
    """(index into ta, hot, lag ta - tb) for every pair of times at most window apart (tb
    sorted): hot where the pair's lag, with the lags either side, holds at least ECHO_MIN_COUNT
    pairs and ECHO_EXCESS times what chance gives over `duration` samples."""
    which, partner = pairs_within(ta, tb, window)
    lag = ta[which] - tb[partner]
    if not len(lag):
        return which, np.zeros(0, dtype=bool), lag
    counts = np.bincount(lag + window, minlength=2 * window + 1)
    around = np.convolve(counts, np.ones(3), mode="same")
    chance = 3.0 * len(ta) * len(tb) / max(duration, 1)
    return which, (around >= max(ECHO_MIN_COUNT, ECHO_EXCESS * chance))[lag + window], lag


def pairs_within(ta, tb, window):
    """(index into ta, index into tb) of every pair of times at most window apart (tb sorted)."""
    lo = np.searchsorted(tb, ta - window)
    hi = np.searchsorted(tb, ta + window, side="right")
    which = np.repeat(np.arange(len(ta)), hi - lo)
    first = np.repeat(lo - np.cumsum(np.r_[0, (hi - lo)[:-1]]), hi - lo)
    return which, first + np.arange(len(which))
