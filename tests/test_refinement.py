"""Refinement in registered space: the split keeps co-located units of different amplitude
apart and a drifting unit whole; the template merge joins a unit split by chance and never
units whose amplitudes differ beyond matching's scale bound; units the clustering missed are
found among the events matching leaves unexplained."""

import numpy as np
import pytest

from dartsort_si.channels import make_channel_index
from dartsort_si.matching import leftover_dtype
from dartsort_si import mixture
from dartsort_si.refinement import (
    RegisteredFeatures,
    cluster_leftovers,
    drift_piece_units,
    pieces_of_known_units,
    drop_known,
    drop_time_locked,
    merge_templates,
    selection_bias_factor,
    shift_operators,
    split_units,
)
from dartsort_si.templates import Templates

BOUND = 1.0 / 3.0
L = 40


def np1_geom(n_rows=24):
    return np.array([[x + (16.0 if r % 2 else 0.0), 20.0 * r] for r in range(n_rows) for x in (11.0, 43.0)])


def basis(rank=5):
    """Orthonormal temporal basis spanning smooth spike-like shapes."""
    t = np.arange(L)
    raw = np.stack([np.exp(-0.5 * ((t - c) / w) ** 2) for c, w in
                    [(15, 2), (16, 3), (22, 5), (12, 4), (28, 6), (18, 1.5)]])
    q, _ = np.linalg.qr(raw.T)
    return q[:, :rank].T.astype(np.float32)


def spike_shape(width):
    t = np.arange(L)
    return -np.exp(-0.5 * ((t - 15) / width) ** 2) + 0.3 * np.exp(-0.5 * ((t - 24) / (2 * width)) ** 2)


def unit_spikes(rng, geom, pos, height, amplitude, width, drift, noise=1.0):
    """Features (n, rank, K), detection channels, drifts: one unit at registered `pos`,
    `height` um off the probe, displaced by `drift` (n,) um at each spike."""
    comps = basis()
    index = make_channel_index(geom, 100.0)
    shape = spike_shape(width)
    feats, chans = [], []
    for d in drift:
        # displacement d: the unit sits d um higher in probe coordinates than registered
        dist2 = ((geom - (pos + [0.0, d])) ** 2).sum(1)
        amp = amplitude * height / np.sqrt(dist2 + height ** 2)
        wave = shape[:, None] * amp[None, :] + noise * rng.standard_normal((L, len(geom)))
        c = int(amp.argmax())
        nb = index[c]
        full = np.concatenate([wave, np.zeros((L, 1))], axis=1)[:, nb]
        feats.append(comps @ full)
        chans.append(c)
    return np.stack(feats).astype(np.float32), np.array(chans), index, comps


def spike_times(rng, n, duration, refractory=150):
    """n sorted spike times (samples) in [0, duration) at least `refractory` apart."""
    gaps = rng.exponential(duration / n, n) + refractory
    return (np.cumsum(gaps) * duration / gaps.sum() * 0.99).astype(np.int64)


REFRACTORY = (15, 60, 1_200_000)  # 0.5-2 ms at 30 kHz, 40 s


def registered(geom, parts, drifts, comps, index):
    feats = np.concatenate([p[0] for p in parts])
    chans = np.concatenate([p[1] for p in parts])
    return RegisteredFeatures(feats, chans, index, geom, rgeom=geom, drift_um=np.concatenate(drifts),
                              components=comps)


def test_colocated_pair_with_2x_amplitude_under_drift_splits():
    rng = np.random.default_rng(0)
    geom = np1_geom()
    pos = np.array([27.0, 230.0])
    drifts = [rng.uniform(-15, 15, 300), rng.uniform(-15, 15, 300)]  # 30 um of drift
    a = unit_spikes(rng, geom, pos, 25.0, 20.0, 2.0, drifts[0])
    b = unit_spikes(rng, geom, pos + [0.0, 5.0], 45.0, 10.0, 2.0, drifts[1])
    rf = registered(geom, [a, b], drifts, a[3], a[2])
    truth = np.repeat([0, 1], 300)
    labels = np.zeros(600, dtype=np.int64)  # the density step merged them
    x = np.full(600, pos[0])
    z = np.full(600, pos[1])
    times = np.concatenate([spike_times(rng, 300, REFRACTORY[2]), spike_times(rng, 300, REFRACTORY[2])])
    out = split_units(labels, x, z, rf, times=times, amplitude_boundary=BOUND, refractory=REFRACTORY)
    assert out.max() == 1
    purity = max(np.mean(out == truth), np.mean(out != truth))
    assert purity > 0.95


def _equal_amplitude_pair(rng):
    """300 spikes each of two units 4 um apart with the same peak amplitude and different
    waveforms, drifting +-10 um: (registered features, true labels, position)."""
    geom = np1_geom()
    pos = np.array([27.0, 230.0])
    drifts = [rng.uniform(-10, 10, 300), rng.uniform(-10, 10, 300)]
    a = unit_spikes(rng, geom, pos, 25.0, 12.0, 1.5, drifts[0])
    b = unit_spikes(rng, geom, pos + [0.0, 4.0], 25.0, 12.0, 4.0, drifts[1])
    return registered(geom, [a, b], drifts, a[3], a[2]), np.repeat([0, 1], 300), pos


