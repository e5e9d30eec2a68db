"""How well a benchmark sort's templates fit ground-truth units' spikes, by displacement.

For each named GT unit of a case run by run_benchmark.py (benchmarks/cache/runs/<case>/dartsort),
its spikes are cut at their true times from the preprocessed recording and grouped by the unit's
true displacement. Per group it prints what subtracting the sort's template leaves: the median
excess squared norm of the residual over the noise on the template's channels, and the least-squares
scale of the template, for the template matching uses (the unit's registered template placed at
each chunk's drift, drift bins included) and for the group's own mean (the floor: what a template
right for that displacement would leave). A drifting unit whose template leaves far more than the
floor has a template that does not fit it there; see CHANGELOG.md (eighteenth session).

    python benchmarks/template_fit.py nonrigid_np1_60s_128ch_40u_seed5 15 4 [--templates templates1.npz]
        [--groups 8]

The unit's template is the one whose matched spikes (matching1.h5) hold most of its spikes. Narrow
groups make a truer floor: a mean over 10 um of displacement is itself smeared. Meant for units
well above the noise (SNR 10 or more): a small unit's mean is mostly noise and neighbours' spikes,
and its scale column is the telling one (how far the template's size is from its spikes').
"""

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import spikeinterface.full as si

from dartsort_si.config import load_config
from dartsort_si.matching import TemplateMatcher
from dartsort_si.motion_info import MotionInfo
from dartsort_si.preprocessing import preprocess
from dartsort_si.subtraction import Geometry
from dartsort_si.templates import Templates
from run_benchmark import DEFAULT_CACHE

MAX_SHIFT = 5  # samples searched each side for the best alignment of a spike with a template


def excess(snippets, template):
    """(median excess squared norm of snippets - scale * template over the noise, on the
    template's channels; median scale): each snippet (L + 2 MAX_SHIFT, C) aligned to it first."""
    length = len(template)
    support = np.abs(template).max(0) > 0.05 * np.abs(template).max()
    out = []
    for x in snippets:
        shift = max(range(2 * MAX_SHIFT + 1), key=lambda s: float((x[s:s + length] * template).sum()))
        window = x[shift:shift + length]
        scale = float((window * template).sum() / (template * template).sum())
        residual = (window - scale * template)[:, support]
        out.append((np.square(residual).sum() - residual.size, scale))
    return np.median(np.array(out), axis=0)


def fit_report(case, units, cache, templates_file, n_groups):
    run = cache / "runs" / case / "dartsort" / "sorter" / "sorter_output" / "dartsort"
    gt_dir = cache / "gt" / case
    cfg = load_config(json.loads((run / "dartsort_si.json").read_text())["config"])
    rec = preprocess(si.load(gt_dir / "recording"), cfg.preprocessing)
    temps = Templates.load(run / templates_file)
    motion = MotionInfo.load(run / "motion_info.npz")
    matcher = TemplateMatcher(rec, temps, motion, cfg, Geometry.build(rec.get_channel_locations(), cfg), "cpu")
    gt = si.NpzSortingExtractor(gt_dir / "gt_sorting.npz")
    truth = np.load(gt_dir / "motion_truth.npz")
    with h5py.File(run / "matching1.h5") as f:
        matched, labels = f["times_samples"][:], f["template_labels"][:]
    fs, nb, length = rec.sampling_frequency, temps.n_before, temps.data.shape[1]
    chunk = int(fs)
    ids = [str(u) for u in gt.unit_ids]
    for unit in units:
        times = gt.get_unit_spike_train(gt.unit_ids[ids.index(str(unit))])
        times = times[(times > 2 * length) & (times < rec.get_num_samples(0) - 2 * length)]
        nearest = np.clip(np.searchsorted(matched, times), 1, len(matched) - 1)
        nearest = np.where(abs(matched[nearest - 1] - times) < abs(matched[nearest] - times), nearest - 1, nearest)
        hit = abs(matched[nearest] - times) <= MAX_SHIFT
        if not hit.any():
            print(f"GT {unit}: no matched spike near its spikes")
            continue
        template_id = np.bincount(labels[nearest[hit]]).argmax()
        which = np.flatnonzero(temps.unit_ids == template_id)
        if not len(which):
            print(f"GT {unit}: its template {template_id} is not in {templates_file} (a unit found among the "
                  "leftovers? their templates are in matched_templates1.npz, without drift bins)")
            continue
        k = int(which[0])
        snippets = np.stack([rec.get_traces(start_frame=t - nb - MAX_SHIFT, end_frame=t - nb + length + MAX_SHIFT)
                             for t in times])
        placed = {}
        for c in np.unique(times // chunk):
            placed[c] = matcher.chunk_templates((c * chunk + chunk / 2) / fs).base()[k].numpy()
        disp = np.interp(times / fs, truth["displacement_times_s"], truth["displacement_um"][:, int(unit)])
        print(f"GT {unit}: template {template_id} ({temps.counts[k]} spikes), {len(times)} spikes")
        for group in np.array_split(np.argsort(disp), n_groups):
            ours = [excess(snippets[[i]], placed[times[i] // chunk]) for i in group]
            mean = snippets[group].mean(0)[MAX_SHIFT:MAX_SHIFT + length]
            floor = excess(snippets[group], mean)
            print(f"  displacement {disp[group].min():6.1f} to {disp[group].max():6.1f} um ({len(group)} spikes): "
                  f"sort's template leaves {np.median([o[0] for o in ours]):7.1f} (scale "
                  f"{np.median([o[1] for o in ours]):.2f}), the spikes' mean {floor[0]:7.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case")
    p.add_argument("units", nargs="+", type=int)
    p.add_argument("--templates", default="templates1.npz", help="templates file of the run (with its drift bins)")
    p.add_argument("--groups", type=int, default=8, help="displacement groups (equal spike counts)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args()
    fit_report(args.case, args.units, args.cache_dir, args.templates, args.groups)


if __name__ == "__main__":
    main()
