"""Redo the steps after subtraction (clustering, templates, matching, leftovers) on a benchmark
run's saved steps, and compare each ground-truth unit with the stored result: a change to
clustering or matching measured on the same subtraction, in a minute per case instead of a whole
sort.

    python benchmarks/rematch.py static_np1_60s_128ch_40u_seed1 [more cases] [--from matching1]
        [--set matching_threshold=6]

A case is a folder of run_benchmark.py's cache (benchmarks/cache/runs/<case>/dartsort, written
by a benchmark run of dartsort). Its output folder is copied to benchmarks/cache/rematch/<case>,
the files of the steps from --from on are removed there, and dartsort resumes with the stored
config (n_jobs as in the benchmark run). Both sortings are scored as the benchmark scores them
(run_benchmark.score_sorting). Printed per case: every ground-truth unit whose accuracy changed by
more than 0.05 or stays under 0.8 (with its SNR and, when missed, how: absent, merged with which
units, split), then a RESULT line: well detected before -> after, detectable (SNR >= 5) well
detected, units.
"""

import argparse
import json
import shutil
from pathlib import Path

import spikeinterface.full as si

from dartsort_si import dartsort
from run_benchmark import DEFAULT_CACHE, gt_unit_snrs, score_sorting

# the files of each step and of every step after it, in pipeline order
STEP_FILES = {
    "clustering": ["initial_labels.npz"],
    "templates1": ["templates1.npz"],
    "matching1": ["matching1.h5", "matched_templates1.npz"],
    "final": ["dartsort_sorting.npz"],
}


def rematch(case: str, cache: Path, first_step: str, overrides: dict) -> str:
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
    marker = json.loads((work / "dartsort_si.json").read_text())
    config = marker["config"] = marker["config"] | overrides  # the kept steps stay valid
    (work / "dartsort_si.json").write_text(json.dumps(marker))
    rec = si.load(gt_dir / "recording")
    gt = si.NpzSortingExtractor(gt_dir / "gt_sorting.npz")
    snrs = gt_unit_snrs(rec, gt, gt_dir)
    after = dartsort(rec, work, config)["sorting"].to_numpy_sorting()
    before = score_sorting(gt, si.NpzSortingExtractor(runs / "dartsort" / "sorting.npz"), snrs)
    now = score_sorting(gt, after, snrs)
    old = dict(zip(before["per_unit"]["unit_ids"], before["per_unit"]["accuracy"]))
    lost = {loss["unit"]: loss for loss in now["losses"]}
    for unit, acc in zip(now["per_unit"]["unit_ids"], now["per_unit"]["accuracy"]):
        if abs(acc - old[unit]) > 0.05 or unit in lost:
            how = {k: v for k, v in lost.get(unit, {}).items() if k in ("kind", "with_gt", "n_units")}
            print(f"  gt {unit}: SNR {snrs[unit]:.1f}, accuracy {old[unit]:.2f} -> {acc:.2f} {how or ''}")
    return (f"RESULT {case}: well detected {before['well_detected']} -> {now['well_detected']}; detectable "
            f"{now['detectable_well_detected']}/{now['n_detectable']}; units {now['n_units']}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="+")
    p.add_argument("--from", dest="first_step", choices=list(STEP_FILES), default="matching1",
                   help="first step to redo (default: matching1)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config field to change for the redone steps (value as JSON), repeatable")
    args = p.parse_args()
    overrides = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    lines = [rematch(case, args.cache_dir, args.first_step, overrides) for case in args.cases]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