def test_colocated_pair_of_equal_amplitude_and_different_waveforms_splits():
    """Same peak amplitude, different waveforms at the same displacements: two neurons, told
    apart by their spike trains (spikes inside each other's refractory period) and, where the
    trains do not tell, by how far apart the waveforms are (refinement.SEPARATED_DPRIME)."""
    rng = np.random.default_rng(6)
    rf, truth, pos = _equal_amplitude_pair(rng)
    args = (np.zeros(600, dtype=np.int64), np.full(600, pos[0]), np.full(600, pos[1]), rf)
    independent = np.concatenate([spike_times(rng, 300, REFRACTORY[2]), spike_times(rng, 300, REFRACTORY[2])])
    out = split_units(*args, times=independent, amplitude_boundary=BOUND, refractory=REFRACTORY)
    assert out.max() == 1
    assert max(np.mean(out == truth), np.mean(out != truth)) > 0.95
    # no refractory evidence (one spike train for both): the waveforms alone split them
    one = spike_times(rng, 600, REFRACTORY[2])
    order = rng.permutation(600)
    out = split_units(*args, times=one[order], amplitude_boundary=BOUND, refractory=REFRACTORY)
    assert out.max() == 1
    assert max(np.mean(out == truth), np.mean(out != truth)) > 0.95


@pytest.mark.parametrize("refine", [split_units, mixture.refine], ids=["split", "mixture"])
def test_unit_drifting_40um_stays_one(refine):
    rng = np.random.default_rng(1)
    geom = np1_geom()
    pos = np.array([27.0, 230.0])
    drift = rng.uniform(-20, 20, 600)
    a = unit_spikes(rng, geom, pos, 25.0, 15.0, 2.0, drift)
    rf = registered(geom, [a], [drift], a[3], a[2])
    out = refine(np.zeros(600, dtype=np.int64), np.full(600, pos[0]), np.full(600, pos[1]), rf,
                 times=spike_times(rng, 600, REFRACTORY[2]), amplitude_boundary=BOUND, refractory=REFRACTORY)
    assert (out == 0).all()


def _pair(rng, drift_um=10.0, n=300):
    """Two co-located units 2x apart in amplitude, drifting: (registered features, truth, x, z, times)."""
    geom = np1_geom()
    pos = np.array([27.0, 230.0])
    drifts = [rng.uniform(-drift_um, drift_um, n), rng.uniform(-drift_um, drift_um, n)]
    a = unit_spikes(rng, geom, pos, 25.0, 20.0, 2.0, drifts[0])
    b = unit_spikes(rng, geom, pos + [0.0, 5.0], 45.0, 10.0, 2.0, drifts[1])
    rf = registered(geom, [a, b], drifts, a[3], a[2])
    times = np.concatenate([spike_times(rng, n, REFRACTORY[2]), spike_times(rng, n, REFRACTORY[2])])
    return rf, np.repeat([0, 1], n), np.full(2 * n, pos[0]), np.full(2 * n, pos[1]), times


def _purity(out, truth):
    return max(np.mean(out == truth), np.mean(out != truth))


def test_mixture_gives_neighbours_back_their_spikes():
    """A fifth of each unit's spikes start in the other unit: EM gives them back."""
    rng = np.random.default_rng(11)
    rf, truth, x, z, times = _pair(rng)
    labels = truth.copy()
    wrong = rng.random(len(labels)) < 0.2
    labels[wrong] = 1 - labels[wrong]
    out = mixture.refine(labels, x, z, rf, times=times, amplitude_boundary=BOUND, refractory=REFRACTORY)
    assert out.max() == 1
    assert _purity(out, truth) > 0.97


def test_mixture_splits_a_merged_pair_and_joins_a_unit_split_by_chance():
    rng = np.random.default_rng(12)
    rf, truth, x, z, times = _pair(rng)
    merged = mixture.refine(np.zeros(len(truth), dtype=np.int64), x, z, rf, times=times,
                            amplitude_boundary=BOUND, refractory=REFRACTORY)
    assert merged.max() == 1 and _purity(merged, truth) > 0.95
    # one unit (the first of the pair) cut at random into two labels: one unit again
    one = truth == 0
    cut = rng.integers(0, 2, one.sum())
    rejoined = mixture.refine(cut, x[one], z[one], _subset(rf, one), times=times[one],
                              amplitude_boundary=BOUND, refractory=REFRACTORY)
    assert rejoined.max() == 0


