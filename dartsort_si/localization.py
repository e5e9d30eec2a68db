"""Localization of spikes (point source, or exponential decay), batched: numpy on the CPU, torch on CUDA.

Each spike is modelled as a point current source at (x, y, z) with y > 0 the
distance from the probe plane; the amplitude seen on a channel at (x_c, z_c) is

    a_c ~ alpha / sqrt((x - x_c)^2 + y^2 + (z - z_c)^2).

We fit (x, y, z, alpha) by least squares with Levenberg-Marquardt steps that
run for the whole batch at once. After every step alpha is replaced by its
closed-form optimum for the new position (the model is linear in alpha), so
the search is effectively over the 3 position parameters. y is optimised as
log(y), which keeps it positive without a constraint.

The same fit runs with a second footprint, alpha * exp(-r / s) with the decay
length s free (model="exponential"). Motion estimation uses it: when a unit's
amplitude does not fall off as 1/r, the point-source depth is biased by an
amount that changes as the unit drifts past the contacts, and DREDge reads that
as motion. `point_source_localizations` (the features clustering uses) stay
point-source fits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# spikes per fit: numpy's fits of 8192 spikes took 325 ms in batches of 2048, 335 in 1024, 464 in
# 4096 (exponential model, one thread); a spike's fit does not depend on its batch
BATCH_SIZE = 2048
Y_START_UM = 20.0
MIN_CHANNELS = 4  # fewer valid channels than parameters: fall back to centre of mass
# bounds on y keep the model away from its singularity on the probe plane
Y_MIN_UM = 0.1
Y_MAX_UM = 1000.0
LAMBDA_START = 1e-2
LAMBDA_MIN, LAMBDA_MAX = 1e-9, 1e9
# exponential-decay model: start and hard bounds of the fall-off length (um)
DECAY_START_UM = 30.0
DECAY_MIN_FIT_UM, DECAY_MAX_FIT_UM = 1.0, 1000.0


# -- public API


def ptp_amplitudes(waveforms, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Peak-to-peak amplitude per channel of (N, T, K) waveforms, ignoring NaNs.

    Channels that are NaN at every time step (padding) come out NaN.
    """
    n = len(waveforms)
    out = np.empty((n, waveforms.shape[2]), dtype=np.float64)
    # batches bound the memory of the float64 copy
    for start in range(0, n, batch_size):
        chunk = _as_tensor(waveforms[start : start + batch_size], "cpu")
        out[start : start + len(chunk)] = _nan_ptp(chunk).numpy()
    return out


def localize_waveforms(
    waveforms,
    main_channels,
    geom,
    channel_index,
    radius_um: float = 100.0,
    n_iter: int = 30,
    device=None,
) -> np.ndarray:
    """Localize (N, T, K) waveforms on `channel_index[main_channels]` by their ptp amplitudes.

    Returns (N, 4) float64: x, y, z (absolute probe coordinates), alpha.
    """
    amplitudes = ptp_amplitudes(waveforms)
    return localize_amplitude_vectors(
        amplitudes, main_channels, geom, channel_index,
        radius_um=radius_um, n_iter=n_iter, device=device,
    )


def localize_amplitude_vectors(
    amplitude_vectors,
    main_channels,
    geom,
    channel_index,
    radius_um: float = 100.0,
    n_iter: int = 30,
    device=None,
    batch_size: int = BATCH_SIZE,
    model: str = "pointsource",
    n_threads: int = 1,
) -> np.ndarray:
    """Fit a source to each (K,) amplitude vector on `channel_index[main_channels]`.

    NaN amplitudes, padding channels and channels farther than `radius_um` from
    the main channel are ignored. With model="pointsource" returns (N, 4)
    float64: x, y, z, alpha; with model="exponential" (N, 5): x, y, z, alpha,
    decay length (um). n_threads: batches fitted side by side on the CPU (numpy releases the GIL
    in its loops); for callers that run alone, not for the chunked passes' workers.
    """
    if model not in _MODELS:
        raise ValueError(f"model must be one of {sorted(_MODELS)}, got {model!r}")
    fit_model = _MODELS[model]
    device = torch.device("cpu" if device is None else device)
    amplitudes = _as_numpy(amplitude_vectors)
    main_channels = _as_numpy(main_channels).astype(np.int64)
    geom = _as_numpy(geom).astype(np.float64)
    channel_index = _as_numpy(channel_index).astype(np.int64)

    out = np.empty((len(amplitudes), fit_model.n_params + 1), dtype=np.float64)  # + alpha
    # on the CPU the fit runs in numpy: a chunk's fit (subtraction's, matching's) is a few hundred
    # spikes, where torch's ~10 us per operation (30 iterations of ~45) took most of the time:
    # 200 spikes 10-13 against 17-23 ms; 1000 the same; 4096 193 against 161 ms (one thread).
    # Matching's and subtraction's fits were 19 s of a 300 s x 128 ch sort's CPU (py-spy).
    in_numpy = device.type == "cpu"

    def fit(start):
        sl = slice(start, start + batch_size)
        amps, xc, zc, mask, main_xz = _neighborhood_batch(
            amplitudes[sl], main_channels[sl], geom, channel_index, radius_um, None if in_numpy else device
        )
        out[sl] = _as_numpy(_fit_batch(amps, xc, zc, mask, main_xz, n_iter, fit_model))

    starts = range(0, len(amplitudes), batch_size)
    if in_numpy and n_threads > 1 and len(starts) > 1:
        # each batch is fitted as it would be alone: the same output as one thread
        with ThreadPoolExecutor(min(n_threads, len(starts))) as pool:
            list(pool.map(fit, starts))
    else:
        for start in starts:
            fit(start)
    return out


