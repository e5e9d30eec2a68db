"""Stage 7, Gaussian-mixture refinement in registered feature space.

After the density clustering, its split and the echo cleanup, units that sit
near each other on the probe compete for their spikes in one Gaussian mixture:

- units are grouped by their registered positions (`unit_groups`): neighbours
  within GROUP_RADIUS_UM, the units that can steal each other's spikes;
- each group's spikes are read on the registered channels around its units
  (refinement.RegisteredFeatures, so drift moves nothing) and reduced to their
  leading principal components;
- a mixture with one full-covariance Gaussian per unit is fitted by EM starting
  from the current labels, then improved by split and merge moves, each kept
  only when it lowers the Bayesian information criterion (the penalized
  likelihood) *and* agrees with the two-neuron test (spikes breaking each
  other's refractory period, or peak amplitudes beyond matching's scale bound
  at the same displacements): a split must give two neurons, a merge must not
  join two. Split moves are judged in the component's own leading directions
  (`split_dimensions`), and two components holding the spikes of different
  displacements that one template can fit are merged whatever the BIC (one
  unit, its waveform changed by the drift);
- every spike of the group is then assigned to its most likely component.

The mixture sees all of a unit's waveform on its channels where the density
split sees a few PCs of one cluster at a time, so it moves spikes between
neighbours and joins the pieces of one unit that the template merge missed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist
from scipy.stats import ks_2samp
from threadpoolctl import threadpool_limits

from .clustering import renumber
from .refinement import (DRIFT_PIECE_RADIUS_UM, MAX_SPIKES, SEPARATED_DPRIME, _centres, _refractory_breach, _sample,
                         apart_in_place, peak_amplitudes, place_gap, separation)

logger = logging.getLogger("dartsort_si")

# units whose registered centres are this close compete in one mixture (two Neuropixels
# rows, 40 um: the nearest-neighbour merges on NP1 were between units 19-26 um apart)
GROUP_RADIUS_UM = 40.0
# a group larger than this is cut by linking at a smaller radius (cost grows with group size)
MAX_GROUP_UNITS = 6
# registered channels within this radius of a unit centre carry the group's features
FEATURE_RADIUS_UM = 50.0
# dimensions of the mixture (leading PCs of the group's registered features)
N_DIMS = 8
# EM iterations per fit
EM_ITERATIONS = 15
# covariance floor (features are in units of the noise standard deviation)
COVARIANCE_FLOOR = 1e-2
# the smallest component a split may leave
MIN_COMPONENT = 25
# pieces whose spikes sit at different displacements (two-sample Kolmogorov-Smirnov p under this)
# are not two neurons by their amplitudes alone: a unit close to the probe is up to 2x bigger
# over a contact than between two, while two neurons in one place drift together and fire
# whatever the drift. NP1 drifting seed 1: an SNR-11 unit's 72 spikes at displacements -2..2 um
# were 2x as big as its 168 others (-10..10 um), and a split in 3 dimensions cut them apart.
DRIFT_DIFFERENCE_P = 1e-3


@dataclass
class Gaussian:
    mean: np.ndarray
    cov: np.ndarray
    weight: float

    @classmethod
    def fit(cls, points, weights=None, total=None):
        w = np.ones(len(points)) if weights is None else weights
        s = max(w.sum(), 1e-9)
        mean = (w[:, None] * points).sum(0) / s
        d = points - mean
        cov = (w[:, None] * d).T @ d / s + COVARIANCE_FLOOR * np.eye(points.shape[1])
        return cls(mean, cov, s / (total or len(points)))

    def log_pdf(self, points):
        chol = np.linalg.cholesky(self.cov)
        sol = np.linalg.solve(chol, (points - self.mean).T)
        log_det = 2 * np.log(np.diag(chol)).sum()
        return -0.5 * ((sol ** 2).sum(0) + log_det + points.shape[1] * np.log(2 * np.pi))


def n_parameters(k, d):
    """Free parameters of a k-component full-covariance mixture in d dimensions."""
    return k * (d + d * (d + 1) // 2) + (k - 1)


def bic(log_likelihood, k, d, n):
    return -2 * log_likelihood + n_parameters(k, d) * np.log(max(n, 2))


def log_likelihoods(points, comps):
    """(n, k) log(weight * density) of each point under each component."""
    return np.stack([np.log(max(c.weight, 1e-12)) + c.log_pdf(points) for c in comps], axis=1)


def total_log_likelihood(points, comps):
    ll = log_likelihoods(points, comps)
    top = ll.max(1)
    return float((top + np.log(np.exp(ll - top[:, None]).sum(1))).sum())


def em(points, labels, n_iter=EM_ITERATIONS):
    """EM for a full-covariance mixture from hard labels 0..K-1; returns
    (components, hard labels). A component that empties is dropped."""
    labels = np.asarray(labels)
    k = labels.max() + 1
    resp = np.eye(k)[labels]
    comps = []
    for _ in range(n_iter):
        keep = resp.sum(0) >= points.shape[1] + 2
        keep[resp.sum(0).argmax()] = True  # never none
        resp = resp[:, keep]
        comps = [Gaussian.fit(points, resp[:, j], len(points)) for j in range(resp.shape[1])]
        ll = log_likelihoods(points, comps)
        ll -= ll.max(1, keepdims=True)
        resp = np.exp(ll)
        resp /= resp.sum(1, keepdims=True)
    return comps, resp.argmax(1)


def unit_groups(centres, radius=GROUP_RADIUS_UM, max_units=MAX_GROUP_UNITS):
    """Index lists of units linked (single linkage) within radius um of each other;
    a group over max_units is cut again at 3/4 of the radius."""
    n = len(centres)
    close = cdist(centres, centres) <= radius
    seen = np.zeros(n, bool)
    groups = []
    for start in range(n):
        if seen[start]:
            continue
        stack, members = [start], []
        seen[start] = True
        while stack:
            i = stack.pop()
            members.append(i)
            for j in np.flatnonzero(close[i] & ~seen):
                seen[j] = True
                stack.append(j)
        members = np.sort(members)
        if len(members) > max_units and radius > 5:
            sub = unit_groups(centres[members], 0.75 * radius, max_units)
            groups.extend(members[g] for g in sub)
        else:
            groups.append(members)
    return groups


@dataclass
class GroupFit:
    """One group's spikes in mixture space and what the moves need of them."""

    points: np.ndarray  # (n, d) PCs
    raw: np.ndarray  # (n, rank * R) registered features, for peak amplitudes
    times: np.ndarray
    drift: np.ndarray  # (n,) displacement of each spike (quantized)
    positions: np.ndarray  # (n, 2) x and registered z of each spike (um)
    components: np.ndarray  # temporal PCA basis
    boundary: float
    refractory: tuple

    def peak(self, mask):
        return peak_amplitudes(self.raw[mask].mean(0), self.components)

    def two_neurons(self, a, b):
        return self.judge(a, b)[0]

    def judge(self, a, b):
        """(two neurons, pieces of one unit) for spikes a and b. Two neurons: they break each
        other's refractory period, or at the same displacements their peak amplitudes differ
        beyond 1 +/- boundary or their features are SEPARATED_DPRIME apart (see
        refinement._two_neurons and DRIFT_DIFFERENCE_P). Pieces of one unit: at different
        displacements, with peak amplitudes one template can fit, in one place (median
        registered positions within DRIFT_PIECE_RADIUS_UM, as refinement.drift_piece_units
        asks). Without the place, a piece of one unit (displacements 0..13 um) and another unit
        (-14..12 um) 41 um away and d' 19 apart were joined (NP1 drifting seed 4, SNR 6.5 and
        7.4); where the place agrees, d' does not tell pieces from neurons (a big unit's
        waveform changes with drift: 32 spikes of an SNR-17 unit at -3..0 um, 1.26x as big as
        its other 269 at the same position, NP1 drifting seed 1)."""
        if _refractory_breach(self.times[a], self.times[b], self.refractory):
            return True, False
        fits, moved = self.one_scale(a, b), self.at_different_displacements(a, b)
        apart = separation(self.raw[a], self.raw[b]) >= SEPARATED_DPRIME or \
            apart_in_place(self.positions[a], self.positions[b])
        return (not fits or apart) and not moved, fits and moved and self.one_place(a, b)

    def one_place(self, a, b):
        return place_gap(self.positions[a], self.positions[b]) <= DRIFT_PIECE_RADIUS_UM

    def one_scale(self, a, b):
        """Peak amplitudes within matching's scale bound: one template can fit both."""
        pa, pb = self.peak(a), self.peak(b)
        return max(pa, pb) <= (1 + self.boundary) * min(pa, pb)

    def at_different_displacements(self, a, b):
        if np.ptp(self.drift[a]) == 0 and np.ptp(self.drift[b]) == 0:
            return False  # no drift (or none to tell)
        return ks_2samp(self.drift[a], self.drift[b]).pvalue < DRIFT_DIFFERENCE_P


