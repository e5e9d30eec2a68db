"""The SpikeInterface sorter class: `si.run_sorter("dartsort", recording, ...)`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from spikeinterface.sorters.basesorter import BaseSorter

from .config import DARTsortUserConfig

# SpikeInterface job kwargs we accept on top of the config fields; None = use the config's value
_JOB_PARAMS = {
    "n_jobs": (None, "Number of workers for chunked steps (overrides n_jobs_cpu / n_jobs_gpu)."),
    "chunk_duration": (None, "Chunk duration, e.g. '1s' (overrides chunk_length_samples)."),
    "progress_bar": (True, "Show progress bars on long steps."),
    "pool_engine": (None, "'thread' or 'process' (overrides executor)."),
}


class DARTsortSorter(BaseSorter):
    """DARTsort (drift-aware registration, NN-denoised subtraction, template matching),
    implemented by dartsort-si."""

    sorter_name = "dartsort"
    requires_locations = True
    gpu_capability = "nvidia-optional"
    requires_binary_data = False
    handle_multi_segment = True  # segments are sorted together on one time axis (join_segments)
    compatible_with_parallel = {"loky": True, "multiprocessing": True, "threading": False}
    sorter_description = (
        "dartsort-si: the DARTsort algorithm (drift-aware registration, NN-denoised "
        "subtraction, template matching) implemented on SpikeInterface and torch."
    )
    installation_mesg = "pip install dartsort-si"

    _default_params = {**DARTsortUserConfig.field_defaults(), **{k: v[0] for k, v in _JOB_PARAMS.items()}}
    _params_description = {**DARTsortUserConfig.field_descriptions(),
                           **{k: v[1] for k, v in _JOB_PARAMS.items()}}

    @classmethod
    def is_installed(cls):
        return True

    @classmethod
    def get_sorter_version(cls):
        from . import __version__

        return __version__

    @classmethod
    def use_gpu(cls, params) -> bool:
        import torch

        device = params.get("device")
        return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")

    @classmethod
    def _check_params(cls, recording, output_folder, params):
        config_from_params(params, recording.sampling_frequency)  # raises ValueError naming the bad field
        return params

    @classmethod
    def _setup_recording(cls, recording, sorter_output_folder, params, verbose):
        pass  # we read the recording SpikeInterface saved beside the sorter folder

    @classmethod
    def _run_from_folder(cls, sorter_output_folder, params, verbose):
        from .pipeline import dartsort

        recording = cls.load_recording_from_folder(Path(sorter_output_folder).parent, with_warnings=False)
        if recording is None:
            raise ValueError("The recording could not be reloaded; save it to binary before sorting.")
        cfg = config_from_params(params, recording.sampling_frequency)
        work = Path(sorter_output_folder) / "dartsort"
        result = dartsort(recording, work, cfg)
        sorting = to_spikeinterface(result, recording)
        sorting.save(folder=Path(sorter_output_folder) / "final_sorting", overwrite=True)

    @classmethod
    def _get_result_from_folder(cls, sorter_output_folder):
        from spikeinterface.core import load

        return load(Path(sorter_output_folder) / "final_sorting")


def config_from_params(params: dict, sampling_frequency: float) -> DARTsortUserConfig:
    """Sorter params -> config, with SpikeInterface job kwargs mapped onto config fields
    (chunk_duration becomes samples at the recording's sampling_frequency)."""
    fields = {k: v for k, v in params.items() if k not in _JOB_PARAMS}
    n = params.get("n_jobs")
    if n is not None:
        if isinstance(n, float) and 0 < n <= 1:  # SpikeInterface's "fraction of the cores"
            n = max(1, int(n * (os.cpu_count() or 1)))
        fields["n_jobs_cpu"] = fields["n_jobs_gpu"] = int(n)
    if params.get("chunk_duration") is not None:
        fields["chunk_length_samples"] = _duration_samples(params["chunk_duration"], sampling_frequency)
    if params.get("pool_engine") is not None:
        fields["executor"] = {"thread": "ThreadPoolExecutor", "process": "ProcessPoolExecutor"}[params["pool_engine"]]
    from .config import from_dict

    return from_dict(fields)


def _duration_samples(duration, fs):
    if isinstance(duration, str):
        value = float(duration.rstrip("ms")) * (1e-3 if duration.endswith("ms") else 1.0)
    else:
        value = float(duration)
    return int(value * fs)


def to_spikeinterface(result, recording):
    """The SpikeInterface sorting of a DARTsortReturn, with the unit properties below."""
    sorting = result["sorting"].to_numpy_sorting()
    for key, values in unit_properties(result["sorting"], recording, sorting.unit_ids, result["motion"]).items():
        sorting.set_property(key, values)
    return sorting


def unit_properties(dsorting, recording, unit_ids, motion=None) -> dict:
    """Per-unit properties for the SpikeInterface sorting: main_channel_id, x_um and depth_um
    (median localization in probe coordinates), registered_depth_um (the same with drift removed;
    equal to depth_um without motion estimation), snr (median peak-to-peak amplitude over the noise
    sd, what detection measures), amplitude_uv (snr times the main channel's noise in uV, when the
    recording is scaled to uV) and firing_rate_hz."""
    from spikeinterface.core import get_noise_levels

    from .report import unit_table

    table = unit_table(dsorting, recording.get_total_duration())
    labels, locs, t = dsorting.labels, dsorting.point_source_localizations, dsorting.times_seconds
    reg = locs[:, 2] if motion is None or not len(t) else motion.correct_s(t, locs[:, 2])
    props = dict(main_channel_id=main_channel_ids(dsorting, recording, unit_ids), x_um=table["x_um"],
                 depth_um=table["depth_um"],
                 registered_depth_um=np.array([np.nanmedian(reg[labels == u]) for u in unit_ids], dtype=float),
                 snr=table["snr"])
    if recording.has_scaleable_traces() and len(unit_ids):
        from spikeinterface.preprocessing import highpass_filter

        # the noise detection sees: highpassed as in preprocessing
        noise = get_noise_levels(highpass_filter(recording, freq_min=300.0), return_in_uV=True,
                                 random_slices_kwargs=dict(seed=0))
        props["amplitude_uv"] = props["snr"] * noise[recording.ids_to_indices(props["main_channel_id"])]
    props["firing_rate_hz"] = table["rate_hz"].astype(float)
    return props


def main_channel_ids(dsorting, recording, unit_ids):
    """The channel where each unit's spikes most often peak."""
    ids = recording.channel_ids
    labels, chans = dsorting.labels, dsorting.channels
    return np.array([ids[np.bincount(chans[labels == u]).argmax()] for u in unit_ids])


def register():
    """Make SpikeInterface's "dartsort" entry point to this package."""
    from spikeinterface.sorters import sorterlist

    old = sorterlist.sorter_dict.get("dartsort")
    sorterlist.sorter_dict["dartsort"] = DARTsortSorter
    lst = sorterlist.sorter_full_list
    if old in lst:
        lst[lst.index(old)] = DARTsortSorter
    elif DARTsortSorter not in lst:
        lst.append(DARTsortSorter)


class SorterName(str):
    """The name "dartsort" that registers the sorter in any process that unpickles it.

    run_sorter_jobs' process engines (joblib's default loky workers, processpoolexecutor with
    spawn, dask) run each job in a fresh interpreter that never ran `import dartsort_si`, so
    SpikeInterface there does not know "dartsort"; and forking a process after torch has run can
    hang it. Passed as a job's sorter_name, this string imports dartsort_si where the job is
    unpickled, which registers the sorter before run_sorter looks the name up."""

    def __reduce__(self):
        return _registered_name, (str(self),)


def _registered_name(name):
    import importlib

    importlib.import_module("dartsort_si")  # registers the sorter and the components
    return SorterName(name)


SORTER_NAME = SorterName("dartsort")
