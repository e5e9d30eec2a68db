"""Matching pursuit: the objective kept up by the templates' pairwise correlations equals a full
recomputation; a smaller template is not fitted to a bigger spike still in the residual; echoes of
big units among the matched spikes are dropped."""

import numpy as np
import torch

from dartsort_si.matching import (LowRankTemplates, TemplateMatcher, low_rank_factors, noise_precision, objective,
                                  pair_correlations, subtract_waveforms, time_locked_echoes, update_objective)


def _objective_after_subtractions(times, n_t=3000, seed=0, whitened=False, apart=False):
    # low-rank templates with three sub-sample versions; each time subtracts a random version of
    # a random unit at a random scale, and the objective kept up by the pairwise correlations must
    # equal a full convolution of the new residual (in the whitened metric for filter units).
    # apart: units on two disjoint groups of channels, and correlations kept only where spatial
    # factors overlap
    gen = torch.Generator().manual_seed(seed)
    n_units, n_up, rank, length, n_chans = 6, 3, 5, 121, 24
    spatial = torch.randn(n_units, rank, n_chans, generator=gen)
    if apart:
        spatial[:3, :, 12:] = 0
        spatial[3:, :, :12] = 0
    temps = LowRankTemplates(torch.randn(n_units, n_up, length, rank, generator=gen), spatial)
    temporal = temps.temporal[:, n_up // 2].permute(0, 2, 1)  # (K, r, L)
    left = temps.spatial
    if whitened:
        a = torch.randn(n_chans, n_chans, generator=gen)
        left = left @ (a @ a.T / n_chans + torch.eye(n_chans))
    to_rank = left.reshape(-1, n_chans).T
    residual = torch.randn(n_t + length - 1, n_chans, generator=gen)
    conv = TemplateMatcher.convolve(residual @ to_rank, temporal)
    xc, index = pair_correlations(temporal, left, temps.temporal, temps.spatial)
    if apart:
        assert (index[:3, 3:] < 0).all() and (index[3:, :3] < 0).all() and (index[:3, :3] >= 0).all()
        assert len(xc) == 18
    t = torch.as_tensor(times)
    unit = torch.randint(n_units, (len(t),), generator=gen)
    version = torch.randint(n_up, (len(t),), generator=gen)
    scale = 0.5 + torch.rand(len(t), generator=gen)
    subtract_waveforms(residual, temps.waveforms(unit, version) * scale[:, None, None], t)
    updated = update_objective(conv, xc, index, t, unit, version, scale)
    return updated, TemplateMatcher.convolve(residual @ to_rank, temporal)


def test_objective_kept_up_by_pair_correlations_equals_a_full_convolution():
    # a few spikes at both chunk edges and overlapping each other; a crowded chunk; whitened;
    # units on disjoint channels with only overlapping pairs kept
    for times, whitened, apart in (([0, 7, 400, 450, 2999], False, False), (list(range(0, 3000, 40)), False, False),
                                   ([0, 60, 1500, 2999], True, False), (list(range(0, 3000, 90)), False, True)):
        updated, full = _objective_after_subtractions(times, whitened=whitened, apart=apart)
        assert torch.allclose(updated, full, atol=1e-4 * float(full.abs().max()))


def _trains(seed=0, duration=1_800_000):
    rng = np.random.default_rng(seed)
    big = np.sort(rng.choice(duration - 200, 500, replace=False) + 100)
    own = np.sort(rng.choice(duration - 200, 400, replace=False) + 100)
    echoes = np.concatenate([big[::2] - 40, big[1::3] + 17])
    return big, own, echoes


def test_objective_of_templates_with_dropped_components_equals_the_full_convolution():
    # units with 5, 3, 1 and 0 live components (spatial rows zeroed as low_rank_factors drops
    # them): the objective from the live rows only equals every row's projection and convolution
    gen = torch.Generator().manual_seed(3)
    rank, length, n_chans = 5, 41, 12
    temporal = torch.randn(4, rank, length, generator=gen)
    spatial = torch.randn(4, rank, n_chans, generator=gen)
    spatial[1, 3:] = 0
    spatial[2, 1:] = 0
    spatial[3] = 0
    residual = torch.randn(500, n_chans, generator=gen)
    full = TemplateMatcher.convolve(residual @ spatial.reshape(-1, n_chans).T, temporal)
    got = objective(residual, temporal, spatial)
    assert got.shape == full.shape == (4, 500 - length + 1)
    assert torch.allclose(got, full, atol=1e-4 * float(full.abs().max()))
    assert (got[3] == 0).all() and (got[:3].abs().amax(1) > 0).all()


def test_template_components_at_the_noise_level_are_dropped():
    # a template averaged from 100 spikes, with components at 20, 4 and 1.25 (three of them) times
    # the largest singular value of the noise such an average holds: those at 1.25x are dropped
    # (NOISE_COMPONENT_FACTOR), the two others kept
    rng = np.random.default_rng(0)
    length, n_chans, count = 121, 40, 100
    floor = (np.sqrt(length) + np.sqrt(n_chans)) / np.sqrt(count)
    u, _ = np.linalg.qr(rng.standard_normal((length, 5)))
    v, _ = np.linalg.qr(rng.standard_normal((n_chans, 5)))
    data = (u @ np.diag(floor * np.array([20, 4, 1.25, 1.25, 1.25])) @ v.T)[None].astype(np.float32)
    _, spatial = low_rank_factors(data, 5, counts=[count])
    assert (np.abs(spatial[0]).sum(1) > 0).tolist() == [True, True, False, False, False]
    _, spatial = low_rank_factors(data, 5)  # no counts: every component kept
    assert (np.abs(spatial[0]).sum(1) > 0).all()


def test_no_small_template_is_fitted_to_a_bigger_spike_picked_in_the_same_round():
    # B is A's waveform 25 samples later at half size. Picked in the same round as A's spikes,
    # B was fitted (at the top of its amplitude range) 25 samples before each A spike, on a
    # residual that still held that spike: one false B spike per A spike
    length, n_chans = 60, 6
    t = np.arange(length)
    wave = -10 * np.exp(-(((t - 20) / 3.0) ** 2)) + 4 * np.exp(-(((t - 30) / 6.0) ** 2))
    a = np.zeros((length, n_chans), np.float32)
    a[:, :3] = wave[:, None] * np.array([1.0, 0.7, 0.5])
    b = np.zeros_like(a)
    b[25:] = 0.5 * a[: length - 25]
    matcher = TemplateMatcher.__new__(TemplateMatcher)  # peeling needs no recording
    matcher.threshold, matcher.prior, matcher.boundary, matcher.n_before = 64.0, 100.0, 1 / 3, 20
    matcher.small_unit_factor = 0.0
    traces = torch.zeros(3000, n_chans)
    starts = range(100, 2900, 300)
    for s in starts:
        traces[s: s + length] += torch.as_tensor(a)
    times, units, scales, _ = matcher.peel(traces, LowRankTemplates.from_dense(torch.as_tensor(np.stack([a, b])[:, None])))
    assert units.tolist() == [0] * len(starts)
    assert times.tolist() == [s + 20 for s in starts]
    assert torch.allclose(scales, torch.ones_like(scales))


def test_time_locked_echoes_of_a_big_unit_are_dropped_and_own_spikes_kept():
    big, own, echoes = _trains()
    times = np.concatenate([big, own, echoes, echoes + 3])
    # template 0: big unit; 1: small unit holding its own spikes and the big one's echoes;
    # 2: a small unit with echoes only (at other lags)
    templates = np.concatenate([np.zeros(len(big)), np.ones(len(own) + len(echoes)),
                                np.full(len(echoes), 2)]).astype(int)
    order = np.argsort(times, kind="stable")
    times, templates = times[order], templates[order]
    is_echo = (np.isin(times, echoes) & (templates == 1)) | (templates == 2)
    out = time_locked_echoes(times, templates, np.array([40.0, 8.0, 8.0]), np.array([0, 1, 2]),
                             window=79, duration=1_800_000)
    assert out[is_echo].all()
    assert out[~is_echo & (templates == 1)].mean() < 0.03  # own spikes: only chance coincidences
    assert not out[templates == 0].any()


def test_pieces_of_one_unit_and_similar_amplitudes_are_not_echoes():
    big, own, echoes = _trains(seed=1)
    times = np.concatenate([big, echoes])
    templates = np.concatenate([np.zeros(len(big)), np.ones(len(echoes))]).astype(int)
    order = np.argsort(times, kind="stable")
    times, templates = times[order], templates[order]
    same_unit = time_locked_echoes(times, templates, np.array([40.0, 8.0]), np.array([0, 0]),
                                   window=79, duration=1_800_000)
    similar = time_locked_echoes(times, templates, np.array([40.0, 25.0]), np.array([0, 1]),
                                 window=79, duration=1_800_000)
    assert not same_unit.any() and not similar.any()


def _on_probe(traces, geom):
    """A 30 kHz NumpyRecording of traces (T, C) on contacts at geom."""
    import spikeinterface.core as sc
    from probeinterface import generate_linear_probe

    rec = sc.NumpyRecording(traces, 30_000.0)
    probe = generate_linear_probe(num_elec=len(geom))
    probe.set_contacts(geom)
    probe.set_device_channel_indices(np.arange(len(geom)))
    rec.set_probe(probe)
    return rec


def _small_unit_recording(size, seed=0, noise_decay_um=None, spread_um=25.0):
    """32 channels of unit noise and one unit of peak `size` noise sd spread over ~10 channels,
    firing every 290 samples: (recording, geom, template, n_before, spike times). With
    noise_decay_um, channels' noise correlates as exp(-distance / noise_decay_um), as in
    SpikeInterface's generator (25 um)."""
    rng = np.random.default_rng(seed)
    n_chans, length, n_before, n = 32, 121, 42, 30_000
    geom = np.c_[np.tile([0.0, 32.0], n_chans // 2), np.repeat(np.arange(n_chans // 2) * 20.0, 2)]
    t = np.arange(length) - n_before
    wave = -np.exp(-0.5 * (t / 4.0) ** 2) + 0.4 * np.exp(-0.5 * ((t - 12) / 8.0) ** 2)
    spread = np.exp(-np.linalg.norm(geom - geom[15], axis=1) ** 2 / (2 * spread_um ** 2))
    template = (size * wave[:, None] * spread[None, :]).astype(np.float32)
    times = np.arange(1000, n - 1000, 290)
    traces = rng.standard_normal((n, n_chans)).astype(np.float32)
    if noise_decay_um:
        dist = np.linalg.norm(geom[:, None] - geom[None], axis=2)
        traces = traces @ np.linalg.cholesky(np.exp(-dist / noise_decay_um)).T.astype(np.float32)
    for s in times:
        traces[s - n_before: s - n_before + length] += template
    rec = _on_probe(traces, geom)
    return rec, geom, template, n_before, times


def _small_unit_matcher(rec, geom, template, n_before, **kwargs):
    from dartsort_si.config import load_config
    from dartsort_si.motion_info import MotionInfo
    from dartsort_si.subtraction import Geometry
    from dartsort_si.templates import Templates

    cfg = load_config({})
    return TemplateMatcher(rec, Templates(template[None], np.array([0]), np.array([100]), n_before),
                           MotionInfo.from_motion_est(geom=geom, rgeom=geom), cfg, Geometry.build(geom, cfg),
                           **kwargs)


def test_leftover_search_finds_spikes_too_small_for_any_one_channel():
    # a unit of peak 2.3 noise sd on its main channel, spread over ~10 channels (energy ~110):
    # a 6 sd voltage threshold catches none of its spikes; the matched filter most of them
    from dartsort_si.steps import LEFTOVER_THRESHOLD

    rec, geom, template, n_before, times = _small_unit_recording(2.6)
    assert np.abs(template).max() < 3 and (template ** 2).sum() < 130
    matcher = _small_unit_matcher(rec, geom, template, n_before, leftover_threshold=LEFTOVER_THRESHOLD)
    margin = matcher.get_margin()
    traces = torch.as_tensor(rec.get_traces())
    found = matcher.leftovers(traces, start_frame=margin)["sample_index"]
    near = np.abs(found[:, None] - times[None, :]).min(1) <= 2
    caught = np.abs(times[:, None] - found[None, :]).min(1) <= 2
    assert caught.mean() > 0.6, caught.mean()
    assert (~near).sum() <= 0.1 * len(found)


def test_leftover_search_on_every_kth_chunk_only():
    # long recordings look for leftover events in every k-th chunk (steps.leftover_stride):
    # chunks 0 and 2 of 0-3 give the events a search of every chunk gives there, 1 and 3 none
    from spikeinterface.core.node_pipeline import run_node_pipeline
    from dartsort_si.steps import LEFTOVER_THRESHOLD

    rec, geom, template, n_before, _ = _small_unit_recording(2.6)
    job = dict(n_jobs=1, chunk_size=7500, progress_bar=False)

    # matched with the same waveform 14 channels away: the unit's spikes are left over
    elsewhere = np.roll(template, -14, axis=1)

    def events(**kwargs):
        matcher = _small_unit_matcher(rec, geom, elsewhere, n_before, leftover_threshold=LEFTOVER_THRESHOLD,
                                      **kwargs)
        return run_node_pipeline(rec, [matcher], job, squeeze_output=False)[2]["sample_index"]

    every = events()
    some = events(leftover_chunks=(7500, 2))
    in_even = (every // 7500) % 2 == 0
    assert in_even.sum() > 0 and (~in_even).sum() > 0
    np.testing.assert_array_equal(np.sort(some), np.sort(every[in_even]))


def test_units_found_by_the_matched_filter_are_matched_by_it():
    # a template of squared norm ~50, under matching_threshold^2 = 64: the decrease alone takes a
    # minority of its spikes, the matched filter at NEW_UNIT_FILTER_Z nearly all, and no noise
    from dartsort_si.steps import NEW_UNIT_FILTER_Z

    rec, geom, template, n_before, times = _small_unit_recording(1.75)
    assert 40 < (template ** 2).sum() < 64
    caught = {}
    for name, kwargs in (("decrease", {}), ("filter", dict(filter_units=[0], filter_threshold=NEW_UNIT_FILTER_Z))):
        matcher = _small_unit_matcher(rec, geom, template, n_before, with_features=False, **kwargs)
        spikes = matcher.compute(rec.get_traces(), 0, rec.get_num_samples(), 0, 0)[0]
        found = spikes["sample_index"]
        inner = times[(times > matcher.get_margin()) & (times < rec.get_num_samples() - matcher.get_margin())]
        caught[name] = (np.abs(inner[:, None] - found[None, :]).min(1) <= 2).mean() if len(found) else 0.0
        if name == "filter":
            assert (np.abs(found[:, None] - times[None, :]).min(1) > 2).sum() <= 2
    assert caught["decrease"] < 0.6 and caught["filter"] > 0.9, caught


def test_a_unit_small_in_a_chunk_is_taken_by_its_matched_filter_there():
    # a unit of the first pass (no filter unit) whose template in this chunk has a squared norm
    # under SMALL_UNIT_FACTOR x matching_threshold^2, as a drifting unit between contacts: its
    # matched filter takes nearly all its spikes, the decrease alone a minority; a big unit's
    # template is not a filter unit
    from dartsort_si.matching import SMALL_UNIT_FACTOR
    from dartsort_si.steps import NEW_UNIT_FILTER_Z

    rec, geom, template, n_before, times = _small_unit_recording(1.75)
    caught = {}
    for factor in (0.0, SMALL_UNIT_FACTOR):
        matcher = _small_unit_matcher(rec, geom, template, n_before, with_features=False,
                                      filter_threshold=NEW_UNIT_FILTER_Z, small_unit_factor=factor)
        found = matcher.compute(rec.get_traces(), 0, rec.get_num_samples(), 0, 0)[0]["sample_index"]
        inner = times[(times > matcher.get_margin()) & (times < rec.get_num_samples() - matcher.get_margin())]
        caught[factor] = (np.abs(inner[:, None] - found[None, :]).min(1) <= 2).mean() if len(found) else 0.0
        assert (np.abs(found[:, None] - times[None, :]).min(1) > 2).sum() <= 2, factor
    assert caught[0.0] < 0.6 and caught[SMALL_UNIT_FACTOR] > 0.9, caught
    norms = torch.tensor([50.0, 127.0, 129.0, 400.0])
    mask = matcher.filter_units_here(norms, torch.tensor([False, False, False, True]))
    assert mask.tolist() == [True, True, False, True]


def test_in_correlated_noise_the_whitened_filter_finds_more_of_a_small_units_spikes():
    # noise correlated between neighbouring channels (25 um decay) hides a small unit's spikes
    # from the plain matched filter more than from the whitened one (matching.noise_precision)
    from dartsort_si.matching import noise_precision
    from dartsort_si.steps import NEW_UNIT_FILTER_Z

    rec, geom, template, n_before, times = _small_unit_recording(2.5, noise_decay_um=25.0, spread_um=12.0)
    precision = noise_precision([rec.get_traces()])
    caught = {}
    for name, extra in (("plain", {}), ("whitened", dict(precision=precision))):
        matcher = _small_unit_matcher(rec, geom, template, n_before, with_features=False, filter_units=[0],
                                      filter_threshold=NEW_UNIT_FILTER_Z, **extra)
        found = matcher.compute(rec.get_traces(), 0, rec.get_num_samples(), 0, 0)[0]["sample_index"]
        inner = times[(times > matcher.get_margin()) & (times < rec.get_num_samples() - matcher.get_margin())]
        caught[name] = (np.abs(inner[:, None] - found[None, :]).min(1) <= 2).mean() if len(found) else 0.0
        assert (np.abs(found[:, None] - times[None, :]).min(1) > 2).sum() <= 2, name
    assert caught["whitened"] > caught["plain"] + 0.2, caught


def test_noise_precision_is_the_inverse_covariance_of_the_quiet_samples():
    rng = np.random.default_rng(1)
    cov = np.array([[1.0, 0.5, 0.2], [0.5, 1.0, 0.5], [0.2, 0.5, 1.0]])
    noise = rng.standard_normal((200_000, 3)) @ np.linalg.cholesky(cov).T
    noise[::1000, 1] += 40.0  # spikes on channel 1: left out as not quiet
    precision = noise_precision([noise.astype(np.float32)], ridge=0.0).numpy()
    assert np.allclose(precision @ cov, np.eye(3), atol=0.03)
    assert noise_precision([noise[:20].astype(np.float32)]) is None  # too few samples to tell
    assert noise_precision([np.full((100, 3), 9.0, np.float32)]) is None  # none quiet


def _two_unit_recording(n=60_000, seed=0):
    """16 channels of unit noise; unit A (peak ~16 sd) and unit B (a quarter of A's size, 20 um
    lower, its trough later), whose spikes often fall within a template length of A's."""
    rng = np.random.default_rng(seed)
    n_chans, length, n_before = 16, 121, 42
    geom = np.c_[np.zeros(n_chans), np.arange(n_chans) * 20.0]
    t = np.arange(length) - n_before

    def unit(depth, size, lag):
        wave = -np.exp(-0.5 * ((t - lag) / 4.0) ** 2) + 0.4 * np.exp(-0.5 * ((t - lag - 12) / 8.0) ** 2)
        spread = np.exp(-np.abs(geom[:, 1] - depth) / 30.0)
        return (size * wave[:, None] * spread[None, :]).astype(np.float32)

    a, b = unit(150.0, 16.0, 0), unit(130.0, 4.0, 3)
    times_a = np.arange(1000, n - 1000, 400)
    times_b = times_a[::2] + rng.integers(-60, 60, len(times_a[::2]))
    traces = rng.standard_normal((n, n_chans)).astype(np.float32)
    for s in times_a:
        traces[s - n_before: s - n_before + length] += a
    for s in times_b:
        traces[s - n_before: s - n_before + length] += b
    rec = _on_probe(traces, geom)
    return rec, geom, np.stack([a, b]), n_before, times_a, times_b


def test_new_units_are_matched_on_the_residual_of_the_first_pass():
    # the second pass after the leftover search: the first pass's spikes (unit A, which cannot
    # take B's spikes) are subtracted and only the new template (B) is looked for. B's spikes are
    # found, those in A's shadow included, and none is put on A's spikes, which B's template
    # would fit were A not subtracted
    from dartsort_si.config import load_config
    from dartsort_si.motion_info import MotionInfo
    from dartsort_si.subtraction import Geometry
    from dartsort_si.templates import Templates

    rec, geom, data, n_before, times_a, times_b = _two_unit_recording()
    cfg = load_config({})
    traces = rec.get_traces()

    def run(units, **kwargs):
        matcher = TemplateMatcher(rec, Templates(data[units], np.array(units), np.full(len(units), 500), n_before),
                                  MotionInfo.from_motion_est(geom=geom, rgeom=geom), cfg, Geometry.build(geom, cfg),
                                  with_features=False, **kwargs)
        margin = matcher.get_margin()  # start_frame = margin: sample indices are absolute
        return matcher.compute(traces, margin, len(traces) - margin, 0, margin)[0]

    first = run([0])
    assert (np.abs(first["sample_index"][:, None] - times_a).min(1) <= 2).all()
    second = run([0, 1], known=first, match_units=[1])
    assert (second["unit_index"] == 1).all()
    found = np.abs(times_b[:, None] - second["sample_index"][None]).min(1) <= 2
    # B spikes within 15 samples of an A spike are lost to A's fit (so with both templates in one
    # pass: 61 of 73 found either way); those 15-60 samples away, in A's shadow, are all found
    shadow = np.abs(times_b[:, None] - times_a[None]).min(1) >= 15
    assert found[shadow].all() and found.mean() > 0.8, found.mean()
    assert len(second) <= len(times_b) + 2
    # without the first pass subtracted, B's template takes A's spikes as well
    blind = run([0, 1], match_units=[1])
    assert len(blind) > len(times_b) + 0.5 * len(times_a)


def test_only_old_units_that_could_take_a_new_units_spikes_are_matched_again():
    from dartsort_si.matching import could_take_spikes

    _, _, data, _, _, _ = _two_unit_recording(n=3000)
    a, b = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    far = torch.roll(b, 8, dims=1)  # B's shape 160 um away
    old = torch.stack([a, 1.1 * b, far])
    take = could_take_spikes(old, b[None], threshold=64.0, boundary=1 / 3)
    # A is 4x B: fitted to a B spike it removes more than B holds; a B-like unit can; a far one cannot
    assert take.tolist() == [False, True, False]


def test_units_that_match_almost_nothing_are_dropped_with_their_spikes():
    # 300 s x 128 ch: four clusters' templates matched 1-4 spikes each over the recording
    from dartsort_si.matching import spike_dtype
    from dartsort_si.steps import MIN_UNIT_SPIKES, _without_tiny_units

    spikes = np.zeros(MIN_UNIT_SPIKES + 3 + MIN_UNIT_SPIKES, dtype=spike_dtype)
    spikes["unit_index"] = [0] * MIN_UNIT_SPIKES + [1] * 3 + [2] * MIN_UNIT_SPIKES
    locs = np.arange(len(spikes), dtype=np.float32)[:, None]
    units = np.array([7, 8, 7])  # templates 0 and 2 are pieces of output unit 7: 40 spikes
    kept, kept_locs = _without_tiny_units(spikes, locs, units)
    assert sorted(set(kept["unit_index"])) == [0, 2]
    assert len(kept) == 2 * MIN_UNIT_SPIKES and len(kept_locs) == len(kept)
    # a unit whose templates each match few spikes but together enough is kept
    spikes["unit_index"] = [0] * (MIN_UNIT_SPIKES + 3) + [2] * MIN_UNIT_SPIKES
    spikes["unit_index"][:12] = 2
    kept, _ = _without_tiny_units(spikes, locs, np.array([7, 8, 7]))
    assert len(kept) == len(spikes)


def test_a_greedy_new_unit_is_left_out_after_a_sample_of_the_chunks(monkeypatch):
    # the rematch on an even tenth of the chunks: a new unit matching 50 spikes per 1 s chunk from
    # 30 leftover events (3000 over the recording) is greedy, one matching one per chunk (60) is not
    from types import SimpleNamespace

    from dartsort_si import steps
    from dartsort_si.matching import spike_dtype
    from dartsort_si.templates import Templates

    fs, n_chunks = 30_000, 60
    rec = SimpleNamespace(get_num_samples=lambda segment=0: n_chunks * fs)
    ctx = SimpleNamespace(rec=rec, cfg=SimpleNamespace(chunk_length_samples=fs), leftover_stride=1)
    seen = []

    def rematch(ctx, temps, new, spikes, locs, motion_info, small, refreshed=(), slices=None):
        seen.extend(start // fs for _, start, _ in slices)
        units = [2] * 50 + [3]  # templates 0, 1 old; 2, 3 new
        extra = np.zeros(len(units) * len(slices), dtype=spike_dtype)
        extra["unit_index"] = units * len(slices)
        return None, extra, None

    monkeypatch.setattr(steps, "_rematch", rematch)
    old = Templates(np.zeros((2, 4, 3), np.float32), np.array([0, 1]), np.array([100, 100]), 1)
    new = Templates(np.zeros((2, 4, 3), np.float32), np.array([5, 6]), np.array([30, 30]), 1)
    greedy = steps._greedy_on_a_sample(ctx, old, new, None, None, None)
    assert greedy.tolist() == [0]
    assert len(seen) == int(steps.GREEDY_PROBE_FRACTION * n_chunks) and seen[0] == 0 and seen[-1] == n_chunks - 1
    # too few chunks for a sample to tell: no probe
    rec.get_num_samples = lambda segment=0: 20 * fs
    assert steps._greedy_on_a_sample(ctx, old, new, None, None, None).tolist() == []


def test_old_units_small_somewhere_are_matched_again_with_new_ones():
    # the rematch also redoes old units that matching takes by their matched filter somewhere
    # (squared norm under SMALL_UNIT_FACTOR x matching_threshold^2 as placed): their filter takes
    # spikes at any decrease, so the could_take_spikes test at the threshold misses them
    from types import SimpleNamespace

    from dartsort_si.config import load_config
    from dartsort_si.matching import SMALL_UNIT_FACTOR
    from dartsort_si.motion_info import MotionInfo
    from dartsort_si.steps import _small_somewhere
    from dartsort_si.subtraction import Geometry
    from dartsort_si.templates import Templates

    rec, geom, data, n_before, _, _ = _two_unit_recording(n=30_000)
    cfg = load_config({})
    data = data * np.array([1.0, 0.8], np.float32)[:, None, None]  # B at squared norm ~92
    temps = Templates(data, np.array([0, 1]), np.array([500, 500]), n_before)
    norms = np.square(data).sum((1, 2))
    limit = SMALL_UNIT_FACTOR * cfg.matching_threshold ** 2
    assert norms[0] > limit > norms[1]
    ctx = SimpleNamespace(rec=rec, cfg=cfg, geometry=Geometry.build(geom, cfg), device="cpu",
                          fs=rec.sampling_frequency)
    motion = MotionInfo.from_motion_est(geom=geom, rgeom=geom)
    assert _small_somewhere(ctx, temps, motion).tolist() == [False, True]


def test_a_small_units_template_is_averaged_again_from_its_matched_spikes_only_where_smaller():
    # a small unit's cluster holds the detections that noise pushed over the threshold, so its
    # template is too big (static NP1 seed 5, GT 11: matching took 62% of its spikes). After the
    # first pass it is averaged again from the spikes matching gave it; a mean that would be
    # bigger (other units' spikes among them) leaves the cluster's template
    from types import SimpleNamespace

    from dartsort_si import refinement, steps
    from dartsort_si.config import load_config
    from dartsort_si.matching import spike_dtype
    from dartsort_si.motion_info import MotionInfo
    from dartsort_si.subtraction import Geometry
    from dartsort_si.templates import Templates

    rng = np.random.default_rng(3)
    n, n_chans, length, n_before = 150_000, 8, 121, 42
    geom = np.c_[np.zeros(n_chans), np.arange(n_chans) * 20.0]
    t = np.arange(length) - n_before
    wave = -np.exp(-0.5 * (t / 4.0) ** 2) + 0.4 * np.exp(-0.5 * ((t - 12) / 8.0) ** 2)
    unit = (3.0 * wave[:, None] * np.exp(-np.abs(geom[:, 1] - 70.0) / 30.0)[None]).astype(np.float32)
    times = np.arange(1000, n - 1000, 300)
    traces = rng.standard_normal((n, n_chans)).astype(np.float32)
    for s in times:
        traces[s - n_before: s - n_before + length] += unit
    cfg = load_config({})
    ctx = SimpleNamespace(rec=_on_probe(traces, geom), cfg=cfg, job_kwargs=dict(n_jobs=1, progress_bar=False),
                          window=SimpleNamespace(n_before=n_before, n_after=length - n_before),
                          geometry=Geometry.build(geom, cfg), device="cpu", fs=30_000.0)
    motion = MotionInfo.from_motion_est(geom=geom, rgeom=geom)
    spikes = np.zeros(len(times), dtype=spike_dtype)
    spikes["sample_index"] = times
    locs = np.zeros((len(times), 4), np.float32)
    locs[:, 2] = 70.0
    limit = steps.REFRESH_NORM_FACTOR * cfg.matching_threshold ** 2
    true_norm = np.square(unit).sum()

    def refreshed(size, count):
        temps = Templates(size * unit[None], np.array([0]), np.array([count]), n_before)
        assert np.square(temps.data).sum() < limit
        return steps._refreshed_small_templates(ctx, temps, spikes, locs, motion)

    out, which = refreshed(1.3, 30)  # a cluster of 30 spikes, 1.3x too big
    assert which.tolist() == [0] and out.counts[0] == len(times)
    assert abs(np.square(out.data[0]).sum() / true_norm - 1) < 0.15
    assert np.linalg.norm(out.data[0] - unit) < 0.3 * np.linalg.norm(unit)
    out, which = refreshed(0.7, 30)  # the matched spikes' mean would be bigger: kept
    assert which.tolist() == [] and np.allclose(out.data[0], 0.7 * unit)
    out, which = refreshed(1.3, len(times))  # the cluster held as many spikes as matching took
    assert which.tolist() == []
    # a unit small enough for matching to take it by its matched filter (squared norm under
    # SMALL_UNIT_FACTOR x threshold): its matched spikes hold its neighbours' too
    assert np.square(1.2 * unit).sum() < steps.SMALL_UNIT_FACTOR * cfg.matching_threshold ** 2
    assert refreshed(1.2, 30)[1].tolist() == []
    # a unit whose peak stands well over the detection threshold: its detections are not biased
    tall = np.zeros_like(unit)
    tall[:, 3] = 6.0 * wave
    assert refinement.detection_bias(6.0, cfg.voltage_threshold) < steps.REFRESH_MIN_BIAS
    temps = Templates(tall[None], np.array([0]), np.array([30]), n_before)
    assert np.square(tall).sum() < limit
    assert steps._refreshed_small_templates(ctx, temps, spikes, locs, motion)[1].tolist() == []


def test_row_medians_through_numpy_equal_torchs_lower_median():
    from dartsort_si.matching import row_mads, row_medians

    g = torch.Generator().manual_seed(0)
    for m in (7, 8, 6097):
        x = torch.randn(5, m, generator=g)
        assert torch.equal(row_medians(x), x.median(1).values)
        assert torch.equal(row_mads(x), (x - x.median(1, keepdim=True).values).abs().median(1).values)


def test_matched_filter_score_is_the_prototype_correlation_summed_over_nearby_channels():
    """per channel: the traces correlated with the prototype, trough aligned on each time (a
    direct sum, against the FFT matched_filter_score uses); score: weighted over channels, in
    units of its MAD."""
    from dartsort_si.matching import matched_filter_score, row_mads

    gen = torch.Generator().manual_seed(6)
    n, n_chans, length, n_before = 2000, 6, 41, 15
    traces = torch.randn(n, n_chans, generator=gen)
    prototype = torch.randn(length, generator=gen)
    spatial = torch.rand(n_chans, n_chans, generator=gen)
    per_channel, score = matched_filter_score(traces, prototype, spatial, n_before)
    padded = torch.cat([torch.zeros(n_before, n_chans), traces, torch.zeros(length, n_chans)]).double()
    direct = torch.stack([(padded[t: t + length] * prototype.double()[:, None]).sum(0) for t in range(n)])
    assert per_channel.shape == score.shape == (n, n_chans)
    assert torch.allclose(per_channel.double(), direct, atol=1e-4)
    weighted = per_channel @ spatial
    assert torch.allclose(score, weighted / (row_mads(weighted[::5].T.contiguous()) / 0.6745), atol=1e-5)