def test_mixture_splits_a_small_cluster_of_two_colocated_units():
    """200 spikes of two units 8 um apart, 1.9x apart in amplitude, amplitudes varying 30% from
    spike to spike: split in two (a split judged in all the mixture's 8 dimensions could not pay
    for a second Gaussian with so few spikes and kept one unit)."""
    rng = np.random.default_rng(0)
    geom = np1_geom()
    pos = np.array([27.0, 230.0])
    sizes = (115, 85)
    drifts = [rng.uniform(-15.0, 15.0, n) for n in sizes]
    parts = [_varying_unit(rng, geom, pos + [0.0, 8.0 * k], amp, d, 0.3)
             for k, (amp, d) in enumerate(zip((12.0, 6.2), drifts))]
    rf = registered(geom, parts, drifts, parts[0][3], parts[0][2])
    truth = np.repeat([0, 1], sizes)
    times = np.concatenate([spike_times(rng, n, REFRACTORY[2]) for n in sizes])
    out = mixture.refine(np.zeros(len(truth), dtype=np.int64), np.full(len(truth), pos[0]),
                         np.full(len(truth), pos[1]), rf, times=times, amplitude_boundary=BOUND,
                         refractory=REFRACTORY)
    assert out.max() == 1
    assert _purity(out, truth) > 0.9


def test_mixture_keeps_one_unit_whose_amplitude_changes_with_its_position():
    """A unit 5 um off the probe, over a contact column, drifting +-12 um: its spikes are about
    twice as big over a contact as between two. Pieces split by amplitude sit at different
    displacements, which two neurons in one place do not: one unit."""
    rng = np.random.default_rng(0)
    geom = np1_geom()
    pos = np.array([11.0, 230.0])
    n = 250
    drift = rng.uniform(-12.0, 12.0, n)
    unit = unit_spikes(rng, geom, pos, 5.0, 10.0, 2.0, drift)
    rf = registered(geom, [unit], [drift], unit[3], unit[2])
    out = mixture.refine(np.zeros(n, dtype=np.int64), np.full(n, pos[0]), np.full(n, pos[1]), rf,
                         times=spike_times(rng, n, REFRACTORY[2]), amplitude_boundary=BOUND, refractory=REFRACTORY)
    assert out.max() == 0


def _two_components(rng, peaks, drifts, one_neuron, n=(200, 150), rank=5, n_chans=4, distance_um=0.0):
    """A GroupFit of two well separated Gaussian clouds (a BIC prefers two), whose raw features
    give the given peak amplitudes, at the given displacements, distance_um apart on the probe;
    the spikes of one neuron (no two within its refractory period) or of two firing independently."""
    comps = basis(rank)
    raw = []
    for k, (peak, size) in enumerate(zip(peaks, n)):
        wave = spike_shape(2.0)[:, None] * np.linspace(1.0, 0.4, n_chans)[None, :] * peak / np.ptp(spike_shape(2.0))
        mean = (comps @ wave).reshape(-1)  # (rank * n_chans,)
        raw.append(mean + 0.3 * rng.standard_normal((size, mean.size)))
    raw = np.concatenate(raw)
    points = np.concatenate([rng.standard_normal((n[0], 3)), rng.standard_normal((n[1], 3)) + [8.0, 0.0, 0.0]])
    if one_neuron:
        times = rng.permutation(spike_times(rng, sum(n), REFRACTORY[2]))
    else:
        times = np.concatenate([spike_times(rng, m, REFRACTORY[2]) for m in n])
    drift = np.concatenate([np.round(d) for d in drifts]).astype(np.int64)
    positions = np.zeros((sum(n), 2))
    positions[n[0]:, 1] = distance_um
    fit = mixture.GroupFit(points, raw, times, drift, positions, comps, BOUND, REFRACTORY)
    return fit, np.repeat([0, 1], n)


def test_mixture_joins_two_components_of_one_unit_at_different_displacements():
    """Two components a Gaussian mixture keeps apart (the waveform changes as the unit drifts
    past contacts), of about one amplitude, holding the spikes of displacements -14..5 and
    2..13 um (NP1 drifting seed 4, an SNR-8.7 unit): one unit. The same two components at the
    same displacements are two neurons firing in one place and stay apart; at different
    displacements but 1.5x apart in amplitude they stay two components (one template could
    not fit both; refinement.drift_piece_units makes them one unit with two templates)."""
    rng = np.random.default_rng(0)
    pieces = [rng.uniform(-14.0, 5.0, 200), rng.uniform(2.0, 13.0, 150)]
    fit, labels = _two_components(rng, (10.0, 11.5), pieces, one_neuron=True)
    assert mixture.try_merges(fit, labels).max() == 0
    # too few spikes for refractory evidence either way: only the displacements tell
    everywhere = [rng.uniform(-14.0, 13.0, 200), rng.uniform(-14.0, 13.0, 150)]
    fit, labels = _two_components(rng, (10.0, 11.5), everywhere, one_neuron=True)
    assert mixture.try_merges(fit, labels).max() == 1
    fit, labels = _two_components(rng, (10.0, 15.0), pieces, one_neuron=True)
    assert mixture.try_merges(fit, labels).max() == 1
    # pieces of one unit sit in one place: two units 40 um apart whose displacements differ
    # (one of them a piece at 0..13 um, NP1 drifting seed 4) stay two components
    part = [rng.uniform(0.0, 13.0, 200), rng.uniform(-14.0, 12.0, 150)]
    fit, labels = _two_components(rng, (10.0, 11.0), part, one_neuron=True, distance_um=40.0)
    assert mixture.try_merges(fit, labels).max() == 1
    fit, labels = _two_components(rng, (10.0, 11.0), part, one_neuron=True, distance_um=5.0)
    assert mixture.try_merges(fit, labels).max() == 0


