#!/usr/bin/env python
r"""Peak memory against recording length: a lazily generated recording (SpikeInterface's
`generate_ground_truth_recording` on a Neuropixels 1.0 layout, default unit and template
parameters; traces are computed per chunk and never held in memory) sorted by `dartsort()` with
default parameters in a child process. Peak = the largest summed RSS of the child and its
workers, sampled every 0.25 s.

    python benchmarks/memory_scaling.py --minutes 1,10 --channels 384
    python benchmarks/memory_scaling.py --minutes 1,10 --channels 64 --out /tmp/mem64.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def lazy_recording(minutes: float, channels: int, seed: int, num_units: int | None = None):
    import spikeinterface.full as si

    from dartsort_si.ground_truth import neuropixels_probe

    probe = neuropixels_probe(channels)
    rec, _ = si.generate_ground_truth_recording(durations=[60.0 * minutes], num_channels=channels,
                                                num_units=num_units or max(4, channels // 3), probe=probe, seed=seed)
    return rec


def child(spec_path: str):
    spec = json.loads(Path(spec_path).read_text())
    from dartsort_si import dartsort

    rec = lazy_recording(spec["minutes"], spec["channels"], spec["seed"], spec.get("num_units"))
    t0 = time.perf_counter()
    res = dartsort(rec, spec["out"], cfg=dict(n_jobs_cpu=spec["n_jobs"]))
    Path(spec["out"], "memory_result.json").write_text(json.dumps(
        dict(wall_s=time.perf_counter() - t0, units=int(res["sorting"].n_units), spikes=len(res["sorting"]))))


def measure(minutes: float, channels: int, n_jobs: int, seed: int, workdir: Path, num_units=None) -> dict:
    from run_benchmark import _MemorySampler

    out = workdir / f"sort_{minutes:g}min_{channels}ch"
    spec = workdir / f"spec_{minutes:g}min_{channels}ch.json"
    spec.write_text(json.dumps(dict(minutes=minutes, channels=channels, n_jobs=n_jobs, seed=seed, out=str(out),
                                num_units=num_units)))
    proc = subprocess.Popen([sys.executable, __file__, "--_child", str(spec)], stdout=subprocess.DEVNULL,
                            stderr=open(workdir / f"log_{minutes:g}min.txt", "w"))
    sampler = _MemorySampler(proc.pid, 0.25)
    sampler.start()
    proc.wait()
    sampler.stop()
    row = dict(minutes=minutes, channels=channels, peak_gb=sampler.peak_bytes / 2**30, returncode=proc.returncode)
    result = out / "memory_result.json"
    if result.exists():
        row.update(json.loads(result.read_text()))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", default="1,10")
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-units", type=int, default=None, help="default: a third of the channels")
    p.add_argument("--workdir", default=None, help="keep the sorts and logs here (default: a temporary folder)")
    p.add_argument("--out", default=str(HERE / "results" / "memory_scaling.md"))
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return child(args._child)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dartsort_mem_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for minutes in [float(m) for m in args.minutes.split(",")]:
            rows.append(measure(minutes, args.channels, args.n_jobs, args.seed, workdir, args.num_units))
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| minutes | channels | peak RSS GB | wall s | units | spikes |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['minutes']:g} | {r['channels']} | {r['peak_gb']:.2f} | {r.get('wall_s', float('nan')):.0f} "
                     f"| {r.get('units', '')} | {r.get('spikes', '')} |")
    ratio = rows[-1]["peak_gb"] / rows[0]["peak_gb"] if len(rows) > 1 else 1.0
    text = "\n".join(lines) + f"\n\nPeak RSS ratio, longest / shortest: {ratio:.2f}\n"
    print(text)
    Path(args.out).write_text(f"# Peak memory against recording length\n\n`python benchmarks/memory_scaling.py "
                              f"--minutes {args.minutes} --channels {args.channels} --n-jobs {args.n_jobs}"
                              + (f" --num-units {args.num_units}" if args.num_units else "") + f"`\n\n{text}")


if __name__ == "__main__":
    main()
