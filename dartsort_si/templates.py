"""Stage 8: drift-aware templates on the registered geometry.

Each spike's snippet is read on the real probe and moved into registered
coordinates by its drift: the real channels sit at their positions minus
the displacement, and the registered channels (the probe extended by
padding) are filled in by kriging from them. Per-unit means of those
registered snippets are the templates. Whole-pitch shifts alone cannot do
this: on a Neuropixels 1.0 probe the pitch is 40 um, so drifts under 20 um
would not be corrected at all and a drifting unit would split in two.
A template is placed back on the real probe at any time by the same
interpolation the other way (see `matching`). Interpolation smooths a sharp
footprint, so each unit also has means per bin of drift within a pitch
(SUPERRES_BIN_UM), moved by whole pitches only; matching blends them in where
the unit sits in a bin it fired in. The walk over the recording is
SpikeInterface's chunk executor, with a gather that sums per-chunk partial
sums, so memory stays at one template array whatever the spike count.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.distance import cdist
from spikeinterface.core.job_tools import TimeSeriesChunkExecutor, fix_job_kwargs
from spikeinterface.core.recording_tools import get_chunk_with_margin

from . import waveforms as wf

# kriging kernel exp(-r / KRIGING_SIGMA_UM); the nugget keeps the solve stable and
# the interpolation (nearly) exact where a target lands on a source. On an NP1 checkerboard,
# point-source footprints moved by up to 20 um are interpolated to ~9% (median max error of
# the peak) at 60 um against ~19% at 20 um; a 30 s x 64 ch rigid sort went from 12 to 14 of
# 21 units well detected
KRIGING_SIGMA_UM = 60.0
KRIGING_NUGGET = 1e-4
# displacements are rounded to this step so interpolation matrices can be shared
DRIFT_STEP_UM = 1.0
# a template channel far from the main channel whose peak-to-peak is under this many times that
# of a mean of n noise snippets (about 5 / sqrt(n) in noise units) holds no signal and is set to
# zero (see Templates.without_noise_channels). Kept, those
# channels cover the whole probe: an SNR-4 unit's template (425 spikes) had peak-to-peaks of
# 0.15-0.58 on every channel up to 1.1 mm away, 20% of its energy, and matching took the spikes
# of an SNR-40 unit 1.1 mm away for it (344 false spikes, accuracy 0.55; 60 s x 128 ch static NP1).
# Alone, this cost units on drifting NP1 (small units next to SNR-30 ones took 3-6x more false
# spikes); with matching's echo filter (matching.time_locked_echoes) taking those out it adds
# 10 well-detected units over the 15 held-out cases (NP1 +4, NP2 +2, static +4) and 1 over the
# 6 tuning cases, with one case 1 lower in each set
NOISE_CHANNEL_FACTOR = 3.0
# peak-to-peak of one noise snippet of template length (unit variance), ~ the mean range of 121 samples
NOISE_SNIPPET_PTP = 5.0
# Drift-binned ("super-resolution") templates. Kriging smooths: a registered template placed 10 um
# off the channels it was measured on kept 62% of its energy (60 s x 128 ch NP1 drifting seed 1,
# GT 16, SNR 5.8: 160 -> 99), and the registered template itself is a mean of spikes kriged the
# other way, so at its drifted positions the unit's template held about half the energy of the
# unit's real spikes there (real means 194-237 over 5 um drift bins against 85-125 kriged), and
# matching missed its spikes there or took a neighbour's. A unit's footprint at drift d is
# that at d - k*pitch moved by k pitches, exactly (the probe repeats every pitch), so spikes are
# binned by their drift's remainder after whole pitches, SUPERRES_BIN_UM wide, and each bin's
# mean is taken on the registered channels moved by whole pitches: no interpolation.
SUPERRES_BIN_UM = 5.0


@dataclass
class Templates:
    """Registered templates (n_units, L, n_registered_channels) plus unit ids."""

    data: np.ndarray
    unit_ids: np.ndarray
    counts: np.ndarray  # spikes averaged per unit
    n_before: int
    # drift-binned means (K, B, L, R) on the registered channels and their spike counts (K, B),
    # see SUPERRES_BIN_UM and superres_bins; None where not measured
    bins: np.ndarray | None = None
    bin_counts: np.ndarray | None = None

    @property
    def n_units(self):
        return len(self.unit_ids)

    def channel_ptps(self) -> np.ndarray:
        """(K, R) peak-to-peak of each unit on each registered channel."""
        return self.data.max(1) - self.data.min(1)

    def main_channels(self) -> np.ndarray:
        return self.channel_ptps().argmax(1) if self.n_units else np.zeros(0, int)

    def ptp(self) -> np.ndarray:
        return self.channel_ptps().max(1) if self.n_units else np.zeros(0)

    def _with(self, data=None, keep=slice(None), unit_ids=None, scale=None) -> "Templates":
        """A copy with data replaced, units subset by keep, ids replaced, or scaled per unit; bins follow."""
        bins, bin_counts = self.bins, self.bin_counts
        if bins is not None:
            bins, bin_counts = bins[keep], bin_counts[keep]
            if scale is not None:
                bins = bins * np.asarray(scale, np.float32)[:, None, None, None]
        data = self.data[keep] if data is None else data
        if scale is not None:
            data = data * np.asarray(scale, np.float32)[:, None, None]
        return Templates(data, self.unit_ids[keep] if unit_ids is None else unit_ids, self.counts[keep],
                         self.n_before, bins, bin_counts)

    def scaled(self, factors) -> "Templates":
        return self._with(scale=factors)

    def renumbered(self, unit_ids) -> "Templates":
        return self._with(unit_ids=np.asarray(unit_ids))

    def concat(self, other: "Templates") -> "Templates":
        bins = bin_counts = None
        if self.bins is not None or other.bins is not None:
            a, b = self._bins_or_empty(other), other._bins_or_empty(self)
            bins, bin_counts = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])
        return Templates(np.concatenate([self.data, other.data]), np.concatenate([self.unit_ids, other.unit_ids]),
                         np.concatenate([self.counts, other.counts]), self.n_before, bins, bin_counts)

    def replaced(self, index, other: "Templates") -> "Templates":
        """A copy whose templates at index (positions) are other's (same order), bins and counts too."""
        out = copy.deepcopy(self)
        out.data[index], out.counts[index] = other.data, other.counts
        if out.bins is not None:
            bins, bin_counts = other._bins_or_empty(self)
            out.bins[index], out.bin_counts[index] = bins, bin_counts
        return out

    def _bins_or_empty(self, like):
        """(bins, bin_counts), zeros (no spike in any bin) shaped like `like`'s where not measured."""
        if self.bins is not None:
            return self.bins, self.bin_counts
        n_bins = like.bins.shape[1]
        return (np.zeros((self.n_units, n_bins) + self.data.shape[1:], np.float32),
                np.zeros((self.n_units, n_bins), np.int64))

    def without_noise_channels(self, rgeom, radius_um) -> "Templates":
        """Channels farther than radius_um from the main channel whose peak-to-peak is within
        noise of the spikes averaged set to zero (see NOISE_CHANNEL_FACTOR). Near the main
        channel even weak values stay: they tell a small unit from the spikes of a big
        neighbour (zeroed there too, small units next to SNR-30 ones took 3-6x more false
        spikes; 60 s x 128 ch NP1)."""
        floor = NOISE_CHANNEL_FACTOR * NOISE_SNIPPET_PTP / np.sqrt(np.maximum(self.counts, 1))
        ptps = self.channel_ptps()
        near = cdist(rgeom[self.main_channels()], rgeom) <= radius_um
        keep = near | (ptps >= floor[:, None])
        data = np.where(keep[:, None, :], self.data, 0.0).astype(np.float32)
        out = self._with(data=data)
        if out.bins is not None:
            out.bins = np.where(keep[:, None, None, :], out.bins, 0.0).astype(np.float32)
        return out

    def subset(self, keep) -> "Templates":
        return self._with(keep=keep)

    def save(self, path, with_bins=True):
        """An .npz; the drift bins (compressed: zero off each unit's channels) unless with_bins is False."""
        from .storage import atomic_savez

        extra = {} if self.bins is None or not with_bins else dict(bins=self.bins, bin_counts=self.bin_counts)
        atomic_savez(path, data=self.data, unit_ids=self.unit_ids, counts=self.counts,
                     n_before=self.n_before, compressed=bool(extra), **extra)

    @classmethod
    def load(cls, path):
        with np.load(path) as f:
            bins = (f["bins"], f["bin_counts"]) if "bins" in f else (None, None)
            return cls(f["data"], f["unit_ids"], f["counts"], int(f["n_before"]), *bins)


