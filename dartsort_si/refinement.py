"""Stage 7, refinement: split and merge clusters on registered waveform features.

The initial density clustering (clustering.py) sees only position and one
amplitude. Two neurons at the same place with different amplitudes or
waveforms can fall into one cluster there, and one neuron can break into
pieces where its amplitude wobbles with drift. Refinement looks at the
waveforms themselves, in *registered* space so that drift moves nothing:

- `RegisteredFeatures`: each spike's collision-cleaned temporal-PCA features,
  read on its detection channel's neighbourhood of the real probe, are
  interpolated (kriging, as for templates) onto a fixed set of registered
  channels, at the probe position those channels had when the spike fired.
- `split_units`: each cluster is re-clustered by density in the whitened PCs
  of its registered features (clustering.split_clusters' machinery).
  A split stands only between pieces that are two neurons: amplitudes apart
  by more than the merge rule allows, or spikes that break each other's
  refractory period. So it separates co-located neurons and not the pieces
  one neuron's waveform falls into.
- `merge_templates`: units whose registered templates match (relative
  residual on their signal channels, best shift) merge, but never when their
  amplitudes differ by more than matching's own scale bound (1 +/-
  amplitude_scaling_boundary): two units on the same channels whose
  amplitudes differ that much are two neurons (PIPELINE.md stage 7).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.spatial.distance import cdist
from scipy.special import log_ndtr
from threadpoolctl import threadpool_limits

from .clustering import _split_once, cluster_spikes, drop_echo_clusters, echo_gaps, echo_mask
from .matching import hot_lag_pairs, pairs_within
from .templates import DRIFT_STEP_UM, Kriging, Templates, interpolation_reach, quantized_drift

logger = logging.getLogger("dartsort_si")

# merge units whose registered templates differ by less than this relative residual (on the
# channels where either has signal, best shift, amplitude scale within matching's bound).
# 0.3 was chosen on all channels (30 s x 64 ch rigid drift: 0.35 merged distinct neighbours);
# on signal channels alone pieces of one unit sit at 0.23-0.32 (60 s x 128 ch non-rigid)
MERGE_DISTANCE = 0.3
# template channels with a peak-to-peak below this (noise units) carry no signal
SIGNAL_PTP = 1.0
# registered channels within this radius of a cluster's centre carry its features: the
# main channel and its ring on Neuropixels (8-12 channels)
FEATURE_RADIUS_UM = 50.0
# features of at most this many spikes per cluster are used to split and merge
MAX_SPIKES = 1500
# spikes are re-aligned by up to this many samples (in quarter samples) before their features are compared
ALIGN_SAMPLES = 2
# two pieces of a split are two neurons when at least this many of their spike pairs (and half the
# chance count) fall 0.5-2 ms apart, inside a refractory period (see _two_neurons)
MIN_REFRACTORY_PAIRS = 2
REFRACTORY_MS = (0.5, 2.0)
# drift pieces (which carry amplitudes) count a refractory pair only between spikes of comparable
# amplitude: a big spike's own echo, detected 0.5-2 ms after or before it, is no second neuron.
# 300 s x 128 ch NP1 drifting seed 1: GT 0 (SNR 18.3) stayed two units over two such pairs
# (amplitudes 9.4 and 8.8 against 27.5 and 29.2, 31 and 23 samples apart; 1.9 expected by chance)
ECHO_PAIR_RATIO = 2.0
# a leftover event within the echo window of a matched spike this many times bigger is its remainder;
# at 1.0 the two events one missed spike leaves (trough and after-peak) flagged each other (82% of a
# missed unit's events on a 12 s x 48 ch case), at 1.5 0.6% of them
LEFTOVER_ECHO_RATIO = 1.5
# a cluster of matching's leftovers with at least this fraction of its events at hot lags
# (matching.hot_lag_pairs) of one unit's matched spikes is what matching left of that unit's
# spikes, not a neuron (see drop_time_locked). A real neuron's events fall there by chance only.
LOCKED_FRACTION = 0.25
# a unit found among matching's leftovers is dropped when a known unit of about its amplitude has
# its main channel this close (see drop_known). At 30 um (NP1's next contacts are 26 um away,
# diagonally) it dropped a neuron for another one: static seed 1, GT 17 (SNR 2.7, 143 of its spikes
# in one leftover cluster, peak-to-peak 3.2) for GT 4's unit (3.9) 26 um away. At 20 um (the same
# registered channel) the rematch of 23 held-out draws from matching1 gains it (37 -> 38) and keeps
# the others' counts, with one false-positive and one redundant unit more over the 23.
KNOWN_RADIUS_UM = 20.0
# the smallest cluster split_units may produce
MIN_SPLIT_SIZE = 25
# pieces of a split that fire over the same displacements and whose mean features lie this many
# pooled standard deviations apart (separation) are two neurons, whatever their amplitudes. On the
# pieces of 60 s x 128 ch drifting clusters (NP2 seed 5, NP1 seed 1), pieces of one unit at the
# same displacements were 1.7-6.7 apart, and pieces of two units 12.9-19.4 (two units of SNR 17 and
# 12 on the same channels, 1.2x apart in amplitude, were one cluster); pieces of one unit at
# displacements 10-20 um apart reached 18.8, which the displacement test leaves to drift_piece_units
SEPARATED_DPRIME = 10.0
# pieces that fire over the same displacements from places this far apart (medians, um, and d' of
# the spikes' registered x, z) are two neurons whatever their waveforms (apart_in_place). On the
# 356 pairs of split pieces of the 15 held-out cases (60 s x 128 ch), pieces of one unit at the
# same displacements lay 0-12.8 um apart with d' 0-2.84 but never both >= 4.9 um and >= 2.0;
# pieces of two units with d' >= 2 lay 7.7-24 um apart. NP1 drifting seed 1: GT 4 and 38 (SNR
# 2.9 and 2.8, 21 um apart, feature d' 4.9, amplitudes 1.07x apart) were one unit under drift,
# two in the static twin; their pieces were 14 um and d' 2.8 apart.
SEPARATED_PLACE_UM = 6.0
SEPARATED_PLACE_DPRIME = 2.0
# drift pieces (see drift_piece_units): clusters whose centres are this close, whose spikes'
# displacements barely overlap (DRIFT_PIECE_SHARED below) and whose
# amplitudes where they meet (the 20% of each piece's spikes closest in displacement to the
# other's) are within this ratio. `coexisting` (the split's and the mixture's test) still asks
# that at most DRIFT_PIECE_OVERLAP of either's spikes lie inside the other's 10-90% displacement
# range. Measured on the clusters of 60 s x 128 ch
# non-rigid cases (NP1 and NP2, seeds 11 and 12): 16 pairs of pieces of one unit sat 2-15 um
# apart with edge ratios 1.01-1.48 (median ratios up to 2.3); the two pairs of different units
# that passed the overlap test had edge ratios 1.27 (against 1.04 for the right partner, which
# mutual-best joining picks) and 1.95
DRIFT_PIECE_RADIUS_UM = 15.0
DRIFT_PIECE_OVERLAP = 0.25
DRIFT_PIECE_EDGE_PERCENT = 20
DRIFT_PIECE_MAX_RATIO = 1.5
# drift_piece_units asks that the pieces' displacement distributions share at most this much
# (shared_displacements, 2 um bins). The range test above let a piece with spikes at both extremes
# of the drift (-15 and +10..15 um) hide the piece between them (-12..2 um) of the same SNR-7 unit
# (NP1 drifting seed 1, GT 35: two output units). On the clusters of the 15 held-out cases
# (60 s x 128 ch, seeds 1-5), pairs within DRIFT_PIECE_RADIUS_UM: pieces of one unit shared
# 0.01-0.14 of their displacements (one 11-spike impure piece 0.55), different units 0.40-0.95.
# Their medians 5 um apart was asked too, until a piece at both extremes (-13..-5 and +7..+13 um,
# 88 spikes at amplitude 8) had the median of the piece between them (-7..+11 um, 168 spikes at
# 17.6) of the same SNR-11.5 unit (NP1 drifting seed 1, GT 7, e1e287f: two output units)
DRIFT_PIECE_SHARED = 0.25
DRIFT_PIECE_BIN_UM = 2.0
# Two pieces' amplitudes are compared at equal displacements where both fired (DRIFT_PIECE_BIN_UM
# bins), when there are this many such spikes (the smaller count of each bin, summed); else on
# their facing edges (DRIFT_PIECE_EDGE_PERCENT). A unit near the probe changes amplitude fast with
# displacement (NP1 drifting seed 5, GT 22 matched: 14.5 at -12 um, 22.5 at -6 um, 34 at +5 um;
# 14.5 against 17.8 for the two pieces at -12..-9 um), and edges a few um apart disagree: NP1
# drifting seed 1's GT 7 (detections 21.8 at 0 um, 8.5 at -10 um) had edges 15.5 and 9.2, 1.69
# apart, where at equal displacements its two pieces were 1.06-1.22 apart. Compared at equal
# displacements on the matched spikes only until e1e287f.
DRIFT_PIECE_SHARED_MIN_SPIKES = 5


class RegisteredFeatures:
    """Interpolates spikes' temporal-PCA features onto registered channels.

    features (N, rank, K) on the neighbourhood channel_index[channels] of each
    spike's detection channel (zeros or NaN where a slot is padding);
    drift_um (N,): displacement of each spike (depth - registered depth);
    components (rank, L): the temporal PCA basis the features were taken in.
    """

    def __init__(self, features, channels, channel_index, geom, rgeom, drift_um, components):
        self.features = np.nan_to_num(np.asarray(features, np.float32))
        self.components = np.asarray(components, np.float32)  # (rank, L) temporal basis
        self.channels = np.asarray(channels)
        self.channel_index = np.asarray(channel_index)
        self.geom = np.asarray(geom, float)
        self.rgeom = np.asarray(rgeom, float)
        self.drift = quantized_drift(drift_um)
        self.reach = interpolation_reach(self.geom)
        self._kriging = None

    def channels_near(self, centre_xz, radius_um=FEATURE_RADIUS_UM):
        """Registered channels within radius_um of a registered (x, z) position."""
        d = cdist(np.atleast_2d(centre_xz), self.rgeom)[0]
        near = np.flatnonzero(d <= radius_um)
        return near if len(near) else np.array([int(d.argmin())])

    def on(self, spikes, reg_channels):
        """(n, rank, len(reg_channels)) features of `spikes` on registered channels."""
        n_chans = len(self.geom)
        rank = self.features.shape[1]
        full = np.zeros((len(spikes), n_chans + 1, rank), np.float32)
        slots = self.channel_index[self.channels[spikes]]  # (n, K), n_chans = padding
        full[np.arange(len(spikes))[:, None], slots] = self.features[spikes].transpose(0, 2, 1)
        full = full[:, :n_chans]
        if self._kriging is None:
            self._kriging = Kriging(self.geom, self.rgeom[:1], self.reach)
        kriging = self._kriging.retarget(self.rgeom[reg_channels])
        out = np.zeros((len(spikes), rank, len(reg_channels)), np.float32)
        drift = self.drift[spikes]
        for k in np.unique(drift):
            sel = drift == k
            w, _ = kriging.weights(k * DRIFT_STEP_UM)  # (R, C)
            out[sel] = np.einsum("rc,nck->nkr", w, full[sel])
        return out

    def aligned(self, spikes, reg_channels, n_iter=2):
        """(n, rank * R) registered features, each spike delayed by the fraction of a
        sample (within +-ALIGN_SAMPLES) that best matches the group's mean.

        Detection puts a spike on the sample nearest its trough, so the sampled shape
        jumps where the true trough crosses the half-sample point: one unit comes out
        as two waveforms a sample apart, and in temporal-PCA space those are two
        clusters (60 s x 128 ch: pieces of one SNR-17 unit at offsets 0 and +1
        against the truth, no density between them). Delays act on the features
        directly, through the projections of the delayed basis on the basis.
        """
        feats = self.on(spikes, reg_channels)  # (n, rank, R)
        ops = self._shift_operators()  # (S, rank, rank)
        moved = np.einsum("nkr,skj->snjr", feats, ops)
        chosen = feats
        for _ in range(n_iter):
            best = np.einsum("snjr,jr->sn", moved, chosen.mean(0)).argmax(0)
            chosen = moved[best, np.arange(len(feats))]
        return chosen.reshape(len(spikes), -1)

    def _shift_operators(self):
        if not hasattr(self, "_ops"):
            self._ops = shift_operators(self.components, np.arange(-ALIGN_SAMPLES, ALIGN_SAMPLES + 1e-9, 0.25))
        return self._ops


def shift_operators(components, delays):
    """(S, rank, rank): row k of op s holds the features of basis vector k delayed by
    delays[s] samples (Fourier shift on a zero-padded copy)."""
    rank, length = components.shape
    padded = np.concatenate([np.zeros((rank, length)), components, np.zeros((rank, length))], axis=1)
    spec = np.fft.rfft(padded, axis=1)
    freqs = np.fft.rfftfreq(padded.shape[1])
    ops = []
    for d in delays:
        delayed = np.fft.irfft(spec * np.exp(-2j * np.pi * freqs * d), n=padded.shape[1], axis=1)
        ops.append(delayed[:, length: 2 * length] @ components.T)
    return np.stack(ops).astype(np.float32)


def _sample(idx, max_n, seed=0):
    if len(idx) <= max_n:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, max_n, replace=False))


def _centres(labels, x, z_reg):
    ids = np.unique(labels[labels >= 0])
    return ids, np.array([[np.median(x[labels == u]), np.median(z_reg[labels == u])] for u in ids])


def split_units(labels, x, z_reg, reg_features: RegisteredFeatures, *, times, amplitude_boundary,
                refractory, min_size=MIN_SPLIT_SIZE, n_pcs=5):
    """Split each cluster by density in the PCs of its aligned registered features.

    A split stands only between pieces that are two neurons (_two_neurons: peak
    amplitudes beyond 1 +/- amplitude_boundary apart, or spikes that break each
    other's refractory period); other pieces are joined again. refractory:
    (lo, hi, duration) in samples: the refractory window 0.5-2 ms and the
    duration the spike times cover.
    Density alone splits one unit by the phase at which its trough was sampled
    and by drift-dependent waveform changes (60 s x 128 ch, 45 clusters: 67
    after an unconditional split, the pieces of one unit 1 um apart with
    scales 0.92-1.08), which no merge test on the same features undoes.
    Spikes beyond the MAX_SPIKES sample of a cluster join the piece whose
    mean (in the same features) is nearest. Returns new labels 0..K-1.
    """
    out = np.full(len(labels), -1, dtype=np.int64)
    next_id = 0
    ids, centres = _centres(labels, x, z_reg)
    with threadpool_limits(limits=1, user_api="blas"):
        for u, centre in zip(ids, centres):
            members = np.flatnonzero(labels == u)
            chans = reg_features.channels_near(centre)
            sample = _sample(members, MAX_SPIKES)
            feats = reg_features.aligned(sample, chans)
            sub = _split_once(feats, min_size, n_pcs, None, 0.75) if len(sample) >= 2 * min_size else None
            if sub is not None:
                sub = _rejoin_one_neuron(feats, times[sample], reg_features.drift[sample], sub, amplitude_boundary,
                                         reg_features.components, refractory,
                                         np.stack([x[sample], z_reg[sample]], 1))
            if sub is None or sub.max() == 0:
                out[members] = next_id
                next_id += 1
                continue
            rest = np.setdiff1d(members, sample)
            if len(rest):
                means = np.stack([feats[sub == k].mean(0) for k in range(sub.max() + 1)])
                rest_feats = reg_features.aligned(rest, chans)
                out[rest] = next_id + cdist(rest_feats, means).argmin(1)
            out[sample] = next_id + sub
            next_id += sub.max() + 1
    return out


def peak_amplitudes(mean_features, components):
    """Largest peak-to-peak over channels of mean registered features (rank * R,)."""
    rank = components.shape[0]
    wave = components.T @ mean_features.reshape(rank, -1)  # (L, R)
    return float((wave.max(0) - wave.min(0)).max())


def refractory_pairs(times_a, times_b, lo, hi):
    """Pairs (a, b) with lo <= |t_b - t_a| <= hi samples."""
    tb = np.sort(times_b)
    count = 0
    for w0, w1 in ((lo, hi), (-hi, -lo)):
        count += int((np.searchsorted(tb, times_a + w1, side="right")
                      - np.searchsorted(tb, times_a + w0, side="left")).sum())
    return count


def separation(feats_a, feats_b) -> float:
    """d': the distance between two groups' mean features along the line joining them, in
    their pooled standard deviation along that line."""
    line = feats_a.mean(0) - feats_b.mean(0)
    norm = float(np.linalg.norm(line))
    if norm == 0:
        return 0.0
    pa, pb = feats_a @ (line / norm), feats_b @ (line / norm)
    return float((pa.mean() - pb.mean()) / max(np.sqrt(0.5 * (pa.var() + pb.var())), 1e-9))


def place_gap(positions_a, positions_b) -> float:
    """Distance (um) between the medians of two groups' (n, 2) registered x, z positions."""
    return float(np.linalg.norm(np.median(positions_a, 0) - np.median(positions_b, 0)))


def apart_in_place(positions_a, positions_b) -> bool:
    """Whether two groups of spikes come from two places: (n, 2) registered x, z of each spike,
    medians SEPARATED_PLACE_UM apart and SEPARATED_PLACE_DPRIME pooled sds apart."""
    return place_gap(positions_a, positions_b) >= SEPARATED_PLACE_UM and \
        separation(positions_a, positions_b) >= SEPARATED_PLACE_DPRIME


def coexisting(drift_a, drift_b) -> bool:
    """Whether two groups of spikes fire over the same displacements of the probe (the
    opposite of drift pieces, see _drift_piece_mismatch)."""
    return max(_inside(drift_a, drift_b), _inside(drift_b, drift_a)) > DRIFT_PIECE_OVERLAP


def _two_neurons(a, b, feats, times, drift, boundary, components, refractory, positions):
    """Whether groups a and b (indices into feats, times, drift) of a split are two neurons.

    Either their peak amplitudes differ by more than a factor 1 + boundary (the
    scale matching and the template merge allow), or their spikes break each
    other's refractory period: pieces of one neuron have no pair 0.5-2 ms apart,
    two neurons have about the chance count. Measured on pieces of density clusters
    (60 s x 128 ch, NP1 and NP2): the five co-located pairs of different units had
    2-6 such pairs at 0.65-1.3x the chance count; 37 of 40 pairs of pieces of one
    unit had none. Relative waveform distances did not separate them (0.43-0.67 between
    units, up to 0.86 between pieces of one unit misaligned or sampled at
    another phase). Or they fire over the same displacements and are SEPARATED_DPRIME apart,
    or come from two places (apart_in_place; positions: (n, 2) registered x, z).
    """
    peak_a, peak_b = (peak_amplitudes(feats[g].mean(0), components) for g in (a, b))
    if max(peak_a, peak_b) > (1 + boundary) * min(peak_a, peak_b):
        return True
    if _refractory_breach(times[a], times[b], refractory):
        return True
    if not coexisting(drift[a], drift[b]):
        return False
    return separation(feats[a], feats[b]) >= SEPARATED_DPRIME or apart_in_place(positions[a], positions[b])


def _rejoin_one_neuron(feats, times, drift, sub, boundary, components, refractory, positions):
    """Pieces of one split that are not two neurons (_two_neurons) are joined again, the
    closest pair (separation) first, as groups; returns piece labels 0..K-1 (K = 1: no split).
    Pair by pair, any piece of one neuron could chain two neurons together: a piece of one
    unit's spikes at the edge of its displacements did not coexist with the other unit's."""
    groups = [np.flatnonzero(sub == i) for i in range(sub.max() + 1)]
    while len(groups) > 1:
        pairs = [(separation(feats[a], feats[b]), i, j) for i, a in enumerate(groups)
                 for j, b in enumerate(groups[i + 1:], i + 1)
                 if not _two_neurons(a, b, feats, times, drift, boundary, components, refractory, positions)]
        if not pairs:
            break
        _, i, j = min(pairs)
        groups[i] = np.concatenate([groups[i], groups.pop(j)])
    out = np.empty(len(sub), dtype=np.int64)
    for k, members in enumerate(groups):
        out[members] = k
    return out


# -- template merge


def merge_templates(temps: Templates, *, amplitude_boundary, max_shift=3, max_channel_gap=8,
                    times=None, refractory=None) -> Templates:
    """Merge units whose registered templates match within MERGE_DISTANCE, closest pair first.

    The distance (template_distance) fits the amplitude scale only within
    1 +/- amplitude_boundary, the scale matching itself allows: two units on
    the same channels whose amplitudes differ more than that are two neurons.
    A merged pair becomes one template (count-weighted mean) before the next pair
    is looked at, so a group is joined only where its mean matches: merging every
    close pair at once chained two neurons through a small cluster holding spikes of
    both (60 s x 128 ch NP1 drifting seed 1: units of SNR 17 and 12, 26 um apart and
    1.7x apart in amplitude, became one unit of 728 spikes).
    With `times` (each unit's spike times, in unit order) and `refractory` (lo, hi, duration in
    samples), units whose spikes break each other's refractory period are two neurons and are
    never merged, however alike their templates: under drift, registered templates of two
    co-located units are smeared towards each other (NP1 drifting seed 4: two units of SNR 16,
    18 um apart, that the clustering had kept apart with 3 pairs 0.5-2 ms apart against 2.5 by
    chance, merged at distance 0.28).
    """
    data = [torch.as_tensor(t, dtype=torch.float32) for t in temps.data]
    counts = [float(c) for c in temps.counts]
    main = list(temps.main_channels())
    alive = list(range(temps.n_units))
    bins = None if temps.bins is None else list(temps.bins)
    bin_counts = None if temps.bins is None else list(temps.bin_counts)
    spikes = [np.sort(np.asarray(t)) for t in times] if times is not None and refractory is not None else None

    def distance(i, j):
        if abs(main[i] - main[j]) > max_channel_gap:
            return np.inf
        d = template_distance(data[i], data[j], amplitude_boundary, max_shift)
        if d < MERGE_DISTANCE and spikes is not None and _refractory_breach(spikes[i], spikes[j], refractory):
            return np.inf
        return d

    pairs = {(i, j): distance(i, j) for n, i in enumerate(alive) for j in alive[n + 1:]}
    while pairs:
        (i, j), d = min(pairs.items(), key=lambda item: item[1])
        if d >= MERGE_DISTANCE:
            break
        weights = np.array([counts[i], counts[j]]) + 1e-9
        data[i] = (data[i] * weights[0] + data[j] * weights[1]) / weights.sum()
        counts[i] += counts[j]
        if bins is not None:
            bins[i], bin_counts[i] = _merged_bins(bins[i], bin_counts[i], bins[j], bin_counts[j])
        main[i] = int(_ptp(data[i]).argmax())
        if spikes is not None:
            spikes[i] = np.sort(np.concatenate([spikes[i], spikes[j]]))
        alive.remove(j)
        pairs = {pair: v for pair, v in pairs.items() if i not in pair and j not in pair}
        pairs.update({(min(i, m), max(i, m)): distance(i, m) for m in alive if m != i})
    if len(alive) == temps.n_units:
        return temps
    logger.info("dartsort: merged %d units into %d", temps.n_units, len(alive))
    merged = np.stack([data[i].numpy() for i in alive]).astype(np.float32)
    if bins is not None:
        bins, bin_counts = np.stack([bins[i] for i in alive]), np.stack([bin_counts[i] for i in alive])
    return Templates(merged, temps.unit_ids[alive], np.array([counts[i] for i in alive]).astype(temps.counts.dtype),
                     temps.n_before, bins, bin_counts)


def _merged_bins(a, na, b, nb):
    """Drift-binned means (B, L, R) of two units joined: per bin, the count-weighted mean."""
    w = (na / np.maximum(na + nb, 1))[:, None, None]
    return (a * w + b * (1 - w)).astype(np.float32), na + nb


def template_distance(a, b, amplitude_boundary, max_shift=3):
    """Relative residual |a - s b| / |a| at the best time shift, larger of the two
    directions, on the channels where either template has signal; the scale s is
    the least-squares one clipped to 1 +/- amplitude_boundary."""
    signal = (_ptp(a) >= SIGNAL_PTP) | (_ptp(b) >= SIGNAL_PTP)
    if not signal.any():
        return 1.0
    a, b = a[:, signal], b[:, signal]
    return max(_one_way_distance(a, b, amplitude_boundary, max_shift),
               _one_way_distance(b, a, amplitude_boundary, max_shift))


def _ptp(t):
    return t.amax(0) - t.amin(0)


def _one_way_distance(a, b, boundary, max_shift):
    best = np.inf
    for s in range(-max_shift, max_shift + 1):
        bs = torch.roll(b, s, dims=0)
        scale = ((a * bs).sum() / (bs * bs).sum().clamp(min=1e-9)).clamp(1 - boundary, 1 + boundary)
        best = min(best, float((a - scale * bs).norm() / max(float(a.norm()), 1e-9)))
    return best


# -- units the clustering missed


def cluster_leftovers(leftovers, z_reg, matched, geom, *, amplitude_scale, echo_samples, echo_cluster_samples,
                      echo_radius_um, echo_cluster_fraction):
    """Density clusters of the events matching left unexplained (leftover_dtype array).

    Echoes are left out as in the initial clustering, judged against the matched
    spikes too and with a 1.5x bigger event counting (LEFTOVER_ECHO_RATIO): the
    remainder of an imperfectly subtracted spike is a leftover event next to a
    bigger matched one.
    """
    n = len(leftovers)
    labels = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return labels
    times = np.concatenate([leftovers["sample_index"], matched["sample_index"]])
    chans = np.concatenate([leftovers["channel_index"], matched["channel_index"]])
    amps = np.concatenate([leftovers["amplitude"], matched["amplitude"]])
    gaps = echo_gaps(times, chans, amps, geom, max_window=max(echo_samples, echo_cluster_samples),
                     radius_um=echo_radius_um, ratio=LEFTOVER_ECHO_RATIO)[:n]
    echo = gaps <= echo_samples
    # one missed spike leaves two events (its trough and its after-peak): keep the bigger
    echo |= echo_mask(leftovers["sample_index"], leftovers["channel_index"], leftovers["amplitude"], geom,
                      window_samples=echo_samples, radius_um=echo_radius_um, ratio=1.0)
    late = gaps <= echo_cluster_samples
    keep = ~echo
    labels[keep] = cluster_spikes(leftovers["x"][keep], z_reg[keep], leftovers["amplitude"][keep],
                                  amplitude_scale=amplitude_scale)
    return drop_echo_clusters(labels, late, echo_cluster_fraction)


def selection_bias_factor(scores, threshold, lowest=0.5) -> float:
    """Factor (lowest..1) that undoes the inflation of a template averaged over events kept
    because their matched-filter score (noise sd units) crossed `threshold`.

    An event is kept when noise pushed its score up, so near the threshold the kept events
    average bigger than the unit: NP1 static seed 1, three units of SNR 2.9-3.7 found among
    the leftovers had templates 1.35-1.55x their true waveforms, and with the amplitude scale
    held near 1 a template that much too big never wins against the threshold, so matching
    took only the spikes noise enlarged (28-55% of each unit). The scores of a unit's events
    are a normal of sd 1 cut at the threshold; the mean of that cut normal that gives the
    kept events' mean score is the unit's own, and the factor is their ratio."""
    scores = np.asarray(scores, float)
    if not len(scores):
        return 1.0
    observed = float(scores.mean())
    lo, hi = threshold - 10.0, observed
    for _ in range(60):  # E[s | s > threshold] grows with the mean: bisection
        mu = 0.5 * (lo + hi)
        a = threshold - mu
        mills = np.exp(-0.5 * a * a - log_ndtr(-a)) / np.sqrt(2 * np.pi)  # stable for large a
        lo, hi = (mu, hi) if mu + mills < observed else (lo, mu)
    return float(np.clip(0.5 * (lo + hi) / observed, lowest, 1.0))


def detection_bias(peak, threshold):
    """Relative excess of the mean of a unit's detections over its peak amplitude (in noise sd,
    unit-variance noise on its main channel) when only those over threshold are kept: for peak p
    and a = p - threshold, E[x | x > threshold] / p - 1 = pdf(a) / cdf(a) / p (steps.REFRESH_MIN_BIAS)."""
    peak = np.asarray(peak, float)
    a = peak - threshold
    mills = np.exp(-0.5 * a * a - log_ndtr(a)) / np.sqrt(2 * np.pi)  # stable for very negative a
    return mills / np.maximum(peak, 1e-9)


def drop_time_locked(labels, times, spike_times, spike_units, *, window, duration, min_lag):
    """Labels of leftover events (times) with the clusters time-locked to a matched unit set
    to -1: LOCKED_FRACTION of a cluster's events or more at hot lags of one unit's spikes,
    more than min_lag samples from them.

    Such a cluster is a piece of that unit's own spikes that its template leaves behind, seen
    at a fixed lag: 60 s x 128 ch NP1 drifting seed 5, 236 of a cluster's 379 events sat
    19-21 samples before the 235 matched spikes of an SNR-7 unit (chance: 0.1 per lag). Added as
    a unit, its template (that unit's waveform, 20 samples early) took 262 spikes in the next
    matching pass and left the real unit 30 of its 273: a false unit and a lost one. Template
    distance does not see it: the shifted copy is 1.5 apart, as it compares shifts of 3 samples.
    Events within min_lag of a matched spike are that spike itself: a neuron whose spikes a
    neighbour's template took, badly, is what the leftover search is for (NP2 drifting seeds 4
    and 5: two SNR 7-8 units, 165 and 275 events at lag 0, lost when they were dropped too).
    """
    out = labels.copy()
    spike_times, spike_units = np.asarray(spike_times), np.asarray(spike_units)
    trains = [np.sort(spike_times[spike_units == k]) for k in np.unique(spike_units)]
    for c in np.unique(labels[labels >= 0]):
        ta = times[labels == c]
        for tb in trains:
            which, hot, lag = hot_lag_pairs(ta, tb, window, duration)
            hot &= np.abs(lag) > min_lag
            if len(np.unique(which[hot])) >= LOCKED_FRACTION * len(ta):
                out[labels == c] = -1
                logger.info("dartsort: a cluster of %d leftover events is time-locked to a unit's spikes "
                            "(median lag %d samples); left out", len(ta), np.median(lag[hot]))
                break
    return out


def drop_known(new: Templates, known: Templates, rgeom, *, amplitude_boundary, radius_um=KNOWN_RADIUS_UM) -> Templates:
    """New templates that an existing unit already explains are dropped: those within
    MERGE_DISTANCE of one, and those whose main channel lies within radius_um of an
    existing unit's with a peak amplitude within 1 +/- amplitude_boundary of its.

    The second kind is what matching failed to explain of a known unit (its spikes at
    a drift its template fits badly); added as a unit of its own it fought the known
    one in matching (60 s x 128 ch NP2: 11,290 spikes became 180,179 and matching
    took 30 times longer). A co-located neuron of another amplitude is still added.
    """
    keep = np.ones(new.n_units, bool)
    known_data = torch.as_tensor(known.data)
    known_pos, known_ptp = rgeom[known.main_channels()], known.ptp()
    for i, (t, pos, ptp) in enumerate(zip(torch.as_tensor(new.data), rgeom[new.main_channels()], new.ptp())):
        near = np.linalg.norm(known_pos - pos, axis=1) <= radius_um
        ratio = np.maximum(known_ptp[near], ptp) / np.maximum(np.minimum(known_ptp[near], ptp), 1e-9)
        if (ratio <= 1 + amplitude_boundary).any():
            keep[i] = False
            continue
        keep[i] = all(template_distance(t, k, amplitude_boundary) >= MERGE_DISTANCE for k in known_data)
    return new.subset(keep)


# -- one unit, several templates


def drift_piece_units(labels, x, z_reg, drift_um, amplitudes, *, times, refractory):
    """Unit id per cluster (an array indexed by cluster id): clusters that are the
    pieces of one neuron at different probe displacements share a unit.

    A neuron close to the probe changes its amplitude and shape as the probe
    moves past it by more than interpolation onto registered channels can
    undo (60 s x 128 ch NP1, one SNR-9 unit: three clusters at displacements
    around -14, -1 and +10 um, amplitudes 28, 12 and 14). Its pieces are
    told apart from co-located neurons by *when* they fire: each piece holds the
    spikes of one range of displacements, while two neurons both fire at every
    displacement; and where their ranges meet, their amplitudes agree.
    Pieces are joined agglomeratively, a pair at a time, each with the candidate
    whose amplitude at the meeting point is closest (mutual best): a narrow
    piece at an extreme displacement is disjoint from every unit around it, and
    only its own unit meets it at its amplitude. Pieces keep their own
    templates (which fit their displacement range better than an average
    would) and share an output unit. Amplitudes are compared where both pieces fired,
    if they did (DRIFT_PIECE_SHARED_MIN_SPIKES).
    """
    ids = np.unique(labels[labels >= 0])
    units = np.arange(ids.max() + 1 if len(ids) else 0)
    if len(ids) < 2:
        return units
    groups = {int(u): np.flatnonzero(labels == u) for u in ids}
    while True:
        best = _best_piece_partners(groups, x, z_reg, drift_um, amplitudes, times, refractory)
        pairs = [(a, b) for a, (b, _) in best.items() if a < b and best.get(b, (None,))[0] == a]
        if not pairs:
            break
        for a, b in pairs:
            groups[a] = np.concatenate([groups[a], groups.pop(b)])
    for key, members in groups.items():
        units[np.unique(labels[members])] = key
    n_joined = len(ids) - len(groups)
    if n_joined:
        logger.info("dartsort: %d clusters are pieces of other units at other probe displacements", n_joined)
    return units


def pieces_of_known_units(labels, units, first_new, x, z_reg, drift_um, amplitudes, *, times, refractory,
                          taken_from=None):
    """Output unit per template (units, indexed by template, updated): a template from first_new
    on (a unit found among matching's leftovers) whose spikes are a drift piece of one known
    output unit (drift_piece_units' tests, against all that unit's spikes) joins the one it
    meets at the closest amplitude. taken_from (per template, or -1) names the known unit that
    held most of a new template's spikes before it was found: that one need not be near it in
    (x, z), which localizations at the probe's edge put far off the probe (NP1 drifting seed 1,
    GT 35 below the first row: its unit's spikes at x 90-276 um on a 48 um wide probe, the 136
    spikes at displacements 6-15 um that a new unit took at x 67-114 um).

    What the known unit's templates fit badly at displacements where it fired little in the
    subtraction's detections is left over, and clusters there (NP1 drifting seed 2: 85 spikes of
    GT 16 at displacements -15..-8 um, against -9..+14 um for its unit of 397, same place and
    amplitude): a false unit and a less complete true one when kept apart."""
    out = np.asarray(units).copy()
    known = np.unique(out[:first_new])
    members = {u: np.flatnonzero(np.isin(labels, np.flatnonzero(out[:first_new] == u))) for u in known}
    members = {u: m for u, m in members.items() if len(m)}
    centre = {u: (np.median(x[m]), np.median(z_reg[m])) for u, m in members.items()}
    for k in range(first_new, len(out)):
        mk = np.flatnonzero(labels == k)
        if not len(mk):
            continue
        ck = np.median(x[mk]), np.median(z_reg[mk])
        best, best_ratio = None, np.inf
        for u, mu in members.items():
            near = np.hypot(centre[u][0] - ck[0], centre[u][1] - ck[1]) <= DRIFT_PIECE_RADIUS_UM
            if not near and (taken_from is None or taken_from[k] != u):
                continue
            ratio = _drift_piece_mismatch(drift_um[mk], drift_um[mu], amplitudes[mk], amplitudes[mu])
            if ratio is not None and ratio < best_ratio and not _refractory_breach(
                    times[mk], times[mu], refractory, amplitudes[mk], amplitudes[mu]):
                best, best_ratio = u, ratio
        if best is not None:
            out[k] = best
            logger.info("dartsort: a unit of %d spikes found among the leftovers is a drift piece of unit %d; "
                        "joined", len(mk), best)
    return out


def _best_piece_partners(groups, x, z_reg, drift_um, amplitudes, times, refractory):
    """{group: (partner, amplitude mismatch)}: each group's best drift-piece partner."""
    keys = list(groups)
    centres = np.array([[np.median(x[groups[k]]), np.median(z_reg[groups[k]])] for k in keys])
    close = cdist(centres, centres) <= DRIFT_PIECE_RADIUS_UM
    best = {}
    for i, j in zip(*np.nonzero(np.triu(close, 1))):
        a, b = keys[i], keys[j]
        ma, mb = groups[a], groups[b]
        mismatch = _drift_piece_mismatch(drift_um[ma], drift_um[mb], amplitudes[ma], amplitudes[mb])
        if mismatch is None or _refractory_breach(times[ma], times[mb], refractory, amplitudes[ma], amplitudes[mb]):
            continue
        for u, v in ((a, b), (b, a)):
            if u not in best or mismatch < best[u][1]:
                best[u] = (v, mismatch)
    return best


def _drift_piece_mismatch(drift_a, drift_b, amps_a, amps_b):
    """Amplitude ratio (>= 1) where the displacement ranges of two pieces meet, or
    None when they are not pieces of one unit (displacements shared, or amplitudes disagree).
    Their medians may coincide: a piece at both extremes of the drift around one in the middle.
    Compared at equal displacements where both fired (_ratio_where_both_fired), else on the
    spikes of each facing the other (_facing)."""
    if shared_displacements(drift_a, drift_b) > DRIFT_PIECE_SHARED:
        return None
    ratio = _ratio_where_both_fired(drift_a, drift_b, amps_a, amps_b)
    if ratio is None:
        in_a, in_b = _facing(drift_a, drift_b), _facing(drift_b, drift_a)
        near_a, near_b = np.median(amps_a[in_a]), np.median(amps_b[in_b])
        ratio = max(near_a, near_b) / max(min(near_a, near_b), 1e-9)
    return ratio if ratio <= DRIFT_PIECE_MAX_RATIO else None


def _ratio_where_both_fired(drift_a, drift_b, amps_a, amps_b, bin_um: float = DRIFT_PIECE_BIN_UM):
    """Amplitude ratio (>= 1) of two pieces at equal displacements: over the displacement bins
    (bin_um) where both fired, the geometric mean of the ratio of their median amplitudes there,
    each bin weighted by the smaller of its two counts; None under DRIFT_PIECE_SHARED_MIN_SPIKES
    in all. Near the probe a unit's amplitude changes fast with displacement (NP1 drifting seed 1,
    GT 7: 21.8 at 0 um, 8.5 at -10 um), so amplitudes a few um apart are not comparable."""
    lo = min(drift_a.min(), drift_b.min())
    bin_a = np.floor((drift_a - lo) / bin_um).astype(np.int64)
    bin_b = np.floor((drift_b - lo) / bin_um).astype(np.int64)
    logs, weights = [], []
    for k in np.intersect1d(bin_a, bin_b):
        in_a, in_b = bin_a == k, bin_b == k
        logs.append(np.log(max(np.median(amps_a[in_a]), 1e-9) / max(np.median(amps_b[in_b]), 1e-9)))
        weights.append(min(in_a.sum(), in_b.sum()))
    if sum(weights) < DRIFT_PIECE_SHARED_MIN_SPIKES:
        return None
    return float(np.exp(abs(np.average(logs, weights=weights))))


def _facing(drift, other, percent=DRIFT_PIECE_EDGE_PERCENT):
    """The spikes of a piece whose displacements lie closest to the other piece's (the nearest
    `percent`%): its top edge facing a piece above it, or both ends facing a piece at both
    extremes of the drift."""
    s = np.sort(other)
    i = np.searchsorted(s, drift)
    above, below = s[np.minimum(i, len(s) - 1)], s[np.maximum(i - 1, 0)]
    dist = np.minimum(np.abs(above - drift), np.abs(below - drift))
    return dist <= np.percentile(dist, percent)


def shared_displacements(drift_a, drift_b, bin_um: float = DRIFT_PIECE_BIN_UM) -> float:
    """Overlap (0 to 1) of two groups' displacement distributions: the sum over bin_um bins of
    the smaller of their two normalized histograms."""
    edges = np.arange(min(drift_a.min(), drift_b.min()), max(drift_a.max(), drift_b.max()) + bin_um, bin_um)
    if len(edges) < 2:
        return 1.0
    pa = np.histogram(drift_a, edges)[0] / len(drift_a)
    pb = np.histogram(drift_b, edges)[0] / len(drift_b)
    return float(np.minimum(pa, pb).sum())


def _inside(values, others):
    """Fraction of values within the 10-90% range of others."""
    lo, hi = np.percentile(others, [10, 90])
    return float(np.mean((values >= lo) & (values <= hi)))


def _refractory_breach(times_a, times_b, refractory, amps_a=None, amps_b=None):
    """Whether two groups of spikes break each other's refractory period (MIN_REFRACTORY_PAIRS).
    Given amplitudes, pairs whose amplitudes are over ECHO_PAIR_RATIO apart are left out."""
    lo, hi, duration = refractory
    if amps_a is None:
        observed = refractory_pairs(times_a, times_b, lo, hi)
    else:
        observed = _comparable_pairs(times_a, times_b, amps_a, amps_b, lo, hi)
    expected = len(times_a) * len(times_b) * 2 * (hi - lo) / max(duration, 1)
    return observed >= MIN_REFRACTORY_PAIRS and observed >= 0.5 * expected


def _comparable_pairs(times_a, times_b, amps_a, amps_b, lo, hi):
    """refractory_pairs, counting only pairs whose amplitudes are within ECHO_PAIR_RATIO."""
    order = np.argsort(times_b, kind="stable")
    tb, ab = np.asarray(times_b)[order], np.asarray(amps_b, float)[order]
    ta = np.asarray(times_a)
    which, partner = pairs_within(ta, tb, hi)
    inside = np.abs(ta[which] - tb[partner]) >= lo
    a, b = np.asarray(amps_a, float)[which][inside], ab[partner][inside]
    return int((np.maximum(a, b) <= ECHO_PAIR_RATIO * np.maximum(np.minimum(a, b), 1e-9)).sum())