def _varying_unit(rng, geom, pos, amplitude, drift, spread):
    """unit_spikes with each spike's amplitude scaled by exp(spread * N(0, 1))."""
    scales = np.exp(spread * rng.standard_normal(len(drift)))
    parts = [unit_spikes(rng, geom, pos, 25.0, amplitude * s, 2.0, drift[i: i + 1]) for i, s in enumerate(scales)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), parts[0][2], parts[0][3]


def _subset(rf, mask):
    return RegisteredFeatures(rf.features[mask], rf.channels[mask], rf.channel_index, rf.geom, rf.rgeom,
                              drift_um=np.zeros(mask.sum()), components=rf.components)


def test_drift_pieces_of_one_unit_share_it_and_colocated_neurons_do_not():
    """Clusters 0 and 1: one neuron near the probe seen below and above 0 um of
    displacement, its amplitude growing with it (10 to 22); cluster 2: a neuron at the
    same place firing at every displacement; cluster 3: a piece 30 um away; cluster 4:
    a narrow piece of neuron 2 at the largest displacements, where cluster 1 also ends."""
    rng = np.random.default_rng(14)
    n = 200
    ranges = [(-15, -3), (3, 15), (-15, 15), (-15, -3), (16, 20)]
    drift = np.concatenate([rng.uniform(lo, hi, n) for lo, hi in ranges])
    labels = np.repeat(np.arange(5), n)
    x = np.where(labels == 3, 57.0, 27.0) + rng.normal(0, 2, 5 * n)
    z = 230.0 + rng.normal(0, 2, 5 * n)
    growing = 15.0 + 0.5 * drift
    amps = np.where(np.isin(labels, [0, 1]), growing, np.where(labels == 3, 10.0, 15.0)) * rng.uniform(0.95, 1.05, 5 * n)
    half = REFRACTORY[2] // 2
    times = np.concatenate([np.sort(rng.choice(half, n, replace=False)) + (half if k in (1, 4) else 0)
                            for k in range(5)])
    units = drift_piece_units(labels, x, z, drift, amps, times=times, refractory=REFRACTORY)
    assert units[0] == units[1]
    assert units[2] == units[4]
    assert len({units[0], units[2], units[3]}) == 3
    # without drift (a static recording) nothing is joined
    still = drift_piece_units(labels, x, z, np.zeros(5 * n), amps, times=times, refractory=REFRACTORY)
    assert len(set(still)) == 5


def test_leftover_units_that_are_drift_pieces_join_their_known_unit():
    """Templates 0 and 1 make known unit 7 (a neuron seen at displacements -5..15 um); templates
    2-4 were found among the leftovers: 2 is that neuron at -15..-7 um, 3 a neuron at the same
    place firing at every displacement, 4 a piece like 2 but 40 um away. Only 2 joins unit 7, and 4
    too when its spikes were unit 7's in the first pass."""
    rng = np.random.default_rng(21)
    n = 200
    ranges = [(-5, 5), (5, 15), (-15, -7), (-15, 15), (-15, -7)]
    drift = np.concatenate([rng.uniform(lo, hi, n) for lo, hi in ranges])
    labels = np.repeat(np.arange(5), n)
    x = np.where(labels == 4, 67.0, 27.0) + rng.normal(0, 2, 5 * n)
    z = 230.0 + rng.normal(0, 2, 5 * n)
    amps = 12.0 * rng.uniform(0.95, 1.05, 5 * n)
    # the probe moves steadily: a spike's displacement says when it fired
    times = ((drift + 15) / 30 * (REFRACTORY[2] - 1)).astype(np.int64)
    units = np.array([7, 7, 8, 9, 10])
    out = pieces_of_known_units(labels, units, 2, x, z, drift, amps, times=times, refractory=REFRACTORY)
    assert list(out) == [7, 7, 7, 9, 10]
    # at twice the amplitude, template 2 is another neuron
    louder = np.where(labels == 2, 2 * amps, amps)
    out = pieces_of_known_units(labels, units, 2, x, z, drift, louder, times=times, refractory=REFRACTORY)
    assert list(out) == [7, 7, 8, 9, 10]
    # the far piece joins when its spikes were unit 7's before (localizations at the probe's edge)
    out = pieces_of_known_units(labels, units, 2, x, z, drift, amps, times=times, refractory=REFRACTORY,
                                taken_from=np.array([-1, -1, -1, -1, 7]))
    assert list(out) == [7, 7, 7, 9, 7]


