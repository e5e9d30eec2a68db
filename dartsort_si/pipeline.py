"""The `dartsort()` function: every stage in order, each persisted in output_dir.

A step whose output file exists is skipped on the next call (resume); files
are written atomically, so a killed run restarts at the step it was in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from . import __version__
from .allocation import memory_kept_in_process
from .config import DARTsortUserConfig, load_config
from .motion_info import MotionInfo
from .sorting import DARTsortSorting
from .denoisers import check_denoiser_config
from .preprocessing import (cache_in_memory, check_recording, check_standardized, join_segments, preprocess,
                            segment_lengths)
from .storage import atomic_write_json, drop_damaged, start_manifest
from .subtraction import Geometry, SnippetWindow

logger = logging.getLogger("dartsort_si")


def _ensure_log_output():
    """Show our INFO lines (stage starts/ends, counts) unless the user configured logging."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

MARKER = "dartsort_si.json"
LOG_NAME = "dartsort.log"  # the command line's log; kept on overwrite
# fields that change how fast we run, not what we find: a resume may change them
_RUNTIME_FIELDS = {
    "dredge_only", "n_jobs_cpu", "n_jobs_gpu", "n_jobs_small", "n_jobs_small_gpu", "device",
    "executor", "work_in_tmpdir", "copy_recording_to_tmpdir", "workdir_copier", "tmpdir_parent",
    "save_intermediates", "save_final_features", "matching_iterations",
}


class DARTsortReturn(dict):
    """dict with keys 'sorting' (DARTsortSorting or None for dredge_only), 'motion'
    (MotionInfo or None when motion is off) and 'si_motion' (spikeinterface Motion or None)."""


INITIAL_DETECTIONS = ("subtraction", "threshold")


def dartsort(recording, output_dir, cfg=None, motion: MotionInfo | None = None, si_motion=None,
             dredge_motion_est=None, overwrite=False, *, initial_detection="subtraction") -> DARTsortReturn:
    """Sort `recording`, storing every step's result in `output_dir`.

    cfg: a DARTsortUserConfig, a dict of its fields, or a path to a .toml/.json file.
    motion / si_motion / dredge_motion_est: an external motion estimate to use
    instead of running DREDge. overwrite=False resumes from the last finished
    step (and does nothing if all finished); overwrite=True redoes everything.
    initial_detection: "subtraction" (the algorithm), or "threshold": plain threshold
    crossings with the same features and no subtraction, for measuring what
    subtraction brings (benchmarks/detection_recall.py).
    """
    if initial_detection not in INITIAL_DETECTIONS:
        raise ValueError(f"initial_detection must be one of {INITIAL_DETECTIONS}, not {initial_detection!r}.")
    _ensure_log_output()
    cfg = load_config(cfg)
    check_recording(recording, cfg.chunk_length_samples)
    check_denoiser_config(cfg.nn_denoiser_class_name, cfg.nn_denoiser_pretrained_path,
                          SnippetWindow.from_config(cfg, recording.sampling_frequency).length,
                          recording.sampling_frequency)
    output_dir = Path(output_dir).absolute()
    prepare_output_dir(output_dir, cfg, overwrite)
    if not cfg.work_in_tmpdir:
        return _run(recording, output_dir, cfg, motion, si_motion, dredge_motion_est, initial_detection)
    with tempfile.TemporaryDirectory(dir=cfg.tmpdir_parent, prefix="dartsort_") as tmp:
        work = Path(tmp) / "work"
        _copy_tree(output_dir, work, cfg.workdir_copier)
        _run(recording, work, cfg, motion, si_motion, dredge_motion_est, initial_detection)
        _copy_tree(work, output_dir, cfg.workdir_copier)
    # reload from output_dir so h5 pointers point there, not into the deleted tmpdir
    return _run(recording, output_dir, cfg, motion, si_motion, dredge_motion_est, initial_detection)


def _copy_tree(src: Path, dst: Path, copier: str):
    if copier == "rsync" and shutil.which("rsync"):
        import subprocess

        dst.mkdir(parents=True, exist_ok=True)
        subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)
    else:
        shutil.copytree(src, dst, dirs_exist_ok=True)


