"""A SpikeInterface SortingAnalyzer built from a finished sort, without recomputing what we have.

    from dartsort_si import to_sorting_analyzer
    analyzer = to_sorting_analyzer("sort_output", recording)     # or a run_sorter folder
    analyzer.compute("quality_metrics")                        # SpikeInterface's own, on our data

Templates, spike amplitudes and spike locations come from the sort: each unit's template is
the average, over its matched spikes, of the template each spike was matched with (scaled by its
fitted amplitude and moved to the real channels at the spike's drift); a spike's amplitude is that
scaled template's value at the unit's main channel and trough; its location is our point-source
fit (x, depth). The analyzer's recording is the recording as we sorted it (filtered, referenced,
in noise units), so what SpikeInterface computes later (waveforms, PCs, metrics) agrees with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .motion_info import MotionInfo
from .sorting import DARTsortSorting
from .templates import Kriging, Templates, drift_steps, interpolation_reach


def to_sorting_analyzer(output_dir, recording, format="memory", folder=None, max_spikes_per_unit=500):
    """SortingAnalyzer of `recording` (the one given to the sort) and the sort in `output_dir`
    (our output folder, or the folder `run_sorter` wrote), with extensions random_spikes,
    noise_levels, templates, spike_amplitudes and spike_locations filled in."""
    import spikeinterface.core as sc

    from .config import load_config
    from .preprocessing import preprocess

    out = _sort_folder(Path(output_dir))
    cfg = load_config(json.loads((out / "dartsort_si.json").read_text())["config"])
    sorted_rec = preprocess(recording, cfg.preprocessing, cfg.preprocessing_dtype)
    ours = DARTsortSorting.load(out / "dartsort_sorting.npz")
    sorting = ours.to_numpy_sorting()
    analyzer = sc.create_sorting_analyzer(sorting, sorted_rec, format=format, folder=folder, sparse=False)
    analyzer.compute("random_spikes", max_spikes_per_unit=max_spikes_per_unit, seed=0)
    analyzer.compute("noise_levels")
    if not len(sorting.unit_ids):
        return analyzer

    order = _spike_vector_order(ours, sorting)
    temps = _matched_templates(out)
    motion = MotionInfo.load(out / "motion_info.npz")
    unit_index = np.searchsorted(sorting.unit_ids, ours.labels[order])
    average, amplitudes = _real_templates_and_amplitudes(
        temps, motion, ours.times_seconds[order], np.searchsorted(temps.unit_ids, ours.template_labels[order]),
        ours.scales[order], unit_index, len(sorting.unit_ids))
    fs = recording.sampling_frequency
    length = temps.data.shape[1]
    _set_extension(analyzer, "templates", dict(ms_before=temps.n_before * 1000 / fs,
                                               ms_after=(length - temps.n_before) * 1000 / fs,
                                               operators=["average"]), average=average)
    _set_extension(analyzer, "spike_amplitudes", {}, amplitudes=amplitudes.astype(np.float32))
    locs = ours.point_source_localizations[order]
    where = np.zeros(len(order), dtype=[("x", "float32"), ("y", "float32")])
    where["x"], where["y"] = locs[:, 0], locs[:, 2]  # SpikeInterface's y is the depth along the probe
    _set_extension(analyzer, "spike_locations", dict(method="dartsort"), spike_locations=where)
    return analyzer


def _sort_folder(path: Path) -> Path:
    for candidate in (path, path / "sorter_output" / "dartsort", path / "dartsort"):
        if (candidate / "dartsort_sorting.npz").exists():
            return candidate
    raise FileNotFoundError(f"{path} holds no finished dartsort-si sort (no dartsort_sorting.npz); "
                            "pass the folder given to dartsort() or to run_sorter().")


def _spike_vector_order(ours: DARTsortSorting, sorting) -> np.ndarray:
    """Indices into our spikes, in the order of sorting.to_spike_vector() (segment, sample, unit)."""
    keep = np.flatnonzero(ours.labels >= 0)
    order = keep[np.lexsort((ours.labels[keep], ours.times_samples[keep]))]
    vector = sorting.to_spike_vector()
    _, times = ours.segment_times()
    if not (np.array_equal(vector["sample_index"], times[order])
            and np.array_equal(sorting.unit_ids[vector["unit_index"]], ours.labels[order])):
        raise RuntimeError("dartsort-si: our spikes and the SpikeInterface sorting disagree; cannot align them.")
    return order


def _matched_templates(out: Path) -> Templates:
    """The templates of the last matching round."""
    rounds = sorted(out.glob("matched_templates*.npz"), key=lambda p: int(p.stem[len("matched_templates"):]))
    if not rounds:
        raise FileNotFoundError(f"{out} has no matched_templates*.npz (a sort made before dartsort-si 0.1.1); "
                                "delete matching*.h5 and dartsort_sorting.npz there and run the sort again "
                                "with overwrite=False to redo matching only.")
    return Templates.load(rounds[-1])


def _real_templates_and_amplitudes(temps, motion, times_s, template_index, scales, unit_index, n_units):
    """Per unit, the mean of its spikes' scaled templates on the real channels (n_units, L, C), and
    per spike that template's value at the unit's main channel and trough."""
    kriging = Kriging(motion.rgeom, motion.geom, interpolation_reach(motion.geom))
    drift = drift_steps(motion, times_s, motion.rgeom[temps.main_channels(), 1][template_index])
    # spikes of one template at one drift step, in one unit, share their real-probe template
    groups, group_of = np.unique(np.stack([template_index, drift, unit_index]), axis=1, return_inverse=True)
    moved = np.stack([kriging.at_drift(temps.data[k], d) for k, d, _ in groups.T])  # (G, L, C)
    group_units = groups[2]
    # (n_units, G): each group's summed scales, divided by its unit's spike count
    weights = np.zeros((n_units, len(moved)))
    weights[group_units, np.arange(len(moved))] = np.bincount(group_of, weights=scales, minlength=len(moved))
    weights /= np.maximum(np.bincount(unit_index, minlength=n_units), 1)[:, None]
    average = (weights @ moved.reshape(len(moved), -1)).reshape((n_units,) + moved.shape[1:]).astype(np.float32)
    main = np.abs(average[:, temps.n_before]).argmax(1)
    at_main = moved[np.arange(len(moved)), temps.n_before, main[group_units]]
    return average, scales * at_main[group_of]


def _set_extension(analyzer, name, params, **data):
    """Fill an extension with our data, as SpikeInterface itself does when it merges units."""
    from spikeinterface.core.sortinganalyzer import get_extension_class

    ext = get_extension_class(name)(analyzer)
    ext.set_params(save=False, **params)
    for key, value in data.items():
        ext.set_data(key, value)
    ext.run_info["run_completed"] = True
    if analyzer.format != "memory":
        ext.save()
    analyzer.extensions[name] = ext