def test_echoes_of_a_big_spike_are_no_refractory_evidence():
    """Two pieces of one neuron (amplitude 28) with spikes 0.5-2 ms apart only where one of the
    two is a small echo (9) of the other: a breach on times alone, none with amplitudes; pairs of
    comparable spikes still count."""
    from dartsort_si.refinement import _refractory_breach

    rng = np.random.default_rng(3)
    a = np.sort(rng.choice(np.arange(0, REFRACTORY[2], 200), 300, replace=False))
    b = np.sort(rng.choice(np.arange(100, REFRACTORY[2], 200), 300, replace=False))
    echoes = a[:8] + 25  # eight echoes of piece a's spikes, clustered with piece b
    tb = np.sort(np.concatenate([b, echoes]))
    amps_a = np.full(len(a), 28.0)
    amps_b = np.where(np.isin(tb, echoes), 9.0, 28.0)
    assert _refractory_breach(a, tb, REFRACTORY)
    assert not _refractory_breach(a, tb, REFRACTORY, amps_a, amps_b)
    assert _refractory_breach(a, tb, REFRACTORY, amps_a, np.full(len(tb), 20.0))


def test_registered_features_undo_drift():
    """The same spike seen at two drifts gives (nearly) the same registered features,
    where the features on the real channels differ."""
    rng = np.random.default_rng(2)
    geom = np1_geom()
    pos = np.array([27.0, 230.0])
    drift = np.array([0.0, 20.0])
    a = unit_spikes(rng, geom, pos, 25.0, 15.0, 2.0, drift, noise=0.0)
    rf = registered(geom, [a], [drift], a[3], a[2])
    chans = rf.channels_near(pos)
    f = rf.on(np.arange(2), chans).reshape(2, -1)
    rel = np.linalg.norm(f[0] - f[1]) / np.linalg.norm(f[0])
    assert rel < 0.15
    assert a[1][0] != a[1][1]  # detected on different real channels


def test_shift_operators_delay_the_features():
    comps = basis()
    shape = spike_shape(3.0)
    ops = shift_operators(comps, np.array([0.0, 1.0]))
    feats = comps @ shape
    np.testing.assert_allclose(feats @ ops[0], feats, atol=1e-4)
    delayed = comps @ np.roll(shape, 1)
    assert np.linalg.norm(feats @ ops[1] - delayed) < 0.1 * np.linalg.norm(delayed)


def _templates(shapes, counts=None):
    data = np.stack(shapes).astype(np.float32)
    counts = np.full(len(shapes), 100) if counts is None else np.asarray(counts)
    return Templates(data, np.arange(len(shapes)), counts, 15)


def _template(amp, rng=None, noise=0.0, centre=10, n_chans=20):
    foot = np.exp(-0.5 * ((np.arange(n_chans) - centre) / 1.5) ** 2)
    t = spike_shape(2.0)[:, None] * foot[None, :] * amp
    if rng is not None:
        t = t + noise * rng.standard_normal(t.shape)
    return t


def test_unit_split_by_chance_merges_back():
    rng = np.random.default_rng(3)
    # two halves of one unit: noisy means of 60 spikes each (noise 1 per sample)
    halves = [_template(12.0, rng, 1.0 / np.sqrt(60)) for _ in range(2)]
    other = _template(12.0, rng, 0.1, centre=16)
    merged = merge_templates(_templates(halves + [other]), amplitude_boundary=BOUND)
    assert merged.n_units == 2
    assert merged.counts.tolist() == [200, 100]


def test_units_2x_apart_in_amplitude_never_merge():
    pair = _templates([_template(20.0), _template(10.0)])
    assert merge_templates(pair, amplitude_boundary=BOUND).n_units == 2
    # within the bound the same shapes do merge
    close = _templates([_template(20.0), _template(17.0)])
    assert merge_templates(close, amplitude_boundary=BOUND).n_units == 1


def test_two_units_are_not_chained_together_through_a_small_cluster_between_them():
    # A and C: one channel set, 2x apart in amplitude (two neurons); B: a small cluster of
    # spikes of both, in between and close to each. Merging every close pair at once made
    # one unit of all three
    chain = _templates([_template(20.0), _template(14.5), _template(10.0)], counts=[300, 30, 300])
    merged = merge_templates(chain, amplitude_boundary=BOUND)
    assert merged.n_units == 2
    assert merged.counts.tolist() == [330, 300]