# -- input handling


def _as_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_tensor(x, device) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)


def _nan_ptp(waveforms: torch.Tensor) -> torch.Tensor:
    nan = torch.isnan(waveforms)
    top = torch.where(nan, -torch.inf, waveforms).amax(dim=1)
    bottom = torch.where(nan, torch.inf, waveforms).amin(dim=1)
    ptp = top - bottom
    return torch.where(nan.all(dim=1), torch.nan, ptp)


def _neighborhood_batch(amplitudes, main_channels, geom, channel_index, radius_um, device):
    """Amplitudes, channel positions and validity mask on each spike's neighbourhood.

    Invalid entries get amplitude 0 and position 0 so that masked sums stay finite.
    """
    n_chans = len(geom)
    neighbors = channel_index[main_channels]  # (B, K), n_chans at padding
    padded_geom = np.concatenate([geom, np.full((1, 2), np.nan)], axis=0)
    positions = padded_geom[neighbors]  # (B, K, 2)
    main_xz = geom[main_channels]  # (B, 2)
    dist = np.sqrt(((positions - main_xz[:, None, :]) ** 2).sum(axis=2))
    amplitudes = amplitudes.astype(np.float64)
    # NaN distance (padding) compares False, so padding is excluded here too
    mask = (neighbors < n_chans) & np.isfinite(amplitudes) & (dist <= radius_um)

    amps = np.where(mask, amplitudes, 0.0)
    positions = np.where(mask[:, :, None], positions, 0.0)
    if device is None:  # fitted in numpy
        return amps, positions[..., 0], positions[..., 1], mask.astype(np.float64), main_xz
    to = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
    return to(amps), to(positions[..., 0]), to(positions[..., 1]), to(mask), to(main_xz)


# -- the fit


# (column of theta, lower, upper), clamped after every step
_LOGY_BOUNDS = (1, np.log(Y_MIN_UM), np.log(Y_MAX_UM))


class _PointSource:
    """a_c = alpha / r_c; parameters x, log y, z."""

    n_params = 3
    start = ()
    bounds = (_LOGY_BOUNDS,)

    @staticmethod
    def basis(dx, y, dz, extra, grad=True, xp=torch):
        """q_c, and dq_c/dparam for every parameter when grad: (B, K) and (B, K, P)."""
        q = 1 / xp.sqrt(dx * dx + y * y + dz * dz)
        if not grad:
            return q, None
        q3 = q * q * q
        return q, xp.stack([-dx * q3, -y * y * q3, -dz * q3], 2)


class _ExponentialDecay:
    """a_c = alpha * exp(-r_c / s) with the decay length s fitted too; parameters x, log y, z, log s.

    Spikes whose amplitude falls off faster or slower than 1/r (real
    neurons near the probe, and the footprints SpikeInterface simulates) bias
    the point-source depth by an amount that changes as the unit drifts past
    the contacts; a free fall-off length takes most of that bias out.
    """

    n_params = 4
    start = (np.log(DECAY_START_UM),)
    bounds = (_LOGY_BOUNDS, (3, np.log(DECAY_MIN_FIT_UM), np.log(DECAY_MAX_FIT_UM)))

    @staticmethod
    def basis(dx, y, dz, extra, grad=True, xp=torch):
        s = xp.exp(extra[0])[:, None]
        r = xp.sqrt(dx * dx + y * y + dz * dz)
        q = xp.exp(-r / s)
        if not grad:
            return q, None
        g = -q / (s * r)  # dq/dr divided by r
        return q, xp.stack([g * dx, g * y * y, g * dz, q * r / s], 2)


_MODELS = dict(pointsource=_PointSource, exponential=_ExponentialDecay)


