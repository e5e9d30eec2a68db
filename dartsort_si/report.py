"""An HTML report of a finished sort: one self-contained page (figures embedded as PNG).

Figures: the drift raster with the motion estimate, units along the probe, amplitude over time,
ISI violations; and a table of units. `dartsort-si report OUTPUT` writes OUTPUT/report.html.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

# an ISI under this is a violation of the refractory period (the usual 1.5 ms)
REFRACTORY_MS = 1.5
# amplitude-over-time plots a random subset of at most this many spikes
MAX_SCATTER_SPIKES = 50000


def find_output(folder) -> Path:
    """The dartsort output folder: `folder` itself, or the one run_sorter makes inside it."""
    folder = Path(folder)
    for candidate in (folder, folder / "sorter_output" / "dartsort"):
        if (candidate / "dartsort_sorting.npz").exists():
            return candidate
    raise FileNotFoundError(f"No finished dartsort sort in {folder} (no dartsort_sorting.npz).")


def unit_table(sorting, duration_s=None) -> dict:
    """Per unit: id, spikes, firing rate, median x and depth, median SNR, ISI violation ratio.
    `duration_s`: the recording's (default: from the sorting's segments or its last spike)."""
    labels, t = sorting.labels, sorting.times_seconds
    duration = _duration_s(sorting) if duration_s is None else duration_s
    locs = sorting.point_source_localizations
    amp = sorting.denoised_ptp_amplitudes
    rows = dict(unit=[], spikes=[], rate_hz=[], x_um=[], depth_um=[], snr=[], isi_violations=[])
    for u in sorting.unit_ids:
        m = labels == u
        isi = np.diff(np.sort(t[m]))
        rows["unit"].append(int(u))
        rows["spikes"].append(int(m.sum()))
        rows["rate_hz"].append(m.sum() / duration)
        rows["x_um"].append(float(np.nanmedian(locs[m, 0])))
        rows["depth_um"].append(float(np.nanmedian(locs[m, 2])))
        rows["snr"].append(float(np.nanmedian(amp[m])))
        rows["isi_violations"].append(float(np.mean(isi < REFRACTORY_MS / 1000)) if len(isi) else 0.0)
    return {k: np.asarray(v) for k, v in rows.items()}


def write_report(folder, path=None) -> Path:
    from .motion_info import MotionInfo
    from .sorting import DARTsortSorting

    out = find_output(folder)
    sorting = DARTsortSorting.load(out / "dartsort_sorting.npz")
    motion = MotionInfo.load(out / "motion_info.npz") if (out / "motion_info.npz").exists() else None
    table = unit_table(sorting)
    figures = [("Drift raster", _raster_png(out, sorting, motion)),
               ("Units along the probe", _probe_png(sorting, table, motion)),
               ("Amplitude over time", _amplitude_png(sorting)),
               ("ISI violations", _isi_png(table))]
    path = Path(path) if path is not None else out / "report.html"
    path.write_text(_page(out, sorting, table, figures))
    return path


def _duration_s(sorting) -> float:
    if sorting.segment_lengths is not None:
        return float(np.sum(sorting.segment_lengths) / sorting.sampling_frequency)
    return float(max(sorting.times_seconds.max(initial=0.0), 1e-9))


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _raster_png(out, sorting, motion) -> bytes:
    if (out / "drift_raster.png").exists():  # drawn on the detected spikes by the motion step
        return (out / "drift_raster.png").read_bytes()
    fig, ax = _figure(figsize=(10, 4))
    ax.scatter(sorting.times_seconds, sorting.point_source_localizations[:, 2], s=1, lw=0)
    ax.set(xlabel="time (s)", ylabel="depth (um)")
    return _png(fig)


def _probe_png(sorting, table, motion) -> bytes:
    fig, ax = _figure(figsize=(4, 8))
    geom = sorting.geom if "geom" in sorting.features() else (motion.geom if motion is not None else None)
    if geom is not None:
        ax.scatter(geom[:, 0], geom[:, 1], marker="s", s=12, color="0.8", label="channels")
    ax.scatter(table["x_um"], table["depth_um"], s=10 + 4 * np.clip(table["snr"], 0, 50), alpha=0.7,
               c=np.arange(len(table["unit"])), cmap="tab20", label="units (size: SNR)")
    for u, x, z in zip(table["unit"], table["x_um"], table["depth_um"]):
        ax.annotate(str(u), (x, z), fontsize=7)
    ax.set(xlabel="x (um)", ylabel="depth (um)")
    ax.legend(loc="upper right", fontsize=7)
    return _png(fig)


def _amplitude_png(sorting) -> bytes:
    fig, ax = _figure(figsize=(10, 4))
    keep = np.flatnonzero(sorting.labels >= 0)
    if len(keep) > MAX_SCATTER_SPIKES:
        keep = np.sort(np.random.default_rng(0).choice(keep, MAX_SCATTER_SPIKES, replace=False))
    ax.scatter(sorting.times_seconds[keep], sorting.denoised_ptp_amplitudes[keep], s=1, lw=0,
               c=sorting.labels[keep] % 20, cmap="tab20", rasterized=True)
    ax.set(xlabel="time (s)", ylabel="peak-to-peak amplitude (noise sd)")
    return _png(fig)


def _isi_png(table) -> bytes:
    fig, ax = _figure(figsize=(10, 3))
    ax.bar(np.arange(len(table["unit"])), 100 * table["isi_violations"], color="tab:red")
    ax.set_xticks(np.arange(len(table["unit"])), [str(u) for u in table["unit"]], fontsize=7)
    ax.set(xlabel="unit", ylabel=f"% ISIs < {REFRACTORY_MS} ms")
    return _png(fig)


def _page(out, sorting, table, figures) -> str:
    head = ["unit", "spikes", "rate (Hz)", "x (um)", "depth (um)", "SNR", f"ISIs < {REFRACTORY_MS} ms"]
    rows = "".join(
        f"<tr><td>{u}</td><td>{n}</td><td>{r:.2f}</td><td>{x:.0f}</td><td>{z:.0f}</td><td>{s:.1f}</td>"
        f"<td>{100 * v:.2f}%</td></tr>"
        for u, n, r, x, z, s, v in zip(*(table[k] for k in table)))
    imgs = "".join(
        f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">' for title, png in figures)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dartsort-si report</title>"
        "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} img{max-width:100%}</style></head><body>"
        f"<h1>dartsort-si report</h1><p>{html.escape(str(out))}: {sorting.n_units} units, "
        f"{int((sorting.labels >= 0).sum())} spikes, {_duration_s(sorting):.1f} s.</p>{imgs}"
        f"<h2>Units</h2><table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>{rows}</table>"
        "</body></html>")
