"""A sort killed (SIGKILL) in every step resumes to exactly the uninterrupted result, and a
damaged step file is recomputed, never read back."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import dartsort_si
from dartsort_si import dartsort
from dartsort_si.storage import MANIFEST

from conftest import FAST_PARAMS

# (step, seconds into it when the kill comes): quick steps are killed as they start, so the kill
# lands in them and not in the next one
STEPS = [("preprocessing", 0.0), ("fit_models", 0.5), ("subtraction", 1.0), ("motion", 0.0),
         ("clustering", 0.0), ("templates1", 0.0), ("matching1", 0.5)]

CHILD = """
import sys, spikeinterface.full as si
from dartsort_si import dartsort
dartsort(si.load(sys.argv[1]), sys.argv[2], cfg={cfg!r})
"""


def _run_until(step, delay_s, rec_folder, out, timeout_s=300):
    """Run a resume in a child; SIGKILL it `delay_s` after it logs that `step` started.
    Returns the steps it logged starting, and whether it was killed (False: it finished)."""
    code = CHILD.format(cfg=FAST_PARAMS)
    proc = subprocess.Popen([sys.executable, "-c", code, str(rec_folder), str(out)], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    started, deadline = [], time.time() + timeout_s
    for line in proc.stderr:
        if line.strip().endswith("..."):
            started.append(line.split("dartsort: ")[-1].rstrip(". \n"))
        if step in started:
            if delay_s:
                time.sleep(delay_s)
            proc.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline
    proc.wait(timeout=timeout_s)
    return started, proc.returncode == -signal.SIGKILL


def test_killed_in_every_step_resumes_exactly(sorted_with_run_sorter, gt_data, tmp_path):
    _, folder = sorted_with_run_sorter
    rec, _, info = gt_data
    reference = dartsort_si.DARTsortSorting.load(folder / "sorter_output" / "dartsort" / "dartsort_sorting.npz")
    rec_folder = tmp_path / "rec"
    rec.save(folder=rec_folder, n_jobs=1, progress_bar=False)
    out = tmp_path / "out"
    killed_in = []
    for step, delay in STEPS:
        started, killed = _run_until(step, delay, rec_folder, out)
        if killed:
            killed_in.append(started[-1])
    # each resume redid the killed step and got killed in the next one
    assert killed_in == [s for s, _ in STEPS]
    result = dartsort(rec, out, cfg=FAST_PARAMS)["sorting"]
    np.testing.assert_array_equal(result.times_samples, reference.times_samples)
    np.testing.assert_array_equal(result.labels, reference.labels)
    assert not list(out.glob(".*.tmp*"))


def test_truncated_step_file_is_recomputed(sorted_with_run_sorter, gt_data, tmp_path, caplog):
    import shutil

    _, folder = sorted_with_run_sorter
    rec, _, _ = gt_data
    out = shutil.copytree(folder / "sorter_output" / "dartsort", tmp_path / "copy")
    reference = dartsort_si.DARTsortSorting.load(out / "dartsort_sorting.npz")
    names = [n for n, _ in json.loads((out / MANIFEST).read_text())]
    assert names.index("subtraction.h5") < names.index("initial_labels.npz") < names.index("matching1.h5")
    kept = (out / "models.pt").stat().st_mtime_ns
    # a full disk cut the file short: the resume must not read it back
    path = out / "initial_labels.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="dartsort_si"):
        result = dartsort(rec, out, cfg=FAST_PARAMS)["sorting"]
    assert any("initial_labels.npz is damaged" in r.getMessage() for r in caplog.records)
    assert (out / "models.pt").stat().st_mtime_ns == kept
    np.testing.assert_array_equal(result.times_samples, reference.times_samples)
    np.testing.assert_array_equal(result.labels, reference.labels)


def test_same_result_twice_and_with_two_workers(sorted_with_run_sorter, gt_data, tmp_path):
    _, folder = sorted_with_run_sorter
    rec, _, _ = gt_data
    reference = dartsort_si.DARTsortSorting.load(folder / "sorter_output" / "dartsort" / "dartsort_sorting.npz")
    for run, n_jobs in [("again", 0), ("two_workers", 2)]:
        result = dartsort(rec, tmp_path / run, cfg={**FAST_PARAMS, "n_jobs_cpu": n_jobs})["sorting"]
        np.testing.assert_array_equal(result.times_samples, reference.times_samples, err_msg=run)
        np.testing.assert_array_equal(result.labels, reference.labels, err_msg=run)
