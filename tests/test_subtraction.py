"""Subtraction peels overlapping spikes apart where threshold detection merges them."""

import numpy as np
import pytest
import spikeinterface.full as si
import torch
from spikeinterface.core.node_pipeline import run_node_pipeline

from dartsort_si import waveforms as wf
from dartsort_si.config import DARTsortUserConfig
from dartsort_si.denoisers import shipped_single_channel_denoiser
from dartsort_si.ground_truth import neuropixels_probe
from dartsort_si.subtraction import (Denoiser, Geometry, SnippetWindow, ThresholdDetector, native_bfloat16,
                                     subtraction_nodes)


def _found_both(peaks, events):
    t = peaks["sample_index"]
    return sum(all(np.abs(t - e).min() <= 3 for e in pair) for pair in events)


@pytest.fixture(scope="module")
def overlapping_pairs():
    """20 pairs of planted spikes ~38 um and 0.2 ms apart on 1/f-free unit noise."""
    fs = 30000
    probe = neuropixels_probe(32)
    geom = probe.contact_positions
    rng = np.random.default_rng(0)
    T = 3 * fs
    traces = rng.standard_normal((T, 32)).astype('float32')
    t_axis = np.arange(121) - 42
    shape = -np.exp(-0.5 * (t_axis / 4) ** 2) + 0.35 * np.exp(-0.5 * ((t_axis - 15) / 8) ** 2)
    shape /= np.ptp(shape)
    def plant(t0, pos, amp):
        d = np.linalg.norm(geom - pos, axis=1)
        spatial = amp * np.exp(-d / 25.0)
        traces[t0 - 42: t0 + 79] += shape[:, None] * spatial[None, :]
    A = np.array([16.0, 160.0]); B = A + [32, 20]   # ~38 um apart
    events = []
    for k in range(20):
        t0 = 5000 + k * 4000
        plant(t0, A, 40.0); plant(t0 + 6, B, 20.0)
        events.append((t0, t0 + 6))
    rec = si.NumpyRecording(traces, fs); rec.set_probe(probe)
    cfg = DARTsortUserConfig(preprocessing='none')
    g = Geometry.build(geom, cfg); w = SnippetWindow.from_config(cfg, fs)
    single = torch.as_tensor(np.concatenate([shape[None] * a for a in np.linspace(5, 40, 50)] + [rng.standard_normal((200,121))]), dtype=torch.float32)
    tpca = wf.TemporalPCA.fit(single.numpy(), 8)
    ftpca = wf.TemporalPCA.fit(single[:, w.feature_start:w.feature_end].numpy(), 8)
    den = Denoiser(tpca, shipped_single_channel_denoiser())
    return rec, g, w, den, ftpca, cfg, events


JOB = dict(n_jobs=1, chunk_size=30000, progress_bar=False)


def test_subtraction_separates_overlapping_spikes(overlapping_pairs):
    rec, g, w, den, ftpca, cfg, events = overlapping_pairs
    nodes = subtraction_nodes(rec, g, w, den, ftpca, cfg, 8)
    peaks = run_node_pipeline(rec, nodes, dict(n_jobs=1, chunk_size=30000, progress_bar=False), squeeze_output=False)[0]
    thr = run_node_pipeline(rec, [ThresholdDetector(rec, g, w, 3.0, 'both', 8, localize=False)], dict(n_jobs=1, chunk_size=30000, progress_bar=False))

    sub_both = _found_both(peaks, events)
    thr_both = _found_both(thr, events)
    print(f"both spikes found: subtraction {sub_both}/20, threshold {thr_both}/20; subtraction events {len(peaks)}")
    assert sub_both >= 18
    assert thr_both <= 10
    assert len(peaks) <= 60  # 40 planted spikes; few false ones on pure noise


