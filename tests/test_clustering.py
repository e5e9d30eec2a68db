"""Tests for dartsort_si.clustering on synthetic point clouds."""

import time

import numpy as np
import pytest

from dartsort_si.clustering import cluster_spikes, density_peak_clustering, echo_gaps, echo_mask, split_clusters


def adjusted_rand_index(a, b):
    """ARI of two labelings (any integer labels; -1 counts as a label)."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    both, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([len(a)]))
    return (both - expected) / ((rows + cols) / 2 - expected)


def purity(truth, labels):
    """Fraction of points whose cluster's majority truth label is their own."""
    keep = labels >= 0
    t, l = truth[keep], labels[keep]
    total = 0
    for k in np.unique(l):
        total += np.bincount(t[l == k]).max()
    return total / len(truth)


def make_blobs(seed, n_blobs=20, sd_um=3.5, noise_fraction=0.05):
    """Units as Gaussian blobs in (x, z, amplitude), centres >= 20 um apart, plus noise."""
    rng = np.random.default_rng(seed)
    centres = []
    while len(centres) < n_blobs:
        c = np.array([rng.uniform(-10, 70), rng.uniform(0, 800)])
        if all(np.hypot(*(c - d)) >= 20 for d in centres):
            centres.append(c)
    sizes = rng.integers(300, 2001, n_blobs)
    truth = np.repeat(np.arange(n_blobs), sizes)
    centres = np.array(centres)[truth]
    x = centres[:, 0] + sd_um * rng.standard_normal(len(truth))
    z = centres[:, 1] + sd_um * rng.standard_normal(len(truth))
    amp = rng.uniform(5, 30, n_blobs)[truth] * np.exp(0.1 * rng.standard_normal(len(truth)))
    n_noise = int(noise_fraction * len(truth))
    x = np.r_[x, rng.uniform(-30, 90, n_noise)]
    z = np.r_[z, rng.uniform(-20, 820, n_noise)]
    amp = np.r_[amp, rng.uniform(3, 40, n_noise)]
    return x, z, amp, np.r_[truth, np.full(n_noise, -1)]


@pytest.mark.parametrize("seed", [0, 1])
def test_cluster_spikes_recovers_blobs(seed):
    x, z, amp, truth = make_blobs(seed)
    labels = cluster_spikes(x, z, amp)
    units = truth >= 0
    n_found = labels.max() + 1
    ari = adjusted_rand_index(truth[units], labels[units])
    pur = purity(truth[units], labels[units])
    print(f"seed {seed}: {n_found} clusters, ARI {ari:.3f}, purity {pur:.3f}")
    assert abs(n_found - 20) <= 2
    assert ari >= 0.9
    assert pur >= 0.9
    assert (labels[units] >= 0).mean() >= 0.9
    # contiguous labels, numbered by depth
    assert set(np.unique(labels)) <= set(range(-1, n_found))
    depth = [z[labels == k].mean() for k in range(n_found)]
    assert np.all(np.diff(depth) >= 0)


def test_cluster_spikes_is_deterministic_and_skips_nan():
    x, z, amp, _ = make_blobs(3, n_blobs=5)
    z[:10] = np.nan
    first = cluster_spikes(x, z, amp)
    second = cluster_spikes(x, z, amp)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.int64
    assert np.all(first[:10] == -1)


def test_density_peak_clustering_separates_amplitudes():
    # same position, amplitudes a factor 2 apart: the log-amplitude axis splits them
    rng = np.random.default_rng(4)
    n = 1000
    amp = np.r_[10 * np.exp(0.1 * rng.standard_normal(n)), 20 * np.exp(0.1 * rng.standard_normal(n))]
    labels = cluster_spikes(rng.normal(0, 3, 2 * n), rng.normal(0, 3, 2 * n), amp)
    assert adjusted_rand_index(np.repeat([0, 1], n), labels) >= 0.9


def _features(rng, n, n_features=40):
    """Gaussian features, a few stronger directions, like one unit's PCA features."""
    scales = np.r_[5.0, 3.0, 2.0, np.ones(n_features - 3)]
    return rng.standard_normal((n, n_features)) * scales


