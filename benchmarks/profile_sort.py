"""Where a sort's time goes: sort one cached benchmark case, and summarize a py-spy profile of it
by stage and operation.

    py-spy record --subprocesses --rate 25 --format raw -o prof.txt -- \\
        python benchmarks/profile_sort.py sort nonrigid_np1_300s_128ch_40u_seed1 /tmp/prof_out
    python benchmarks/profile_sort.py summary prof.txt

`sort` runs `si.run_sorter("dartsort", ...)` with n_jobs=2 on a recording of
benchmarks/cache/gt (made by run_benchmark.py) and prints the wall time. `summary` prints, for
each stage (the chunked nodes run in worker threads, whose stacks do not show the step that
started them, so a stage is named by the function its samples pass through), its share of the
samples and the operations with the most samples inside it: self time per function, and the
lines of the stage's main function with what they called.
"""

import argparse
import collections
import re
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# stage -> a function every sample of it passes through
STAGES = {
    "preprocessing": r"^(cache_in_memory|preprocess)[ .]",
    "fit_models": r"^fit_models ",
    "subtraction": r"^SubtractionPeeler\.compute ",
    "matching": r"^TemplateMatcher\.compute ",
    "templates": r"^(estimate_templates|_template_chunk) ",
}
TOP = 12


def sort(case: str, out: str, cache: Path):
    import spikeinterface.full as si

    import dartsort_si  # noqa: F401  (registers the sorter)

    si.set_global_job_kwargs(n_jobs=2, progress_bar=False)
    rec = si.load(cache / "gt" / case / "recording")
    t0 = time.perf_counter()
    sorting = si.run_sorter("dartsort", rec, folder=out, remove_existing_folder=True, verbose=False,
                            raise_error=True, n_jobs=2)
    print(f"{case}: {time.perf_counter() - t0:.1f} s, {len(sorting.unit_ids)} units")


def _frames(line):
    stack, count = line.rstrip().rsplit(" ", 1)
    return stack.split(";"), int(count)


def _name(frame):
    """'func (file.py:line)' -> 'func (file.py)'."""
    return re.sub(r" \(.*?([^/]+\.py):\d+\)", r" (\1)", frame)


def summary(path: str):
    lines = Path(path).read_text().splitlines()
    total = sum(_frames(line)[1] for line in lines)
    for stage, pattern in STAGES.items():
        own = collections.Counter()
        calls = collections.Counter()
        n = 0
        for line in lines:
            frames, count = _frames(line)
            at = next((i for i, f in enumerate(frames) if re.search(pattern, f)), None)
            if at is None:
                continue
            n += count
            own[_name(frames[-1])] += count
            if at + 1 < len(frames):  # the stage function's line and what it called there
                line_no = re.search(r":(\d+)\)", frames[at])
                calls[(line_no.group(1) if line_no else "?", frames[at + 1].split(" (")[0])] += count
        if not n:
            continue
        print(f"\n## {stage}: {n} samples, {100 * n / total:.1f}% of all")
        print("self time:")
        for name, count in own.most_common(TOP):
            print(f"  {100 * count / n:5.1f}%  {name}")
        print(f"lines of its main function ({pattern.strip('^ ').replace('[ .]', '')}):")
        for (line_no, callee), count in calls.most_common(TOP):
            print(f"  {100 * count / n:5.1f}%  line {line_no} -> {callee}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sort")
    s.add_argument("case")
    s.add_argument("out")
    s.add_argument("--cache-dir", type=Path, default=HERE / "cache")
    m = sub.add_parser("summary")
    m.add_argument("profile")
    args = p.parse_args()
    if args.command == "sort":
        sort(args.case, args.out, args.cache_dir)
    else:
        summary(args.profile)


if __name__ == "__main__":
    main()