def two_over_one(points, two):
    """BIC of one Gaussian over `points` minus that of the two components `two`:
    positive where two explain them better, penalty included."""
    d = points.shape[1]
    return bic(float(Gaussian.fit(points).log_pdf(points).sum()), 1, d, len(points)) - \
        bic(total_log_likelihood(points, two), 2, d, len(points))


def try_splits(fit: GroupFit, labels):
    """Split each component in two where that lowers the BIC and gives two neurons.

    The split is judged in the component's own leading principal directions, as many as
    its spikes can support (split_dimensions). In all the group's 8 dimensions a second
    full-covariance Gaussian adds 45 parameters, which the BIC charges a log-likelihood gain
    of ~120 for at 200 spikes: 60 s x 128 ch NP1 drifting seed 5, a cluster of 207 spikes of
    an SNR-7 and an SNR-4.5 unit 8 um apart (3 sd apart on its first direction) stayed one
    unit; in 3 dimensions the charge is ~27 and it splits."""
    for k in range(labels.max() + 1):
        members = np.flatnonzero(labels == k)
        centred = fit.points[members] - fit.points[members].mean(0)
        d = split_dimensions(len(members), fit.points.shape[1])
        if len(members) < 2 * max(MIN_COMPONENT, d + 2):
            continue
        pts = centred @ np.linalg.svd(centred, full_matrices=False)[2][:d].T
        # start from the sign of the first principal direction of the component
        start = (pts[:, 0] > 0).astype(int)
        if min(start.sum(), len(start) - start.sum()) < d + 2:
            continue
        comps2, sub = em(pts, start)
        if len(comps2) < 2 or min(np.bincount(sub, minlength=2)) < MIN_COMPONENT:
            continue
        if two_over_one(pts, comps2) > 0 and fit.two_neurons(members[sub == 0], members[sub == 1]):
            labels = labels.copy()
            labels[members[sub == 1]] = labels.max() + 1
    return labels


