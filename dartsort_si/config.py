"""The single parameter table: `DARTsortUserConfig`.

Every field, default and unit follows the public DARTsort API reference. The
dataclass validates itself on construction, so a typo or an out-of-range value
fails at once with a message naming the field, instead of hours into a sort.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

_DOC = "doc"
_CHECK = "check"


def _field(default, doc: str, check: str | None = None):
    """A dataclass field carrying its docstring and an optional range check.

    `check` is one of 'positive', 'nonnegative', 'fraction', 'atleast1'.
    """
    return field(default=default, metadata={_DOC: doc, _CHECK: check})


@dataclass(frozen=True)
class DARTsortUserConfig:
    """User-facing configuration options.

    To change dartsort's behavior, set parameters here and pass the object
    to the dartsort() function (or pass them as sorter params to
    `si.run_sorter("dartsort", ...)`).
    """

    # -- high level behavior
    do_motion_estimation: bool = _field(
        True, "Set this to false if your data is super stable or already motion-corrected."
    )
    preprocessing: Literal["ibllikecmr", "ibllike", "standardize", "none"] = _field(
        "ibllikecmr",
        "If other than 'none', dartsort will apply some preprocessing to the recording. "
        "Leave as 'none' if you are passing in an already-preprocessed recording; dartsort "
        "then expects its input to be highpass filtered and standardized on each channel "
        "(unit noise std), and stops with an error if it is not. 'standardize': per-channel "
        "scaling to unit noise only. 'ibllike': highpass, phase shift (Neuropixels), bad "
        "channel interpolation, standardization. 'ibllikecmr': 'ibllike' plus common median "
        "reference. Whitening is handled internally.",
    )
    preprocessing_dtype: Literal["float16", "float32"] = _field(
        "float32",
        "dtype of the preprocessed traces when a preprocessed copy is saved "
        "(copy_recording_to_tmpdir). Only relevant if preprocessing != 'none'.",
    )
    subsampling_spikes: int | None = _field(
        2048000,
        "Detection steps before the final matching round run until at least this many "
        "spikes are found or the whole recording is covered. None disables subsampling.",
        "atleast1",
    )
    subsampling_presence: float = _field(
        0.1,
        "Early detection steps which found subsampling_spikes spikes may only end early if "
        "they also cover this fraction of the recording.",
        "fraction",
    )
    matching_iterations: int = _field(
        1,
        "Number of template matching rounds; rounds after the first re-estimate templates "
        "from the previous round's spikes.",
        "atleast1",
    )
    dredge_only: bool = _field(
        False, "Whether to stop after initial localization and motion tracking."
    )

    # -- computer options
    n_jobs_cpu: int = _field(
        0,
        "Number of parallel workers to use when running on CPU. 0 means everything runs on "
        "the main thread; negative means #cpu - (val+1) so that -1 is all cores.",
    )
    n_jobs_gpu: int = _field(0, "Number of parallel workers to use when running on GPU.")
    n_jobs_small: int = _field(-2, "Max workers to use for small jobs.")
    n_jobs_small_gpu: int = _field(4, "Max workers to use for small jobs running on GPU.")
    device: str | None = _field(
        None,
        "The name of the PyTorch device to use, e.g. 'cpu', 'cuda' or 'cuda:1'. If unset, "
        "uses CUDA when available, else the CPU.",
    )
    executor: Literal[
        "threading_unless_multigpu", "ThreadPoolExecutor", "ProcessPoolExecutor"
    ] = _field(
        "threading_unless_multigpu",
        "Parallel backend for the chunked steps: 'threading_unless_multigpu' (threads), "
        "'ThreadPoolExecutor' (threads) or 'ProcessPoolExecutor' (processes).",
    )
    chunk_length_samples: int = _field(
        30000, "Batch size (samples) for data processing.", "atleast1"
    )
    work_in_tmpdir: bool = _field(
        False,
        "If True, store all temporary data in a scratch directory in tmpdir_parent or "
        "TMPDIR and copy results to output_dir at the end.",
    )
    copy_recording_to_tmpdir: bool = _field(
        False, "Save a copy of the preprocessed recording to a tmpdir?"
    )
    workdir_copier: Literal["shutil", "rsync"] = _field("shutil", "'shutil' or 'rsync'")
    tmpdir_parent: str | None = _field(None, "Control where tmpdirs are created.")
    save_intermediates: bool = _field(
        False, "Store all spike features from intermediate steps (for debugging)."
    )
    save_final_features: bool = _field(
        True,
        "Store the spike features from the final step (instead of just basic spike train "
        "outputs).",
    )

    # -- waveform snippet lengths
    ms_before: float = _field(
        1.4,
        "Length of time (ms) before trough (or peak) in waveform snippets. 42 samples at 30kHz.",
        "positive",
    )
    ms_after: float = _field(
        2.6 + 0.1 / 3,
        "Length of time (ms) after trough (or peak) in waveform snippets. 79 samples at 30kHz.",
        "positive",
    )
    alignment_ms: float = _field(
        1.5, "Largest time shift (ms) allowed when re-aligning events.", "nonnegative"
    )

    # -- thresholds
    peak_sign: Literal["neg", "both", "pos"] = _field(
        "both",
        "Allow only troughs ('neg'), events of both signs, or peaks only ('pos') when "
        "detecting threshold crossings during initialization.",
    )
    voltage_threshold: float = _field(
        3.0,
        "Threshold in standardized (SNR) voltage units for initial detection.",
        "positive",
    )
    matching_threshold: float = _field(
        8.0,
        "Template matching threshold: a match is used if subtracting it reduces the "
        "Euclidean norm of the standardized residual by at least this much "
        "(squared-norm decrease >= threshold**2).",
        "positive",
    )
    initial_threshold: float = _field(
        10.0,
        "Initial detection's neural net matching threshold, same units as "
        "matching_threshold, with the NN denoiser guessing the waveforms.",
        "positive",
    )
    motion_voltage_threshold: float = _field(
        4.0,
        "If subsampling, a quick thresholding runs at this voltage threshold (SNR units) to "
        "grab spikes for motion estimation.",
        "positive",
    )

    # -- featurization
    temporal_pca_rank: int = _field(
        8, "Rank of temporal PCAs used in denoising and featurization.", "atleast1"
    )
    feature_ms_before: float = _field(
        0.75, "As ms_before, but used only when computing PCA features in clustering.", "positive"
    )
    feature_ms_after: float = _field(
        1.25, "As ms_after, but used only when computing PCA features in clustering.", "positive"
    )
    subtraction_radius_um: float = _field(
        200.0,
        "Radius (um) of neighborhoods around spike events extracted when denoising and "
        "subtracting NN-denoised events.",
        "positive",
    )
    deduplication_radius_um: float = _field(
        50.0,
        "During initial detection, if two spike events occur at the same time within this "
        "radius (um), the smaller one (and the big one's secondary channels) is ignored.",
        "nonnegative",
    )
    featurization_radius_um: float = _field(
        100.0,
        "Radius (um) around detection channel or template peak channel used to extract "
        "spike features for clustering.",
        "positive",
    )
    fit_radius_um: float = _field(
        75.0,
        "Extraction radius (um) when fitting features like PCA; smaller than other radii "
        "to include less noise.",
        "positive",
    )
    localization_radius_um: float = _field(
        100.0, "Radius (um) around main channel used when localizing spikes.", "positive"
    )
    nn_denoiser_class_name: Literal["SingleChannelWaveformDenoiser", "Decollider"] = _field(
        "Decollider",
        "Which neural net to use in initial detection. Decollider with no pretrained path "
        "trains a brand-new unsupervised denoiser on this recording.",
    )
    nn_denoiser_pretrained_path: str | None = _field(
        None,
        "Path to a pytorch saved model (.pt file as dumped by torch.save()). If None, a new "
        "model is fit (Decollider) or the shipped weights are used "
        "(SingleChannelWaveformDenoiser).",
    )

    # -- matching
    amplitude_scaling_stddev: float = _field(
        0.01,
        "Standard deviation of amplitude scaling regularization prior in template matching.",
        "nonnegative",
    )
    amplitude_scaling_boundary: float = _field(
        1.0 / 3.0, "Boundaries on the amount of scaling allowed (1 +/- this).", "fraction"
    )
    temporal_upsamples: int = _field(
        4,
        "Upsampling of templates during matching to allow for temporal aliasing of waveforms.",
        "atleast1",
    )

    # -- motion estimation
    rigid: bool = _field(False, "Use rigid registration and ignore the window parameters.")
    probe_boundary_padding_um: float = _field(
        100.0,
        "Padding (um) added above and below the probe when building the registered geometry.",
        "nonnegative",
    )
    speed_limit_um_per_s: float = _field(
        500.0, "Motion bins exceeding this speed (um/s) are replaced by interpolation.", "positive"
    )

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_value(f.name, getattr(self, f.name), hints[f.name], f.metadata.get(_CHECK))
        if self.feature_ms_before > self.ms_before or self.feature_ms_after > self.ms_after:
            raise ValueError(
                "feature_ms_before/feature_ms_after must fit inside ms_before/ms_after "
                f"(got {self.feature_ms_before}/{self.feature_ms_after} vs "
                f"{self.ms_before}/{self.ms_after})."
            )

    # -- conversions
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kwargs) -> "DARTsortUserConfig":
        return from_dict({**self.to_dict(), **kwargs})

    @classmethod
    def field_descriptions(cls) -> dict[str, str]:
        return {f.name: f.metadata[_DOC] for f in fields(cls)}

    @classmethod
    def field_defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls)}



def _allowed(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    args = [a for a in typing.get_args(hint)] or [hint]
    return " or ".join("None" if a is type(None) else a.__name__ for a in args)


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        # bools are ints in Python, but a bool here is almost surely a mistake
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_value(name, value, hint, check):
    if not _type_ok(value, hint):
        raise ValueError(
            f"DARTsortUserConfig.{name}={value!r} is not valid: expected {_allowed(hint)}."
        )
    if value is None or check is None:
        return
    bad = {
        "positive": value <= 0,
        "nonnegative": value < 0,
        "fraction": not (0 <= value <= 1),
        "atleast1": value < 1,
    }[check]
    if bad:
        ranges = {
            "positive": "> 0",
            "nonnegative": ">= 0",
            "fraction": "between 0 and 1",
            "atleast1": ">= 1",
        }
        raise ValueError(
            f"DARTsortUserConfig.{name}={value!r} is out of range: must be {ranges[check]}."
        )


def from_dict(d: dict) -> DARTsortUserConfig:
    """Build a config from a dict, refusing unknown keys (typos)."""
    known = {f.name for f in fields(DARTsortUserConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        import difflib

        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, known, n=1))
                 else repr(k) for k in unknown]
        raise ValueError(
            f"Unknown DARTsortUserConfig field(s): {', '.join(hints)}. Allowed fields: {sorted(known)}."
        )
    d = dict(d)
    # floats given as ints in TOML/JSON ("voltage_threshold = 4") are fine
    hints = typing.get_type_hints(DARTsortUserConfig)
    for k, v in d.items():
        if hints[k] is float and isinstance(v, int) and not isinstance(v, bool):
            d[k] = float(v)
    return DARTsortUserConfig(**d)


def load_config(cfg) -> DARTsortUserConfig:
    """Accept a DARTsortUserConfig, a dict, or a path to a .toml / .json file."""
    if cfg is None:
        return default_dartsort_cfg
    if isinstance(cfg, DARTsortUserConfig):
        return cfg
    if isinstance(cfg, dict):
        return from_dict(cfg)
    if isinstance(cfg, (str, Path)):
        path = Path(cfg)
        if not path.exists():
            raise ValueError(f"Config file {path} does not exist.")
        if path.suffix == ".toml":
            import tomllib

            with open(path, "rb") as f:
                return from_dict(tomllib.load(f))
        if path.suffix == ".json":
            return from_dict(json.loads(path.read_text()))
        raise ValueError(f"Config file {path} must end in .toml or .json.")
    raise ValueError(
        f"cfg must be a DARTsortUserConfig, a dict or a path to a .toml/.json file, "
        f"not {type(cfg).__name__}."
    )


def save_config(cfg: DARTsortUserConfig, path: Path):
    """Write the config as TOML-compatible JSON (None values kept)."""
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2))


default_dartsort_cfg = DARTsortUserConfig()