class Kriging:
    """Spatial interpolation from fixed source positions to fixed target positions
    moved along the probe by dz.

    weights(dz) is the (n_targets, n_sources) matrix W such that values at the
    sources, times W.T, are the interpolated values at targets + [0, dz]. Targets
    farther than `reach` from every source get all-zero rows (no information).
    dz is rounded to the DRIFT_STEP_UM grid, so each matrix is computed once.
    """

    def __init__(self, sources: np.ndarray, targets: np.ndarray, reach: float):
        self.sources = np.asarray(sources, float)
        self.targets = np.asarray(targets, float)
        k = np.exp(-cdist(self.sources, self.sources) / KRIGING_SIGMA_UM)
        self.inverse = np.linalg.inv(k + KRIGING_NUGGET * np.eye(len(k)))
        self.reach = reach
        self._cache = {}

    def retarget(self, targets: np.ndarray) -> "Kriging":
        """The same sources (and their inverted kernel, the costly part) for other targets."""
        new = copy.copy(self)
        new.targets = np.asarray(targets, float)
        new._cache = {}
        return new

    def at_drift(self, data: np.ndarray, steps: int) -> np.ndarray:
        """(..., L, R) registered templates on the real channels (..., L, C) when displaced by
        `steps` drift steps: real channel c reads the registered template at geom[c] - d."""
        w, _ = self.weights(-steps * DRIFT_STEP_UM)
        return data @ w.T

    def weights(self, dz: float = 0.0):
        key = round(dz / DRIFT_STEP_UM)
        if key not in self._cache:
            dist = cdist(self.targets + [0.0, key * DRIFT_STEP_UM], self.sources)
            w = np.exp(-dist / KRIGING_SIGMA_UM) @ self.inverse
            ok = dist.min(1) <= self.reach
            self._cache[key] = (w * ok[:, None]).astype(np.float32), ok
        return self._cache[key]


