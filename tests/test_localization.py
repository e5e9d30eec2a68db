"""Point-source localization recovers simulated spike positions."""

import numpy as np
import pytest
import torch

from dartsort_si.channels import make_channel_index
from dartsort_si.localization import (
    BATCH_SIZE,
    Y_START_UM,
    localize_amplitude_vectors,
    localize_waveforms,
    ptp_amplitudes,
)

RADIUS_UM = 100.0


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Many small batched ops: on a shared 2-core box, 2 intra-op threads that
    compete with another busy process run 10-20x slower than 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def neuropixels_geom(n_channels=64):
    """Neuropixels 1.0-like: 2 channels per row, rows every 20 um, staggered columns."""
    xz = []
    for row in range(n_channels // 2):
        columns = (43, 11) if row % 2 == 0 else (59, 27)
        xz += [(x, 20.0 * row) for x in columns]
    return np.array(xz, dtype=float)


def simulate_sources(n, geom, rng):
    """Random sources over the probe, with alpha set so the peak amplitude SNR is 10..40."""
    positions = np.column_stack([
        rng.uniform(11, 59, n),
        rng.uniform(10, 60, n),
        rng.uniform(geom[:, 1].min(), geom[:, 1].max(), n),
    ])
    dist = np.sqrt(
        (positions[:, None, 0] - geom[None, :, 0]) ** 2
        + positions[:, None, 1] ** 2
        + (positions[:, None, 2] - geom[None, :, 1]) ** 2
    )
    peak_snr = rng.uniform(10, 40, n)
    alpha = peak_snr * dist.min(axis=1)
    clean = alpha[:, None] / dist  # (n, C) amplitudes on all channels
    return positions, clean


def on_neighborhoods(values, main_channels, channel_index):
    """Take (n, ..., C) per-channel values onto each spike's channel_index row, NaN padded."""
    pad = np.full(values.shape[:-1] + (1,), np.nan)
    padded = np.concatenate([values, pad], axis=-1)
    rows = channel_index[main_channels]
    idx = np.arange(len(values))
    if values.ndim == 2:
        return padded[idx[:, None], rows]
    return padded[idx[:, None, None], np.arange(values.shape[1])[None, :, None], rows[:, None, :]]


def report_errors(label, estimate, truth):
    err = np.abs(estimate[:, :3] - truth)
    med = np.median(err, axis=0)
    med3d = np.median(np.linalg.norm(estimate[:, :3] - truth, axis=1))
    print(f"\n{label}: median |error| x={med[0]:.2f} y={med[1]:.2f} z={med[2]:.2f} um, "
          f"3D={med3d:.2f} um (n={len(truth)})")
    return med


def test_amplitude_vectors_recover_positions():
    rng = np.random.default_rng(0)
    geom = neuropixels_geom()
    channel_index = make_channel_index(geom, RADIUS_UM)
    n = BATCH_SIZE + 904  # more than one internal batch
    truth, clean = simulate_sources(n, geom, rng)
    noisy = clean + rng.normal(size=clean.shape)
    main = noisy.argmax(axis=1)
    amps = on_neighborhoods(noisy, main, channel_index)

    est = localize_amplitude_vectors(amps, main, geom, channel_index, RADIUS_UM)
    assert est.shape == (n, 4) and est.dtype == np.float64
    assert np.all(est[:, 1] > 0)
    med = report_errors("amplitude vectors", est, truth)
    assert med[0] < 5 and med[2] < 5
    assert med[1] < 10

    # batching is per spike: running in pieces must give the same numbers
    half = n // 2
    pieces = np.concatenate([
        localize_amplitude_vectors(amps[:half], main[:half], geom, channel_index, RADIUS_UM),
        localize_amplitude_vectors(amps[half:], main[half:], geom, channel_index, RADIUS_UM),
    ])
    np.testing.assert_array_equal(est, pieces)

    # torch inputs give the same answer
    est_torch = localize_amplitude_vectors(
        torch.from_numpy(amps[:500]), torch.from_numpy(main[:500]), geom, channel_index, RADIUS_UM
    )
    np.testing.assert_array_equal(est_torch, est[:500])


def test_waveforms_recover_positions():
    rng = np.random.default_rng(1)
    geom = neuropixels_geom()
    channel_index = make_channel_index(geom, RADIUS_UM)
    n = 800
    truth, clean = simulate_sources(n, geom, rng)
    # a fixed biphasic shape with peak-to-peak 1, scaled by the source amplitudes
    t = np.linspace(-1, 1, 42)
    shape = -np.exp(-(t / 0.1) ** 2) + 0.5 * np.exp(-((t - 0.3) / 0.2) ** 2)
    shape /= np.ptp(shape)
    waveforms = shape[None, :, None] * clean[:, None, :]
    main = clean.argmax(axis=1)
    waveforms = on_neighborhoods(waveforms, main, channel_index)

    ptp = ptp_amplitudes(torch.from_numpy(waveforms))
    np.testing.assert_allclose(ptp, on_neighborhoods(clean, main, channel_index))

    est = localize_waveforms(waveforms, main, geom, channel_index, RADIUS_UM)
    assert est.shape == (n, 4) and np.all(est[:, 1] > 0)
    med = report_errors("waveforms (noiseless)", est, truth)
    assert med[0] < 1 and med[1] < 1 and med[2] < 1


def test_fallbacks_and_radius():
    geom = neuropixels_geom()
    channel_index = make_channel_index(geom, RADIUS_UM)
    k = channel_index.shape[1]
    main = np.array([20, 20, 20])
    amps = np.full((3, k), np.nan)
    amps[0, :2] = [4.0, 2.0]  # too few channels: centre of mass, y at its start value
    amps[1, :] = 0.0  # nothing to fit: main channel position
    rows = channel_index[main[2]]
    amps[2] = np.where(rows < len(geom), 1.0, np.nan)

    est = localize_amplitude_vectors(amps, main, geom, channel_index, RADIUS_UM)
    com = (4 * geom[rows[0]] + 2 * geom[rows[1]]) / 6
    np.testing.assert_allclose(est[0, [0, 2]], com)
    np.testing.assert_allclose(est[0, 1], Y_START_UM)
    np.testing.assert_allclose(est[1, [0, 2]], geom[20])
    assert np.isfinite(est).all()

    # a huge amplitude outside the radius is ignored
    small = localize_amplitude_vectors(amps[2:], main[2:], geom, channel_index, 30.0)
    far = np.argmax(np.linalg.norm(geom[np.minimum(rows, len(geom) - 1)] - geom[20], axis=1))
    amps_far = amps[2:].copy()
    amps_far[0, far] = 1e6
    np.testing.assert_array_equal(
        small, localize_amplitude_vectors(amps_far, main[2:], geom, channel_index, 30.0)
    )


def test_exponential_model_recovers_positions_and_decay():
    """Footprints that fall off as exp(-r / s) (as SpikeInterface simulates them): the
    exponential-decay fit finds the source and its decay length."""
    rng = np.random.default_rng(3)
    geom = neuropixels_geom()
    channel_index = make_channel_index(geom, RADIUS_UM)
    n = 3000
    truth, _ = simulate_sources(n, geom, rng)
    dist = np.sqrt((truth[:, None, 0] - geom[None, :, 0]) ** 2 + truth[:, None, 1] ** 2
                   + (truth[:, None, 2] - geom[None, :, 1]) ** 2)
    decay = rng.uniform(10, 40, n)
    shape = np.exp(-dist / decay[:, None])
    clean = rng.uniform(10, 40, n)[:, None] * shape / shape.max(axis=1, keepdims=True)
    noisy = clean + rng.normal(size=clean.shape)
    main = noisy.argmax(axis=1)
    amps = on_neighborhoods(noisy, main, channel_index)

    est = localize_amplitude_vectors(amps, main, geom, channel_index, RADIUS_UM, model="exponential")
    assert est.shape == (n, 5) and np.all(est[:, 1] > 0) and np.all(est[:, 4] > 0)
    med = report_errors("exponential model", est, truth)
    assert med[0] < 5 and med[2] < 5
    assert np.median(np.abs(est[:, 4] - decay) / decay) < 0.25

    # the 1/r model, fitted to the same spikes, is pulled off in depth
    point = localize_amplitude_vectors(amps, main, geom, channel_index, RADIUS_UM)
    assert report_errors("point source on exp footprints", point, truth)[2] > med[2]

    with pytest.raises(ValueError, match="model must be one of"):
        localize_amplitude_vectors(amps[:2], main[:2], geom, channel_index, model="dipole")


def noisy_amplitude_vectors(n, seed):
    """(geom, channel_index, amplitude vectors on the main channels' neighbourhoods, main
    channels) of n simulated sources with unit noise on a Neuropixels geometry."""
    rng = np.random.default_rng(seed)
    geom = neuropixels_geom()
    channel_index = make_channel_index(geom, RADIUS_UM)
    _, clean = simulate_sources(n, geom, rng)
    noisy = clean + rng.normal(size=clean.shape)
    main = noisy.argmax(axis=1)
    return geom, channel_index, on_neighborhoods(noisy, main, channel_index), main


@pytest.mark.parametrize("model", ["pointsource", "exponential"])
def test_numpy_fit_agrees_with_the_torch_fit(model):
    """The CPU fits in numpy, CUDA in torch: the same steps, so the same positions up to rounding
    (which the accept-if-better steps may carry further on a rare spike)."""
    from dartsort_si import localization as loc

    geom, channel_index, amps, main = noisy_amplitude_vectors(1500, seed=3)
    fit = loc._MODELS[model]
    batch = loc._neighborhood_batch(amps, main, geom, channel_index, RADIUS_UM, None)
    in_numpy = loc._fit_batch(*batch, 30, fit)
    in_torch = loc._fit_batch(*(torch.as_tensor(a, dtype=torch.float64) for a in batch), 30, fit).numpy()
    assert isinstance(batch[0], np.ndarray) and in_numpy.shape == in_torch.shape == (1500, fit.n_params + 1)
    apart = np.abs(in_numpy[:, :3] - in_torch[:, :3]).max(1)  # um
    assert np.quantile(apart, 0.9) < 1e-6 and apart.max() < 0.1
    assert np.median(np.abs(in_numpy - in_torch) / np.maximum(np.abs(in_torch), 1), axis=0).max() < 1e-9


def test_batches_fitted_side_by_side_give_the_serial_fits():
    """n_threads > 1: the batches run in threads, each written to its own rows: the same array."""
    geom, channel_index, amps, main = noisy_amplitude_vectors(700, seed=5)
    serial = localize_amplitude_vectors(amps, main, geom, channel_index, batch_size=128, model="exponential")
    threaded = localize_amplitude_vectors(amps, main, geom, channel_index, batch_size=128, model="exponential",
                                          n_threads=3)
    assert np.isfinite(serial[:, :3]).all()
    np.testing.assert_array_equal(threaded, serial)
