"""Neural-network waveform denoisers (pipeline stage 4).

Both nets work on one channel at a time: a noisy snippet of shape (B, T) in,
a clean estimate of shape (B, T) out. Multichannel snippets (N, T, K) go
through `denoise_waveforms`, which runs the net on every real channel and
keeps NaN on the padded ones.

- `SingleChannelWaveformDenoiser`: supervised on simulated spikes; the package
  ships small pretrained weights (`dartsort_si/pretrained/single_channel_denoiser.pt`,
  made by `scripts/train_single_channel_denoiser.py`) so it works offline.
- `Decollider`: the same network, trained unsupervised on the recording being
  sorted with the noisier-to-noisy objective (see `fit_decollider`).

Data are assumed standardized (noise std ~1 on every channel).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SHIPPED_WEIGHTS_PATH = Path(__file__).parent / "pretrained" / "single_channel_denoiser.pt"
# the shipped weights were trained on 30 kHz snippets (scripts/train_single_channel_denoiser.py)
SHIPPED_RATE_HZ = 30000.0
CLASS_NAMES = ("SingleChannelWaveformDenoiser", "Decollider")
# Decollider training keeps signal rows peaking within this many samples of the detection time
CENTRE_SLACK_SAMPLES = 6


# ----------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------


class SingleChannelWaveformDenoiser(nn.Module):
    """Two 1-D convolutions then one linear layer: (B, T) -> (B, T).

    The final linear layer maps the conv features straight onto the T output
    samples, so outputs live in a learned low-dimensional "spike shape" space;
    that is what removes the noise. Weights are ~100k floats (~0.4 MB).
    """

    def __init__(
        self,
        spike_length_samples: int = 121,
        n_filters: tuple[int, int] = (16, 8),
        kernel_sizes: tuple[int, int] = (5, 11),
    ):
        super().__init__()
        self.spike_length_samples = int(spike_length_samples)
        self.n_filters = tuple(int(n) for n in n_filters)
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        conv_out_len = self.spike_length_samples - sum(k - 1 for k in self.kernel_sizes)
        if conv_out_len < 1:
            raise ValueError(
                f"spike_length_samples={spike_length_samples} is too short for "
                f"kernel_sizes={kernel_sizes}."
            )
        self.conv1 = nn.Conv1d(1, self.n_filters[0], self.kernel_sizes[0])
        self.conv2 = nn.Conv1d(self.n_filters[0], self.n_filters[1], self.kernel_sizes[1])
        self.out = nn.Linear(self.n_filters[1] * conv_out_len, self.spike_length_samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutions' output, flattened: what the last linear layer reads (B, F)."""
        h = F.relu(self.conv1(x[:, None, :]))
        return F.relu(self.conv2(h)).flatten(1)

    def init_kwargs(self) -> dict:
        return dict(
            spike_length_samples=self.spike_length_samples,
            n_filters=self.n_filters,
            kernel_sizes=self.kernel_sizes,
        )


class Decollider(SingleChannelWaveformDenoiser):
    """Same net, trained unsupervised on the recording (noisier-to-noisy).

    Training (see `fit_decollider`): y is a detected snippet, n a fresh noise
    snippet, z = y + n. The classic objective fits f(z) ~ y, and the clean
    estimate is then 2 f(y) - y. We parametrize f(z) = (z + g(z)) / 2 and keep
    g as the network, so that 2 f(y) - y = g(y): `forward` (the inference
    path) is simply g, the same as `SingleChannelWaveformDenoiser.forward`.
    This is the documented equivalent of 2 f(y) - y, and it lets the net
    start from the shipped supervised weights.

    Collisions: noisier-to-noisy alone teaches the net to reproduce whatever
    is in the window, including a neighbour's spike off the centre, and the
    subtraction peeler then subtracts that neighbour along with the centred
    spike (it is lost). So some training inputs also carry a clean off-centre
    spike c, and their target is y + c / 2: then E[target | z] = (s + z) / 2,
    which makes g(z) the centred spike s alone (see `fit_decollider`).
    """

    def noisier_to_noisy(self, z: torch.Tensor) -> torch.Tensor:
        return noisier_to_noisy(self, z)