def interpolation_reach(geom: np.ndarray) -> float:
    """How far from a contact a value can still be interpolated: 1.5x the typical
    nearest-neighbour distance between contacts."""
    d = cdist(geom, geom)
    np.fill_diagonal(d, np.inf)
    return 1.5 * float(np.median(d.min(1)))


def quantized_drift(displacement_um: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(displacement_um, float) / DRIFT_STEP_UM).astype(np.int64)


def drift_steps(motion_info, times_s, reg_depths_um) -> np.ndarray:
    """Displacement, in DRIFT_STEP_UM steps, at times_s of sources at registered depths."""
    reg_depths_um = np.asarray(reg_depths_um, float)
    return quantized_drift(motion_info.uncorrect_s(times_s, reg_depths_um) - reg_depths_um)


def n_superres_bins(pitch: float) -> int:
    return max(1, int(np.ceil(pitch / SUPERRES_BIN_UM - 1e-9)))


def superres_bins(drift_um, pitch: float):
    """(whole pitches, bin of the remainder) of displacements drift_um: drift = k * pitch + r
    with r in [-pitch/2, pitch/2), r's bin one of n_superres_bins(pitch) equal ones."""
    drift_um = np.asarray(drift_um, float)
    k = np.round(drift_um / pitch).astype(np.int64)
    n = n_superres_bins(pitch)
    b = np.floor((drift_um - k * pitch + pitch / 2) / (pitch / n)).astype(np.int64)
    return k, np.clip(b, 0, n - 1)


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
    depths = depths_um[which]
    drift = quantized_drift(depths - motion_info.correct_s(t / fs, depths))
    # registered channel r at rgeom[r] sees the real probe moved by the drift:
    # interpolate the real channels at rgeom[r] + drift
    kriging = Kriging(motion_info.geom, motion_info.rgeom, interpolation_reach(motion_info.geom))
    maps = {int(k): kriging.weights(k * DRIFT_STEP_UM) for k in np.unique(drift)}
    n_reg = len(motion_info.rgeom)
    length = n_before + n_after
    pitches, bins = superres_bins(drift * DRIFT_STEP_UM, motion_info.pitch)
    n_bins = n_superres_bins(motion_info.pitch)
    pitch_maps = {int(k): motion_info.registered_channel_map(int(k)) for k in np.unique(pitches)}
    spikes = dict(times=t, units=unit_of, drift=drift, pitches=pitches, bins=unit_of * n_bins + bins)
    total = _SumGather((len(unit_ids), length, n_reg), n_bins)
    init_args = (recording, spikes, maps, pitch_maps, n_before, n_after, len(unit_ids), n_bins, n_reg)
    executor = TimeSeriesChunkExecutor(
        recording, _template_chunk, _template_init, init_args, gather_func=total,
        job_name="templates", **_job_kwargs(job_kwargs),
    )
    executor.run()
    sums, counts = total.sums, total.counts
    data = np.where(counts[:, None, :] > 0, sums / np.maximum(counts[:, None, :], 1), 0.0)
    n_spikes = np.bincount(unit_of, minlength=len(unit_ids))
    # a registered channel no spike of a bin reached (probe ends) keeps the unit's template
    shape = (len(unit_ids), n_bins, length, n_reg)
    bin_counts = total.bin_counts.reshape(len(unit_ids), n_bins, 1, n_reg)
    bin_means = np.where(bin_counts > 0, total.bin_sums.reshape(shape) / np.maximum(bin_counts, 1),
                         data[:, None])
    n_in_bin = np.bincount(spikes["bins"], minlength=len(unit_ids) * n_bins).reshape(len(unit_ids), n_bins)
    return Templates(data.astype(np.float32), unit_ids, n_spikes, n_before, bin_means.astype(np.float32), n_in_bin)


