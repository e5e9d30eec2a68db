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
    Works on the (few) crossings only, not on the whole chunk. traces may be laid out by
    rows or by channels (with_zero_channel's residual).
    """
    lo, hi = valid if valid is not None else (0, len(traces))
    search = _peaks_numpy if traces.device.type == "cpu" and not traces.requires_grad else _peaks_torch
    return search(traces, threshold, peak_sign, dedup_index, dedup_samples, lo, hi, rows)


def _peaks_torch(traces, threshold, peak_sign, dedup_index, dedup_samples, lo, hi, rows):
    """find_peaks in torch (CUDA): each crossing's window gathered (n, W) on its channel, then
    (n, K, W) on its neighbours."""
    if rows is None:
        times, chans = torch.nonzero(_energy(traces[lo:hi], peak_sign) >= threshold, as_tuple=True)
        times = times + lo
    else:
        rows = rows[(rows >= lo) & (rows < hi)]
        at, chans = torch.nonzero(_energy(traces[rows], peak_sign) >= threshold, as_tuple=True)
        times = rows[at]
    own = _energy(traces[times, chans], peak_sign)
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


def _peaks_numpy(traces, threshold, peak_sign, dedup_index, dedup_samples, lo, hi, rows):
    """find_peaks on the CPU, through numpy: its comparison and flatnonzero found a chunk's
    crossings in 1 ms where torch's took 6-10 ms (one thread, 1 s x 128 ch), and the windows
    are read one lag at a time for all crossings (a max of 2 dedup_samples + 1 gathers) where
    torch's (n, K, W) gather and max over W took 5-8 ms. A whole-chunk search, 1 s x 128 ch
    NP1/NP2: 5-11 against 15-24 ms (three full searches per chunk in subtraction's peeling).
    The same peaks."""
    x = traces.numpy()
    n_rows, n_chans = x.shape
    times, chans = _crossings(x, threshold, peak_sign, lo, hi, None if rows is None else rows.numpy())
    by_channel = x.T.flags.c_contiguous and not x.flags.c_contiguous
    flat = (x.T if by_channel else x).reshape(-1)
    row_step, col_step = (1, n_rows) if by_channel else (n_chans, 1)
    own = _energy(flat[times * row_step + chans * col_step], peak_sign)
    # biggest within the time window on its own channel ...
    lags = range(-dedup_samples, dedup_samples + 1)
    is_peak = own >= _window_max(flat, times, chans * col_step, lags, row_step, n_rows, peak_sign)
    times, chans, own = times[is_peak], chans[is_peak], own[is_peak]
    # ... and within the dedup neighbourhood (padding reads as 0, under any crossing)
    neighbours = dedup_index.numpy()[chans]  # (n, K)
    around = _window_max(flat, times[:, None], np.minimum(neighbours, n_chans - 1) * col_step, lags, row_step,
                         n_rows, peak_sign)
    around = np.where(neighbours < n_chans, around, np.float32(0))
    keep = own >= around.max(1, initial=-np.inf)
    return torch.from_numpy(times[keep]), torch.from_numpy(chans[keep]), torch.from_numpy(own[keep])


def _crossings(x: np.ndarray, threshold, peak_sign, lo, hi, rows=None):
    """(times, channels) where x (T, C) reaches the threshold in rows [lo, hi) (at rows only,
    if given), ordered by time then channel."""
    n_chans = x.shape[1]
    if rows is not None:
        rows = rows[(rows >= lo) & (rows < hi)]
        flat = np.flatnonzero(_reaches(x[rows], threshold, peak_sign))
        return rows[flat // n_chans], flat % n_chans
    if x.flags.c_contiguous or not x.T.flags.c_contiguous:
        flat = np.flatnonzero(_reaches(x[lo:hi], threshold, peak_sign))
        return flat // n_chans + lo, flat % n_chans
    width = hi - lo  # laid out by channels: found channel by channel, then put in time order
    flat = np.flatnonzero(_reaches(x.T[:, lo:hi], threshold, peak_sign))
    times, chans = flat % width + lo, flat // width
    order = np.argsort(times * n_chans + chans)
    return times[order], chans[order]


def _reaches(x: np.ndarray, threshold, peak_sign):
    """_energy(x) >= threshold without the negated copy (-x >= t is x <= -t, exactly)."""
    if peak_sign == "neg":
        return x <= -threshold
    return _energy(x, peak_sign) >= threshold


def _window_max(flat, times, col_offsets, lags, row_step, n_rows, peak_sign):
    """The biggest energy at times + lag (clamped to the chunk) over lags, on the channels at
    col_offsets in flat (broadcast with times)."""
    clamp = len(times) > 0 and (times.min() + min(lags) < 0 or times.max() + max(lags) >= n_rows)
    base = times * row_step + col_offsets
    out = None
    for lag in lags:
        at = np.clip(times + lag, 0, n_rows - 1) * row_step + col_offsets if clamp else base + lag * row_step
        e = _energy(flat[at], peak_sign)
        out = e if out is None else np.maximum(out, e, out=out)
    return out


def _energy(x, peak_sign: str):
    """What a peak is the maximum of: -x for troughs, x for peaks, |x| for both (torch or numpy)."""
    if peak_sign == "neg":
        return -x
    if peak_sign == "pos":
        return x
    return abs(x)


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
    """In place: traces[times+offsets, channel_index[chans]] += snippets (padding dropped); a
    sample written twice gets both, in order (index_add_)."""
    real, idx = _flat_indices(traces, times, channel_index[chans], offsets)
    index_add(flat_view(traces), idx[real], snippets[real] if torch.is_tensor(real) else snippets.numpy()[real])


def fill(traces: torch.Tensor, times: torch.Tensor, cols: torch.Tensor, offsets: torch.Tensor, value):
    """In place: traces[times+offsets, cols] = value, cols (n, K) channels (padding:
    traces.shape[1], dropped)."""
    real, idx = _flat_indices(traces, times, cols, offsets)
    if torch.is_tensor(idx):
        flat_view(traces).index_fill_(0, idx[real], value)
    else:
        flat_view(traces).numpy()[idx[real]] = value


def index_add(flat: torch.Tensor, idx, values, alpha: int = 1):
    """In place: flat[idx] += alpha * values, in the order of idx, a position given twice getting
    both (torch's index_add_). idx and values may be numpy arrays: on the CPU the masks and
    index arithmetic that make them run in numpy, 1.3 against 5.7 ms for torch's (60 snippets
    of 121 x 40 samples, one thread; index_add_ itself 0.3 ms). Not numpy's ufunc.at, as fast
    but holding the GIL: two threads took longer than one."""
    flat.index_add_(0, torch.as_tensor(idx), torch.as_tensor(values), alpha=alpha)


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
    each sample in flat_view(traces). numpy arrays for traces on the CPU (index_add), torch's
    elsewhere."""
    row_stride, col_stride = traces.stride()
    if traces.device.type == "cpu":
        times, cols, offsets = times.numpy(), cols.numpy(), offsets.numpy()
    rows = times[:, None] + offsets[None, :]  # (n, L)
    idx = rows[:, :, None] * row_stride + cols[:, None, :] * col_stride
    real = (cols < traces.shape[1])[:, None, :]
    return (real.expand_as(idx) if torch.is_tensor(real) else np.broadcast_to(real, idx.shape)), idx


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


def rows_near(times, window, n_rows):
    """Sorted sample indices within +-window of any of times, or None when they cover
    most of the chunk (then one pass over the whole chunk is cheaper). Subtraction's peeling
    looks for peaks only there after its first round (a whole-chunk search each round was 7%
    of a sort, py-spy), matching recomputes its best units there."""
    if len(times) * (2 * window + 1) > n_rows // 2:
        return None
    rows = (times[:, None] + torch.arange(-window, window + 1, device=times.device)).reshape(-1)
    return torch.unique(rows.clamp(0, n_rows - 1))


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