def noisier_to_noisy(g: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """f(z) = (z + g(z)) / 2, the training-time prediction of y from z (g: a Decollider, or
    one wrapped in `Resampled`)."""
    return 0.5 * (z + g(z))


# ----------------------------------------------------------------------------
# inference
# ----------------------------------------------------------------------------


def resolve_device(device=None) -> torch.device:
    """None -> CUDA when available, else the CPU (as the config's `device`)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def denoise_waveforms(
    model: nn.Module, waveforms, batch_size: int = 4096, device=None
) -> torch.Tensor:
    """Apply a single-channel `model` to every channel of (N, T, K) snippets.

    Channels holding any NaN (padding) are skipped and stay NaN. Runs on
    `device` (default: where the model's weights are) and returns a float32
    tensor on the input tensor's device (CPU for numpy input).
    """
    x = torch.as_tensor(waveforms)
    out_device = x.device
    if x.ndim != 3:
        raise ValueError(f"waveforms must be (N, T, K), got shape {tuple(x.shape)}")
    n, t, k = x.shape
    run_device = torch.device(device) if device is not None else _model_device(model)
    model = model.to(run_device)

    # channel-major rows (N*K, T) so each row is one single-channel snippet
    rows = x.to(torch.float32).permute(0, 2, 1).reshape(n * k, t)
    valid = ~torch.isnan(rows).any(dim=1)
    out = torch.full_like(rows, torch.nan)
    valid_ix = torch.nonzero(valid).flatten()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(valid_ix), batch_size):
                ix = valid_ix[start : start + batch_size]
                batch = rows[ix].to(run_device)
                out[ix] = model(batch).to(out.device, torch.float32)
    finally:
        model.train(was_training)
    return out.reshape(n, k, t).permute(0, 2, 1).contiguous().to(out_device)


# ----------------------------------------------------------------------------
# unsupervised training on the recording
# ----------------------------------------------------------------------------


def _training_channels(
    waveforms, signal_ptp: float, other_fraction: float, rng: np.random.Generator,
    centred_only: bool = False,
) -> np.ndarray:
    """Single-channel rows (n, T) to train on, mostly channels with real signal.

    A pure-noise snippet of 121 samples (std 1) has a peak-to-peak of ~5-6, so
    `signal_ptp` ~8 keeps channels that carry a spike. A share of the others
    (`other_fraction` of the signal count) is kept too, so the net also learns
    to return ~0 on channels where the spike is faint or absent.
    With `centred_only`, signal rows whose biggest excursion is away from the
    detection time are dropped (see `_centred`).
    """
    x = torch.as_tensor(waveforms).to(torch.float32).cpu().numpy()
    # the rows without NaN, snippet by snippet and channel by channel, as flat (snippet, channel)
    # indices: only the rows kept are copied (all rows of 20,000 NP2 snippets, copied twice and
    # tested for NaN, took 3 s of fit_models, py-spy)
    flat = np.flatnonzero(~np.isnan(x).any(axis=1))
    if not len(flat):
        raise ValueError("fit_decollider: no channel without NaN among the training waveforms.")

    def rows(i):
        return x[flat[i] // x.shape[2], :, flat[i] % x.shape[2]]

    ptp = (x.max(axis=1) - x.min(axis=1)).reshape(-1)[flat]
    strong = np.flatnonzero(ptp > signal_ptp)
    if centred_only:
        strong = strong[_centred(rows(strong))]
    weak = np.flatnonzero(ptp <= signal_ptp)
    n_weak = min(len(weak), max(int(other_fraction * len(strong)), 1))
    weak = rng.choice(weak, size=n_weak, replace=False) if len(weak) else weak
    return rows(np.concatenate([strong, weak]))


def _centred(rows: np.ndarray, slack: int = CENTRE_SLACK_SAMPLES) -> np.ndarray:
    """True for rows whose biggest excursion sits at the detection time (the most
    common peak position, +- slack samples). A row whose biggest excursion is
    elsewhere mostly holds a colliding neighbour's spike; training on it would
    teach the net to reproduce off-centre spikes, which subtraction would then
    remove along with the centred one."""
    if not len(rows):
        return np.zeros(0, bool)
    where = np.abs(rows).argmax(axis=1)
    return np.abs(where - np.bincount(where).argmax()) <= slack


def _noise_windows(noise: torch.Tensor, n: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """n random noise windows of length t, with random sign and time reversal.

    Noise is symmetric and (roughly) stationary, so flipping its sign or
    reversing it in time gives new, equally valid noise for free.
    """
    ix = torch.randint(len(noise), (n,), generator=gen)
    start = torch.randint(noise.shape[1] - t + 1, (n,), generator=gen)
    cols = start[:, None] + torch.arange(t)[None, :]
    w = noise[ix[:, None], cols]
    sign = torch.randint(2, (n, 1), generator=gen) * 2.0 - 1.0
    flip = torch.rand(n, generator=gen) < 0.5
    w = torch.where(flip[:, None], w.flip(1), w)
    return w * sign


def fit_decollider(
    waveforms,
    noise_snippets,
    *,
    spike_length_samples: int = 121,
    max_seconds: float = 60.0,
    max_epochs: int = 200,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    signal_ptp: float = 8.0,
    other_fraction: float = 0.25,
    init_from_shipped: bool = True,
    num_threads: int | None = 1,
    device=None,
    seed: int = 0,
    progress: bool = True,
    collision_rate: float = 0.3,
    centred_only: bool = True,
    sampling_frequency: float = SHIPPED_RATE_HZ,
) -> nn.Module:
    """Train a `Decollider` on this recording's snippets, unsupervised.

    waveforms: (N, T, K) detected snippets (NaN on padded channels).
    noise_snippets: (M, T') spike-free noise from the same recording, T' >= T
    (longer stretches are cut into random windows).
    Each step: y = a batch of single-channel snippets, n = fresh noise, z = y + n;
    minimize ||f(z) - y||^2 with f(z) = (z + g(z)) / 2 (see `Decollider`).
    A share `collision_rate` of the inputs also gets a clean spike planted 15-60
    samples off the centre, with target y + c / 2 (see `Decollider`), so the net
    learns to leave colliding neighbours out of its output.
    Stops after `max_epochs` passes or `max_seconds`, whichever comes first.
    `init_from_shipped` starts g from the shipped supervised weights when the
    window is the shipped one (121 samples at 30 kHz, or the same window in ms at
    `sampling_frequency`: then g is trained through `Resampled`), so even a short
    budget gives a decent net. From random weights, a small recording's few spikes
    do not suffice: on a 20 s tetrode at 25 kHz the net shrank spikes 5-7x and
    subtraction took each spike 3-4 times.
    `num_threads`: torch CPU threads while training (restored afterwards; None
    leaves them alone). The batches are tiny, so extra threads mostly add
    synchronisation; on a busy 2-core machine 1 thread ran ~10x more steps.
    """
    t = int(spike_length_samples)
    device = resolve_device(device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    rows = _training_channels(waveforms, signal_ptp, other_fraction, rng, centred_only)
    if rows.shape[1] != t:
        raise ValueError(
            f"fit_decollider: waveforms have {rows.shape[1]} samples, "
            f"spike_length_samples={t}."
        )
    noise = torch.as_tensor(np.asarray(noise_snippets, dtype=np.float32))
    if noise.ndim != 2 or noise.shape[1] < t or not len(noise):
        raise ValueError(f"fit_decollider: noise_snippets must be (M, >= {t}), got {tuple(noise.shape)}")
    noise = noise[~torch.isnan(noise).any(dim=1)]
    y_all = torch.as_tensor(rows)

    model = _decollider_init(t, sampling_frequency, init_from_shipped).to(device)
    with _cpu_threads(num_threads, device):
        # clean estimates of the training spikes, to plant as off-centre collisions
        clean_bank = denoise_waveforms(model.eval(), y_all[:, :, None], device=device)[:, :, 0].cpu()
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
        _train_noisier_to_noisy(
            model, opt, y_all, noise, clean_bank, batch_size, max_epochs, max_seconds, device, gen,
            progress, collision_rate,
        )
    return model.eval()


def _decollider_init(t: int, sampling_frequency: float, init_from_shipped: bool) -> nn.Module:
    """A Decollider for t-sample snippets, from the shipped weights where they apply."""
    if init_from_shipped and SHIPPED_WEIGHTS_PATH.exists():
        shipped = _shipped_at_rate(t, sampling_frequency, device="cpu", strict=False)
        if shipped is not None:
            inner = shipped.model if isinstance(shipped, Resampled) else shipped
            model = Decollider(**inner.init_kwargs())
            model.load_state_dict(inner.state_dict())
            return Resampled(model, t) if isinstance(shipped, Resampled) else model
    return Decollider(spike_length_samples=t)


@contextlib.contextmanager
def _cpu_threads(num_threads: int | None, device: torch.device):
    """Temporarily set torch's CPU thread count (only when training on CPU)."""
    old = torch.get_num_threads()
    if num_threads is not None and device.type == "cpu":
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def shift_rows(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Shift each row of (B, T) by an integer number of samples, zero-filled."""
    t = x.shape[1]
    src = torch.arange(t)[None, :] - shifts[:, None]
    ok = (src >= 0) & (src < t)
    return torch.where(ok, x.gather(1, src.clamp(0, t - 1)), torch.zeros(()))


def _off_centre(clean_bank, n, rate, gen):
    """(n, T) planted collisions: a random clean spike shifted 15-60 samples either
    way for a share `rate` of the rows, zeros for the others."""
    c = clean_bank[torch.randint(len(clean_bank), (n,), generator=gen)]
    shift = torch.randint(15, 61, (n,), generator=gen) * (torch.randint(2, (n,), generator=gen) * 2 - 1)
    planted = torch.rand(n, 1, generator=gen) < rate
    return torch.where(planted, shift_rows(c, shift), torch.zeros(()))


def _train_noisier_to_noisy(
    model, opt, y_all, noise, clean_bank, batch_size, max_epochs, max_seconds, device, gen, progress,
    collision_rate,
):
    """The training loop of `fit_decollider`; stops at `max_seconds`."""
    from tqdm.auto import tqdm

    t = y_all.shape[1]
    steps_per_epoch = max(1, int(np.ceil(len(y_all) / batch_size)))
    t0 = time.monotonic()
    bar = tqdm(total=max_epochs * steps_per_epoch, desc="fit Decollider", disable=not progress)
    out_of_time = False
    for _ in range(max_epochs):
        order = torch.randperm(len(y_all), generator=gen)
        for start in range(0, len(order), batch_size):
            y = y_all[order[start : start + batch_size]]
            c = _off_centre(clean_bank, len(y), collision_rate, gen)
            z = y + c + _noise_windows(noise, len(y), t, gen)
            loss = F.mse_loss(noisier_to_noisy(model, z.to(device)), (y + 0.5 * c).to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            if time.monotonic() - t0 > max_seconds:
                out_of_time = True
                break
        bar.set_postfix(loss=loss.item())
        if out_of_time:
            break
    bar.close()


# ----------------------------------------------------------------------------
# loading and selection
# ----------------------------------------------------------------------------


def _from_state_dict(state: dict, path) -> SingleChannelWaveformDenoiser:
    """Rebuild a SingleChannelWaveformDenoiser from its state_dict.

    All sizes are read off the tensor shapes, so weights trained with other
    widths or snippet lengths load too.
    """
    try:
        w1, w2, w_out = state["conv1.weight"], state["conv2.weight"], state["out.weight"]
        model = SingleChannelWaveformDenoiser(
            spike_length_samples=w_out.shape[0],
            n_filters=(w1.shape[0], w2.shape[0]),
            kernel_sizes=(w1.shape[2], w2.shape[2]),
        )
        model.load_state_dict(state)
    except (KeyError, AttributeError, IndexError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"{path} holds a state_dict that does not fit SingleChannelWaveformDenoiser: {err}"
        ) from err
    return model


def load_pretrained_denoiser(path, device=None) -> nn.Module:
    """Load a `torch.save()`d whole model, or a SingleChannelWaveformDenoiser state_dict.

    Raises ValueError naming `path` if it is missing or not a model.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"NN denoiser file not found: {path}")
    try:
        # weights_only=False: a whole pickled nn.Module needs the full unpickler.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many kinds on garbage files
        raise ValueError(f"Could not load an NN denoiser from {path}: {err}") from err
    if isinstance(obj, nn.Module):
        model = obj
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        model = _from_state_dict(obj, path)
    else:
        raise ValueError(
            f"{path} is not a torch.save()d nn.Module nor a SingleChannelWaveformDenoiser "
            f"state_dict (got {type(obj).__name__})."
        )
    return model.to(resolve_device(device)).eval()


def shipped_single_channel_denoiser(device=None) -> SingleChannelWaveformDenoiser:
    """The pretrained SingleChannelWaveformDenoiser shipped with the package."""
    if not SHIPPED_WEIGHTS_PATH.exists():
        raise ValueError(
            f"Shipped denoiser weights are missing ({SHIPPED_WEIGHTS_PATH}); rerun "
            "scripts/train_single_channel_denoiser.py or reinstall the package."
        )
    return load_pretrained_denoiser(SHIPPED_WEIGHTS_PATH, device=device)


def _check_length(model: nn.Module, spike_length_samples: int, where) -> None:
    length = getattr(model, "spike_length_samples", None)
    if length is not None and length != spike_length_samples:
        raise ValueError(
            f"The NN denoiser from {where} expects snippets of {length} samples, but this "
            f"sort uses {spike_length_samples} (from ms_before/ms_after and the sampling "
            "rate). Use the default ms_before/ms_after at 30 kHz, choose "
            "nn_denoiser_class_name='Decollider' with no pretrained path (trained on this "
            "recording), or pass weights trained for this length."
        )


class Resampled(nn.Module):
    """A single-channel denoiser trained at 30 kHz used at another sampling rate on the same
    window in ms: snippets are resampled (linear) to the model's length and back."""

    def __init__(self, model: nn.Module, spike_length_samples: int):
        super().__init__()
        self.model = model
        self.spike_length_samples = int(spike_length_samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.model.spike_length_samples
        y = F.interpolate(x[:, None], size=n, mode="linear", align_corners=True)
        y = self.model(y[:, 0])
        return F.interpolate(y[:, None], size=x.shape[1], mode="linear", align_corners=True)[:, 0]


def _shipped_at_rate(spike_length_samples: int, sampling_frequency: float, device=None,
                     strict: bool = True) -> nn.Module | None:
    """The shipped weights (121 samples at 30 kHz, the default window), resampled when the
    same window in ms has another length at this sampling rate. Another window: an error
    (strict) or None."""
    model = shipped_single_channel_denoiser(device=device)
    n = model.spike_length_samples
    if spike_length_samples == n:
        return model
    window_ms, model_ms = spike_length_samples / sampling_frequency * 1000, n / SHIPPED_RATE_HZ * 1000
    if abs(window_ms - model_ms) <= 1.5 * 1000 / sampling_frequency:
        return Resampled(model, spike_length_samples).to(resolve_device(device))
    if strict:
        _check_length(model, spike_length_samples, SHIPPED_WEIGHTS_PATH)
    return None


def check_denoiser_config(class_name: str, pretrained_path, spike_length_samples: int,
                          sampling_frequency: float = SHIPPED_RATE_HZ) -> None:
    """Refuse, before any work, a denoiser that cannot run: a missing or broken model file, or
    weights trained for another snippet length (loads the file on the CPU; seconds)."""
    if pretrained_path is not None:
        _check_length(load_pretrained_denoiser(pretrained_path, device="cpu"), spike_length_samples, pretrained_path)
    elif class_name == "SingleChannelWaveformDenoiser":
        _shipped_at_rate(spike_length_samples, sampling_frequency, device="cpu")


def make_denoiser(
    class_name: str,
    pretrained_path=None,
    *,
    train_waveforms=None,
    noise_snippets=None,
    spike_length_samples: int = 121,
    sampling_frequency: float = SHIPPED_RATE_HZ,
    device=None,
    max_seconds: float = 60.0,
    max_epochs: int = 200,
    learning_rate: float = 1e-3,
    progress: bool = True,
) -> nn.Module:
    """Pick the denoiser from the config fields.

    class_name = `nn_denoiser_class_name`, pretrained_path = `nn_denoiser_pretrained_path`.
    A path is loaded as is. With no path: shipped weights for
    SingleChannelWaveformDenoiser; for Decollider, a net fitted on
    `train_waveforms` (N, T, K) + `noise_snippets` (M, T) within `max_seconds`.
    """
    if class_name not in CLASS_NAMES:
        raise ValueError(
            f"Unknown nn_denoiser_class_name {class_name!r}; choose one of {CLASS_NAMES}."
        )
    device = resolve_device(device)
    if pretrained_path is not None:
        model = load_pretrained_denoiser(pretrained_path, device=device)
        _check_length(model, spike_length_samples, pretrained_path)
        return model
    if class_name == "SingleChannelWaveformDenoiser":
        return _shipped_at_rate(spike_length_samples, sampling_frequency, device=device)
    if train_waveforms is None or noise_snippets is None:
        raise ValueError(
            "Decollider without nn_denoiser_pretrained_path is trained on the recording: "
            "train_waveforms and noise_snippets are required."
        )
    return fit_decollider(
        train_waveforms,
        noise_snippets,
        spike_length_samples=spike_length_samples,
        max_seconds=max_seconds,
        max_epochs=max_epochs,
        learning_rate=learning_rate,
        device=device,
        progress=progress,
        sampling_frequency=sampling_frequency,
    )
