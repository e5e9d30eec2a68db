"""Stage 8: drift-aware templates on the registered geometry.

Each spike's snippet is read on the real probe, moved by the whole number of
probe pitches its drift amounts to (`MotionInfo.pitch_shifts`), and averaged
per unit on the registered geometry (the probe extended by padding). A
template can then be placed back on the real probe at any time by shifting
the other way. The walk over the recording is SpikeInterface's chunk
executor, with a gather that sums per-chunk partial sums, so memory stays
at one template array whatever the spike count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from spikeinterface.core.job_tools import TimeSeriesChunkExecutor, fix_job_kwargs
from spikeinterface.core.recording_tools import get_chunk_with_margin


@dataclass
class Templates:
    """Registered templates (n_units, L, n_registered_channels) plus unit ids."""

    data: np.ndarray
    unit_ids: np.ndarray
    counts: np.ndarray  # spikes averaged per unit
    n_before: int

    @property
    def n_units(self):
        return len(self.unit_ids)

    def main_channels(self) -> np.ndarray:
        ptps = self.data.max(1) - self.data.min(1)
        return ptps.argmax(1) if self.n_units else np.zeros(0, int)

    def ptp(self) -> np.ndarray:
        return (self.data.max(1) - self.data.min(1)).max(1) if self.n_units else np.zeros(0)

    def subset(self, keep) -> "Templates":
        return Templates(self.data[keep], self.unit_ids[keep], self.counts[keep], self.n_before)

    def save(self, path):
        from .storage import atomic_savez

        atomic_savez(path, data=self.data, unit_ids=self.unit_ids, counts=self.counts,
                     n_before=self.n_before)

    @classmethod
    def load(cls, path):
        with np.load(path) as f:
            return cls(f["data"], f["unit_ids"], f["counts"], int(f["n_before"]))


def registered_channel_maps(motion_info, shifts: np.ndarray) -> dict[int, np.ndarray]:
    """For each pitch shift k: the registered channel of every real channel."""
    return {int(k): np.asarray(motion_info.registered_channel_map(int(k))) for k in np.unique(shifts)}


def sample_spikes(labels: np.ndarray, max_per_unit: int, seed: int = 0) -> np.ndarray:
    """Indices of at most max_per_unit random spikes per unit (labels >= 0), sorted."""
    rng = np.random.default_rng(seed)
    keep = []
    for u in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == u)
        if len(idx) > max_per_unit:
            idx = rng.choice(idx, max_per_unit, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, int)


def estimate_templates(recording, times, labels, motion_info, *, depths_um, n_before, n_after,
                       max_spikes_per_unit=500, job_kwargs=None, seed=0) -> Templates:
    """Mean registered template per unit from at most max_spikes_per_unit spikes each."""
    fs = recording.sampling_frequency
    which = sample_spikes(labels, max_spikes_per_unit, seed)
    t, lab = times[which], labels[which]
    unit_ids = np.unique(lab)
    unit_of = np.searchsorted(unit_ids, lab)
    shifts, _ = motion_info.pitch_shifts(times_s=t / fs, depths_um=depths_um[which])
    maps = registered_channel_maps(motion_info, shifts)
    n_reg = len(motion_info.rgeom)
    length = n_before + n_after
    spikes = dict(times=t, units=unit_of, shifts=np.asarray(shifts, int))
    total = _SumGather((len(unit_ids), length, n_reg + 1))
    init_args = (recording, spikes, maps, n_before, n_after, len(unit_ids), n_reg)
    executor = TimeSeriesChunkExecutor(
        recording, _template_chunk, _template_init, init_args, gather_func=total,
        job_name="templates", **_job_kwargs(job_kwargs),
    )
    executor.run()
    sums, counts = total.sums[..., :n_reg], total.counts[:, :n_reg]
    data = np.where(counts[:, None, :] > 0, sums / np.maximum(counts[:, None, :], 1), 0.0)
    n_spikes = np.bincount(unit_of, minlength=len(unit_ids))
    return Templates(data.astype(np.float32), unit_ids, n_spikes, n_before)


def _job_kwargs(job_kwargs):
    return fix_job_kwargs(dict(job_kwargs or {}))


class _SumGather:
    def __init__(self, shape):
        self.sums = np.zeros(shape, np.float64)
        self.counts = np.zeros((shape[0], shape[2]), np.int64)

    def __call__(self, res):
        if res is not None:
            self.sums += res[0]
            self.counts += res[1]


def _template_init(recording, spikes, maps, n_before, n_after, n_units, n_reg):
    return dict(recording=recording, spikes=spikes, maps=maps, n_before=n_before, n_after=n_after,
                n_units=n_units, n_reg=n_reg)


def _template_chunk(segment_index, start_frame, end_frame, ctx):
    s = ctx["spikes"]
    lo, hi = np.searchsorted(s["times"], [start_frame, end_frame])
    if lo == hi:
        return None
    nb, na = ctx["n_before"], ctx["n_after"]
    margin = nb + na
    seg = ctx["recording"].segments[segment_index]
    traces, left, _ = get_chunk_with_margin(seg, start_frame, end_frame, None, margin, add_zeros=True)
    traces = torch.as_tensor(np.asarray(traces, np.float32))
    rel = torch.as_tensor(s["times"][lo:hi] - start_frame + left)
    snips = traces[(rel[:, None] + torch.arange(-nb, na)[None, :])]  # (n, L, C)
    n_units, n_reg = ctx["n_units"], ctx["n_reg"]
    sums = torch.zeros((n_units, nb + na, n_reg + 1), dtype=torch.float64)
    counts = torch.zeros((n_units, n_reg + 1), dtype=torch.int64)
    units = torch.as_tensor(s["units"][lo:hi])
    shifts = s["shifts"][lo:hi]
    for k in np.unique(shifts):
        sel = torch.as_tensor(np.flatnonzero(shifts == k))
        rchan = torch.as_tensor(ctx["maps"][int(k)])
        rchan = torch.where(rchan < 0, n_reg, rchan)  # off the registered probe: dropped
        flat_index = units[sel][:, None] * (n_reg + 1) + rchan[None, :]  # (n, C)
        _scatter_sum(sums, counts, snips[sel], flat_index, n_units, n_reg)
    return sums.numpy(), counts.numpy()


def _scatter_sum(sums, counts, snips, flat_index, n_units, n_reg):
    length = snips.shape[1]
    flat_sums = sums.permute(1, 0, 2).reshape(length, -1)
    src = snips.permute(1, 0, 2).reshape(length, -1).double()
    idx = flat_index.reshape(-1)
    flat_sums.index_add_(1, idx, src)
    sums.copy_(flat_sums.reshape(length, n_units, n_reg + 1).permute(1, 0, 2))
    counts.view(-1).index_add_(0, idx, torch.ones_like(idx))
