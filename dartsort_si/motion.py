"""Stage 6: motion estimation with DREDge on localized spikes, and the drift raster plot."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger("dartsort_si")

# DREDge's raster needs spikes in most time bins; below this a registration is noise
MIN_MOTION_SPIKES = 100


# DREDge registers depth histograms of spikes; on a probe shorter than this the histogram has
# no structure to align (a 20 um tetrode got displacements of -50..+62 um on a static recording,
# and the registered templates then mixed its units: 0 of 3 found, 3 of 3 without it)
MIN_PROBE_SPAN_UM = 100.0


# A registration must line the spikes' depths up at least about as well as no correction does:
# the concentration of their depth histogram (sum of squared bin fractions, DEPTH_BIN_UM bins)
# after correction, over that before, must reach MIN_SHARPENING. An 8 s static recording on 16
# channels (4 units in two rows 50 um apart, 474 spikes) got a rigid estimate of +41 then -83 um,
# which put each unit at two registered depths and made two units of each (ratio 0.17); on the
# benchmark's 60 s x 128 ch cases it is 2.7-3.5 (drifting) and 1.00 (static).
DEPTH_BIN_UM = 2.0
MIN_SHARPENING = 0.8


# DREDge leaves out each (non-rigid window, time bin) whose activity (the window's mean of the log
# amplitude raster) is under its weights threshold, ACTIVITY_THRESHOLD (DREDge's default, passed
# explicitly): a level for dense recordings. On a 384-channel NP1 drifting draw with 40 units (one
# per 96 um) 89% of them fell under it, 8 of 9 windows were left out whole and the estimate came out
# flat (error 5.2 um against 6.6 with no correction; 20 of 40 units well detected, most split in
# two). On the 128-channel cases 0-3% fall under it. When over SPARSE_FRACTION do, the estimate is
# redone with the threshold at SPARSE_RELATIVE x the median activity: 0.61 um on that draw (0.3x:
# 0.61, 0.7x: 0.89).
ACTIVITY_THRESHOLD = 0.2
SPARSE_FRACTION = 0.25
SPARSE_RELATIVE = 0.5


class MotionNotEstimable(ValueError):
    """The sort goes on without motion correction."""


class TooFewSpikesForMotion(MotionNotEstimable):
    pass


def check_probe_span(geom):
    span = float(np.ptp(geom[:, 1])) if len(geom) else 0.0
    if span < MIN_PROBE_SPAN_UM:
        raise MotionNotEstimable(
            f"The probe spans {span:.0f} um in depth, too short to estimate drift (needs "
            f"{MIN_PROBE_SPAN_UM:.0f} um); set do_motion_estimation=False to silence this."
        )


def estimate_motion(times_s, depths_um, amplitudes, cfg, geom=None, device=None, progress=True):
    """DREDge registration of (time, depth, amplitude) spikes; returns a dredge MotionEstimate.

    Rigid or non-rigid per cfg.rigid; bins moving faster than
    cfg.speed_limit_um_per_s are replaced by interpolation. With `geom`, spikes
    localized farther than cfg.probe_boundary_padding_um outside the probe are
    left out.
    """
    import dredge
    from dredge.motion_util import speed_limit_filter

    if geom is not None:
        check_probe_span(geom)
    ok = np.isfinite(depths_um) & np.isfinite(amplitudes) & (amplitudes > 0)
    if geom is not None:
        # DREDge sizes its depth raster (and places its non-rigid windows) on the
        # spikes' depth range: a few wild fits thousands of um away spread the
        # windows and flatten the raster (a rigid estimate came out all zeros)
        lo, hi = np.min(geom[:, 1]), np.max(geom[:, 1])
        pad = cfg.probe_boundary_padding_um
        with np.errstate(invalid="ignore"):
            ok &= (depths_um >= lo - pad) & (depths_um <= hi + pad)
    if ok.sum() < MIN_MOTION_SPIKES:
        raise TooFewSpikesForMotion(
            f"Only {ok.sum()} usable spikes for motion estimation; the recording may be too "
            "short or too quiet. Set do_motion_estimation=False to sort without motion correction."
        )
    duration = float(np.ptp(times_s[ok])) if ok.any() else 0.0
    # a time horizon well under the recording length keeps the solve local and stable
    kwargs = dict(rigid=cfg.rigid, device=device, pbar=progress, weights_threshold_low=ACTIVITY_THRESHOLD,
                  weights_threshold_high=ACTIVITY_THRESHOLD)
    if duration < 600:
        kwargs["max_dt_s"] = max(duration, 1.0)
    me, extra = dredge.register(amplitudes[ok], depths_um[ok], times_s[ok], **kwargs)
    sparse = sparse_activity_threshold(extra.get("weights_orig"))
    if sparse is not None:
        logger.info("dartsort: spikes too sparse along the probe for DREDge's default activity threshold; "
                    "motion estimated again with the threshold at %.3f", sparse)
        kwargs.update(weights_threshold_low=sparse, weights_threshold_high=sparse)
        me, _ = dredge.register(amplitudes[ok], depths_um[ok], times_s[ok], **kwargs)
    me = speed_limit_filter(me, speed_limit_um_per_s=cfg.speed_limit_um_per_s)
    gain = sharpening(depths_um[ok], me.correct_s(times_s[ok], depths_um[ok]))
    if gain < MIN_SHARPENING:
        raise MotionNotEstimable(
            f"The motion estimate blurs the spikes' depths instead of lining them up (depth histogram "
            f"concentration x{gain:.2f} after correction); the recording may be too short or its probe "
            "too small to register. Set do_motion_estimation=False to silence this"
        )
    return me


def sparse_activity_threshold(weights) -> float | None:
    """The activity threshold to register with when over SPARSE_FRACTION of DREDge's (window,
    time bin) activities (weights) fall under its default, else None."""
    if weights is None or not np.size(weights):
        return None
    weights = np.asarray(weights, dtype=float)
    if np.mean(weights < ACTIVITY_THRESHOLD) <= SPARSE_FRACTION:
        return None
    return SPARSE_RELATIVE * float(np.median(weights))


def sharpening(raw_depths, registered_depths):
    """Concentration of the registered depths' histogram over that of the raw depths (> 1: the
    registration lines spikes up; < 1: it blurs them)."""
    lo = min(np.min(raw_depths), np.min(registered_depths))
    hi = max(np.max(raw_depths), np.max(registered_depths))
    bins = np.arange(lo, hi + 2 * DEPTH_BIN_UM, DEPTH_BIN_UM)
    concentration = [np.sum((np.histogram(d, bins)[0] / len(d)) ** 2) for d in (raw_depths, registered_depths)]
    return float(concentration[1] / max(concentration[0], 1e-12))


def plot_drift_raster(path, times_s, depths_um, amplitudes, motion_info=None, title="drift raster"):
    """Spike depth vs time coloured by amplitude, with the motion estimate overlaid; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if motion_info is not None and motion_info.drifting else 1,
                             figsize=(12, 5), squeeze=False, sharey=True)
    amp = np.clip(np.log1p(amplitudes), 0, np.nanpercentile(np.log1p(amplitudes), 99))
    order = np.argsort(amp)
    ax = axes[0, 0]
    ax.scatter(times_s[order], depths_um[order], c=amp[order], s=1, cmap="viridis", lw=0, rasterized=True)
    # a few wild localizations should not squash the picture
    lo, hi = np.nanpercentile(depths_um, [0.5, 99.5])
    ax.set(xlabel="time (s)", ylabel="depth (um)", title=title, ylim=(lo - 50, hi + 50))
    if motion_info is not None and motion_info.drifting:
        t = np.linspace(times_s.min(), times_s.max(), 200)
        for z in np.linspace(np.nanpercentile(depths_um, 10), np.nanpercentile(depths_um, 90), 5):
            ax.plot(t, z + motion_info.disp_at_s(t, np.full_like(t, z)), color="r", lw=1)
        reg = motion_info.correct_s(times_s, depths_um)
        axes[0, 1].scatter(times_s[order], reg[order], c=amp[order], s=1, cmap="viridis", lw=0,
                           rasterized=True)
        axes[0, 1].set(xlabel="time (s)", title="registered")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