def test_threshold_only_mode_detects_without_subtracting(overlapping_pairs):
    """subtract=False (the yardstick of benchmarks/detection_recall.py): crossings only,
    so the hidden second spike of a pair is often missed, with the same outputs."""
    rec, g, w, den, ftpca, cfg, events = overlapping_pairs
    nodes = subtraction_nodes(rec, g, w, den, ftpca, cfg, 8, subtract=False)
    peaks, amps, locs, feats = run_node_pipeline(rec, nodes, JOB, squeeze_output=False)
    both = _found_both(peaks, events)
    print(f"threshold-only peeler: both spikes found in {both}/20")
    assert both <= 15  # subtraction: >= 18
    big = [t for t, _ in events]
    assert all(np.abs(peaks["sample_index"] - t).min() <= 3 for t in big)  # the big ones are all there
    assert locs.shape == (len(peaks), 4) and feats.shape[0] == amps.shape[0] == len(peaks)


@pytest.mark.parametrize("peak_sign", ["neg", "both"])
def test_peak_search_on_some_rows_finds_what_the_whole_chunk_search_finds_there(peak_sign):
    gen = torch.Generator().manual_seed(3)
    traces = torch.randn(3000, 16, generator=gen) * 1.5
    index = torch.stack([torch.clamp(torch.arange(16) + d, 0, 15) for d in (-2, -1, 0, 1, 2)], 1)
    rows = torch.unique(torch.cat([torch.arange(0, 40), torch.arange(500, 800), torch.arange(2950, 3000)]))
    full = wf.find_peaks(traces, 3.0, peak_sign, index, 5, valid=(10, 2990))
    part = wf.find_peaks(traces, 3.0, peak_sign, index, 5, valid=(10, 2990), rows=rows)
    inside = torch.isin(full[0], rows)
    assert inside.sum() > 10
    for a, b in zip(part, full):
        assert torch.equal(a, b[inside])


def test_nn_memo_reuses_an_output_only_while_its_input_is_untouched():
    from dartsort_si.subtraction import NNMemo
    memo = NNMemo(100, 4, torch.arange(-2, 3))
    calls = []

    def double(x):
        calls.append(len(x))
        return 2 * x

    flat = torch.randn(3, 5)
    keys = torch.tensor([10 * 4 + 0, 10 * 4 + 1, 50 * 4 + 2])  # (time 10, ch 0), (10, 1), (50, 2)
    first = memo.apply(double, flat, keys)
    # a subtraction at time 13 on channel 1 (4: padding) touches samples 11..15: (10, 1) reads 8..12
    memo.subtracted(torch.tensor([13]), torch.tensor([[1, 4]]))
    again = memo.apply(double, flat + 1, keys)
    assert calls == [3, 1]
    assert torch.equal(again[0], first[0]) and torch.equal(again[2], first[2])
    assert torch.equal(again[1], 2 * (flat[1] + 1))
    # the recomputed one is remembered from this round on
    assert torch.equal(memo.apply(double, flat[1:2] + 5, keys[1:2])[0], 2 * (flat[1] + 1))
    assert calls == [3, 1]


def test_denoiser_decrease_from_features_equals_the_waveforms_decrease(overlapping_pairs):
    """Peeling scores candidates from temporal-PCA features only; the figure must be the
    drop in squared norm of subtracting the denoised waveform itself."""
    rec, g, w, den, ftpca, cfg, events = overlapping_pairs
    x = torch.as_tensor(rec.get_traces())
    t = torch.tensor([e for pair in events for e in pair])
    c = torch.as_tensor(np.abs(rec.get_traces()[t.numpy()]).argmax(1))
    snips = wf.cut(x, t, c, g.subtraction_index, w.offsets())
    mask = wf.neighbour_mask(g.subtraction_index, c)
    feats, decrease = den.features(snips, mask)
    clean = den.tpca.inverse(feats)
    direct = 2 * (snips * clean).sum((1, 2)) - (clean * clean).sum((1, 2))
    assert decrease.min() > 100  # real spikes, not a zero-against-zero comparison
    torch.testing.assert_close(decrease, direct, rtol=1e-4, atol=1e-2)
    assert torch.equal(den(snips, mask), clean)