def test_alike_templates_of_units_that_break_each_others_refractory_period_stay_apart():
    # under drift the registered templates of two co-located neurons come out alike; their
    # spike trains say they are two: pairs 0.5-2 ms apart, which one neuron cannot fire
    rng = np.random.default_rng(5)
    pair = _templates([_template(12.0, rng, 0.05), _template(12.0, rng, 0.05)])
    a = np.sort(rng.choice(np.arange(0, 1_800_000, 100), 400, replace=False))
    b = np.sort(rng.choice(np.arange(50, 1_800_000, 100), 400, replace=False))  # 50 samples after a's grid
    refractory = (15, 60, 1_800_000)
    assert merge_templates(pair, amplitude_boundary=BOUND).n_units == 1
    assert merge_templates(pair, amplitude_boundary=BOUND, times=[a, b], refractory=refractory).n_units == 2
    # one neuron split in two: no spike of one falls 0.5-2 ms from a spike of the other
    one = np.sort(rng.choice(np.arange(0, 1_800_000, 100), 800, replace=False))
    halves = [one[::2], one[1::2]]
    assert merge_templates(pair, amplitude_boundary=BOUND, times=halves, refractory=refractory).n_units == 1


@pytest.mark.parametrize("true_mean", [3.0, 4.5, 6.0, 9.0])
def test_selection_bias_factor_recovers_the_mean_of_events_cut_at_the_threshold(true_mean):
    scores = np.random.default_rng(6).normal(true_mean, 1.0, 200_000)
    kept = scores[scores > 5.0]
    factor = selection_bias_factor(kept, 5.0, lowest=0.3)
    assert factor * kept.mean() == pytest.approx(true_mean, abs=0.1)
    assert factor <= 1.0


def test_leftover_events_form_a_new_unit():
    rng = np.random.default_rng(4)
    geom = np1_geom()
    n = 200
    left = np.zeros(n + 40, dtype=leftover_dtype)
    left["sample_index"] = np.sort(rng.choice(np.arange(0, 600_000, 50), n + 40, replace=False))
    left["channel_index"] = 20
    left["amplitude"][:n] = rng.normal(9.0, 0.5, n)
    left["x"][:n] = rng.normal(27.0, 2.0, n)
    left["z"][:n] = rng.normal(200.0, 2.0, n)
    # scattered noise events: no cluster
    left["amplitude"][n:] = rng.uniform(6, 30, 40)
    left["x"][n:] = rng.uniform(-50, 100, 40)
    left["z"][n:] = rng.uniform(0, 480, 40)
    matched = np.zeros(0, dtype=left.dtype)
    labels = cluster_leftovers(left, left["z"].astype(float), matched, geom, amplitude_scale=50.0,
                               echo_samples=15, echo_cluster_samples=45, echo_radius_um=150.0,
                               echo_cluster_fraction=0.5)
    assert labels.max() == 0
    assert np.mean(labels[:n] == 0) > 0.9 and np.mean(labels[n:] == -1) > 0.9


def test_leftover_echoes_of_matched_spikes_are_no_unit():
    """Events right after a much bigger matched spike (the remainder of its subtraction)
    do not become a unit, however well they cluster."""
    rng = np.random.default_rng(5)
    geom = np1_geom()
    n = 200
    matched = np.zeros(n, dtype=leftover_dtype)
    matched["sample_index"] = np.arange(n) * 3000 + 1000
    matched["channel_index"] = 20
    matched["amplitude"] = 40.0
    left = matched.copy()
    left["sample_index"] += 20
    left["amplitude"] = rng.normal(7.0, 0.3, n)
    left["x"], left["z"] = rng.normal(27.0, 2.0, n), rng.normal(200.0, 2.0, n)
    labels = cluster_leftovers(left, left["z"].astype(float), matched, geom, amplitude_scale=50.0,
                               echo_samples=15, echo_cluster_samples=45, echo_radius_um=150.0,
                               echo_cluster_fraction=0.5)
    assert (labels == -1).all()


def test_leftover_cluster_time_locked_to_a_unit_is_no_unit():
    """Leftover events that sit at one lag from a unit's matched spikes (what its template left
    of its own spikes) are no unit; a neuron firing on its own is kept, whatever its neighbours."""
    rng = np.random.default_rng(6)
    duration = 1_800_000
    spikes = np.sort(rng.choice(np.arange(100, duration - 100, 40), 400, replace=False))
    units = np.zeros(400, dtype=np.int64)
    # cluster 0: 150 events 20 samples before matched spikes (+-1) and 100 unlocked; cluster 1 independent
    locked = spikes[rng.choice(400, 150, replace=False)] - 20 + rng.integers(-1, 2, 150)
    free = np.sort(rng.choice(np.arange(100, duration - 100, 30), 100 + 300, replace=False))
    times = np.concatenate([locked, free])
    labels = np.r_[np.zeros(250, np.int64), np.ones(300, np.int64)]
    out = drop_time_locked(labels, times, spikes, units, window=45, duration=duration, min_lag=7)
    assert (out[:250] == -1).all()
    assert (out[250:] == 1).all()
    # the same events on the matched spikes themselves: another neuron the unit's template took
    on_spikes = np.concatenate([locked + 20, free])
    assert (drop_time_locked(labels, on_spikes, spikes, units, window=45, duration=duration, min_lag=7) == labels).all()


