"""Train the shipped SingleChannelWaveformDenoiser weights on simulated spikes.

Clean single-channel waveforms come from `spikeinterface.core.generate_templates`
(several unit parameter ranges, many random unit positions on a generated
probe, 30 kHz, ms_before=1.4, ms_after=2.6+0.1/3 -> T=121, trough at 42).
Each training example is one channel of one template, scaled to a random peak
amplitude 3..40 (noise-std units; channels away from the peak get the
template's smaller share of it), with a small random time shift, sometimes a
sign flip or a colliding neighbour spike, plus standardized band-limited
Gaussian noise. Loss: MSE between the net's output and the clean waveform.

Usage:
    python scripts/train_single_channel_denoiser.py [--seconds 180] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from probeinterface import generate_multi_columns_probe
from scipy import signal
from spikeinterface.core.generate import generate_templates
from torch.nn import functional as F

# run from a checkout without installing: make the repo's package importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dartsort_si.denoisers import SHIPPED_WEIGHTS_PATH, SingleChannelWaveformDenoiser, shift_rows

FS = 30000.0
MS_BEFORE = 1.4
MS_AFTER = 2.6 + 0.1 / 3
T = 121
UPSAMPLE = 4  # sub-sample jitter of the templates

# Several families of waveform shapes: SpikeInterface's defaults, and broader
# ranges so the net also sees narrow/wide and more biphasic spikes.
UNIT_PARAM_SETS = [
    {},
    dict(
        depolarization_ms=(0.06, 0.2),
        repolarization_ms=(0.3, 1.0),
        recovery_ms=(0.6, 1.6),
        positive_amplitude=(0.05, 0.6),
        smooth_ms=(0.02, 0.1),
        spatial_decay=(8.0, 60.0),
    ),
    dict(repolarization_ms=(0.2, 0.5), recovery_ms=(0.5, 1.0), positive_amplitude=(0.2, 0.5)),
]


def simulate_clean_rows(n_units_per_set: int, seed: int) -> np.ndarray:
    """Single-channel clean waveforms (n, UPSAMPLE, T), peak |value| of their unit = 1.

    Only channels with a visible share of the spike are kept, plus a few faint
    ones so the net also learns to output ~0 where there is nothing.
    """
    rng = np.random.default_rng(seed)
    probe = generate_multi_columns_probe(
        num_columns=4, num_contact_per_column=24, xpitch=16, ypitch=20,
        y_shift_per_column=[0, -10, 0, -10],
    )
    loc = probe.contact_positions
    rows = []
    for k, params in enumerate(UNIT_PARAM_SETS):
        n = n_units_per_set
        units = np.c_[
            rng.uniform(loc[:, 0].min() - 30, loc[:, 0].max() + 30, n),
            rng.uniform(loc[:, 1].min(), loc[:, 1].max(), n),
            rng.uniform(5.0, 80.0, n),
        ]
        tpl = generate_templates(
            loc, units, FS, MS_BEFORE, MS_AFTER, seed=seed * 100 + k,
            upsample_factor=UPSAMPLE, unit_params=params,
        )  # (n, T, C, UPSAMPLE)
        tpl = tpl / np.abs(tpl).max(axis=(1, 2, 3), keepdims=True)
        per_chan = tpl.transpose(0, 2, 3, 1).reshape(-1, UPSAMPLE, T)  # (n*C, UP, T)
        amp = np.abs(per_chan).max(axis=(1, 2))
        faint = np.flatnonzero(amp <= 0.1)
        keep = np.concatenate([
            np.flatnonzero(amp > 0.1),
            rng.choice(faint, size=min(len(faint), len(faint) // 10), replace=False),
        ])
        rows.append(per_chan[keep])
    return np.concatenate(rows).astype(np.float32)


def noise_bank(n: int, seed: int) -> np.ndarray:
    """(n, T) standardized Gaussian noise, band-limited with random filters.

    Real standardized traces are highpassed (~300 Hz) and lose power at high
    frequencies, so white noise is band-passed with a random upper cutoff and
    renormalised to std 1.
    """
    rng = np.random.default_rng(seed)
    out = []
    for lo_cut in (2500.0, 4000.0, 6000.0, 9000.0, None):
        white = rng.standard_normal((n // 5, T + 200))
        if lo_cut is None:
            sos = signal.butter(2, 300.0, "highpass", fs=FS, output="sos")
        else:
            sos = signal.butter(2, [300.0, lo_cut], "bandpass", fs=FS, output="sos")
        x = signal.sosfilt(sos, white, axis=1)[:, 200:]  # drop the filter's warm-up
        out.append(x / x.std())
    return np.concatenate(out).astype(np.float32)


def make_batch(clean_rows, noise, batch_size, gen):
    """A (noisy, clean) pair of (B, T) tensors, freshly randomized."""
    b = batch_size
    ix = torch.randint(len(clean_rows), (b,), generator=gen)
    jitter = torch.randint(UPSAMPLE, (b,), generator=gen)
    clean = clean_rows[ix, jitter]
    # log-uniform peak amplitudes 3..40: small spikes are the hard, common case
    amp = torch.exp(torch.empty(b).uniform_(np.log(3.0), np.log(40.0), generator=gen))
    clean = clean * amp[:, None]
    clean = shift_rows(clean, torch.randint(-3, 4, (b,), generator=gen))
    sign = torch.where(torch.rand(b, generator=gen) < 0.1, -1.0, 1.0)
    clean = clean * sign[:, None]
    # occasional colliding spike: part of what the net must remove
    other = clean_rows[torch.randint(len(clean_rows), (b,), generator=gen), 0]
    other = other * torch.empty(b, 1).uniform_(3.0, 20.0, generator=gen)
    offset = torch.randint(15, 60, (b,), generator=gen) * torch.where(
        torch.rand(b, generator=gen) < 0.5, -1, 1
    )
    collide = (torch.rand(b, generator=gen) < 0.15)[:, None]
    extra = torch.where(collide, shift_rows(other, offset), torch.zeros(()))
    nix = torch.randint(len(noise), (b,), generator=gen)
    nsign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    noisy = clean + extra + noise[nix] * nsign[:, None]
    return noisy, clean


def evaluate(model, clean_rows, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    noisy, clean = make_batch(clean_rows, noise, 20000, gen)
    with torch.no_grad():
        den = model(noisy)
    return F.mse_loss(noisy, clean).item(), F.mse_loss(den, clean).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="training time budget")
    ap.add_argument("--units-per-set", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; 1 is fastest for this small net on a shared 2-core box",
    )
    ap.add_argument("--out", type=Path, default=SHIPPED_WEIGHTS_PATH)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.monotonic()
    rows = torch.as_tensor(simulate_clean_rows(args.units_per_set, args.seed))
    val_rows = torch.as_tensor(simulate_clean_rows(200, args.seed + 1))
    noise = torch.as_tensor(noise_bank(100_000, args.seed))
    val_noise = torch.as_tensor(noise_bank(20_000, args.seed + 1))
    print(f"simulated {len(rows)} training rows in {time.monotonic() - t0:.1f} s")

    model = SingleChannelWaveformDenoiser(spike_length_samples=T)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.monotonic()
    step = 0
    next_report = 20.0
    while (elapsed := time.monotonic() - t0) < args.seconds:
        # cosine learning-rate decay over the time budget
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * min(elapsed / args.seconds, 1.0))) + 1e-5
        noisy, clean = make_batch(rows, noise, args.batch_size, gen)
        loss = F.mse_loss(model(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if elapsed > next_report:
            next_report += 20.0
            before, after = evaluate(model.eval(), val_rows, val_noise, 1)
            model.train()
            print(f"step {step} {elapsed:.0f}s train {loss.item():.4f} val {before:.3f} -> {after:.4f}")

    model.eval()
    before, after = evaluate(model, val_rows, val_noise, 1)
    print(f"trained {step} steps in {time.monotonic() - t0:.1f} s; "
          f"held-out MSE {before:.3f} -> {after:.4f} ({before / after:.1f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
