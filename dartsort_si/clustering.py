"""Density clustering of spikes (pipeline stage 7).

Three steps, all deterministic:

- `density_peak_clustering`: a mode-seeking clusterer for point clouds in a
  few dimensions. Each point gets a Gaussian kernel density estimate; each
  point climbs to its highest-density neighbour in a k-nearest-neighbour graph
  until it reaches a local peak; peaks whose basins touch are merged when the
  best path between them never drops below `saddle_ratio` times the lower
  peak (a density valley test, "persistence" merging). Clusters smaller than
  `remove_clusters_smaller_than` become noise (-1).
- `cluster_spikes`: the initial clustering on (x, registered z, scaled log
  amplitude), all in microns.
- `split_clusters`: refinement; each cluster is re-clustered in the whitened
  principal components of its own features, recursively.

Densities are "kernel-weighted neighbour counts": the sum over points of
exp(-r^2 / 2 sigma^2), so a lone point has density about 1 (itself). This is
the unit of `noise_density`.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial import cKDTree
from threadpoolctl import threadpool_limits

# Above this many cells the 3-D density grid is coarsened, to bound memory/time.
_MAX_GRID_CELLS = 2**23
# Kernel density in more than 3 dimensions uses at most this many reference points.
_MAX_REFERENCE_POINTS = 2000
# A valley between two density peaks must be this many standard errors deep.
_DIP_Z = 2.0


# ----------------------------------------------------------------------------
# density estimates


def _grid_density(X, sigma, max_cells=_MAX_GRID_CELLS):
    """Gaussian KDE at each point via a smoothed histogram (D <= 3).

    Binning then smoothing costs O(N + cells) regardless of how crowded the
    clusters are, where an exact pairwise sum would cost O(N * neighbours).
    """
    n, dim = X.shape
    bin_size = sigma / 2.0
    lo = X.min(axis=0) - 3 * sigma
    hi = X.max(axis=0) + 3 * sigma
    shape = np.ceil((hi - lo) / bin_size).astype(np.int64) + 1
    if np.prod(shape.astype(float)) > max_cells:
        # coarser bins keep a huge (e.g. outlier-stretched) extent affordable
        bin_size *= (np.prod(shape.astype(float)) / max_cells) ** (1.0 / dim)
        shape = np.ceil((hi - lo) / bin_size).astype(np.int64) + 1
    coords = (X - lo) / bin_size
    cells = np.minimum(coords.astype(np.int64), shape - 1)
    flat = np.ravel_multi_index(tuple(cells.T), tuple(shape))
    hist = np.bincount(flat, minlength=int(np.prod(shape))).astype(np.float32)
    smooth = gaussian_filter(hist.reshape(shape), sigma / bin_size, mode="constant", truncate=3.0)
    # cell k's centre sits at index coordinate k, so shift by half a bin
    dens = map_coordinates(smooth, (coords - 0.5).T, order=1, mode="nearest")
    # the filter's kernel sums to 1 per axis; rescale to "kernel-weighted counts"
    return dens.astype(np.float64) * (sigma * np.sqrt(2 * np.pi) / bin_size) ** dim


def _gauss(dist, sigma):
    return np.exp(-0.5 * (dist / sigma) ** 2)


def _pairwise_density(X, sigma):
    """Exact Gaussian KDE over all pairs within 3 sigma (self included)."""
    pairs = cKDTree(X).query_pairs(3 * sigma, output_type="ndarray")
    w = _gauss(np.linalg.norm(X[pairs[:, 0]] - X[pairs[:, 1]], axis=1), sigma)
    n = len(X)
    return 1.0 + np.bincount(pairs[:, 0], w, n) + np.bincount(pairs[:, 1], w, n)


def _reference_density(X, sigma, max_reference=_MAX_REFERENCE_POINTS):
    """Gaussian KDE at each point (any dimension) and the count scale.

    Exact sum over pairs within 3 sigma (grids blow up in more than 3
    dimensions, and cost more than pairs for small sets); above max_reference points only a fixed subsample serves as
    neighbours, which bounds the pairwise work. The count scale is how many
    points each sampled neighbour stands for.
    """
    n = len(X)
    if n <= max_reference:
        return _pairwise_density(X, sigma), 1.0
    is_ref = np.zeros(n, dtype=bool)
    is_ref[np.random.default_rng(0).permutation(n)[:max_reference]] = True
    ref_tree = cKDTree(X[is_ref])
    # the coo output keeps zero distances (self pairs, duplicates)
    pairs = ref_tree.sparse_distance_matrix(cKDTree(X), 3 * sigma, output_type="coo_matrix")
    sums = np.bincount(pairs.col, weights=_gauss(pairs.data, sigma), minlength=n)
    # leave out each reference point's own term, count every point's self once,
    # and scale the others up to stand for all n - 1 other points
    others = np.where(is_ref, sums - 1.0, sums)
    scale = (n - 1) / np.where(is_ref, max_reference - 1, max_reference)
    return 1.0 + others * scale, (n - 1) / max_reference


def kernel_density(X, sigma):
    """Kernel-weighted neighbour count at each point (a lone point has 1).

    Returns (density, count_scale): count_scale is how many points each
    sampled neighbour stands for (1 when all are used), so that the sampling
    noise of a density d is about sqrt(d * count_scale).
    """
    X = np.asarray(X, dtype=np.float64)
    if X.shape[1] <= 3 and len(X) > _MAX_REFERENCE_POINTS:
        return _grid_density(X, sigma), 1.0
    return _reference_density(X, sigma)


# ----------------------------------------------------------------------------
# graph mode seeking


def _find(parent, i):
    """Union-find root with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _climb_to_peaks(neighbors, rank):
    """Index of the local peak each point reaches by steepest ascent.

    `neighbors` (N, k) includes the point itself in column 0; missing
    neighbours are -1. Ranks are distinct, so there are no ties to break.
    """
    nbr_rank = np.where(neighbors >= 0, rank[np.maximum(neighbors, 0)], -1)
    best = np.take_along_axis(neighbors, nbr_rank.argmax(axis=1)[:, None], axis=1)[:, 0]
    # pointer jumping: each pass doubles the distance followed
    while True:
        nxt = best[best]
        if np.array_equal(nxt, best):
            return best
        best = nxt


