"""Torch helpers shared by detection, subtraction and matching: find peaks,
cut snippets on channel neighbourhoods, add them back, temporal PCA.

Snippets live on a `channel_index` neighbourhood (see channels.py); padded
channels read as zeros and carry mask False.
"""

from __future__ import annotations

import numpy as np
import torch


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for float tensors of 2 dimensions (or a of more, multiplied on its last). On the CPU
    through numpy's BLAS: torch's (MKL) ran this sorter's products 2.5-5.5x slower than numpy's
    (OpenBLAS) on the AMD EPYC the benchmarks run on, one thread: matching's (30484 x 128) @
    (128 x 195) 35.7 against 9.8 ms; the temporal PCA of 500 snippets x 40 channels 1.46 against
    0.58 ms, its inverse 4.0 against 0.72 ms. Elsewhere (CUDA, gradients) torch's own."""
    if (a.device.type != "cpu" or b.device.type != "cpu" or a.requires_grad or b.requires_grad
            or a.dtype != b.dtype or a.dtype not in (torch.float32, torch.float64)):
        return a @ b
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def find_peaks(traces: torch.Tensor, threshold: float, peak_sign: str, dedup_index: torch.Tensor,
               dedup_samples: int = 7, valid: tuple[int, int] | None = None, rows: torch.Tensor | None = None):
    """Threshold crossings that are the biggest event within `dedup_samples`
    in time and within the dedup neighbourhood in space.

    Returns (times, channels, energies) where energy is |voltage| (or the
    signed voltage for 'neg'/'pos'). The dedup neighbourhood suppresses the
    secondary channels of a big spike, not just smaller spikes nearby.
    rows (sorted, unique sample indices): look for crossings at these times only;
    the result there is the same as a search of the whole chunk.
    Works on the (few) crossings only, not on the whole chunk.
    """
    lo, hi = valid if valid is not None else (0, len(traces))
    if rows is None:
        times, chans = torch.nonzero(_energy(traces[lo:hi], peak_sign) >= threshold, as_tuple=True)
        times = times + lo
    else:
        rows = rows[(rows >= lo) & (rows < hi)]
        at, chans = torch.nonzero(_energy(traces[rows], peak_sign) >= threshold, as_tuple=True)
        times = rows[at]
    own = _energy(traces[times, chans], peak_sign)
    if traces.T.is_contiguous() and len(times) and times.min() >= dedup_samples and \
            times.max() < len(traces) - dedup_samples:
        return _peaks_channel_major(traces.T, times, chans, own, peak_sign, dedup_index, dedup_samples)
    window = torch.arange(-dedup_samples, dedup_samples + 1, device=traces.device)
    around_t = (times[:, None] + window[None, :]).clamp(0, len(traces) - 1)  # (n, W)
    # biggest within the time window on its own channel ...
    is_peak = own >= _energy(traces[around_t, chans[:, None]], peak_sign).amax(1)
    times, chans, own, around_t = times[is_peak], chans[is_peak], own[is_peak], around_t[is_peak]
    # ... and within the dedup neighbourhood
    n_chans = traces.shape[1]
    neighbours = dedup_index[chans]  # (n, K)
    real = neighbours < n_chans
    around = _energy(traces[around_t[:, :, None], neighbours.clamp(max=n_chans - 1)[:, None, :]], peak_sign)
    around = torch.where(real[:, None, :], around, torch.zeros((), dtype=around.dtype, device=around.device))
    keep = own >= around.amax((1, 2))
    return times[keep], chans[keep], own[keep]


def _peaks_channel_major(traces_ct, times, chans, own, peak_sign, dedup_index, dedup_samples):
    """find_peaks' two tests on traces laid out (C, T), for crossings at least dedup_samples
    from either end: each channel's time window is then a contiguous run (an unfold view)
    where the (T, C) layout gathers each sample from another row (whole-chunk searches, 60 s x
    128 ch NP1: 31 -> 26 ms). The same peaks."""
    windows = traces_ct.unfold(1, 2 * dedup_samples + 1, 1)  # (C, T - W + 1, W)
    starts = times - dedup_samples
    is_peak = own >= _energy(windows[chans, starts], peak_sign).amax(1)
    times, chans, own, starts = times[is_peak], chans[is_peak], own[is_peak], starts[is_peak]
    n_chans = traces_ct.shape[0]
    neighbours = dedup_index[chans]  # (n, K)
    around = _energy(windows[neighbours.clamp(max=n_chans - 1), starts[:, None]], peak_sign).amax(2)
    around = torch.where(neighbours < n_chans, around, torch.zeros((), dtype=around.dtype, device=around.device))
    keep = own >= around.amax(1)
    return times[keep], chans[keep], own[keep]


