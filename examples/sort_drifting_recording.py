"""Sort a generated drifting ground-truth recording with dartsort-si and print its accuracy.

    python examples/sort_drifting_recording.py [--duration 60] [--channels 128] [--folder /tmp/dartsort_example]
"""

import argparse
import time
from pathlib import Path

import spikeinterface.full as si

import dartsort_si  # noqa: F401  (registers the "dartsort" sorter)
from dartsort_si.ground_truth import generate_ground_truth


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--drift", default="rigid", choices=["static", "rigid", "nonrigid", "bump"])
    parser.add_argument("--folder", default="/tmp/dartsort_example")
    parser.add_argument("--n-jobs", type=int, default=2)
    args = parser.parse_args()

    folder = Path(args.folder)
    rec, gt, _ = generate_ground_truth(folder / f"gt_{args.drift}_{args.duration:g}s_{args.channels}ch",
                                       duration=args.duration, num_channels=args.channels, drift=args.drift,
                                       n_jobs=args.n_jobs)
    print(rec)
    t0 = time.perf_counter()
    sorting = si.run_sorter("dartsort", rec, folder=folder / "sorting", remove_existing_folder=True,
                            n_jobs=args.n_jobs)
    wall = time.perf_counter() - t0
    perf = si.compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True).get_performance()
    well = int((perf["accuracy"] >= 0.8).sum())
    print(f"dartsort-si: {sorting.get_num_units()} units found in {wall:.0f} s")
    print(f"well detected (accuracy >= 0.8): {well} of {len(perf)} ground-truth units "
          f"({well / len(perf):.0%}); mean accuracy {perf['accuracy'].astype(float).mean():.2f}")


if __name__ == "__main__":
    main()