def test_noise_snippets_for_the_denoiser_touch_no_threshold_crossing():
    from dartsort_si.steps import _quiet_snippets
    x = torch.randn(3000, 4)
    x[::50, :] = 9.0  # a crossing every 50 samples on every channel: no 121-sample window is quiet
    x[1000:1400, 2] = 0.1 * torch.randn(400)  # except on channel 2 here
    rng = np.random.default_rng(0)
    out = _quiet_snippets(x, 4.0, 121, rng, n=50)
    assert out.shape == (50, 121)
    assert out.abs().max() < 4.0
    assert len(_quiet_snippets(x[:500], 4.0, 121, rng)) == 0


def test_time_blocked_conflict_tests_match_all_against_all():
    # strongest and _near compare candidates in time blocks (all against all was n^2 and took
    # 12 s per 384-channel chunk); on random candidates with ties they agree with the n^2 form
    from dartsort_si.subtraction import _near
    from dartsort_si.waveforms import strongest

    gen = torch.Generator().manual_seed(0)
    n, duration, n_groups, window = 3000, 30_000, 64, 121
    times = torch.randint(0, duration, (n,), generator=gen)
    groups = torch.randint(0, n_groups, (n,), generator=gen)
    score = torch.randint(0, 50, (n,), generator=gen).float()  # many ties
    conflicts = torch.rand(n_groups, n_groups, generator=gen) < 0.2
    conflicts = conflicts | conflicts.T | torch.eye(n_groups, dtype=torch.bool)
    close = ((times[:, None] - times[None, :]).abs() <= window) & conflicts[groups[:, None], groups[None, :]]
    rival = torch.where(close, score[None, :], torch.full((n, n), -torch.inf))
    earlier_tie = (rival == score[:, None]) & torch.ones(n, n, dtype=torch.bool).tril(-1)
    dense = (score[:, None] >= rival).all(1) & ~earlier_tie.any(1)
    assert torch.equal(strongest(score, times, groups, conflicts, window, block=64), dense)
    assert 0 < dense.sum() < n
    refs = torch.randint(0, n, (400,), generator=gen)
    near = (((times[:, None] - times[None, refs]).abs() <= window) & conflicts[groups[:, None], groups[None, refs]]).any(1)
    assert torch.equal(_near(times, groups, times[refs], groups[refs], conflicts, window), near)
    assert 0 < near.sum() < n


def test_subtraction_leaves_only_noise_where_big_spikes_were(gt_data, sorted_with_run_sorter):
    """The denoiser's temporal PCA is fitted to the NN's output: fitted to raw snippets (mostly
    noise on small channels) it missed the shape of big spikes, whose residuals (20% of their
    peak-to-peak) came back as new events around them."""
    from dartsort_si.config import load_config
    from dartsort_si.preprocessing import preprocess
    from dartsort_si.subtraction import SubtractionPeeler
    from conftest import FAST_PARAMS

    rec, gt, _ = gt_data
    _, folder = sorted_with_run_sorter
    models = torch.load(folder / "sorter_output" / "dartsort" / "models.pt", weights_only=False)
    cfg = load_config(FAST_PARAMS)
    prec = preprocess(rec, cfg.preprocessing, cfg.preprocessing_dtype)
    fs = prec.sampling_frequency
    g, w = Geometry.build(prec.get_channel_locations(), cfg), SnippetWindow.from_config(cfg, fs)
    peeler = SubtractionPeeler(prec, g, w, Denoiser(wf.TemporalPCA(**models["tpca"]), models["nn"]), cfg, 8)
    x = torch.as_tensor(prec.get_traces(start_frame=0, end_frame=int(4 * fs)).astype(np.float32))
    residual = x.clone()
    peeler.peel(residual)
    offsets = np.arange(-w.n_before, w.n_after)
    worst = []
    for u in gt.unit_ids:
        t = gt.get_unit_spike_train(u)
        t = t[(t > 200) & (t < len(x) - 200)]
        data, left = x.numpy()[t[:, None] + offsets], residual.numpy()[t[:, None] + offsets]
        main = np.ptp(data.mean(0), 0).argmax()
        if np.ptp(data.mean(0)[:, main]) > 25:  # big units (noise sd 1)
            worst.append(np.median(np.abs(left[:, :, main]).max(1)))
    print("median max |residual| on the main channel of big units:", np.round(worst, 1))
    assert len(worst) >= 2
    assert max(worst) < 4.5  # the max of 121 noise samples is ~3; the raw-fitted PCA left 7-11