def test_drop_known_keeps_only_new_units():
    rgeom = np.column_stack([np.zeros(20), 20.0 * np.arange(20)])
    known = _templates([_template(12.0)])
    # the same unit; a unit 20 um away of about its amplitude; a co-located one 2x bigger;
    # a distinct one 100 um away
    new = _templates([_template(12.5), _template(11.0, centre=11), _template(24.0, centre=11) * 1.0,
                      _template(12.0, centre=15)])
    kept = drop_known(new, known, rgeom, amplitude_boundary=BOUND)
    assert kept.unit_ids.tolist() == [2, 3]


def test_unit_left_out_of_initial_clustering_is_found_after_matching(sorted_with_run_sorter, gt_data, tmp_path):
    """Remove the cluster of a clear unit from the initial clustering and resume: matching
    leaves that unit's spikes unexplained, and they come back as a unit of their own."""
    import shutil

    import spikeinterface.full as si

    from dartsort_si import DARTsortSorting, dartsort

    from conftest import FAST_PARAMS

    _, folder = sorted_with_run_sorter
    rec, gt, _ = gt_data
    out = shutil.copytree(folder / "sorter_output" / "dartsort", tmp_path / "copy")
    initial = DARTsortSorting.from_peeling_hdf5(out / "subtraction.h5")
    labels = np.load(out / "initial_labels.npz")["labels"]
    clustered = initial.ephemeral_replace(labels=labels).to_numpy_sorting()
    cmp = si.compare_sorter_to_ground_truth(gt, clustered, exhaustive_gt=True)
    # of the units the initial clustering isolated well, the one with most spikes: its cluster goes
    scores = cmp.agreement_scores
    isolated = [u for u in gt.unit_ids if scores.loc[u].max() >= 0.95]
    gt_unit = max(isolated, key=lambda u: len(gt.get_unit_spike_train(u)))
    cluster = int(scores.loc[gt_unit].idxmax())
    labels[labels == cluster] = -1
    np.savez(out / "initial_labels.npz", labels=labels)
    for name in ["templates1.npz", "matching1.h5", "dartsort_sorting.npz"]:
        (out / name).unlink()
    res = dartsort(rec, out, cfg=FAST_PARAMS)
    perf = si.compare_sorter_to_ground_truth(gt, res["sorting"].to_numpy_sorting(),
                                             exhaustive_gt=True).get_performance()
    print(f"GT unit {gt_unit}: accuracy {perf.loc[gt_unit, 'accuracy']:.2f} after its cluster was removed")
    assert perf.loc[gt_unit, "accuracy"] >= 0.8


def test_mixture_splits_colocated_units_of_equal_amplitude_without_refractory_evidence():
    """Two units on the same channels, same peak amplitude, different waveforms, spikes drawn
    from one refractory train (no pair breaks a refractory period): the mixture keeps them apart
    on the separation of their features alone (refinement.SEPARATED_DPRIME)."""
    rng = np.random.default_rng(6)
    rf, truth, pos = _equal_amplitude_pair(rng)
    times = spike_times(rng, 600, REFRACTORY[2])[rng.permutation(600)]
    out = mixture.refine(np.zeros(600, dtype=np.int64), np.full(600, pos[0]), np.full(600, pos[1]), rf,
                         times=times, amplitude_boundary=BOUND, refractory=REFRACTORY)
    assert out.max() == 1
    assert _purity(out, truth) > 0.95


def test_a_piece_at_both_extremes_of_the_drift_joins_the_piece_between_them():
    """NP1 drifting seed 1, GT 35 (SNR 7): one cluster held the unit's spikes at -12..2 um of
    displacement, the other those at the two extremes (-15..-13 and 10..15 um). The second's
    10-90% range spans the first, which a range test read as two neurons firing together; their
    displacement histograms barely overlap. A neuron at the same place firing at every
    displacement (cluster 2) stays apart."""
    rng = np.random.default_rng(3)
    n = 200
    middle = rng.uniform(-12, 2, n)
    extremes = np.where(rng.random(n) < 0.4, rng.uniform(-15, -13, n), rng.uniform(10, 15, n))
    drift = np.concatenate([middle, extremes, rng.uniform(-15, 15, n)])
    labels = np.repeat(np.arange(3), n)
    x = 27.0 + rng.normal(0, 2, 3 * n)
    z = 230.0 + rng.normal(0, 2, 3 * n)
    amps = np.where(labels == 2, 20.0, 11.0) * rng.uniform(0.9, 1.1, 3 * n)
    # the probe moves steadily from -15 to 15 um: each displacement has its time
    times = ((drift + 15.0) / 30.0 * (REFRACTORY[2] - 1)).astype(np.int64)
    order = np.argsort(times, kind="stable")
    labels, x, z, drift, amps, times = (v[order] for v in (labels, x, z, drift, amps, times))
    units = drift_piece_units(labels, x, z, drift, amps, times=times, refractory=REFRACTORY)
    assert units[0] == units[1] != units[2]


