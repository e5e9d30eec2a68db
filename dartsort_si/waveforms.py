"""Torch helpers shared by detection, subtraction and matching: find peaks,
cut snippets on channel neighbourhoods, add them back, temporal PCA.

Snippets live on a `channel_index` neighbourhood (see channels.py); padded
channels read as zeros and carry mask False.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def find_peaks(traces: torch.Tensor, threshold: float, peak_sign: str, dedup_index: torch.Tensor,
               dedup_samples: int = 7, valid: tuple[int, int] | None = None,
               allowed: torch.Tensor | None = None):
    """Threshold crossings that are the biggest event within `dedup_samples`
    in time and within the dedup neighbourhood in space.

    Returns (times, channels, energies) where energy is |voltage| (or the
    signed voltage for 'neg'/'pos'). The dedup neighbourhood suppresses the
    secondary channels of a big spike, not just smaller spikes nearby.
    """
    if peak_sign == "neg":
        energy = -traces
    elif peak_sign == "pos":
        energy = traces
    else:
        energy = traces.abs()
    energy = torch.where(energy >= threshold, energy, torch.zeros((), dtype=energy.dtype, device=energy.device))
    # biggest within the time window on its own channel ...
    pooled = F.max_pool1d(energy.T[None], kernel_size=2 * dedup_samples + 1, stride=1, padding=dedup_samples)[0].T
    is_peak = (energy > 0) & (energy == pooled)
    if valid is not None:
        is_peak[: valid[0]] = False
        is_peak[valid[1]:] = False
    if allowed is not None:  # (T,) or (T, C) bool: where peaks may be
        is_peak &= allowed if allowed.ndim == 2 else allowed[:, None]
    # ... and within the dedup neighbourhood (checked only at those candidates)
    times, chans = torch.nonzero(is_peak, as_tuple=True)
    padded = torch.cat([pooled, torch.zeros_like(pooled[:, :1])], dim=1)
    neighbours_max = padded[times[:, None], dedup_index[chans]].amax(1)
    keep = energy[times, chans] >= neighbours_max
    times, chans = times[keep], chans[keep]  # sorted by time, then channel
    energies = energy[times, chans]
    return times, chans, energies


def cut(traces: torch.Tensor, times: torch.Tensor, chans: torch.Tensor,
        channel_index: torch.Tensor, offsets: torch.Tensor):
    """Snippets (n, len(offsets), K) at times+offsets on channel_index[chans]; zeros at padding."""
    padded = torch.cat([traces, torch.zeros_like(traces[:, :1])], dim=1)
    rows = (times[:, None] + offsets[None, :])[:, :, None]
    cols = channel_index[chans][:, None, :]
    return padded[rows, cols]


def add(traces: torch.Tensor, times: torch.Tensor, chans: torch.Tensor,
        channel_index: torch.Tensor, offsets: torch.Tensor, snippets: torch.Tensor):
    """In place: traces[times+offsets, channel_index[chans]] += snippets (padding dropped)."""
    n_t, n_c = traces.shape
    padded = torch.cat([traces, torch.zeros_like(traces[:, :1])], dim=1)
    rows = (times[:, None] + offsets[None, :])[:, :, None].expand_as(snippets)
    cols = channel_index[chans][:, None, :].expand_as(snippets)
    padded.index_put_((rows.reshape(-1), cols.reshape(-1)), snippets.reshape(-1), accumulate=True)
    traces.copy_(padded[:, :n_c])


def neighbour_mask(channel_index: torch.Tensor, chans: torch.Tensor) -> torch.Tensor:
    """(n, K) bool: True where the neighbourhood slot is a real channel."""
    return channel_index[chans] < channel_index.shape[0]


class TemporalPCA:
    """Per-channel temporal PCA (rank r) used to denoise and to featurize snippets."""

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.components = torch.as_tensor(components, dtype=torch.float32)  # (rank, L)
        self.rank = self.components.shape[0]

    @classmethod
    def fit(cls, single_channel_snippets: np.ndarray, rank: int) -> "TemporalPCA":
        # uncentred on purpose: a flat (noise-free) channel must project to zero,
        # or subtraction would add the mean spike shape onto every channel
        x = torch.as_tensor(single_channel_snippets, dtype=torch.float32)
        mean = torch.zeros(x.shape[1])
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        return cls(mean.numpy(), vh[:rank].numpy())

    def to(self, device) -> "TemporalPCA":
        return TemporalPCA(self.mean.to(device), self.components.to(device))

    def transform(self, snippets: torch.Tensor) -> torch.Tensor:
        """(n, L, K) -> (n, rank, K)."""
        return torch.einsum("nlk,rl->nrk", snippets - self.mean[None, :, None], self.components)

    def inverse(self, features: torch.Tensor) -> torch.Tensor:
        """(n, rank, K) -> (n, L, K)."""
        return torch.einsum("nrk,rl->nlk", features, self.components) + self.mean[None, :, None]

    def project(self, snippets: torch.Tensor) -> torch.Tensor:
        return self.inverse(self.transform(snippets))

    def state(self) -> dict:
        return {"mean": self.mean.cpu().numpy(), "components": self.components.cpu().numpy()}


def ptp(snippets: torch.Tensor) -> torch.Tensor:
    """Peak-to-peak per channel: (n, L, K) -> (n, K)."""
    return snippets.amax(dim=1) - snippets.amin(dim=1)