def test_nn_with_the_projection_folded_in_gives_the_projected_output():
    # the temporal PCA's projection folded into the net's last layer: the same features as
    # projecting the net's output, for the two-conv net and for a net it cannot fold into
    from dartsort_si.denoisers import Resampled, shipped_single_channel_denoiser
    from dartsort_si.subtraction import ProjectedNN, apply_nn

    gen = torch.Generator().manual_seed(0)
    components = torch.linalg.qr(torch.randn(121, 8, generator=gen))[0].T  # (8, 121) orthonormal
    rows = 3 * torch.randn(50, 121, generator=gen)
    for model in (shipped_single_channel_denoiser().eval(), Resampled(shipped_single_channel_denoiser().eval(), 121)):
        folded = ProjectedNN(model, components)
        assert (folded.folded is not None) == (not isinstance(model, Resampled))
        with torch.no_grad():
            want = model(rows) @ components.T
            assert torch.allclose(folded(rows), want, atol=1e-4 * float(want.abs().max()))
        # an empty batch comes back as wide as the features (a recording without units peels nothing)
        assert apply_nn(folded, rows[:0]).shape == (0, 8)


@pytest.mark.skipif(not native_bfloat16("cpu"), reason="this CPU has no native bfloat16")
def test_nn_in_bfloat16_is_close_to_float32_and_each_row_independent_of_its_batch():
    from dartsort_si.subtraction import ProjectedNN, apply_nn

    gen = torch.Generator().manual_seed(0)
    components = torch.linalg.qr(torch.randn(121, 8, generator=gen))[0].T
    rows = 3 * torch.randn(600, 121, generator=gen)
    model = shipped_single_channel_denoiser().eval()
    exact, low = ProjectedNN(model, components), ProjectedNN(model, components, bfloat16=True)
    want, got = apply_nn(exact, rows), apply_nn(low, rows)
    assert low.low is not None
    assert float((got - want).norm() / want.norm()) < 2e-2
    # NNMemo reuses a row's output computed in another batch: it must be the same
    alone = torch.cat([apply_nn(low, rows[i: i + 5]) for i in range(0, 60, 5)])
    assert torch.equal(alone, got[:60])


def test_matmul_through_numpy_equals_torchs_and_keeps_gradients():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, 50, generator=gen).transpose(1, 2)  # a non-contiguous (3, 50, 7) view
    b = torch.randn(4, 7, generator=gen).T
    got = wf.matmul(a, b)
    assert got.shape == (3, 50, 4)
    assert torch.allclose(got, a @ b, atol=1e-5)
    w = b.clone().requires_grad_(True)
    wf.matmul(a, w).sum().backward()  # training goes through torch's own
    assert w.grad is not None and torch.allclose(w.grad, a.sum((0, 1))[:, None].expand(-1, 4))


def test_cut_from_channel_major_traces_equals_cut():
    from dartsort_si.channels import make_channel_index

    rng = np.random.default_rng(0)
    geom = np.array([[0.0, 20.0 * i] for i in range(12)])
    index = torch.as_tensor(make_channel_index(geom, 45.0))  # padded rows at the probe's ends
    traces = torch.as_tensor(rng.standard_normal((500, 12)), dtype=torch.float32)
    times = torch.as_tensor([30, 31, 250, 400])
    chans = torch.as_tensor([0, 5, 11, 6])
    offsets = torch.arange(-20, 40)
    expected = wf.cut(traces, times, chans, index, offsets)
    got = wf.cut_channel_major(traces.T.contiguous(), times, chans, index, offsets)
    assert got.shape == expected.shape == (4, 60, index.shape[1])
    assert torch.equal(got, expected)
    # the residual with a row of zeros after its last channel: padding read from that row
    residual, by_channel = wf.with_zero_channel(traces)
    assert torch.equal(residual, traces) and by_channel.shape == (13, 500) and not by_channel[12].any()
    assert torch.equal(wf.cut_channel_major(by_channel, times, chans, index, offsets), expected)