def _fit_batch(amps, xc, zc, mask, main_xz, n_iter, model=_PointSource):
    """Levenberg-Marquardt over a batch; returns (B, P + 1) x, y, z, alpha[, decay]. numpy arrays
    (the CPU) or torch tensors (CUDA), the same steps: a chunk's fit is ~50 steps x 30 iterations
    on a few hundred spikes, where torch's ~10 us per operation took most of the time (one
    thread, 200 spikes: 18 ms)."""
    xp = torch if torch.is_tensor(amps) else np
    x, z, ok = _center_of_mass(amps, xc, zc, mask, main_xz, xp)
    theta = xp.stack([x, xp.full_like(x, np.log(Y_START_UM)), z]
                     + [xp.full_like(x, v) for v in model.start], 1)
    alpha, loss = _profile_alpha(amps, xc, zc, mask, theta, model, xp)
    lam = xp.full_like(x, LAMBDA_START)

    for _ in range(n_iter):
        theta_new = _lm_step(amps, xc, zc, mask, theta, alpha, lam, model, xp)
        alpha_new, loss_new = _profile_alpha(amps, xc, zc, mask, theta_new, model, xp)
        # accept per spike only if the loss went down; otherwise damp harder.
        # Spikes that must fall back never move.
        accept = ok & (loss_new < loss)
        theta = xp.where(accept[:, None], theta_new, theta)
        alpha = xp.where(accept, alpha_new, alpha)
        loss = xp.where(accept, loss_new, loss)
        lam = xp.clip(xp.where(accept, lam / 3, lam * 3), LAMBDA_MIN, LAMBDA_MAX)

    cols = [theta[:, 0], xp.exp(theta[:, 1]), theta[:, 2], alpha] + [xp.exp(v) for v in theta[:, 3:].T]
    return xp.stack(cols, 1)


def _center_of_mass(amps, xc, zc, mask, main_xz, xp):
    """Amplitude-weighted (x, z) start, and which spikes have enough data to fit."""
    weights = xp.clip(amps, 0, None) * mask
    total = weights.sum(1)
    ok = (total > 0) & (mask.sum(1) >= MIN_CHANNELS)
    safe_total = xp.where(total > 0, total, 1.0)
    # with no positive amplitude at all, stay on the main channel
    x = xp.where(total > 0, (weights * xc).sum(1) / safe_total, main_xz[:, 0])
    z = xp.where(total > 0, (weights * zc).sum(1) / safe_total, main_xz[:, 1])
    return x, z, ok


def _basis(xc, zc, theta, model, grad, xp):
    dx = theta[:, 0, None] - xc
    dz = theta[:, 2, None] - zc
    y = xp.exp(theta[:, 1])[:, None]
    return model.basis(dx, y, dz, theta[:, 3:].T, grad, xp)


def _profile_alpha(amps, xc, zc, mask, theta, model, xp):
    """Closed-form best alpha >= 0 for a fixed position, and the resulting loss."""
    q, _ = _basis(xc, zc, theta, model, False, xp)
    q = q * mask
    num = (amps * q).sum(1)
    den = (q * q).sum(1)
    alpha = xp.clip(xp.where(den > 0, num / xp.where(den > 0, den, 1.0), 0.0), 0, None)
    resid = (amps - alpha[:, None] * q) * mask
    return alpha, (resid * resid).sum(1)


def _lm_step(amps, xc, zc, mask, theta, alpha, lam, model, xp):
    """One damped Gauss-Newton step on (theta, alpha); returns the new theta."""
    q, dq = _basis(xc, zc, theta, model, True, xp)
    # d(residual)/d(param) with residual = a - alpha * q
    jac = xp.concatenate([-alpha[:, None, None] * dq, -q[:, :, None]], 2) * mask[:, :, None]
    resid = (amps - alpha[:, None] * q) * mask

    hess = jac.swapaxes(1, 2) @ jac  # (B, P+1, P+1)
    grad = (jac * resid[:, :, None]).sum(1)
    diag = xp.diagonal(hess, 0, 1, 2)
    # Marquardt scaling by diag(H), plus a floor so a zero column stays solvable
    floor = 1e-12 * xp.amax(diag, 1)[:, None] + 1e-30
    eye = xp.eye(hess.shape[1], dtype=hess.dtype) if xp is np else torch.eye(hess.shape[1], dtype=hess.dtype,
                                                                              device=hess.device)
    damped = hess + eye * (lam[:, None] * (diag + floor) + floor)[:, :, None]
    step, good = _solve(damped, -grad, xp)
    step = step[:, :-1]  # alpha is profiled, not stepped
    good = good & xp.isfinite(step).all(1)
    theta = theta + xp.where(good[:, None], step, 0.0)
    for col, lo, hi in model.bounds:
        theta[:, col] = xp.clip(theta[:, col], lo, hi)
    return theta


def _solve(a, b, xp):
    """(x, solved): a (B, n, n) x = b (B, n), solved False where a is singular."""
    if xp is torch:
        x, info = torch.linalg.solve_ex(a, b[:, :, None])
        return x[..., 0], info == 0
    try:
        return np.linalg.solve(a, b[:, :, None])[..., 0], np.ones(len(a), dtype=bool)
    except np.linalg.LinAlgError:  # one singular matrix fails the batch: solve them one by one
        x, solved = np.zeros_like(b), np.ones(len(a), dtype=bool)
        for i in range(len(a)):
            try:
                x[i] = np.linalg.solve(a[i], b[i])
            except np.linalg.LinAlgError:
                solved[i] = False
        return x, solved