# -- output folder bookkeeping

def check_output_dir(output_dir: Path):
    """Refuse a folder that holds something other than a dartsort-si output."""
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ValueError(f"{output_dir} is a file; pick a folder for the output.")
    others = [p for p in output_dir.iterdir() if p.name != LOG_NAME]
    if others and not (output_dir / MARKER).exists():
        raise ValueError(
            f"{output_dir} exists, is not empty and is not a dartsort-si output folder; "
            "refusing to write into it. Pick a new or empty folder."
        )


def prepare_output_dir(output_dir: Path, cfg: DARTsortUserConfig, overwrite: bool):
    """Refuse folders that are not ours; on overwrite, remove only our own files."""
    marker = output_dir / MARKER
    check_output_dir(output_dir)
    if marker.exists() and overwrite:
        for p in output_dir.iterdir():
            if p.name not in (MARKER, LOG_NAME):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif marker.exists():
        old = json.loads(marker.read_text()).get("config", {})
        new = cfg.to_dict()
        changed = sorted(k for k in new if k not in _RUNTIME_FIELDS and old.get(k) != new[k])
        if changed:
            raise ValueError(
                f"{output_dir} holds results computed with different settings ({', '.join(changed)}); "
                "pass overwrite=True to recompute, or use another folder."
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"dartsort_si_version": __version__, "config": cfg.to_dict()})
    start_manifest(output_dir)
    drop_damaged(output_dir)