def test_split_clusters_splits_two_groups():
    rng = np.random.default_rng(5)
    n = 600
    feats = _features(rng, 2 * n)
    direction = rng.standard_normal(feats.shape[1])
    feats[n:] += 8 * direction / np.linalg.norm(direction)
    feats[:, -4:] = np.nan  # channels missing for everyone
    feats[rng.random(2 * n) < 0.3, 30:33] = np.nan  # and for some spikes
    # a second, single-group cluster and some unclustered spikes alongside
    other = _features(rng, 500) + 10
    labels = np.r_[np.zeros(2 * n, int), np.ones(500, int), -np.ones(50, int)]
    feats = np.r_[feats, other, _features(rng, 50)]
    out = split_clusters(labels, feats)
    truth = np.r_[np.repeat([0, 1], n), np.full(500, 2), np.full(50, -1)]
    assert out.max() + 1 == 3
    assert np.all(out[-50:] == -1)
    assert np.all(out[:-50] >= 0)  # noise of the sub-clustering joins a piece
    assert adjusted_rand_index(truth[:-50], out[:-50]) >= 0.9
    assert len(np.unique(out[2 * n : 2 * n + 500])) == 1


@pytest.mark.parametrize("n", [300, 3000])
def test_split_clusters_keeps_single_gaussian(n):
    rng = np.random.default_rng(6)
    feats = _features(rng, n)
    feats[rng.random(n) < 0.2, 35:] = np.nan
    out = split_clusters(np.zeros(n, int), feats)
    np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_tiny_inputs(n):
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, 3))
    labels = density_peak_clustering(X, sigma=1.0)
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert np.all(labels == -1)
    every = density_peak_clustering(X, sigma=1.0, min_cluster_size=1)
    assert every.shape == (n,) and np.all(every >= 0)
    assert np.all(cluster_spikes(X[:, 0], X[:, 1], np.abs(X[:, 2]) + 5) == -1)
    feats = rng.standard_normal((n, 10))
    out = split_clusters(np.zeros(n, int), feats)
    assert out.shape == (n,)
    assert np.all(out == 0)


def test_tiny_cluster_with_min_size_one():
    X = np.array([[0.0, 0, 0], [0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.1], [0.05, 0.05, 0]])
    labels = density_peak_clustering(X, sigma=1.0, min_cluster_size=1)
    np.testing.assert_array_equal(labels, 0)


def test_speed_200k_points():
    rng = np.random.default_rng(7)
    n_units = 150
    sizes = rng.integers(300, 2100, n_units)
    truth = np.repeat(np.arange(n_units), sizes)
    centre_x = rng.uniform(-10, 70, n_units)
    centre_z = np.linspace(0, 3800, n_units)
    n_noise = 200_000 - len(truth)
    x = np.r_[centre_x[truth] + 4 * rng.standard_normal(len(truth)), rng.uniform(-40, 100, n_noise)]
    z = np.r_[centre_z[truth] + 4 * rng.standard_normal(len(truth)), rng.uniform(-50, 3850, n_noise)]
    amp = np.r_[
        rng.uniform(5, 30, n_units)[truth] * np.exp(0.1 * rng.standard_normal(len(truth))),
        rng.uniform(3, 40, n_noise),
    ]
    start = time.perf_counter()
    labels = cluster_spikes(x, z, amp)
    elapsed = time.perf_counter() - start
    units = np.arange(200_000) < len(truth)
    ari = adjusted_rand_index(truth, labels[units])
    print(f"200k spikes: {elapsed:.2f} s, {labels.max() + 1} clusters, ARI {ari:.4f}")
    assert elapsed < 20
    assert ari >= 0.9


def test_echo_mask_flags_small_events_next_to_big_ones():
    geom = np.column_stack([np.zeros(20), 20.0 * np.arange(20)])  # one column, 20 um pitch
    # (time, channel, amplitude)
    events = [
        (1000, 5, 20.0), (1007, 9, 4.0),    # echo: 7 samples, 80 um, 5x smaller -> flagged
        (2000, 5, 20.0), (2007, 15, 4.0),   # 200 um away: a real spike elsewhere
        (3000, 5, 20.0), (3030, 6, 4.0),    # 1 ms later: outside the window
        (4000, 5, 8.0), (4005, 6, 4.0),     # only 2x smaller: kept
        (5010, 2, 3.0), (5000, 3, 15.0),    # input need not be sorted by time
    ]
    t, c, a = map(np.array, zip(*events))
    got = echo_mask(t, c, a, geom, window_samples=15, radius_um=150.0)
    assert got.tolist() == [False, True, False, False, False, False, False, False, True, False]
    assert not echo_mask(t[:0], c[:0], a[:0], geom, window_samples=15, radius_um=150.0).any()
    # the gap to the nearest bigger event, so one pass serves every window
    gaps = echo_gaps(t, c, a, geom, max_window=40, radius_um=150.0)
    assert gaps.tolist() == [np.inf, 7, np.inf, np.inf, np.inf, 30, np.inf, np.inf, 10, np.inf]