def _energy(x: torch.Tensor, peak_sign: str) -> torch.Tensor:
    """What a peak is the maximum of: -x for troughs, x for peaks, |x| for both."""
    if peak_sign == "neg":
        return -x
    if peak_sign == "pos":
        return x
    return x.abs()


def cut(traces: torch.Tensor, times: torch.Tensor, chans: torch.Tensor,
        channel_index: torch.Tensor, offsets: torch.Tensor):
    """Snippets (n, len(offsets), K) at times+offsets on channel_index[chans]; zeros at padding."""
    n_chans = traces.shape[1]
    cols = channel_index[chans]
    rows = (times[:, None] + offsets[None, :])[:, :, None]
    out = traces[rows, cols.clamp(max=n_chans - 1)[:, None, :]]
    return out * (cols < n_chans)[:, None, :]


def cut_channel_major(traces_ct: torch.Tensor, times: torch.Tensor, chans: torch.Tensor,
                      channel_index: torch.Tensor, offsets: torch.Tensor):
    """cut() from traces laid out (C, T), for offsets that are consecutive samples: each
    snippet channel is then one contiguous run of memory, where cut() on (T, C) gathers every
    sample from another row (prefilter and peel's cuts: 23% of subtraction, py-spy). Returns the
    (n, L, K) transpose of a contiguous (n, K, L). traces_ct may have one more row, of zeros
    (with_zero_channel): padding then reads it, and no mask is applied to the copy (that
    multiply was 8.5% of subtraction's samples, py-spy, 60 s x 128 ch NP1)."""
    n_chans = channel_index.shape[0]
    cols = channel_index[chans]
    windows = traces_ct.unfold(1, len(offsets), 1)  # (C, T - L + 1, L), a view
    starts = (times + offsets[0])[:, None]
    if traces_ct.shape[0] > n_chans:
        return windows[cols, starts].transpose(1, 2)
    out = windows[cols.clamp(max=n_chans - 1), starts]  # (n, K, L)
    return (out * (cols < n_chans)[:, :, None]).transpose(1, 2)


def with_zero_channel(traces: torch.Tensor):
    """(residual, by_channel): a copy of traces (T, C) laid out channel by channel, and the
    (C + 1, T) buffer that holds it with a row of zeros after the last channel, which
    cut_channel_major reads for the padding of channel neighbourhoods."""
    buffer = traces.new_zeros((traces.shape[1] + 1, traces.shape[0]))
    buffer[:-1] = traces.T
    return buffer[:-1].T, buffer


def add(traces: torch.Tensor, times: torch.Tensor, chans: torch.Tensor,
        channel_index: torch.Tensor, offsets: torch.Tensor, snippets: torch.Tensor):
    """In place: traces[times+offsets, channel_index[chans]] += snippets (padding dropped)."""
    real, idx = _flat_indices(traces, times, channel_index[chans], offsets)
    flat_view(traces).index_add_(0, idx[real], snippets[real])


def fill(traces: torch.Tensor, times: torch.Tensor, cols: torch.Tensor, offsets: torch.Tensor, value):
    """In place: traces[times+offsets, cols] = value, cols (n, K) channels (padding:
    traces.shape[1], dropped)."""
    real, idx = _flat_indices(traces, times, cols, offsets)
    flat_view(traces).index_fill_(0, idx[real], value)


def flat_view(traces: torch.Tensor) -> torch.Tensor:
    """The 1-D view of a (T, C) tensor's memory, laid out by rows or by channels. Writing
    through it with index_add_ took 0.7 ms where index_put_ on (rows, cols) took 10 ms (60
    snippets of 121 x 40 samples, one thread), the same sums."""
    if traces.is_contiguous():
        return traces.view(-1)
    if traces.T.is_contiguous():
        return traces.T.view(-1)
    raise ValueError("traces must be laid out by rows or by channels")


def _flat_indices(traces, times, cols, offsets):
    """(real, idx), both (n, L, K): where cols (n, K) is a real channel, and the position of
    each sample in flat_view(traces)."""
    row_stride, col_stride = traces.stride()
    rows = times[:, None] + offsets[None, :]  # (n, L)
    idx = rows[:, :, None] * row_stride + cols[:, None, :] * col_stride
    real = (cols < traces.shape[1])[:, None, :].expand_as(idx)
    return real, idx