def job_kwargs_from_config(cfg: DARTsortUserConfig, device: torch.device) -> dict:
    n = cfg.n_jobs_gpu if device.type == "cuda" else cfg.n_jobs_cpu
    if n == 0:
        n = 1
    elif n < 0:
        n = max(1, (os.cpu_count() or 1) + 1 + n)
    engine = "process" if cfg.executor == "ProcessPoolExecutor" else "thread"
    # BLAS and OpenMP pools are per process: thread workers share one, limited once for the whole
    # sort (_run). Limited per chunk, as SpikeInterface does for max_threads_per_worker,
    # threadpoolctl scanned the loaded libraries on every chunk (see chunk_limits_off)
    per_worker = max(1, (os.cpu_count() or 1) // n)
    return dict(n_jobs=n, chunk_size=cfg.chunk_length_samples, pool_engine=engine, progress_bar=True,
                max_threads_per_worker=per_worker if engine == "process" else None)


@contextmanager
def chunk_limits_off(job_kwargs):
    """Within: SpikeInterface's chunk executors leave the BLAS/OpenMP pools alone around each
    chunk when job_kwargs asks for no per-worker limit (thread workers; _run limits the pools
    once for the whole sort). Its fix_job_kwargs drops a None given at the call for the global
    default (1), and a limit makes threadpoolctl scan the loaded libraries on every chunk: 2.5%
    of a 300 s x 128 ch sort's CPU samples (py-spy), ~7 ms per chunk. So the global default is
    None while we sort, and restored after."""
    from spikeinterface.core import globals as si_globals

    if job_kwargs.get("max_threads_per_worker") is not None:
        yield
        return
    kwargs = si_globals.global_job_kwargs
    old = kwargs.get("max_threads_per_worker")
    kwargs["max_threads_per_worker"] = None
    try:
        yield
    finally:
        kwargs["max_threads_per_worker"] = old


def resolve_device(cfg) -> torch.device:
    if cfg.device is not None:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={cfg.device!r} was asked for but CUDA is not available.")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Timer:
    """Wall time per stage, logged and saved as timings.json (benchmark profile mode reads it)."""

    def __init__(self, path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()
                logger.info("dartsort: %s ...", name)

            def __exit__(self, *exc):
                if exc[0] is not None:
                    return
                elapsed = time.perf_counter() - self.t0
                logger.info("dartsort: %s done in %.1f s", name, elapsed)
                if name not in timer.times:  # keep the first run's figure; a resume redoes only cheap steps
                    timer.times[name] = elapsed
                    atomic_write_json(timer.path, timer.times)

        return _Ctx()


# -- the steps

def _empty_result(recording, final, why) -> DARTsortReturn:
    logger.warning("dartsort: %s", why)
    if not final.exists():
        DARTsortSorting(times_samples=np.zeros(0, np.int64), channels=np.zeros(0, np.int64),
                        labels=np.zeros(0, np.int64), sampling_frequency=recording.sampling_frequency,
                        segment_lengths=segment_lengths(recording),
                        ephemeral_features=dict(point_source_localizations=np.zeros((0, 4)))).save(final)
    return DARTsortReturn(sorting=DARTsortSorting.load(final), motion=None, si_motion=None)


def _run(recording, out: Path, cfg, motion, si_motion, dredge_motion_est, initial_detection) -> DARTsortReturn:
    device = resolve_device(cfg)
    job_kwargs = job_kwargs_from_config(cfg, device)
    # torch's own thread pool ignores SpikeInterface's per-worker limits: n_jobs workers
    # with a full pool each oversubscribe the cores (measured 3-5x slower on 2 cores)
    threads = torch.get_num_threads()
    per_worker = max(1, (os.cpu_count() or 1) // job_kwargs["n_jobs"])
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(threads, per_worker)))
    try:
        with threadpool_limits(limits=per_worker), memory_kept_in_process(), chunk_limits_off(job_kwargs):
            return _run_steps(recording, out, cfg, motion, si_motion, dredge_motion_est, device, job_kwargs,
                              initial_detection)
    finally:
        torch.set_num_threads(threads)


def _run_steps(recording, out, cfg, motion, si_motion, dredge_motion_est, device, job_kwargs, initial_detection):
    from . import steps

    timer = Timer(out / "timings.json")
    with timer("preprocessing"):
        rec = join_segments(preprocess(recording, cfg.preprocessing, cfg.preprocessing_dtype))
        if cfg.preprocessing == "none":
            check_standardized(rec)
        if cfg.copy_recording_to_tmpdir:
            rec = steps.copy_recording(rec, out, cfg, job_kwargs)
        elif not (out / "dartsort_sorting.npz").exists():  # a finished sort resumes without reading
            rec = cache_in_memory(rec, steps.shared_cores(job_kwargs), job_kwargs["chunk_size"],
                                  threads=job_kwargs["pool_engine"] == "thread")
    geom = rec.get_channel_locations()
    window = SnippetWindow.from_config(cfg, rec.sampling_frequency)
    geometry = Geometry.build(geom, cfg, device)
    ctx = steps.Context(rec, out, cfg, device, job_kwargs, geometry, window, timer, initial_detection)

    final = out / "dartsort_sorting.npz"
    try:
        with steps.all_cores(device):
            models = steps.fit_models(ctx)
    except steps.NoSpikes as err:
        return _empty_result(recording, final, f"{err} The sorting is empty.")
    detected = steps.subtract(ctx, models)
    motion_info = steps.motion_step(ctx, detected, motion, si_motion, dredge_motion_est)
    result = DARTsortReturn(sorting=None, motion=motion_info if motion_info.drifting else None,
                            si_motion=motion_info.si_motion if motion_info.drifting else None)
    if cfg.dredge_only:
        return result
    with steps.all_cores(device):
        sorting = steps.initial_clustering(ctx, detected, motion_info, models)
    if sorting.n_units == 0:
        # a quiet recording or one without units: an empty result, not an error
        logger.warning("dartsort: no unit found (%d spikes detected above threshold); the sorting is empty. "
                       "Check that the recording holds spikes and that voltage_threshold (%s) suits it.",
                       len(detected), cfg.voltage_threshold)
    for i in range(1, cfg.matching_iterations + 1 if sorting.n_units else 1):
        sorting = steps.match(ctx, sorting, motion_info, i)
    if not final.exists():
        sorting.segment_lengths = segment_lengths(recording)
        sorting.save(final)
    result["sorting"] = DARTsortSorting.load(final)
    logger.info("dartsort: %d units, %d spikes. Timings: %s", result["sorting"].n_units,
                len(result["sorting"]), {k: round(v, 1) for k, v in timer.times.items()})
    return result
