"""Spike trains: `DARTsortSorting`, its .npz file, and the peeling HDF5 format.

Peeling HDF5 format (written by `write_peeling_hdf5`, read by `DARTsortSorting.from_peeling_hdf5`):
datasets `times_samples` (N,) int64, `channels` (N,) int64, optional `labels` (N,) int64,
`geom` (C, 2) float [x, z] um, optional `channel_index` (C, K) int64 padded with C, and any
per-spike feature whose first axis is N (e.g. `point_source_localizations` (N, 4) = x, y, z_abs,
alpha). Root attribute `sampling_frequency`.
"""

from __future__ import annotations

import copy
import os
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np

from .storage import atomic_path, atomic_savez, record_size, to_numpy

CORE_NAMES = ("times_samples", "channels", "labels")
PROBE_DATASETS = ("geom", "channel_index")
SORTING_FORMAT = "dartsort_si.DARTsortSorting/1"
_EPHEMERAL = "ephemeral__"
_PERSISTENT = "persistent__"
_FULL_EXTRA = "pip install 'dartsort-si[full]'"


def _relative_path(target, folder):
    try:
        return os.path.relpath(Path(target).resolve(), Path(folder).resolve())
    except ValueError:  # different drives on Windows: no relative path exists
        return str(Path(target).resolve())


def write_peeling_hdf5(path, *, times_samples, channels, sampling_frequency, geom,
                       channel_index=None, labels=None, features=None):
    """Write a peeling result in our HDF5 format, atomically (temp name, then rename)."""
    times_samples = np.asarray(times_samples, dtype=np.int64)
    n = times_samples.shape[0]
    core = {"times_samples": times_samples, "channels": np.asarray(channels, dtype=np.int64)}
    if labels is not None:
        core["labels"] = np.asarray(labels, dtype=np.int64)
    features = {k: to_numpy(v) for k, v in (features or {}).items()}
    for name, value in {**core, **features}.items():
        if name in features and name in CORE_NAMES + PROBE_DATASETS:
            raise ValueError(f"Feature name {name!r} is reserved.")
        if value.ndim == 0 or value.shape[0] != n:
            raise ValueError(f"{name} has shape {value.shape}, expected first axis {n}.")
    probe = {"geom": np.asarray(to_numpy(geom), dtype=np.float64)}
    if channel_index is not None:
        probe["channel_index"] = np.asarray(to_numpy(channel_index), dtype=np.int64)

    def write(tmp):
        with h5py.File(tmp, "w") as h5:
            h5.attrs["sampling_frequency"] = float(sampling_frequency)
            for name, value in {**core, **probe, **features}.items():
                h5.create_dataset(name, data=value)

    with atomic_path(path) as tmp:
        write(tmp)


def _h5_feature_names(h5, n_spikes, skip, names=None, simple=True, load_all=False,
                      allow_missing=False):
    """Which datasets to load: geom/channel_index when present, plus the requested features."""
    probe = [p for p in PROBE_DATASETS if p in h5]
    if names is not None:
        missing = [k for k in names if k not in h5]
        if missing and not allow_missing:
            raise KeyError(f"Features {missing} not found in {h5.filename}.")
        return probe + [k for k in names if k in h5 and k not in probe]
    if not (simple or load_all):
        return probe
    per_spike = [
        k for k, d in h5.items()
        if isinstance(d, h5py.Dataset) and k not in skip and k not in probe
        and d.ndim >= 1 and d.shape[0] == n_spikes
    ]
    if not load_all:  # "simple" = scalar or vector per spike; matrices (waveforms, PCs) stay on disk
        per_spike = [k for k in per_spike if h5[k].ndim <= 2]
    return probe + per_spike


def _read_h5_features(h5, names, h5_index=None):
    features = {}
    for name in names:
        value = h5[name][()]
        if h5_index is not None and name not in PROBE_DATASETS:
            value = value[h5_index]
        features[name] = value
    return features


# -- spike trains