@pytest.mark.parametrize("refine", [split_units, mixture.refine], ids=["split", "mixture"])
def test_small_neighbours_at_two_places_stay_two_units(refine):
    """NP1 drifting seed 1, GT 4 and 38: two SNR-3 units 21 um apart, same waveform and
    amplitude, firing over the same displacements; their features alone were 4.9 d' apart, under
    SEPARATED_DPRIME, and one spike train gives no refractory evidence. Where the spikes come from
    (registered x, z, 14 um and 2.8 sd apart there) tells the two neurons apart."""
    rng = np.random.default_rng(8)
    geom = np1_geom()
    pos_a, pos_b = np.array([11.0, 230.0]), np.array([27.0, 244.0])
    drifts = [rng.uniform(-10, 10, 300), rng.uniform(-10, 10, 300)]
    a = unit_spikes(rng, geom, pos_a, 30.0, 6.0, 2.0, drifts[0])
    b = unit_spikes(rng, geom, pos_b, 30.0, 6.0, 2.0, drifts[1])
    rf = registered(geom, [a, b], drifts, a[3], a[2])
    truth = np.repeat([0, 1], 300)
    # point-source positions of small spikes: a few um of scatter around each unit
    xz = np.concatenate([pos_a + rng.normal(0, 6.0, (300, 2)), pos_b + rng.normal(0, 6.0, (300, 2))])
    times = spike_times(rng, 600, REFRACTORY[2])[rng.permutation(600)]
    labels = np.zeros(600, dtype=np.int64)
    out = refine(labels, xz[:, 0], xz[:, 1], rf, times=times, amplitude_boundary=BOUND, refractory=REFRACTORY)
    assert out.max() == 1
    assert _purity(out, truth) > 0.9


def test_drift_pieces_are_compared_where_both_fired():
    """NP1 drifting seed 5, GT 22 (SNR 22) after matching with drift-binned templates: one piece
    at -18..-9 um of displacement, the other at -12..+15 um, few spikes of either in -12..-9, the
    unit's amplitude flat below -12 um and climbing steeply above (near the probe). Their facing
    edges (the 20% of each piece nearest the other) sit at different displacements and differ
    over 1.5x; where both fired (-12..-9 um) they agree: one unit. A neuron in the same place at
    half the amplitude stays apart."""
    rng = np.random.default_rng(5)
    low = np.concatenate([rng.uniform(-18, -12, 90), rng.uniform(-12, -9, 15)])
    high = np.concatenate([rng.uniform(-12, -9, 15), rng.uniform(-9, 15, 360)])
    other = rng.uniform(-18, -9, 100)
    drift = np.concatenate([low, high, other])
    labels = np.repeat([0, 1, 2], [len(low), len(high), len(other)])
    x = 27.0 + rng.normal(0, 2, len(drift))
    z = 230.0 + rng.normal(0, 2, len(drift))
    climbing = np.clip(14.5 + 2.2 * (drift + 12.0), 14.5, 34.0)
    amps = np.where(labels == 2, 0.5, 1.0) * climbing * rng.uniform(0.95, 1.05, len(drift))
    # the probe moves steadily: each displacement has its time
    times = ((drift + 18.0) / 33.0 * (REFRACTORY[2] - 1)).astype(np.int64)
    units = drift_piece_units(labels, x, z, drift, amps, times=times, refractory=REFRACTORY)
    assert units[0] == units[1] != units[2]


def test_a_piece_at_both_ends_of_the_drift_joins_the_piece_between():
    """NP1 drifting seed 1, GT 7 (SNR 11.5, near the probe: amplitude 21.8 at 0 um, 8.5 at
    +-10 um): one piece at -6..+8 um, the other at both extremes (-12..-5 and +7..+12 um), so both
    have median displacement ~0. Compared where both fired they are one unit; a neuron in the
    same place at the extremes' amplitude firing at every displacement stays apart."""
    rng = np.random.default_rng(7)
    middle = rng.uniform(-6, 8, 170)
    ends = np.concatenate([rng.uniform(-12, -5, 45), rng.uniform(7, 12, 45)])
    other = rng.uniform(-12, 12, 150)
    drift = np.concatenate([middle, ends, other])
    labels = np.repeat([0, 1, 2], [len(middle), len(ends), len(other)])
    x = 16.0 + rng.normal(0, 2, len(drift))
    z = 959.0 + rng.normal(0, 2, len(drift))
    peaked = 22.0 - 1.35 * np.abs(drift)
    amps = np.where(labels == 2, 8.5, peaked) * rng.uniform(0.9, 1.1, len(drift))
    times = np.sort(rng.choice(REFRACTORY[2], len(drift), replace=False))[rng.permutation(len(drift))]
    units = drift_piece_units(labels, x, z, drift, amps, times=times, refractory=REFRACTORY)
    assert units[0] == units[1] != units[2]
