"""DREDge motion estimation on spikes with a known displacement."""

import numpy as np
import pytest

from dartsort_si.config import DARTsortUserConfig
from dartsort_si.motion import estimate_motion

DURATION_S = 60.0
GEOM = np.array([[x, 20.0 * r] for r in range(40) for x in (0.0, 32.0)])  # 0..780 um


def true_disp(t):
    return 15.0 * np.sin(2 * np.pi * t / 40.0)


def drifting_spikes(rng, n_units=25, rate_hz=20.0, outlier_fraction=0.03, unit_depths=None):
    """Units at fixed depths (unit_depths, or n_units drawn over GEOM) that all move by
    true_disp(t), plus a few wild depths."""
    depths0 = rng.uniform(50, 730, n_units) if unit_depths is None else np.asarray(unit_depths, float)
    amps0 = rng.uniform(5, 30, len(depths0))
    times, depths, amps = [], [], []
    for z, a in zip(depths0, amps0):
        t = np.sort(rng.uniform(0, DURATION_S, rng.poisson(rate_hz * DURATION_S)))
        times.append(t)
        depths.append(z + true_disp(t) + rng.normal(0, 2.0, len(t)))
        amps.append(a * rng.uniform(0.8, 1.2, len(t)))
    times, depths, amps = map(np.concatenate, (times, depths, amps))
    # failed localizations land anywhere, thousands of um off the probe
    wild = rng.random(len(times)) < outlier_fraction
    depths[wild] = rng.uniform(-5000, 5000, wild.sum())
    return times, depths, amps


def mae_against_truth(me, depths=(200.0, 400.0, 600.0)):
    t = np.arange(2.0, DURATION_S - 2.0, 0.5)
    errs = []
    for z in depths:
        d = me.disp_at_s(t, np.full_like(t, z)) - true_disp(t)
        errs.append(np.abs(d - np.median(d)))  # motion is defined up to a constant
    return float(np.mean(errs))


@pytest.mark.parametrize("rigid", [True, False])
def test_motion_recovers_known_drift(rigid):
    rng = np.random.default_rng(0)
    times, depths, amps = drifting_spikes(rng)
    cfg = DARTsortUserConfig(rigid=rigid)
    me = estimate_motion(times, depths, amps, cfg, geom=GEOM, progress=False)
    err = mae_against_truth(me)
    print(f"\nrigid={rigid}: motion MAE {err:.2f} um (true peak-to-peak 30 um)")
    assert err < 2.0


def test_too_few_spikes_is_an_error():
    cfg = DARTsortUserConfig()
    with pytest.raises(ValueError, match="do_motion_estimation=False"):
        estimate_motion(np.arange(50.0), np.full(50, 100.0), np.ones(50), cfg, geom=GEOM, progress=False)


def test_an_estimate_that_blurs_the_depths_is_refused():
    """A registration must line spikes up: static units corrected by a made-up jump of 120 um
    (what DREDge gave an 8 s, 16-channel static recording) come out blurred, drifting units
    corrected by their true drift come out sharper."""
    from dartsort_si.motion import MIN_SHARPENING, sharpening

    rng = np.random.default_rng(0)
    t = rng.uniform(0, 8, 2000)
    depths = rng.choice([10.0, 15.0, 60.0, 65.0], 2000) + rng.normal(0, 1.5, 2000)
    jump = np.where(t < 4, 41.0, -80.0)
    assert sharpening(depths, depths - jump) < MIN_SHARPENING
    drift = 10 * np.sin(t)
    assert sharpening(depths + drift, depths) > 1.5
    assert sharpening(depths, depths) == pytest.approx(1.0)


def test_motion_of_units_spread_thinly_along_a_long_probe(caplog):
    """A 384-channel probe (3.8 mm) holding a unit every ~300 um: DREDge's default activity threshold
    leaves out most of its windows, so the estimate is redone with a threshold relative to the data
    (motion.SPARSE_RELATIVE) and still recovers the drift."""
    import logging

    geom = np.array([[x, 20.0 * r] for r in range(192) for x in (0.0, 32.0)])
    times, depths, amps = drifting_spikes(np.random.default_rng(1), rate_hz=8.0, outlier_fraction=0.0,
                                          unit_depths=np.linspace(150, 3650, 12))
    with caplog.at_level(logging.INFO, logger="dartsort_si"):
        me = estimate_motion(times, depths, amps, DARTsortUserConfig(), geom=geom, progress=False)
    assert "too sparse" in caplog.text
    assert mae_against_truth(me, depths=(500.0, 1900.0, 3300.0)) < 2.0