class DARTsortSorting:
    """Spike times, main channels, optional labels, and per-spike features.

    Features are reachable as attributes (`sorting.point_source_localizations`).
    Persistent features live in the parent HDF5 file; ephemeral ones only in memory and in
    the .npz written by `save`. Ephemeral features shadow persistent ones of the same name.
    """

    def __init__(self, *, times_samples, channels, labels=None, parent_h5_path=None,
                 sampling_frequency=30000.0, persistent_features=None, ephemeral_features=None,
                 segment_lengths=None):
        self.times_samples = np.asarray(times_samples)
        # samples per segment of a multi-segment recording, sorted as one concatenated time axis
        # (times_samples); None: one segment
        self.segment_lengths = None if segment_lengths is None else np.asarray(segment_lengths, dtype=np.int64)
        self.channels = np.asarray(channels)
        self.labels = None if labels is None else np.asarray(labels)
        self.parent_h5_path = None if parent_h5_path is None else Path(parent_h5_path)
        self.sampling_frequency = float(sampling_frequency)
        self.persistent_features = dict(persistent_features or {})
        self.ephemeral_features = dict(ephemeral_features or {})
        # indices of our spikes in the parent h5 after subsetting (None: one to one)
        self._h5_index = None
        self._check()

    def _check(self):
        n = self.times_samples.shape[0]
        for name in CORE_NAMES[1:]:
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"{name} has shape {value.shape}, expected ({n},).")
        for name in {**self.persistent_features, **self.ephemeral_features}:
            if name in CORE_NAMES or hasattr(type(self), name):
                raise ValueError(f"Feature name {name!r} clashes with a DARTsortSorting attribute.")

    def __getattr__(self, name):
        # only reached when normal lookup fails: expose features as attributes
        if not name.startswith("__"):
            for store in ("ephemeral_features", "persistent_features"):
                features = self.__dict__.get(store, {})
                if name in features:
                    return features[name]
        raise AttributeError(f"DARTsortSorting has no attribute or feature {name!r}")

    def __len__(self):
        return int(self.times_samples.shape[0])

    @property
    def n_spikes(self):
        return len(self)

    @property
    def unit_ids(self):
        if self.labels is None:
            return np.array([], dtype=np.int64)
        return np.unique(self.labels[self.labels >= 0])

    @property
    def n_units(self):
        return int(self.unit_ids.size)

    @property
    def times_seconds(self):
        return self.times_samples / self.sampling_frequency

    def features(self):
        """All features by name, ephemeral ones shadowing persistent ones."""
        return {**self.persistent_features, **self.ephemeral_features}

    def __repr__(self):
        h5 = self.parent_h5_path.name if self.parent_h5_path is not None else None
        return (
            f"DARTsortSorting(n_spikes={len(self)}, n_units={self.n_units}, "
            f"sampling_frequency={self.sampling_frequency}, parent_h5={h5!r}, "
            f"persistent={sorted(self.persistent_features)}, "
            f"ephemeral={sorted(self.ephemeral_features)})"
        )

    # -- exports

    def _labels_or_raise(self):
        if self.labels is None:
            raise ValueError("This sorting has no labels (unit assignments) yet.")
        return self.labels

    def segment_times(self):
        """(segment index, sample within that segment) of each spike."""
        if self.segment_lengths is None:
            return np.zeros(len(self), dtype=np.int64), self.times_samples.astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(self.segment_lengths)[:-1]])
        segment = np.searchsorted(starts, self.times_samples, side="right") - 1
        return segment, (self.times_samples - starts[segment]).astype(np.int64)

    def to_numpy_sorting(self):
        """SpikeInterface NumpySorting, one segment per recording segment; spikes with
        label < 0 (unassigned) are dropped."""
        from spikeinterface.core import NumpySorting

        labels = self._labels_or_raise()
        keep = np.flatnonzero(labels >= 0)
        keep = keep[np.argsort(self.times_samples[keep], kind="stable")]
        segment, times = self.segment_times()
        n_segments = 1 if self.segment_lengths is None else len(self.segment_lengths)
        in_seg = [keep[segment[keep] == s] for s in range(n_segments)]
        sorting = NumpySorting.from_samples_and_labels(
            [times[k] for k in in_seg], [labels[k].astype(np.int64) for k in in_seg], self.sampling_frequency,
            unit_ids=self.unit_ids,
        )
        # NumpySorting counts segments up to the last one holding a spike; trailing empty
        # segments (or an empty sorting) must still be there to match the recording
        from spikeinterface.core.numpyextractors import SpikeVectorSortingSegment

        for s in range(sorting.get_num_segments(), n_segments):
            sorting.add_sorting_segment(SpikeVectorSortingSegment(sorting.to_spike_vector(), s, sorting.unit_ids))
        return sorting

    def to_pandas(self):
        """DataFrame of times, channels, labels (-1 if none) and every 1-D per-spike feature."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError(f"to_pandas() needs pandas: {_FULL_EXTRA}") from err
        n = len(self)
        labels = self.labels if self.labels is not None else np.full(n, -1, dtype=np.int64)
        columns = {
            "times_samples": self.times_samples,
            "times_seconds": self.times_seconds,
            "channels": self.channels,
            "labels": labels,
        }
        for name, value in self.features().items():
            value = np.asarray(value)
            if name not in PROBE_DATASETS and value.shape == (n,):
                columns[name] = value
        locs = self.features().get("point_source_localizations")
        if locs is not None and locs.ndim == 2 and locs.shape[0] == n:
            for j, col in enumerate(("x", "y", "z", "alpha")[: locs.shape[1]]):
                columns[col] = locs[:, j]
        return pd.DataFrame(columns)

    def to_tsgroup(self, weight_key=None):
        """pynapple TsGroup, one entry per unit: Tsd of feature `weight_key` if given, else Ts."""
        try:
            import pynapple as nap
        except ImportError as err:
            raise ImportError(f"to_tsgroup() needs pynapple: {_FULL_EXTRA}") from err
        labels = self._labels_or_raise()
        times = self.times_seconds
        weights = None if weight_key is None else np.asarray(getattr(self, weight_key))
        end = (times.max() if len(self) else 0.0) + 1.0 / self.sampling_frequency
        # one shared support: single-spike units would otherwise get a zero-length epoch
        support = nap.IntervalSet(start=0.0, end=end)
        units = {}
        for unit in self.unit_ids:
            idx = np.flatnonzero(labels == unit)
            idx = idx[np.argsort(times[idx], kind="stable")]
            if weights is None:
                units[int(unit)] = nap.Ts(t=times[idx], time_support=support)
            else:
                units[int(unit)] = nap.Tsd(t=times[idx], d=weights[idx], time_support=support)
        return nap.TsGroup(units, time_support=support)

    # -- features

    def add_ephemeral_feature(self, feature_name, feature, check_shape=None, overwrite=False):
        """Register an in-memory feature (saved in the .npz, not in the .h5).

        check_shape (default on) requires feature.shape[0] == number of spikes.
        """
        feature = to_numpy(feature)
        if check_shape is None or check_shape:
            if feature.ndim == 0 or feature.shape[0] != len(self):
                raise ValueError(
                    f"Feature {feature_name!r} has shape {feature.shape}, "
                    f"expected first axis {len(self)}."
                )
        if feature_name in self.features() and not overwrite:
            raise ValueError(f"Feature {feature_name!r} exists; pass overwrite=True to replace it.")
        if feature_name in CORE_NAMES or hasattr(type(self), feature_name):
            raise ValueError(f"Feature name {feature_name!r} clashes with a DARTsortSorting attribute.")
        self.ephemeral_features[feature_name] = feature

    def _h5_writable(self):
        h5 = self.parent_h5_path
        return (
            h5 is not None and self._h5_index is None and h5.exists()
            and os.access(h5, os.W_OK)
        )

    def add_feature(self, name, feature):
        """Write a per-spike feature into the parent h5 if possible, else keep it ephemeral."""
        feature = to_numpy(feature)
        if feature.ndim == 0 or feature.shape[0] != len(self):
            raise ValueError(f"Feature {name!r} has shape {feature.shape}, expected first axis {len(self)}.")
        if name in CORE_NAMES + PROBE_DATASETS or hasattr(type(self), name):
            raise ValueError(f"Feature name {name!r} is reserved.")
        if self._h5_writable():
            try:
                with h5py.File(self.parent_h5_path, "r+") as h5:
                    if name in h5:
                        del h5[name]
                    h5.create_dataset(name, data=feature)
                record_size(self.parent_h5_path)  # a changed size is ours, not damage
                self.persistent_features[name] = feature
                self.ephemeral_features.pop(name, None)
                return
            except OSError as err:  # locked or read-only file system
                warnings.warn(f"Could not write {name!r} to {self.parent_h5_path} ({err}); keeping it in memory.")
        self.add_ephemeral_feature(name, feature, overwrite=True)

    def ephemeral_replace(self, **new_features):
        """Shallow copy with some arrays replaced (features, or labels/times_samples/channels)."""
        new = copy.copy(self)
        new.persistent_features = dict(self.persistent_features)
        new.ephemeral_features = dict(self.ephemeral_features)
        for name, value in new_features.items():
            if name in CORE_NAMES:
                setattr(new, name, None if value is None else to_numpy(value))
            else:
                new.ephemeral_features[name] = to_numpy(value)
        new._check()
        return new

    def _subset(self, indices):
        """New sorting keeping spikes `indices`; features are subset in memory."""
        n = len(self)

        def take(store):
            return {
                k: (v[indices] if k not in PROBE_DATASETS and np.ndim(v) >= 1 and len(v) == n else v)
                for k, v in store.items()
            }

        new = self.ephemeral_replace(
            times_samples=self.times_samples[indices],
            channels=self.channels[indices],
            labels=None if self.labels is None else self.labels[indices],
        )
        new.persistent_features = take(self.persistent_features)
        new.ephemeral_features = take(self.ephemeral_features)
        old_index = np.arange(n) if self._h5_index is None else self._h5_index
        new._h5_index = old_index[indices]
        return new

    def drop_doubles(self):
        """Remove spikes at the exact same time as an earlier spike of the same unit."""
        if self.labels is None or len(self) < 2:
            return self.ephemeral_replace()
        order = np.lexsort((self.times_samples, self.labels))  # stable: first occurrence wins
        times, labels = self.times_samples[order], self.labels[order]
        double = (np.diff(times) == 0) & (np.diff(labels) == 0) & (labels[1:] >= 0)
        keep = np.ones(len(self), dtype=bool)
        keep[order[1:][double]] = False
        return self._subset(np.flatnonzero(keep))

    # -- persistence

    @classmethod
    def from_peeling_hdf5(cls, h5_path, *, times_samples_dataset="times_samples",
                          channels_dataset="channels", labels_dataset="labels",
                          load_feature_names=None, load_simple_features=True,
                          load_all_features=False, allow_missing=False):
        """Load a sorting from a peeler's .h5 (see the module docstring for the format)."""
        h5_path = Path(h5_path)
        with h5py.File(h5_path, "r") as h5:
            for name in (times_samples_dataset, channels_dataset):
                if name not in h5:
                    raise KeyError(f"Dataset {name!r} not found in {h5_path}.")
            times = h5[times_samples_dataset][()]
            channels = h5[channels_dataset][()]
            labels = None
            if labels_dataset in h5:
                labels = h5[labels_dataset][()]
            elif labels_dataset != "labels" and not allow_missing:
                # a labels dataset the caller named on purpose is required
                raise KeyError(f"Dataset {labels_dataset!r} not found in {h5_path}.")
            if "sampling_frequency" in h5.attrs:
                fs = float(h5.attrs["sampling_frequency"])
            else:
                fs = 30000.0
                warnings.warn(f"{h5_path} has no sampling_frequency attribute; assuming {fs} Hz.")
            skip = (times_samples_dataset, channels_dataset, labels_dataset)
            names = _h5_feature_names(
                h5, len(times), skip, load_feature_names, load_simple_features,
                load_all_features, allow_missing,
            )
            features = _read_h5_features(h5, names)
        return cls(
            times_samples=times, channels=channels, labels=labels, parent_h5_path=h5_path,
            sampling_frequency=fs, persistent_features=features,
        )

    def save(self, sorting_npz):
        """Save to .npz: core arrays, ephemeral features, and a relative pointer to the h5.

        Persistent features are stored in the npz too when there is no parent h5 to
        reload them from.
        """
        sorting_npz = Path(sorting_npz)
        arrays = {
            "format": np.array(SORTING_FORMAT),
            "times_samples": self.times_samples,
            "channels": self.channels,
            "sampling_frequency": np.array(self.sampling_frequency),
        }
        if self.segment_lengths is not None:
            arrays["segment_lengths"] = self.segment_lengths
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.parent_h5_path is not None:
            arrays["parent_h5_path"] = np.array(_relative_path(self.parent_h5_path, sorting_npz.parent))
            if self._h5_index is not None:
                arrays["h5_index"] = self._h5_index
        else:
            arrays.update({_PERSISTENT + k: np.asarray(v) for k, v in self.persistent_features.items()})
        arrays.update({_EPHEMERAL + k: np.asarray(v) for k, v in self.ephemeral_features.items()})
        atomic_savez(sorting_npz, **arrays)

    @classmethod
    def load(cls, sorting_npz, additional_persistent_features=None,
             load_ephemeral_feature_names=None, load_persistent_feature_names=None):
        """Load from a .npz written by `save`, reloading persistent features from the h5."""
        sorting_npz = Path(sorting_npz)
        data = _read_sorting_npz(sorting_npz)
        ephemeral = {
            k[len(_EPHEMERAL):]: v for k, v in data.items() if k.startswith(_EPHEMERAL)
        }
        if load_ephemeral_feature_names is not None:
            ephemeral = {k: v for k, v in ephemeral.items() if k in load_ephemeral_feature_names}
        persistent = {
            k[len(_PERSISTENT):]: v for k, v in data.items() if k.startswith(_PERSISTENT)
        }
        h5_path = None
        if "parent_h5_path" in data:
            h5_path = sorting_npz.parent / str(data["parent_h5_path"])
            if h5_path.exists():
                persistent.update(_load_persistent(
                    h5_path, data, additional_persistent_features, load_persistent_feature_names
                ))
            else:
                warnings.warn(f"Parent h5 {h5_path} of {sorting_npz} is missing; no persistent features.")
                h5_path = None
        sorting = cls(
            times_samples=data["times_samples"], channels=data["channels"],
            labels=data.get("labels"), parent_h5_path=h5_path,
            sampling_frequency=float(data["sampling_frequency"]),
            persistent_features=persistent, ephemeral_features=ephemeral,
            segment_lengths=data.get("segment_lengths"),
        )
        if h5_path is not None and "h5_index" in data:
            sorting._h5_index = data["h5_index"]
        return sorting