def split_dimensions(n, d_max):
    """Dimensions a split of n points is judged in: ~25 * 2^d points for a density in d
    dimensions, as the density split (clustering._split_once) allows."""
    return int(min(d_max, max(1, np.log2(max(n, 1) / 25))))


def try_merges(fit: GroupFit, labels):
    """Merge pairs of components, best first, that are not two neurons and where one
    Gaussian explains both at a lower BIC, or that hold one unit's spikes at different
    displacements with amplitudes one template can fit (whatever the BIC: drift changes a
    unit's waveform on registered channels more than one Gaussian allows. NP1 drifting seed 4:
    an SNR-8.7 unit in two components, displacements -14..5 and 2..13 um, peaks 9.9 and 11.5,
    one refractory pair). Pieces further apart in amplitude stay two components, each with its
    own template, and refinement.drift_piece_units makes them one unit (NP1 drifting seed 2: an
    SNR-8.9 unit at -12..-5 and -1..10 um, peaks 17.1 and 12.4; as one template it fitted
    the first range so badly that a copy of it grew out of the leftovers)."""
    while labels.max() > 0:
        best, best_gain = None, -np.inf
        for i in range(labels.max() + 1):
            for j in range(i + 1, labels.max() + 1):
                both = np.flatnonzero((labels == i) | (labels == j))
                pts = fit.points[both]
                sub = (labels[both] == j).astype(int)
                a, b = both[sub == 0], both[sub == 1]
                two = [Gaussian.fit(pts[sub == s], total=len(pts)) for s in (0, 1)]
                gain = -two_over_one(pts, two)
                if gain <= best_gain:
                    continue
                two, pieces = fit.judge(a, b)
                if not two and (gain > 0 or pieces):
                    best, best_gain = (i, j), gain
        if best is None:
            return labels
        i, j = best
        labels = labels.copy()
        labels[labels == j] = i
        labels[labels > j] -= 1
    return labels


