"""Channel neighbourhoods on the probe geometry.

A `channel_index` is a (n_channels, n_neighbors) int array: row c lists the
channels within some radius of channel c, sorted by distance, padded with the
fill value n_channels (an index one past the last real channel). Waveforms
extracted "on a channel_index" have n_neighbors channels; padded entries are NaN.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def make_channel_index(geom: np.ndarray, radius_um: float) -> np.ndarray:
    """Channels within `radius_um` of each channel, closest first, padded with n_channels."""
    geom = np.asarray(geom, dtype=float)
    n = len(geom)
    dist = cdist(geom, geom)
    rows = [np.flatnonzero(dist[c] <= radius_um) for c in range(n)]
    rows = [r[np.argsort(dist[c, r], kind="stable")] for c, r in enumerate(rows)]
    width = max(len(r) for r in rows)
    index = np.full((n, width), n, dtype=np.int64)
    for c, r in enumerate(rows):
        index[c, : len(r)] = r
    return index
