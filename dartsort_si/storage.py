"""Atomic writes: write to a temporary name in the same folder, flush to disk, then rename.

A killed run never leaves a half-written file that a resume would trust. In an output folder
(one that holds MANIFEST), each file written so is also recorded with its size, in write order:
a file whose size changed since (truncated by a full disk, a copy cut short) is found on resume
by `drop_damaged`, removed with every file written after it, and so recomputed, never read back.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

logger = logging.getLogger("dartsort_si")

MANIFEST = "file_sizes.json"


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        record_size(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync(path):
    # the data must be on disk before the rename makes the file look finished
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_savez(path, compressed=False, **arrays):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)


def to_numpy(x):
    """x as a numpy array (a torch tensor, on any device, is copied to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def atomic_write_json(path, obj):
    """Bookkeeping JSON (not recorded in the manifest: it is rewritten on every call)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def start_manifest(folder):
    manifest = Path(folder) / MANIFEST
    if not manifest.exists():
        atomic_write_json(manifest, [])


def _read_manifest(folder) -> list:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return []


def record_size(path):
    """Note `path`'s size in its folder's manifest (only in output folders, which have one)."""
    path = Path(path)
    if not (path.parent / MANIFEST).exists():
        return
    entries = [e for e in _read_manifest(path.parent) if e[0] != path.name]
    entries.append([path.name, path.stat().st_size])
    atomic_write_json(path.parent / MANIFEST, entries)


def drop_damaged(folder) -> list[str]:
    """Remove files whose size differs from the one recorded, and every file written after the
    first of them (they were computed from it); returns the removed names."""
    folder = Path(folder)
    for stale in folder.glob(".*.tmp*"):  # temp files of a killed run
        stale.unlink()
    entries = _read_manifest(folder)
    damaged = next((i for i, (name, size) in enumerate(entries)
                    if (folder / name).exists() and (folder / name).stat().st_size != size), None)
    if damaged is None:
        return []
    removed = [name for name, _ in entries[damaged:] if (folder / name).exists()]
    logger.warning("dartsort: %s is damaged (its size changed since it was written); recomputing it "
                   "and the %d file(s) written after it.", entries[damaged][0], len(removed) - 1)
    for name in removed:
        (folder / name).unlink()
    atomic_write_json(folder / MANIFEST, entries[:damaged])
    return removed