def _saddles(neighbors, peak_of, density):
    """Best connection (highest min-density edge) between each pair of touching basins."""
    n, k = neighbors.shape
    src = np.repeat(np.arange(n), k)
    dst = neighbors.ravel()
    keep = dst >= 0
    src, dst = src[keep], dst[keep]
    a, b = peak_of[src], peak_of[dst]
    cross = a != b
    src, dst, a, b = src[cross], dst[cross], a[cross], b[cross]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    level = np.minimum(density[src], density[dst])
    if not len(level):
        return lo, hi, level
    # max level per (lo, hi) pair: sort by pair then by level, keep each pair's last
    order = np.lexsort((level, hi, lo))
    lo, hi, level = lo[order], hi[order], level[order]
    last = np.ones(len(lo), dtype=bool)
    last[:-1] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[last], hi[last], level[last]


def _merge_peaks(peak_of, density, lo, hi, level, saddle_ratio, min_size, noise_var):
    """Root peak of each point after merging basins across shallow valleys.

    Two basins merge when their saddle is at least saddle_ratio times the
    lower peak, or when the dip (lower peak - saddle) is within _DIP_Z
    standard errors of the density's sampling noise (variance noise_var *
    density per point), or when one has fewer than min_size points and the other not
    (small fragments join the big cluster they hang on to). Pairs are taken
    from the highest saddle down (Kruskal order), which matches sweeping the
    density level from the top.
    """
    parent = np.arange(len(peak_of))
    size = np.bincount(peak_of, minlength=len(peak_of))
    for i in np.argsort(-level, kind="stable"):
        ra, rb = _find(parent, lo[i]), _find(parent, hi[i])
        if ra == rb:
            continue
        low_peak = min(density[ra], density[rb])
        dip = low_peak - level[i]
        shallow = level[i] >= saddle_ratio * low_peak
        # a dip that sampling noise could make is no valley
        shallow |= dip**2 < _DIP_Z**2 * noise_var * (low_peak + level[i])
        small_to_big = (size[ra] < min_size) != (size[rb] < min_size)
        if shallow or small_to_big:
            # the lower peak joins the higher one, so roots stay at maxima
            if density[ra] < density[rb]:
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] += size[rb]
    peaks = np.unique(peak_of)
    root_of_peak = np.zeros(len(peak_of), dtype=np.int64)
    root_of_peak[peaks] = [_find(parent, p) for p in peaks]
    return root_of_peak[peak_of]


def renumber(labels):
    """Labels 0..K-1 in the order of the old ids; -1 (unassigned) stays -1."""
    out = np.asarray(labels).copy()
    valid = out >= 0
    out[valid] = np.unique(out[valid], return_inverse=True)[1]
    return out


