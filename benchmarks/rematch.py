"""Redo the steps after clustering (templates, matching, leftovers) on a benchmark run's saved
steps, and compare each ground-truth unit with the stored result: a change to matching measured
on the same subtraction and clustering, in a minute per case instead of a whole sort.

    python benchmarks/rematch.py static_np1_60s_128ch_40u_seed1 [more cases] [--from matching1]

A case is a folder of run_benchmark.py's cache (benchmarks/cache/runs/<case>/dartsort, written
by a benchmark run of dartsort). Its output folder is copied to benchmarks/cache/rematch/<case>,
the files of the steps from --from on are removed there, and dartsort resumes with the stored
config (n_jobs as in the benchmark run). Printed per case: every ground-truth unit whose
accuracy changed by more than 0.05 or stays under 0.8 (with SNR, recall, precision), then a
RESULT line: well detected before -> after, detectable (SNR >= 5) well detected, units.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import spikeinterface.full as si

from dartsort_si import dartsort
from run_benchmark import DEFAULT_CACHE

# the files of each step and of every step after it, in pipeline order
STEP_FILES = {
    "templates1": ["templates1.npz"],
    "matching1": ["matching1.h5", "matched_templates1.npz"],
    "final": ["dartsort_sorting.npz"],
}


def rematch(case: str, cache: Path, first_step: str) -> str:
    runs, gt_dir = cache / "runs" / case, cache / "gt" / case
    src = runs / "dartsort" / "sorter" / "sorter_output" / "dartsort"
    work = cache / "rematch" / case
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src, work)
    steps = list(STEP_FILES)
    for step in steps[steps.index(first_step):]:
        for name in STEP_FILES[step]:
            (work / name).unlink(missing_ok=True)
    config = json.loads((work / "dartsort_si.json").read_text())["config"]
    rec = si.load(gt_dir / "recording")
    gt = si.NpzSortingExtractor(gt_dir / "gt_sorting.npz")
    snr = json.loads((gt_dir / "gt_snr.json").read_text())
    snrs = np.array([snr[str(u)] for u in gt.unit_ids])
    after = dartsort(rec, work, config)["sorting"].to_numpy_sorting()
    before = si.NpzSortingExtractor(runs / "dartsort" / "sorting.npz")
    old = si.compare_sorter_to_ground_truth(gt, before, exhaustive_gt=True).get_performance()["accuracy"]
    perf = si.compare_sorter_to_ground_truth(gt, after, exhaustive_gt=True).get_performance()
    new = perf["accuracy"]
    for u, s in zip(gt.unit_ids, snrs):
        if abs(new[u] - old[u]) > 0.05 or new[u] < 0.8:
            print(f"  gt {u}: SNR {s:.1f}, accuracy {old[u]:.2f} -> {new[u]:.2f} "
                  f"(recall {perf['recall'][u]:.2f}, precision {perf['precision'][u]:.2f})")
    well_old, well_new = old.to_numpy(float) >= 0.8, new.to_numpy(float) >= 0.8
    return (f"RESULT {case}: well detected {well_old.sum()} -> {well_new.sum()}; detectable "
            f"{(well_new & (snrs >= 5)).sum()}/{(snrs >= 5).sum()}; units {after.get_num_units()}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="+")
    p.add_argument("--from", dest="first_step", choices=list(STEP_FILES), default="matching1",
                   help="first step to redo (default: matching1)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args()
    lines = [rematch(case, args.cache_dir, args.first_step) for case in args.cases]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