def _read_sorting_npz(path):
    """The npz's arrays, or a ValueError if it is not a DARTsortSorting npz."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, AttributeError) as err:
        raise ValueError(f"{path} is not a DARTsortSorting .npz file ({err}).") from err
    missing = [k for k in ("times_samples", "channels", "sampling_frequency") if k not in data]
    if missing:
        raise ValueError(f"{path} is not a DARTsortSorting .npz file: missing {missing}.")
    return data


def _load_persistent(h5_path, data, additional, names):
    """Persistent features from the h5, aligned with the npz's spikes."""
    h5_index = data.get("h5_index")
    with h5py.File(h5_path, "r") as h5:
        n_h5 = h5["times_samples"].shape[0]
        # a rewritten h5 (e.g. a rerun) would silently misalign features: refuse instead
        fits = n_h5 == len(data["times_samples"]) if h5_index is None else np.all(h5_index < n_h5)
        if not fits:
            raise ValueError(f"{h5_path} ({n_h5} spikes) does not match the spikes in the npz.")
        skip = CORE_NAMES
        chosen = _h5_feature_names(h5, n_h5, skip, names=names)
        if additional:
            chosen += [k for k in _h5_feature_names(h5, n_h5, skip, names=list(additional)) if k not in chosen]
        return _read_h5_features(h5, chosen, h5_index)