def _relabel(labels, X, min_size):
    """Drop clusters below min_size (-> -1); number the rest 0..K-1 by centroid.

    Ordering uses the 2nd coordinate (depth for spike positions), then the 1st.
    """
    out = np.full(len(labels), -1, dtype=np.int64)
    valid = labels >= 0
    ids, inverse, counts = np.unique(labels[valid], return_inverse=True, return_counts=True)
    big = counts >= min_size
    if not big.any():
        return out
    col = min(1, X.shape[1] - 1)
    sums = np.zeros((len(ids), 2))
    np.add.at(sums, inverse, X[valid][:, [col, 0]])
    centroid = sums / counts[:, None]
    kept = np.flatnonzero(big)
    order = kept[np.lexsort((centroid[kept, 1], centroid[kept, 0]))]
    new_id = np.full(len(ids), -1, dtype=np.int64)
    new_id[order] = np.arange(len(order))
    out[valid] = new_id[inverse]
    return out


def density_peak_clustering(
    X,
    *,
    sigma,
    outlier_radius=None,
    min_cluster_size=25,
    remove_clusters_smaller_than=None,
    noise_density=0.0,
    max_n_neighbors=16,
    radius_search=None,
    saddle_ratio=0.75,
):
    """Cluster points (N, D) by density peaks; returns int64 labels, -1 = noise.

    sigma: Gaussian kernel width (units of X).
    outlier_radius: points with no other point this close are noise (None: off).
    min_cluster_size: a basin with fewer points than this joins a touching
        basin of at least this size whatever the valley between them (a small
        fragment is not trusted as a unit of its own; two small fragments only
        merge by the valley test, so isolated noise does not snowball).
    remove_clusters_smaller_than: final clusters below this size become noise
        (default: min_cluster_size).
    noise_density: points whose kernel-weighted neighbour count is below this
        are noise and take no part (a lone point has about 1).
    max_n_neighbors: k of the nearest-neighbour graph the points climb on.
    radius_search: graph edges longer than this are dropped (default 3 sigma),
        so a point with no denser point nearby starts a cluster of its own.
    saddle_ratio: two touching peaks stay separate when the density along the
        best path between them falls below saddle_ratio * the lower peak.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    n = len(X)
    if remove_clusters_smaller_than is None:
        remove_clusters_smaller_than = min_cluster_size
    labels = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return labels if remove_clusters_smaller_than > n else np.zeros(n, dtype=np.int64)
    if radius_search is None:
        radius_search = 3.0 * sigma

    density, count_scale = kernel_density(X, sigma)
    idx = np.flatnonzero(density >= noise_density)
    if len(idx) < 2:
        return labels
    Xk, dk = X[idx], density[idx]
    nbr = _neighbor_graph(Xk, max_n_neighbors, radius_search, outlier_radius)
    # distinct ranks (ties broken by index) make the climb deterministic
    rank = np.empty(len(idx), dtype=np.int64)
    rank[np.lexsort((np.arange(len(idx)), dk))] = np.arange(len(idx))
    peak_of = _climb_to_peaks(nbr, rank)
    lo, hi, level = _saddles(nbr, peak_of, dk)
    # variance of a kernel-weighted count ~ sum of squared weights ~ d / 2^(D/2)
    noise_var = count_scale * 2.0 ** (-X.shape[1] / 2)
    roots = _merge_peaks(peak_of, dk, lo, hi, level, saddle_ratio, min_cluster_size, noise_var)
    if outlier_radius is not None:
        # outliers lost all their edges: noise, whatever the size threshold
        roots[(nbr[:, 1:] < 0).all(axis=1)] = -1
    labels[idx] = roots
    return _relabel(labels, X, remove_clusters_smaller_than)


def _neighbor_graph(X, k, radius, outlier_radius):
    """(N, k+1) neighbour indices within radius, self first, -1 where missing.

    Points with no other point within outlier_radius lose all their edges.
    """
    n = len(X)
    kk = min(k + 1, n)
    # threads pay off only for big queries
    workers = -1 if n > 50_000 else 1
    dist, nbr = cKDTree(X).query(X, k=kk, distance_upper_bound=radius, workers=workers)
    nbr = np.where(np.isfinite(dist), nbr, -1)
    nbr[:, 0] = np.arange(n)  # self first, even when duplicate points exist
    if outlier_radius is not None and kk > 1:
        lonely = ~(dist[:, 1:] <= outlier_radius).any(axis=1)
        nbr[lonely, 1:] = -1
        nbr[:, 1:][np.isin(nbr[:, 1:], np.flatnonzero(lonely))] = -1
    return nbr


# ----------------------------------------------------------------------------
# spike-level entry points


def cluster_spikes(
    x_um,
    z_reg_um,
    amplitudes,
    *,
    amplitude_scale=50.0,
    amplitude_log_offset=5.0,
    sigma_um=3.0,
    min_cluster_size=25,
    noise_density=0.0,
    saddle_ratio=0.75,
):
    """Initial clustering on (x, registered z, scaled log amplitude).

    All three coordinates are in microns: the amplitude axis is
    amplitude_scale * log(amplitude + amplitude_log_offset), so a factor e in
    amplitude spans amplitude_scale = 50 um for amplitudes well above the
    offset, so a 10% amplitude change is ~5 um, about the localization
    scatter of one unit. The offset (5, SNR units) compresses small,
    noisily-estimated amplitudes (at amplitude 10, 10% is ~3 um).
    sigma_um = 3 um kernel width: units whose clouds (3-4 um of scatter) are
    >= ~20 um apart in (x, z), or differ by >= ~50% in amplitude, come out
    separate. Spikes with non-finite coordinates and clusters under
    min_cluster_size are -1.
    """
    x = np.asarray(x_um, dtype=np.float64)
    z = np.asarray(z_reg_um, dtype=np.float64)
    amp = np.abs(np.asarray(amplitudes, dtype=np.float64))
    log_amp = amplitude_scale * np.log(amp + amplitude_log_offset)
    X = np.column_stack([x, z, log_amp])
    ok = np.isfinite(X).all(axis=1)
    labels = np.full(len(X), -1, dtype=np.int64)
    labels[ok] = density_peak_clustering(
        X[ok],
        sigma=sigma_um,
        min_cluster_size=min_cluster_size,
        noise_density=noise_density,
        saddle_ratio=saddle_ratio,
    )
    return labels


def echo_mask(times, channels, amplitudes, geom, *, window_samples, radius_um, ratio=3.0):
    """True for events that sit within window_samples and radius_um of an event at
    least `ratio` times larger: "echoes" of a big spike.

    Subtraction removes the denoiser's estimate of a spike; on the far channels of
    a big unit, where the estimate falls short, the remainder can cross threshold
    again a few samples later. Such echoes (30 s x 64 ch, 50-250 uV: a third of one
    small cluster, 6-8 samples and 50-100 um from spikes 4x larger) pull the
    cluster's mean template toward the big unit's waveform. Real small spikes this
    close to a big one are rare, and matching still finds them.
    """
    gaps = echo_gaps(times, channels, amplitudes, geom, max_window=window_samples, radius_um=radius_um, ratio=ratio)
    return gaps <= window_samples


def echo_gaps(times, channels, amplitudes, geom, *, max_window, radius_um, ratio=3.0):
    """Per event, the time (samples) to the nearest event at least `ratio` times larger
    within radius_um, looked for up to max_window away (inf beyond): echo_mask for
    several windows from one pass over the pairs."""
    times = np.asarray(times)
    n = len(times)
    order = np.argsort(times, kind="stable")
    t, c, a = times[order], np.asarray(channels)[order], np.abs(np.asarray(amplitudes, float))[order]
    near_channels = np.linalg.norm(geom[:, None] - geom[None], axis=2) <= radius_um
    gap = np.full(n, np.inf)
    for k in range(1, n):  # pairs k apart in time order; gaps only grow with k
        d = t[k:] - t[:-k]
        i = np.flatnonzero(d <= max_window)
        if not len(i):
            break
        j = i + k
        near = near_channels[c[i], c[j]]
        for small, big in ((j, i), (i, j)):
            hit = near & (a[big] >= ratio * a[small])
            gap[small[hit]] = np.minimum(gap[small[hit]], d[i][hit])
    out = np.empty(n)
    out[order] = gap
    return out


def drop_echo_clusters(labels, is_echo, max_fraction):
    """Clusters made mostly of echoes (is_echo: events near a much bigger one) become -1.

    Echoes of big spikes a little later than the event-level filter reaches (20-22
    samples after an SNR-39 unit, 60 s x 128 ch) form clusters of their own at the
    detection threshold; every event of such a cluster is time-locked to its big
    neighbour, where a real small unit shares only the few percent of its spikes
    that fall near another unit's by chance.
    """
    labels = np.asarray(labels).copy()
    for u in np.unique(labels[labels >= 0]):
        members = labels == u
        if is_echo[members].mean() > max_fraction:
            labels[members] = -1
    return labels


def _whitened_pcs(features, n_pcs, max_nan_fraction=0.5):
    """Top principal components of (N, F) features, each scaled to unit variance.

    Columns missing (NaN) in more than max_nan_fraction of the spikes are
    dropped; remaining NaNs get the column mean, so that missing channels do
    not become a direction of their own (filling with 0 would split spikes by
    which channels they happen to have).
    """
    F = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    nan = np.isnan(F)
    F = F[:, nan.mean(axis=0) <= max_nan_fraction]
    if F.shape[1] == 0:
        return np.zeros((len(F), 0))
    mean = np.nanmean(F, axis=0)
    F = np.where(np.isnan(F), mean, F) - mean
    # eigendecomposition of the F x F covariance: cheap when N >> F
    evals, evecs = np.linalg.eigh(F.T @ F / max(len(F) - 1, 1))
    top = np.argsort(evals)[::-1][:n_pcs]
    top = top[evals[top] > 1e-12 * max(evals.max(), 1e-30)]
    return (F @ evecs[:, top]) / np.sqrt(evals[top])


def _split_once(features, min_cluster_size, n_pcs, sigma, saddle_ratio):
    """Labels 0..K-1 for one cluster's spikes, or None when it does not split.

    Spikes left as noise by the sub-clustering go to the nearest piece (in PC
    space): refinement changes assignments, it does not throw spikes away.
    """
    n = len(features)
    # a density in d dimensions needs ~25 * 2^d points; small clusters get fewer PCs
    n_dims = min(n_pcs, max(2, int(np.log2(n / 25))))
    pcs = _whitened_pcs(features, n_dims)
    if pcs.shape[1] == 0:
        return None
    if sigma is None:
        # Scott's rule for whitened data, on the points the density really
        # uses: enough smoothing that sampling noise makes no fake peaks
        n_used = n if pcs.shape[1] <= 3 else min(n, _MAX_REFERENCE_POINTS)
        sigma = n_used ** (-1.0 / (pcs.shape[1] + 4))
    sub = density_peak_clustering(
        pcs, sigma=sigma, min_cluster_size=min_cluster_size, saddle_ratio=saddle_ratio
    )
    if sub.max(initial=-1) < 1:
        return None
    noise = sub < 0
    if noise.any():
        _, nearest = cKDTree(pcs[~noise]).query(pcs[noise])
        sub[noise] = sub[~noise][nearest]
    return sub


def split_clusters(
    labels,
    features,
    *,
    min_cluster_size=25,
    n_pcs=5,
    max_iter=4,
    sigma=None,
    saddle_ratio=0.75,
):
    """Refine clusters by density splits in their own feature PCs.

    labels: (N,) int, -1 = unclustered (left alone).
    features: (N, F) or (N, ...) float, e.g. flattened temporal-PCA features on
        a channel neighbourhood; NaN for missing channels (see _whitened_pcs).
    Each cluster is projected on the top n_pcs principal components of its
    spikes' features, whitened, and re-clustered with density_peak_clustering
    (kernel width `sigma` in whitened units; None = Scott's rule n^(-1/(d+4))).
    A split is kept when >= 2 pieces of >= min_cluster_size spikes come out;
    the pieces are split again, up to max_iter levels deep. Spikes the
    sub-clustering calls noise join the nearest piece. Returns contiguous
    labels 0..K-1 (pieces of one cluster numbered consecutively, clusters in
    their original order), -1 kept as -1.
    """
    labels = np.asarray(labels)
    features = np.asarray(features)
    out = np.full(len(labels), -1, dtype=np.int64)
    next_label = 0
    # the matrices here are small: threaded BLAS only adds contention
    with threadpool_limits(limits=1, user_api="blas"):
        order = np.argsort(labels, kind="stable")
        units, starts = np.unique(labels[order], return_index=True)
        for unit, members in zip(units, np.split(order, starts[1:])):
            if unit < 0:
                continue
            todo = [(members, 0)]
            while todo:
                idx, depth = todo.pop(0)
                sub = None
                if depth < max_iter and len(idx) >= 2 * min_cluster_size:
                    sub = _split_once(features[idx], min_cluster_size, n_pcs, sigma, saddle_ratio)
                if sub is None:
                    out[idx] = next_label
                    next_label += 1
                    continue
                # pieces are split again: one split can hide another
                todo[:0] = [(idx[sub == k], depth + 1) for k in range(sub.max() + 1)]
    return out
