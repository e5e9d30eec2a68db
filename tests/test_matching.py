"""Matching pursuit: the objective kept up to date locally equals a full recomputation;
echoes of big units among the matched spikes are dropped."""

import numpy as np
import torch

from dartsort_si.matching import TemplateMatcher, time_locked_echoes


def _objective_after_subtractions(times, n_t=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_units, rank, length, n_chans = 6, 5, 121, 24
    temporal = torch.randn(n_units, rank, length, generator=gen)
    spatial = torch.randn(n_units, rank, n_chans, generator=gen)
    residual = torch.randn(n_t + length - 1, n_chans, generator=gen)
    to_rank = spatial.reshape(-1, n_chans).T
    matcher = TemplateMatcher.__new__(TemplateMatcher)  # the objective needs no recording
    proj = residual @ to_rank
    conv = matcher.convolve(proj, temporal)
    t = torch.as_tensor(times)
    for start in t:  # "subtract" something where each spike sits
        residual[start: start + length] -= torch.randn(length, n_chans, generator=gen)
    rows = torch.unique(t[:, None] + torch.arange(length))
    proj[rows] = residual[rows] @ to_rank
    updated = matcher.update_objective(conv, proj, temporal, t)
    full = matcher.convolve(residual @ to_rank, temporal)
    return updated, full


def test_local_objective_update_matches_full_convolution():
    # a few spikes (the local path), at both chunk edges and overlapping each other
    updated, full = _objective_after_subtractions([0, 7, 400, 450, 2999])
    assert torch.allclose(updated, full, atol=1e-3 * float(full.abs().max()))


def test_objective_update_falls_back_to_full_convolution_when_crowded():
    updated, full = _objective_after_subtractions(list(range(0, 3000, 40)))
    assert torch.allclose(updated, full, atol=1e-3 * float(full.abs().max()))


def _trains(seed=0, duration=1_800_000):
    rng = np.random.default_rng(seed)
    big = np.sort(rng.choice(duration - 200, 500, replace=False) + 100)
    own = np.sort(rng.choice(duration - 200, 400, replace=False) + 100)
    echoes = np.concatenate([big[::2] - 40, big[1::3] + 17])
    return big, own, echoes


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
