#!/usr/bin/env python
r"""Recordings as labs have them: small generated ground truth that is not a Neuropixels 30 kHz
single-segment float recording, sorted by dartsort-si and the peers on the same data.

Cases (SpikeInterface's `generate_ground_truth_recording`, default unit and template parameters,
25 kHz unless named otherwise):
    fs15k, fs20k, fs50k   32 ch, 20 s, 8 units at 15, 20 and 50 kHz
    tetrode               4 ch tetrode, 20 s, 3 units
    linear16              16 ch single-column probe (irregular pitch), 20 s, 5 units
    dead_noisy            32 ch, 20 s, 8 units; one flat channel, one with 10x the noise, one clipped
    int16_gains           32 ch, 20 s, 8 units, stored as int16 with gains to uV
    two_segments          32 ch, two segments of 15 s, 8 units
    noise_only            32 ch, 20 s, no units (the sort must end with an empty sorting)

Each sorter runs in its own subprocess (run_benchmark.run_in_subprocess: wall time, peak memory).
Peers' results are reused when the same case, seed and SpikeInterface version were run before.

    python benchmarks/lab_recordings.py --seeds 1,2,3
    python benchmarks/lab_recordings.py --cases tetrode,fs20k --sorters dartsort --seeds 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_benchmark as rb  # noqa: E402

from dartsort_si.ground_truth import lab_recording  # noqa: E402

CASES = ("fs15k", "fs20k", "fs50k", "tetrode", "linear16", "dead_noisy", "int16_gains", "two_segments",
         "noise_only")
SORTERS = ("dartsort", "spykingcircus2", "tridesclous2")
CACHE = HERE / "cache" / "lab"


def prepare(name: str, seed: int) -> Path:
    """Save the case once under benchmarks/cache/lab/<name>_s<seed>/ (recording/ and gt.npz)."""
    import spikeinterface.full as si

    folder = CACHE / f"{name}_s{seed}"
    if not (folder / "done").exists():
        rec, gt = lab_recording(name, seed)
        rec.save(folder=folder / "recording", overwrite=True, n_jobs=1, progress_bar=False)
        si.NpzSortingExtractor.write_sorting(gt, folder / "gt.npz")
        (folder / "done").write_text("")
    return folder


def run(name: str, seed: int, sorter: str, n_jobs: int, reuse: bool) -> dict:
    import spikeinterface.full as si

    folder = prepare(name, seed)
    out = folder / sorter
    key = rb.reuse_key(sorter, {}, n_jobs)
    res = rb.load_reusable(out, key) if reuse and sorter != rb.OURS else None
    if res is None:
        res = rb.run_in_subprocess("sorter", sorter, folder / "recording", out, n_jobs=n_jobs, timeout=900)
        rb.save_run_stats(out, res, key)
    row = dict(case=name, seed=seed, sorter=sorter, status=res["status"], wall_s=res.get("wall_s"),
               peak_gb=res.get("peak_mem_gb"))
    if res["status"] != "ok":
        row["error"] = (res.get("error") or "").strip().splitlines()[-1:]
        return row
    gt = si.read_npz_sorting(folder / "gt.npz")
    sorting = si.read_npz_sorting(res["sorting_path"])
    row["units_out"] = len(sorting.unit_ids)
    if len(gt.unit_ids) == 0:
        row["well"] = row["gt_units"] = 0
        row["spikes_out"] = int(sum(len(sorting.get_unit_spike_train(u, segment_index=s))
                                    for u in sorting.unit_ids for s in range(sorting.get_num_segments())))
        return row
    cmp = si.compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True)
    row["well"] = int(cmp.count_well_detected_units(rb.WELL_DETECTED))
    row["gt_units"] = len(gt.unit_ids)
    return row


def cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return f"{row['status']}: {' '.join(row.get('error') or [])[:60]}"
    wall = f", {row['wall_s']:.0f} s" if row.get("wall_s") else ""
    if row["gt_units"] == 0:
        return f"{row['units_out']} units, {row['spikes_out']} spikes{wall}"
    return f"{row['well']}/{row['gt_units']}{wall}"


def table(rows: list[dict], sorters) -> str:
    lines = ["| case | seed | " + " | ".join(sorters) + " |", "|---|---|" + "---|" * len(sorters)]
    keys = sorted({(r["case"], r["seed"]) for r in rows}, key=lambda k: (CASES.index(k[0]), k[1]))
    for case, seed in keys:
        cells = [cell(next((r for r in rows if (r["case"], r["seed"], r["sorter"]) == (case, seed, s)), None))
                 for s in sorters]
        lines.append(f"| {case} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--seeds", default="1")
    p.add_argument("--sorters", default=",".join(SORTERS))
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--no-reuse", action="store_true", help="rerun the peers even when a stored run matches")
    p.add_argument("--out", default=str(HERE / "results" / "lab_recordings.md"))
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    sorters = args.sorters.split(",")
    rows = []
    t0 = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for case in cases:
            for sorter in sorters:
                row = run(case, seed, sorter, args.n_jobs, not args.no_reuse)
                print(json.dumps(row), flush=True)
                rows.append(row)
    text = table(rows, sorters)
    print(text)
    Path(args.out).write_text(
        f"# Recordings as labs have them\n\n`python benchmarks/lab_recordings.py --cases {args.cases} "
        f"--seeds {args.seeds} --sorters {args.sorters}` ({time.perf_counter() - t0:.0f} s, "
        f"n_jobs {args.n_jobs}). Cells: well detected / GT units, wall time.\n\n{text}\n")


if __name__ == "__main__":
    main()