def refine(labels, x, z_reg, reg_features, *, times, amplitude_boundary, refractory, n_dims=N_DIMS):
    """Gaussian-mixture refinement of `labels` (-1: unassigned, left alone).

    Returns new labels 0..K-1. See the module docstring.
    """
    labels = np.asarray(labels)
    ids, centres = _centres(labels, x, z_reg)
    positions = np.stack([x, z_reg], 1)
    out = np.full(len(labels), -1, dtype=np.int64)
    if len(ids) == 0:
        return out
    next_id = 0
    with threadpool_limits(limits=1, user_api="blas"):
        for group in unit_groups(centres):
            new, n_comps = _refine_group(labels, ids[group], centres[group], reg_features, times, positions,
                                         amplitude_boundary, refractory, n_dims)
            sel = new >= 0
            out[sel] = next_id + new[sel]
            next_id += n_comps
    logger.info("dartsort: mixture refinement: %d units in, %d out", len(ids), next_id)
    return out


def _refine_group(labels, unit_ids, centres, reg_features, times, positions, boundary, refractory, n_dims):
    """(labels of all spikes for this group's units, -1 elsewhere; number of components)."""
    members = [np.flatnonzero(labels == u) for u in unit_ids]
    chans = np.unique(np.concatenate([reg_features.channels_near(c, FEATURE_RADIUS_UM) for c in centres]))
    samples = [_sample(m, MAX_SPIKES) for m in members]
    raw = np.concatenate([reg_features.aligned(s, chans) for s in samples])
    start = np.concatenate([np.full(len(s), k) for k, s in enumerate(samples)])
    sample = np.concatenate(samples)
    mean = raw.mean(0)
    basis = np.linalg.svd(raw - mean, full_matrices=False)[2][: min(n_dims, raw.shape[1])]
    points = (raw - mean) @ basis.T
    if len(points) < 4 * (points.shape[1] + 2):
        # too few spikes to fit even one Gaussian per unit: labels stay as they are
        out = np.full(len(labels), -1, dtype=np.int64)
        for k, m in enumerate(members):
            out[m] = k
        return out, len(members)
    fit = GroupFit(points, raw, times[sample], reg_features.drift[sample], positions[sample], reg_features.components,
                   boundary, refractory)
    _, current = em(points, start)
    current = renumber(current)
    current = try_splits(fit, current)
    current = try_merges(fit, current)
    comps, current = em(points, current)
    current = renumber(current)
    comps, _ = em(points, current, n_iter=1)
    out = np.full(len(labels), -1, dtype=np.int64)
    out[sample] = current
    # the unsampled spikes: aligned as their own unit's sample was, then the most likely component
    for rest in (np.setdiff1d(m, s) for m, s in zip(members, samples)):
        if len(rest):
            out[rest] = log_likelihoods((reg_features.aligned(rest, chans) - mean) @ basis.T, comps).argmax(1)
    return out, len(comps)