@pytest.mark.parametrize("peak_sign", ["neg", "pos", "both"])
def test_find_peaks_the_same_on_traces_laid_out_by_channel(peak_sign):
    from dartsort_si.channels import make_channel_index

    rng = np.random.default_rng(2)
    geom = np.array([[0.0, 20.0 * i] for i in range(12)])
    index = torch.as_tensor(make_channel_index(geom, 45.0))
    traces = torch.as_tensor(rng.standard_normal((3000, 12)), dtype=torch.float32)
    by_channel = traces.T.contiguous().T  # the same values, laid out channel by channel
    for valid in (None, (50, 2950)):  # with and without crossings at the very ends
        expected = wf.find_peaks(traces, 2.5, peak_sign, index, 7, valid=valid)
        got = wf.find_peaks(by_channel, 2.5, peak_sign, index, 7, valid=valid)
        assert len(expected[0]) > 20
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("peak_sign", ["neg", "pos", "both"])
def test_find_peaks_numpy_path_finds_the_torch_paths_peaks(peak_sign):
    """The CPU search (numpy, crossings' windows read lag by lag) against the torch one CUDA
    runs, on both layouts, with crossings at the chunk's ends and on some rows only."""
    from dartsort_si.channels import make_channel_index

    rng = np.random.default_rng(4)
    geom = np.array([[16.0 * (i % 2), 20.0 * (i // 2)] for i in range(24)])
    index = torch.as_tensor(make_channel_index(geom, 50.0))
    traces = torch.as_tensor(rng.standard_normal((3000, 24)), dtype=torch.float32)
    traces[0, 3] = traces[2999, 5] = -9.0 if peak_sign != "pos" else 9.0  # crossings at the ends
    rows = torch.unique(torch.cat([torch.arange(0, 30), torch.arange(700, 1500), torch.arange(2980, 3000)]))
    for layout in (traces, traces.T.contiguous().T):
        for valid, some in (((0, 3000), None), ((40, 2960), None), ((0, 3000), rows)):
            args = (layout, 2.5, peak_sign, index, 7, *valid, some)
            got, expected = wf._peaks_numpy(*args), wf._peaks_torch(*args)
            assert len(expected[0]) > 20
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, expected))
        assert (wf._peaks_numpy(layout, 2.5, peak_sign, index, 7, 0, 3000, None)[0] == 0).any()


@pytest.mark.parametrize("by_channel", [False, True])
def test_add_and_fill_write_what_indexing_by_row_and_channel_writes(by_channel):
    from dartsort_si.channels import make_channel_index

    rng = np.random.default_rng(1)
    geom = np.array([[0.0, 20.0 * i] for i in range(12)])
    index = torch.as_tensor(make_channel_index(geom, 45.0))  # padded rows at the probe's ends
    base = torch.as_tensor(rng.standard_normal((500, 12)), dtype=torch.float32)
    traces = base.T.contiguous().T if by_channel else base.clone()
    times = torch.as_tensor([30, 50, 250, 400])  # the first two overlap: their sums add up
    chans = torch.as_tensor([0, 1, 11, 6])
    offsets = torch.arange(-20, 40)
    snippets = torch.as_tensor(rng.standard_normal((4, 60, index.shape[1])), dtype=torch.float32)
    expected = base.clone()
    cols = index[chans][:, None, :].expand_as(snippets)
    rows = (times[:, None] + offsets)[:, :, None].expand_as(snippets)
    real = cols < 12
    expected.index_put_((rows[real], cols[real]), snippets[real], accumulate=True)
    wf.add(traces, times, chans, index, offsets, snippets)
    assert torch.allclose(traces, expected, atol=1e-6) and not torch.equal(traces, base)
    marks = torch.zeros((500, 12), dtype=torch.int32)
    marks = marks.T.contiguous().T if by_channel else marks
    wf.fill(marks, times, index[chans], offsets, 7)
    assert torch.equal(marks == 7, (expected != base))