def _job_kwargs(job_kwargs):
    return fix_job_kwargs(dict(job_kwargs or {}))


class _SumGather:
    def __init__(self, shape, n_bins):
        self.sums = np.zeros(shape, np.float64)
        self.counts = np.zeros((shape[0], shape[2]), np.int64)
        self.bin_sums = np.zeros((shape[0] * n_bins,) + shape[1:], np.float32)
        self.bin_counts = np.zeros((shape[0] * n_bins, shape[2]), np.int64)

    def __call__(self, res):
        if res is not None:
            self.sums += res[0]
            self.counts += res[1]
            rows = res[2]
            self.bin_sums[rows] += res[3]
            self.bin_counts[rows] += res[4]


def _template_init(recording, spikes, maps, pitch_maps, n_before, n_after, n_units, n_bins, n_reg):
    return dict(recording=recording, spikes=spikes, maps=maps, pitch_maps=pitch_maps, n_before=n_before,
                n_after=n_after, n_units=n_units, n_bins=n_bins, n_reg=n_reg)


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
    sums = torch.zeros((n_units, nb + na, n_reg), dtype=torch.float64)
    counts = torch.zeros((n_units, n_reg), dtype=torch.int64)
    units = torch.as_tensor(s["units"][lo:hi])
    drift = s["drift"][lo:hi]
    for k in np.unique(drift):
        sel = torch.as_tensor(np.flatnonzero(drift == k))
        w, ok = ctx["maps"][int(k)]
        registered = wf.matmul(snips[sel], torch.as_tensor(w).T)  # (n, L, R)
        sums.index_add_(0, units[sel], registered.double())
        counts.index_add_(0, units[sel], torch.as_tensor(ok, dtype=torch.int64).expand(len(sel), -1).contiguous())
    rows, rows_of = np.unique(s["bins"][lo:hi], return_inverse=True)
    bin_sums, bin_counts = _bin_sums(snips, s["pitches"][lo:hi], torch.as_tensor(rows_of.ravel()), len(rows), ctx)
    return sums.numpy(), counts.numpy(), rows, bin_sums.numpy(), bin_counts.numpy()


def _bin_sums(snips, pitches, rows_of, n_rows, ctx):
    """Sums of the snippets, put on the registered channels by whole-pitch moves
    (superres_bins), into n_rows (the chunk's (unit, drift bin) rows: rows_of per snippet),
    and per channel the number of snippets summed. Only the rows in the chunk: the whole
    array is 24 MB per chunk at 40 units x 8 bins x 152 registered channels."""
    n_reg = ctx["n_reg"]
    sums = torch.zeros((n_rows, snips.shape[1], n_reg), dtype=torch.float32)
    counts = torch.zeros((n_rows, n_reg), dtype=torch.int64)
    for k in np.unique(pitches):
        sel = torch.as_tensor(np.flatnonzero(pitches == k))
        chans = ctx["pitch_maps"][int(k)]
        on = np.flatnonzero(chans >= 0)
        moved = torch.zeros((len(sel), snips.shape[1], n_reg), dtype=torch.float32)
        moved[:, :, torch.as_tensor(chans[on])] = snips[sel][:, :, torch.as_tensor(on)]
        sums.index_add_(0, rows_of[sel], moved)
        reached = torch.zeros(n_reg, dtype=torch.int64)
        reached[torch.as_tensor(chans[on])] = 1
        counts.index_add_(0, rows_of[sel], reached.expand(len(sel), -1).contiguous())
    return sums, counts
