"""The `dartsort-si` command line.

    dartsort-si sort INPUT OUTPUT [--config FILE] [--set key=value ...]
    dartsort-si report OUTPUT

INPUT is anything SpikeInterface reads that carries a probe: a SpikeGLX or Open Ephys folder
(found by their files), an NWB file, a folder saved by SpikeInterface, or a raw binary file with
--probe, --sampling-frequency, --num-channels and --dtype. OUTPUT is dartsort's output folder; it
also gets `sorting/` (a SpikeInterface sorting folder: `si.load(OUTPUT / "sorting")`) and
`dartsort.log`. Running the same command again resumes an interrupted sort. `report` writes
OUTPUT/report.html (drift raster, units along the probe, amplitudes, ISI violations, unit table).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("dartsort_si")

RAW_SUFFIXES = (".bin", ".dat", ".raw")


def read_input(path, probe=None, sampling_frequency=None, num_channels=None, dtype=None, stream_id=None):
    """A SpikeInterface recording from a path, by what the path holds; `probe` (a probeinterface
    .json or .prb file) is attached to it, replacing any probe the files describe."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_file() and path.suffix in RAW_SUFFIXES:
        missing = [name for name, v in [("--probe", probe), ("--sampling-frequency", sampling_frequency),
                                        ("--num-channels", num_channels), ("--dtype", dtype)] if v is None]
        if missing:
            raise ValueError(f"A raw binary file needs {', '.join(missing)}.")
        import spikeinterface.full as si

        rec = si.read_binary(path, sampling_frequency=sampling_frequency, num_channels=num_channels, dtype=dtype)
    else:
        rec = _read_known_format(path, stream_id)
    if probe is not None:
        _attach_probe(rec, Path(probe))
    return rec


def _read_known_format(path, stream_id):
    import spikeinterface.extractors as se
    import spikeinterface.full as si

    if path.is_file() and path.suffix == ".nwb":
        return se.read_nwb_recording(path)
    if path.is_dir() and any(path.rglob("*.ap.meta")):
        return se.read_spikeglx(path, stream_id=stream_id or _first_stream("spikeglx", path, ".ap"))
    if path.is_dir() and (any(path.rglob("structure.oebin")) or any(path.rglob("settings.xml"))):
        return se.read_openephys(path, stream_id=stream_id)
    try:
        return si.load(path)
    except Exception as err:
        raise ValueError(
            f"Could not read {path} as a recording ({err}). Give a SpikeGLX or Open Ephys folder, an "
            f".nwb file, a folder saved by SpikeInterface, or a raw binary file ({', '.join(RAW_SUFFIXES)}) "
            "with --probe, --sampling-frequency, --num-channels and --dtype."
        ) from err


def _first_stream(fmt, path, suffix):
    import spikeinterface.extractors as se

    names, ids = se.get_neo_streams(fmt, path)
    chosen = [i for i in ids if i.endswith(suffix)]
    if not chosen:
        raise ValueError(f"No '{suffix}' stream in {path} (streams: {ids}); pass --stream-id.")
    return chosen[0]


def _attach_probe(rec, probe_path: Path):
    import probeinterface as pi

    group = pi.read_prb(probe_path) if probe_path.suffix == ".prb" else pi.read_probeinterface(probe_path)
    n_contacts = sum(p.get_contact_count() for p in group.probes)
    if n_contacts != rec.get_num_channels():
        raise ValueError(f"The probe file {probe_path} has {n_contacts} contacts, the recording "
                         f"{rec.get_num_channels()} channels.")
    rec.set_probegroup(group)  # in place in SpikeInterface 0.105


def parse_sets(items) -> dict:
    """`key=value` pairs; values are read as JSON when they parse (numbers, true, null, lists),
    else kept as text."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {item!r}.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_config(config_file, sets):
    from .config import DARTsortUserConfig, load_config

    cfg = load_config(config_file) if config_file else DARTsortUserConfig()
    return load_config({**cfg.to_dict(), **parse_sets(sets)})


def sort(args) -> int:
    from . import dartsort
    from .sorter import to_spikeinterface

    cfg = build_config(args.config, args.set)  # config errors before the recording is opened
    recording = read_input(args.input, args.probe, args.sampling_frequency, args.num_channels, args.dtype,
                           args.stream_id)
    output = Path(args.output)
    result = dartsort(recording, output, cfg=cfg, overwrite=args.overwrite)
    sorting = to_spikeinterface(result, recording)  # with the unit properties run_sorter gives
    sorting.save(folder=output / "sorting", overwrite=True)
    logger.info("dartsort: %d units; SpikeInterface sorting in %s", len(sorting.unit_ids), output / "sorting")
    return 0


def _log_to(output: Path):
    """Log lines to the terminal and to OUTPUT/dartsort.log."""
    from .pipeline import LOG_NAME

    output.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(output / LOG_NAME)]
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    return handlers


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dartsort-si", description="DARTsort spike sorting on SpikeInterface.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sort", help="sort a recording", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("input", help="recording folder or file")
    s.add_argument("output", help="output folder (created; an interrupted sort resumes here)")
    s.add_argument("--config", help="a .toml or .json DARTsortUserConfig file")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config field, e.g. --set voltage_threshold=4 --set device=cpu (repeatable)")
    s.add_argument("--overwrite", action="store_true", help="recompute everything in OUTPUT")
    s.add_argument("--stream-id", help="which stream of a multi-stream folder (default: the first AP stream)")
    r = sub.add_parser("report", help="write OUTPUT/report.html for a finished sort")
    r.add_argument("output", help="a dartsort output folder (or a run_sorter folder)")
    s.add_argument("--probe", help="probeinterface .json or .prb file: the probe of a raw binary file, or of "
                   "a recording whose files describe none (e.g. Open Ephys without probe settings)")
    raw = s.add_argument_group("raw binary input")
    raw.add_argument("--sampling-frequency", type=float)
    raw.add_argument("--num-channels", type=int)
    raw.add_argument("--dtype")
    return p


def report(args) -> int:
    from .report import write_report

    try:
        path = write_report(args.output)
    except FileNotFoundError as err:
        print(f"dartsort-si: error: {err}", file=sys.stderr)
        return 2
    print(f"dartsort-si: report written to {path}")
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "report":
        return report(args)
    from .pipeline import check_output_dir

    output = Path(args.output)
    try:  # refuse a bad config or a folder that is not ours before writing anything
        check_output_dir(output)
        build_config(args.config, args.set)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"dartsort-si: error: {err}", file=sys.stderr)
        return 2
    handlers = _log_to(output)
    try:
        return sort(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        logger.error("dartsort-si: %s", err)
        return 2
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()


if __name__ == "__main__":
    sys.exit(main())