def neighbour_mask(channel_index: torch.Tensor, chans: torch.Tensor) -> torch.Tensor:
    """(n, K) bool: True where the neighbourhood slot is a real channel."""
    return channel_index[chans] < channel_index.shape[0]


class TemporalPCA:
    """Per-channel temporal PCA (rank r) used to denoise and to featurize snippets."""

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.components = torch.as_tensor(components, dtype=torch.float32)  # (rank, L)
        self.rank = self.components.shape[0]
        # fit() leaves the mean at zero; skipping it saves a copy of every snippet
        self.centred = bool(self.mean.any())

    @classmethod
    def fit(cls, single_channel_snippets: np.ndarray, rank: int) -> "TemporalPCA":
        # uncentred on purpose: a flat (noise-free) channel must project to zero,
        # or subtraction would add the mean spike shape onto every channel
        # in float64: the float32 SVD of ~300k rows rounds differently with the BLAS thread
        # count, so a resumed sort (another process) got other components (up to 9e-6)
        x = torch.as_tensor(single_channel_snippets, dtype=torch.float64)
        mean = torch.zeros(x.shape[1], dtype=torch.float32)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        return cls(mean.numpy(), vh[:rank].float().numpy())

    def to(self, device) -> "TemporalPCA":
        return TemporalPCA(self.mean.to(device), self.components.to(device))

    def transform(self, snippets: torch.Tensor) -> torch.Tensor:
        """(n, L, K) -> (n, rank, K)."""
        if self.centred:
            snippets = snippets - self.mean[None, :, None]
        # one product on the (n, K, L) view (contiguous for snippets cut channel-major)
        return matmul(snippets.transpose(1, 2), self.components.T).transpose(1, 2)

    def inverse(self, features: torch.Tensor) -> torch.Tensor:
        """(n, rank, K) -> (n, L, K)."""
        out = matmul(features.transpose(1, 2), self.components).transpose(1, 2)
        return out + self.mean[None, :, None] if self.centred else out

    def project(self, snippets: torch.Tensor) -> torch.Tensor:
        return self.inverse(self.transform(snippets))

    def state(self) -> dict:
        return {"mean": self.mean.cpu().numpy(), "components": self.components.cpu().numpy()}


def ptp(snippets: torch.Tensor) -> torch.Tensor:
    """Peak-to-peak per channel: (n, L, K) -> (n, K)."""
    return snippets.amax(dim=1) - snippets.amin(dim=1)


def strongest(score, times, groups, conflicts, window, block=1024):
    """True for candidates with the top score among those within +-window samples whose
    groups (channels, or units) conflict (conflicts: (G, G) bool); ties go to the earlier one.

    Compared in time blocks (conflicting_in_time): all against all is n^2, 0.7 G pairs per call
    for the ~27k candidates of a 384-channel chunk's first peeling round."""
    out = torch.zeros(len(score), dtype=torch.bool, device=score.device)
    for rows, cols, close in conflicting_in_time(times, groups, times, groups, conflicts, window, block):
        rival = torch.where(close, score[None, cols], torch.full_like(score[None, cols], -torch.inf))
        earlier_tie = (rival == score[rows, None]) & (cols[None, :] < rows[:, None])
        out[rows] = (score[rows, None] >= rival).all(1) & ~earlier_tie.any(1)
    return out


def conflicting_in_time(times, groups, others, other_groups, conflicts, window, block=1024):
    """(rows, cols, close) covering every pair (i, j) with |times[i] - others[j]| <= window:
    rows are up to `block` of times' indices, consecutive in time; cols all of others' indices
    within the window of those rows; close (len(rows), len(cols)) is True where the pair is
    within the window and its groups conflict (conflicts: (G, G) bool)."""
    order = torch.argsort(times, stable=True)
    other_order = torch.argsort(others, stable=True)
    sorted_others = others[other_order]
    for start in range(0, len(times), block):
        rows = order[start: start + block]
        t = times[rows]
        lo = int(torch.searchsorted(sorted_others, t.min() - window))
        hi = int(torch.searchsorted(sorted_others, t.max() + window, right=True))
        cols = other_order[lo:hi]
        close = ((t[:, None] - others[None, cols]).abs() <= window) & \
            conflicts[groups[rows, None], other_groups[None, cols]]
        yield rows, cols, close
