"""The pipeline's steps. Each reads its inputs, writes one output file
atomically in the output folder, and returns early when that file exists.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from spikeinterface.core.node_pipeline import run_node_pipeline
from threadpoolctl import threadpool_limits

from . import clustering, mixture, refinement, waveforms as wf
from .motion_info import MotionInfo
from .sorting import DARTsortSorting, write_peeling_hdf5
from .denoisers import make_denoiser
from .localization import localize_amplitude_vectors
from .matching import SMALL_UNIT_FACTOR, TemplateMatcher, could_take_spikes, noise_precision, time_locked_echoes
from .motion import MotionNotEstimable, estimate_motion, plot_drift_raster
from .channels import make_channel_index
from .storage import atomic_path, atomic_savez
from .subtraction import Denoiser, ThresholdDetector, apply_nn, subtraction_nodes
from .templates import Templates, estimate_templates

logger = logging.getLogger("dartsort_si")

N_FIT_CHUNKS = 20
MAX_FIT_SNIPPETS = 20000
# single-channel rows the temporal PCAs are fitted on, drawn from the fit snippets' rows: all
# ~280,000 of 20,000 snippets x 14 channels took 3.3 s of fit_models (NN pass and SVD, py-spy)
MAX_TPCA_ROWS = 50000
DEDUP_MS = 0.25
# a unit found among the leftovers is greedy when it matches more than this many times its leftover
# events (+20) (_greedy_units). Its events are those of its spikes that the leftover threshold kept, a
# fraction of them: NP2 drifting seed 6, four true units of SNR 1.9-2.7 found from 68-110 events
# matched 0.8-2.9 times as many spikes; NP1 drifting seed 2, a unit of 40 events matched 101 spikes,
# all GT 4's (a drift piece of GT 4's unit, see _join_drift_pieces). At 2x, that unit and with it
# the seed's two other new units were lost.
GREEDY_NEW_FACTOR = 10
# matching the leftover units again without the greedy ones (_match_new_units): at most this many passes
MAX_REMATCHES = 2
# Before the rematch over the whole recording, the new units are matched on this fraction of its
# chunks (spread evenly, at least GREEDY_PROBE_MIN_CHUNKS) and those whose count, scaled up, is
# greedy are left out (_greedy_on_a_sample). 300 s x 128 ch NP1 drifting: a new unit of 25
# leftover events took 1244 spikes and the whole rematch ran again without it (matching 48 -> 65 s).
GREEDY_PROBE_FRACTION = 0.1
GREEDY_PROBE_MIN_CHUNKS = 5
# On recordings of at least twice this, matching's first pass looks for leftover events in every
# k-th chunk only, k = duration // LEFTOVER_COVER_S (leftover_stride): the leftover search was 20% of
# matching's samples on 300 s x 128 ch NP1 (py-spy), and 150 s of events is 2.5 times what the
# 60 s benchmark recordings, whose units it finds, give. The counts the new units are judged
# by (_greedy_units, _spikes_of_kept_new_units, _greedy_on_a_sample) are their events scaled by k
# (_leftover_events).
# 300 s x 128 ch NP1 (rematch from matching1, two runs each): matching 61-62 against 76 s, 37/40
# well detected either way, 40 units against 42.
LEFTOVER_COVER_S = 150.0
# times at which the rematch looks for old units that are small somewhere (_small_somewhere)
SMALL_SOMEWHERE_TIMES = 20
# After the first pass a small unit's template is averaged again from the spikes matching gave it
# (_refreshed_small_templates) and the unit matched again with it in the rematch. A small unit's
# cluster holds the detections that noise pushed over the threshold, and few of them, so its
# template is too big and noisy, and the decrease a spike must bring (2 <t, x> - |t|^2 >=
# threshold) misses its spikes: static NP1 seed 5, GT 11 (SNR 2.3), template from 60 clustered
# spikes, squared norm 185 at rank 5; the mean of the 131 spikes matching took has 150 at the same
# dot product with the unit's spikes (median 136), which raises the share of them over the
# threshold from 0.62 to 0.83. Refreshed: units under REFRESH_NORM_FACTOR x matching_threshold^2
# whose peak is near enough to the detection threshold for its detections to average over
# REFRESH_MIN_BIAS above it (refinement.detection_bias: a peak of 4.7 noise sd at
# voltage_threshold 3), that matching does not take by their matched filter anywhere
# (_small_somewhere), where matching took more spikes than the cluster held and their mean is the
# smaller. Each guard stands for a unit lost without it. A unit well over the threshold gains
# nothing and risks a neighbour's spikes in its mean: NP1 drifting seed 1, GT 16 (SNR 5.8, peak
# 5.0) with 70 spikes of GT 17 (SNR 2.2) among its 255 came out as a template between the two and
# merged them (0.86 -> 0.73). The same pair at 120 s, GT 16's peak under the bias limit there: a
# unit taken by its matched filter takes its neighbours' spikes at any decrease
# (SMALL_UNIT_FACTOR), so their mean is no estimate of its own (35 -> 37 well detected with the
# filter guard). A bigger mean took other units' spikes in (static seed 5, GT 38, SNR 4.7: squared
# norm 216 -> 245, 152 -> 131 of its 163 spikes). Rematch from templates1 of the 24 draws (seeds
# 1-8 of NP1 and NP2 drifting, static NP1): static seeds 5 (GT 11, 0.70 -> 0.80) and 7 (GT 20,
# 0.76 -> 0.98) +1 well-detected unit each, no other draw's count changed (without the filter
# guard NP1 seed 2 also gained GT 25, 0.76 -> 0.86, a unit taken by its filter somewhere), and no
# ground-truth unit's accuracy fell by over 0.05 but NP1 seed 7's GT 23 (SNR 2.4), split between
# two units before and after.
REFRESH_NORM_FACTOR = 4.0
REFRESH_MIN_BIAS = 0.02
MIN_UNIT_SPIKES = 20
# events this close to a 3x bigger one are left out of clustering (clustering.echo_mask)
ECHO_MS = 0.5
ECHO_RADIUS_UM = 150.0
# clusters with more than this fraction of their events within ECHO_CLUSTER_MS and
# ECHO_RADIUS_UM of a 3x bigger event are echoes, not a unit (60 s x 128 ch: the junk
# clusters' fractions were 0.84-0.99, no real unit's above 0.3)
ECHO_CLUSTER_MS = 1.5
# After the mixture refinement the same test runs again over the whole snippet window
# (ms_before before to ms_after after). The mixture's splits cut a big unit's echoes out of real
# clusters into clusters of their own, and echoes come up to 2.6 ms from the big spike. On held-out
# draws these clusters had templates that were time-shifted copies of the big unit's waveform, and
# matching put them on its spikes: static NP1 seed 5, five such clusters by an SNR-36 unit
# (fractions 0.07-0.87 at 1.5 ms, 0.73-0.99 over the window; 7000 spikes matched on its 412);
# NP1 drifting seed 4, two by an SNR-40 unit (two real units next to it took 3100 false spikes).
# Before the mixture the window stays short: there, echoes still share a cluster with a real
# small unit, and the whole cluster would go (NP1 seed 2: an SNR-5 unit 21 um from an SNR-42 one).
ECHO_CLUSTER_FRACTION = 0.5
# after matching, peaks of the residual's matched-filter score (matching.matched_filter_score, in
# its noise sd) at this level that cluster become new units. Static NP1 seed 1 (60 s x 128 ch):
# 719 events, 45 of them away from any true spike; four units of SNR 2.5-3.7 that no step had
# found gave 80-180 events each and one pure cluster each (a 6 sd voltage threshold: 0-13 events)
LEFTOVER_THRESHOLD = 5.0
# units found among the leftovers are found by a matched filter, and matched by one: a spike of
# theirs is also taken when the template's own matched filter on the residual reaches this many
# times its noise sd, measured per chunk (matching.matched_filter_thresholds). Their templates are
# small (squared norm 49-94 against matching_threshold^2 = 64), so the threshold on the decrease
# alone took a fraction of their spikes (static NP1 seed 1: GT 23, SNR 2.9, 128 of 477). Measured
# on static seeds 1 and 8 (rematch from matching1), spikes matched by the five new units that were
# no GT spike's: 233-282 each at 3.5, 28-50 at 4, 2-9 at 4.5, 0-1 at 5; GT 23 at 4.5: 387 of 477
# (at 5: 313).
# Then on all 24 draws (seeds 1-8): static seed 1 35 -> 37 and seed 5 34 -> 35 well detected, the
# 22 others unchanged; false-positive + redundant units 26 -> 20.
# Since the filter is measured in the noise-whitened metric (matching.WhitenedFilter), rematch from
# matching1 of the 24 draws: at 4.5, static seeds 1, 4, 8 and NP2 seed 1 +1 each, NP1 seed 8 -1
# (GT 34, SNR 2.9: 28 spikes on no GT spike); at 5.0 (18 draws) only static seed 4 +1, NP1 seed 8 -1.
NEW_UNIT_FILTER_Z = 4.5
# log-amplitude axis scale in clustering: a factor e in amplitude spans this many um
AMPLITUDE_SCALE_UM = 50.0
DECOLLIDER_MAX_SECONDS = 120.0  # cap for long recordings; short ones get less (see fit_models)
DECOLLIDER_EPOCHS = 4
# the Decollider starts from the shipped weights; a gentle rate adapts them to the recording
# without losing them (at 1e-3 a 60 s x 128 ch sort fell from 24 to 16 well-detected units)
DECOLLIDER_LEARNING_RATE = 1e-4


@dataclass
class Context:
    rec: object
    out: Path
    cfg: object
    device: torch.device
    job_kwargs: dict
    geometry: object
    window: object
    timer: object
    # "subtraction", or "threshold" (plain crossings, no subtraction): see pipeline.dartsort
    initial_detection: str = "subtraction"
    # measured once per sort on first use (noise_precision)
    cache: dict = field(default_factory=dict)

    @property
    def fs(self):
        return self.rec.sampling_frequency

    @property
    def echo_window_samples(self):
        """The longer side of the snippet window, in samples: how far from a spike its echoes reach."""
        return max(self.window.n_before, self.window.n_after)

    @property
    def dedup_samples(self):
        return max(1, int(round(DEDUP_MS * self.fs / 1000)))

    @property
    def leftover_stride(self):
        """Matching's first pass looks for leftover events in every k-th chunk (LEFTOVER_COVER_S)."""
        return max(1, int(self.rec.get_total_duration() // LEFTOVER_COVER_S))


def copy_recording(rec, out, cfg, job_kwargs):
    """Save the preprocessed recording (in preprocessing_dtype) and sort the copy."""
    import spikeinterface.core as sc

    folder = out / "preprocessed_recording"
    if not (folder / "binary.json").exists():
        jk = {k: v for k, v in job_kwargs.items() if k != "chunk_size"}
        rec.save(folder=folder, dtype=cfg.preprocessing_dtype, overwrite=True, **jk)
    return sc.load(folder)


# -- stage 3/4 models: temporal PCA and NN denoiser

def _fit_chunks(ctx, n_chunks=N_FIT_CHUNKS):
    n = ctx.rec.get_num_samples(0)
    size = min(ctx.cfg.chunk_length_samples, n)
    starts = np.linspace(0, n - size, min(n_chunks, max(1, n // size))).astype(int)
    return [(s, s + size) for s in starts]


def sample_snippets(ctx):
    """Spike snippets on the fit-radius neighbourhood, plus single-channel noise snippets."""
    g, w = ctx.geometry, ctx.window
    fit_index = torch.as_tensor(make_channel_index(g.geom, ctx.cfg.fit_radius_um))
    rng = np.random.default_rng(0)
    traces, peaks, noise = [], [], []
    for x in _read_chunks(ctx, _fit_chunks(ctx)):
        t, c, _ = wf.find_peaks(x, ctx.cfg.voltage_threshold, ctx.cfg.peak_sign, g.dedup_index.cpu(),
                                ctx.dedup_samples, valid=(w.n_before, len(x) - w.n_after))
        traces.append(x)
        peaks.append((t, c))
        noise.append(_quiet_snippets(x, ctx.cfg.voltage_threshold, w.length, rng))
    # the draw is over all crossings, but only the drawn ones are cut: cutting every crossing
    # of 20 chunks (~700 MB at 128 ch) and drawing then took 40% of fit_models (py-spy)
    total = sum(len(t) for t, _ in peaks)
    pick = rng.choice(total, MAX_FIT_SNIPPETS, replace=False) if total > MAX_FIT_SNIPPETS else np.arange(total)
    spikes = torch.zeros((len(pick), w.length, fit_index.shape[1]))
    first = np.cumsum([0] + [len(t) for t, _ in peaks])
    chunk_of = np.searchsorted(first[1:], pick, side="right")
    for k, (x, (t, c)) in enumerate(zip(traces, peaks)):
        rows = np.flatnonzero(chunk_of == k)
        local = torch.as_tensor(pick[rows] - first[k])
        snips = wf.cut(x, t[local], c[local], fit_index, w.offsets())
        snips[~wf.neighbour_mask(fit_index, c[local])[:, None, :].expand_as(snips)] = torch.nan
        spikes[torch.as_tensor(rows)] = snips
    noise = torch.cat(noise) if noise else torch.zeros((0, w.length))
    return spikes, noise


def _read_chunks(ctx, slices):
    """The traces of each (start, end) as float32 tensors, in order, read by n_jobs threads
    (filtering and the median reference release the GIL; read one by one, the 20 fit chunks
    took 2.2 s of a 60 s x 128 ch sort)."""
    n_jobs = max(1, int(ctx.job_kwargs.get("n_jobs", 1)))

    def read(s):
        return torch.as_tensor(ctx.rec.get_traces(start_frame=s[0], end_frame=s[1]).astype(np.float32))

    with ThreadPoolExecutor(n_jobs) as pool:
        pending = [pool.submit(read, s) for s in slices[:n_jobs]]
        for k in range(len(slices)):
            x = pending.pop(0).result()
            if k + n_jobs < len(slices):
                pending.append(pool.submit(read, slices[k + n_jobs]))
            yield x


def _quiet_snippets(x, threshold, length, rng, n=500):
    """Up to n random single-channel windows of x that no threshold crossing touches: among 4n
    windows drawn at random, or, where fewer than n of those are quiet (a crowded chunk), among
    all quiet windows (listing them took 40 ms per 1 s x 128 ch chunk)."""
    if len(x) < length:
        return torch.zeros((0, length))
    ts = torch.as_tensor(rng.integers(0, len(x) - length + 1, 4 * n))
    cs = torch.as_tensor(rng.integers(0, x.shape[1], 4 * n))
    windows = x[ts[:, None] + torch.arange(length), cs[:, None]]
    windows = windows[(windows.abs() < threshold).all(1)]
    if len(windows) >= n:
        return windows[:n]
    loud = torch.zeros((x.shape[0] + 1, x.shape[1]), dtype=torch.int32)
    loud[1:] = torch.cumsum((x.abs() >= threshold).int(), 0)
    quiet = (loud[length:] - loud[:-length]) == 0  # (T - length + 1, C): window starting at t
    ts, cs = torch.nonzero(quiet, as_tuple=True)
    if not len(ts):
        return torch.zeros((0, length))
    pick = torch.as_tensor(rng.choice(len(ts), min(len(ts), n), replace=False))
    rows = ts[pick][:, None] + torch.arange(length)
    return x[rows, cs[pick][:, None]]


def decollider_budget_s(duration_s):
    """Time cap for training the Decollider: half the recording's duration, 30 s to 2 min.
    Training normally stops earlier, after DECOLLIDER_EPOCHS passes, so that the result does
    not depend on how busy the machine is."""
    return float(np.clip(0.5 * duration_s, 30.0, DECOLLIDER_MAX_SECONDS))


def fit_temporal_pcas(spikes, window, rank, nn_model):
    """Temporal PCA of single-channel snippets: on the whole window, of the NN's output
    (denoising: it projects the NN's output), and on the feature window of the raw
    snippets (clustering features)."""
    # the finite rows, snippet by snippet and channel by channel, as flat (snippet, channel)
    # indices: only the drawn ones are copied
    flat = torch.nonzero(torch.isfinite(spikes).all(1).reshape(-1))[:, 0]
    if len(flat) > MAX_TPCA_ROWS:
        pick = np.sort(np.random.default_rng(0).choice(len(flat), MAX_TPCA_ROWS, replace=False))
        flat = flat[torch.as_tensor(pick)]
    single = spikes[flat // spikes.shape[2], :, flat % spikes.shape[2]]
    # fitted on raw snippets, mostly noise on small channels, the basis missed the shape of
    # big spikes: NP2 seed 4, an SNR-56 unit kept residuals of 11 noise sd on its main channel
    # after subtraction (20% of its peak-to-peak), which came back as events 0.2-1.3 ms from
    # it; fitted on the NN's output, 2.8 sd, the level of the noise alone
    tpca = wf.TemporalPCA.fit(apply_nn(nn_model, single).numpy(), rank)
    feature_tpca = wf.TemporalPCA.fit(single[:, window.feature_start: window.feature_end].numpy(), rank)
    return tpca, feature_tpca


class NoSpikes(ValueError):
    """Too few threshold crossings to fit anything: the sort ends with an empty sorting."""


def fit_models(ctx):
    path = ctx.out / "models.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    with ctx.timer("fit_models"):
        spikes, noise = sample_snippets(ctx)
        if len(spikes) < 10:
            raise NoSpikes(
                f"Only {len(spikes)} threshold crossings at voltage_threshold="
                f"{ctx.cfg.voltage_threshold} in the sampled chunks: nothing to sort."
            )
        w = ctx.window
        nn = make_denoiser(ctx.cfg.nn_denoiser_class_name, ctx.cfg.nn_denoiser_pretrained_path,
                           train_waveforms=spikes.numpy(), noise_snippets=noise.numpy(),
                           spike_length_samples=w.length, sampling_frequency=ctx.fs, device=ctx.device,
                           max_seconds=decollider_budget_s(ctx.rec.get_total_duration()),
                           max_epochs=DECOLLIDER_EPOCHS, learning_rate=DECOLLIDER_LEARNING_RATE)
        tpca, feature_tpca = fit_temporal_pcas(spikes, w, ctx.cfg.temporal_pca_rank, nn.cpu())
        models = dict(tpca=tpca.state(), feature_tpca=feature_tpca.state(), nn=nn.cpu())
        with atomic_path(path) as tmp:
            torch.save(models, tmp)
    return models


def shared_cores(job_kwargs) -> int:
    """The cores the sort's workers and their torch threads share (n_jobs x torch threads): what
    the main thread may use alone between the chunked passes (the in-memory fill, motion's
    localization)."""
    return int(job_kwargs.get("n_jobs", 1)) * torch.get_num_threads()


@contextmanager
def all_cores(device):
    """Within: torch, BLAS and OpenMP use every core, for work the main thread does alone (model
    fitting, motion estimation, clustering), where the workers' one thread each left the other
    cores idle (300 s x 128 ch: fit_models 6.0-7.0 -> 5.4 s, motion 6.1-9.0 -> 5.6 s). Not
    around the chunked passes: their workers would share the cores with these threads."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    if device.type == "cpu":
        torch.set_num_threads(cores)
    try:
        with threadpool_limits(limits=cores):
            yield
    finally:
        torch.set_num_threads(threads)


# -- stage 2/3: detection

def _chunk_slices(ctx):
    n = ctx.rec.get_num_samples(0)
    size = ctx.cfg.chunk_length_samples
    return [(0, s, min(s + size, n)) for s in range(0, n, size)]


def _run_nodes(ctx, nodes, slices, name):
    """Outputs of a node (or a list of nodes, parents first) over the chunks in slices (None: all)."""
    nodes = nodes if isinstance(nodes, list) else [nodes]
    outs = run_node_pipeline(ctx.rec, nodes, ctx.job_kwargs, job_name=name, slices=slices,
                             squeeze_output=False)
    return outs


def subtract(ctx, models):
    """Subtraction over a subsample of chunks spread over the recording (or all of it)."""
    path = ctx.out / "subtraction.h5"
    if not path.exists():
        with ctx.timer("subtraction"):
            _subtract(ctx, models, path)
    return DARTsortSorting.from_peeling_hdf5(path, load_all_features=True)


def _subtract(ctx, models, path):
    cfg = ctx.cfg
    denoiser = Denoiser(wf.TemporalPCA(**models["tpca"]), models["nn"], ctx.device)
    nodes = subtraction_nodes(ctx.rec, ctx.geometry, ctx.window, denoiser,
                              wf.TemporalPCA(**models["feature_tpca"]), cfg, ctx.dedup_samples, ctx.device,
                              subtract=ctx.initial_detection == "subtraction")
    slices = _chunk_slices(ctx)
    order = np.random.default_rng(0).permutation(len(slices))
    target = cfg.subsampling_spikes or np.inf
    first = max(1, int(np.ceil(cfg.subsampling_presence * len(slices)))) if cfg.subsampling_spikes else len(slices)
    parts, done, n_found = [], 0, 0
    while done < len(slices):
        todo = first if done == 0 else _more_chunks(n_found, done, target, len(slices) - done)
        batch = sorted((slices[i] for i in order[done: done + todo]), key=lambda s: s[1])
        parts.append(_run_nodes(ctx, nodes, batch, "subtraction"))
        done += todo
        n_found += len(parts[-1][0])
        if n_found >= target and done >= cfg.subsampling_presence * len(slices):
            break
    peaks, amp_vecs, locs, feats = (np.concatenate(z) for z in zip(*parts))
    order = np.argsort(peaks["sample_index"], kind="stable")
    features = dict(
        point_source_localizations=locs[order],
        denoised_ptp_amplitudes=peaks["amplitude"][order],
        denoised_ptp_amplitude_vectors=amp_vecs[order],
        collisioncleaned_tpca_features=feats[order],
    )
    # before the h5: a resume that finds subtraction.h5 must find its coverage too
    with atomic_path(ctx.out / "subtraction_coverage.txt") as tmp:
        tmp.write_text(f"{done} / {len(slices)} chunks\n")
    write_peeling_hdf5(path, times_samples=peaks["sample_index"][order],
                       channels=peaks["channel_index"][order], sampling_frequency=ctx.fs,
                       geom=ctx.geometry.geom,
                       channel_index=ctx.geometry.featurization_index.cpu().numpy(), features=features)
    logger.info("dartsort: subtraction found %d spikes in %d of %d chunks", len(peaks), done, len(slices))


def _more_chunks(n_found, done, target, left):
    rate = max(n_found / max(done, 1), 1e-9)
    return int(min(left, max(1, np.ceil((target - n_found) / rate))))


def _coverage(ctx):
    """(chunks subtraction walked, chunks in the recording), from subtraction_coverage.txt."""
    text = (ctx.out / "subtraction_coverage.txt").read_text().split()
    return int(text[0]), int(text[2])


def _covers_all(ctx):
    done, total = _coverage(ctx)
    return done == total


def _covered_samples(ctx):
    """Samples of the recording that subtraction walked (it may subsample chunks)."""
    done, total = _coverage(ctx)
    return ctx.rec.get_num_samples(0) * done / total


def motion_spikes(ctx, detected):
    """(times, depths, amplitudes) for motion: subtraction's spikes if it covered everything,
    else a quick threshold pass. Depths come from the exponential-decay fit, which tracks a
    drifting unit with far less position-dependent bias than the point source (on the
    benchmark's 300 s rigid / non-rigid cases: motion error 0.16 / 0.27 um, against 0.99 /
    0.79 um from point-source depths with the same off-probe filter)."""
    if _covers_all(ctx):
        g = ctx.geometry
        # the main thread alone, between the chunked passes: its fits in batches side by side
        # (52k spikes of the 300 s x 128 ch case: 5.1 -> 2.5-2.8 s on 2 cores, the same fits)
        locs = localize_amplitude_vectors(detected.denoised_ptp_amplitude_vectors, detected.channels, g.geom,
                                          g.localization_index.cpu().numpy(), device=ctx.device,
                                          model="exponential", n_threads=shared_cores(ctx.job_kwargs))
        return detected.times_samples, locs[:, 2], detected.denoised_ptp_amplitudes
    path = ctx.out / "motion_peaks.h5"
    if not path.exists():
        with ctx.timer("motion_spike_grab"):
            node = ThresholdDetector(ctx.rec, ctx.geometry, ctx.window, ctx.cfg.motion_voltage_threshold,
                                     ctx.cfg.peak_sign, ctx.dedup_samples, ctx.device)
            peaks, locs = _run_nodes(ctx, node, None, "motion spikes")
            write_peeling_hdf5(path, times_samples=peaks["sample_index"], channels=peaks["channel_index"],
                               sampling_frequency=ctx.fs, geom=ctx.geometry.geom,
                               features=dict(exponential_localizations=locs, amplitudes=np.abs(peaks["amplitude"])))
    s = DARTsortSorting.from_peeling_hdf5(path)
    return s.times_samples, s.exponential_localizations[:, 2], s.amplitudes


# -- stage 6: motion

def motion_step(ctx, detected, motion, si_motion, dredge_motion_est) -> MotionInfo:
    path = ctx.out / "motion_info.npz"
    if path.exists():
        return MotionInfo.load(path)
    geom, pad = ctx.geometry.geom, ctx.cfg.probe_boundary_padding_um
    with ctx.timer("motion"):
        if motion is not None:
            info = motion
        elif si_motion is not None or dredge_motion_est is not None:
            info = MotionInfo.from_motion_est(geom=geom, si_motion=si_motion, dredge_motion_est=dredge_motion_est,
                                              probe_boundary_padding_um=pad)
        elif ctx.cfg.do_motion_estimation:
            t, depths, amps = motion_spikes(ctx, detected)
            try:
                with all_cores(ctx.device):
                    me = estimate_motion(t / ctx.fs, depths, amps, ctx.cfg, geom=geom, device=str(ctx.device))
            except MotionNotEstimable as err:
                # a quiet recording still gets sorted (or an empty sorting), just not registered
                logger.warning("dartsort: %s Sorting without motion correction.", str(err).split(";")[0] + ".")
                me = None
            info = MotionInfo.from_motion_est(geom=geom, dredge_motion_est=me, probe_boundary_padding_um=pad)
        else:
            info = MotionInfo.from_motion_est(geom=geom, probe_boundary_padding_um=pad)
        if info.drifting:
            info.si_motion.save(ctx.out / "si_motion", overwrite=True) if hasattr(info.si_motion, "save") else None
        t = detected.times_samples / ctx.fs
        locs = detected.point_source_localizations
        try:
            if len(detected):
                plot_drift_raster(ctx.out / "drift_raster.png", t, locs[:, 2], detected.denoised_ptp_amplitudes, info)
        except Exception as err:  # a plot must never cost the sort
            logger.warning("dartsort: drift raster plot failed: %s", err)
        info.save(path)
    return info


# -- stage 7/8: clustering and templates

def initial_clustering(ctx, detected, motion_info, models) -> DARTsortSorting:
    path = ctx.out / "initial_labels.npz"
    if not path.exists():
        with ctx.timer("clustering"):
            labels, units = _cluster(ctx, detected, motion_info, models["feature_tpca"]["components"])
            atomic_savez(path, labels=labels, units=units)
    saved = np.load(path)
    labels = saved["labels"]
    units = saved["units"] if "units" in saved else np.arange(labels.max(initial=-1) + 1)
    # labels: output units; template_labels: the clusters, each with a template of its own
    return detected.ephemeral_replace(labels=_unit_labels(labels, units), template_labels=labels)


def _unit_labels(template_labels, units):
    out = np.asarray(template_labels).copy()
    valid = out >= 0
    out[valid] = units[out[valid]]
    return out


def _cluster(ctx, detected, motion_info, feature_basis):
    """(cluster labels, unit per cluster): density clustering on (x, registered z, scaled
    log amplitude), a split on registered waveform features (refinement.split_units), echo
    clusters dropped, the Gaussian-mixture refinement (mixture.refine), and drift pieces
    joined into units (refinement.drift_piece_units)."""
    if len(detected) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    locs = detected.point_source_localizations
    z_reg = motion_info.correct_s(detected.times_samples / ctx.fs, locs[:, 2])
    amps = detected.denoised_ptp_amplitudes
    echo_samples = int(ECHO_MS * ctx.fs / 1000)
    cluster_samples = int(ECHO_CLUSTER_MS * ctx.fs / 1000)
    gaps = clustering.echo_gaps(detected.times_samples, detected.channels, amps, ctx.geometry.geom,
                                max_window=max(echo_samples, cluster_samples, ctx.echo_window_samples),
                                radius_um=ECHO_RADIUS_UM)
    echo = gaps <= echo_samples
    labels = np.full(len(amps), -1, dtype=np.int64)
    labels[~echo] = clustering.cluster_spikes(locs[~echo, 0], z_reg[~echo], amps[~echo],
                                              amplitude_scale=AMPLITUDE_SCALE_UM)
    n_initial = labels.max() + 1
    feats = refinement.RegisteredFeatures(
        detected.collisioncleaned_tpca_features, detected.channels,
        ctx.geometry.featurization_index.cpu().numpy(), ctx.geometry.geom, motion_info.rgeom,
        drift_um=locs[:, 2] - z_reg, components=feature_basis)
    refractory = _refractory(ctx)
    labels = refinement.split_units(labels, locs[:, 0], z_reg, feats, times=detected.times_samples,
                                    amplitude_boundary=ctx.cfg.amplitude_scaling_boundary, refractory=refractory)
    n_split = labels.max() + 1
    labels = clustering.drop_echo_clusters(labels, gaps <= cluster_samples, ECHO_CLUSTER_FRACTION)
    n_clean = len(np.unique(labels[labels >= 0]))
    labels = mixture.refine(labels, locs[:, 0], z_reg, feats, times=detected.times_samples,
                            amplitude_boundary=ctx.cfg.amplitude_scaling_boundary, refractory=refractory)
    n_mixture = len(np.unique(labels[labels >= 0]))
    labels = clustering.drop_echo_clusters(labels, gaps <= ctx.echo_window_samples, ECHO_CLUSTER_FRACTION)
    logger.info("dartsort: density clustering: %d clusters (%d echo events of bigger spikes left out); "
                "%d after the split on registered features, %d echo clusters dropped, %d units after the "
                "mixture refinement, %d echo clusters dropped", n_initial, echo.sum(), n_split, n_split - n_clean,
                n_mixture, n_mixture - len(np.unique(labels[labels >= 0])))
    labels = clustering.renumber(labels)
    units = refinement.drift_piece_units(labels, locs[:, 0], z_reg, locs[:, 2] - z_reg, amps,
                                         times=detected.times_samples, refractory=refractory)
    return labels, units


def _refractory(ctx):
    """(lo, hi, duration) in samples: refinement's refractory window and the time the spikes cover."""
    lo, hi = (int(round(ms * ctx.fs / 1000)) for ms in refinement.REFRACTORY_MS)
    return lo, hi, _covered_samples(ctx)


def unit_templates(ctx, sorting, motion_info, name) -> Templates:
    path = ctx.out / f"{name}.npz"
    if path.exists():
        return Templates.load(path)
    with ctx.timer(name):
        w = ctx.window
        temps = estimate_templates(ctx.rec, sorting.times_samples, _template_labels(sorting), motion_info,
                                   depths_um=sorting.point_source_localizations[:, 2], n_before=w.n_before,
                                   n_after=w.n_after, job_kwargs=ctx.job_kwargs)
        temps = temps.without_noise_channels(motion_info.rgeom, ctx.cfg.subtraction_radius_um)
        labels = _template_labels(sorting)
        times = [sorting.times_samples[labels == u] for u in temps.unit_ids]
        temps = refinement.merge_templates(temps, amplitude_boundary=ctx.cfg.amplitude_scaling_boundary,
                                           times=times, refractory=_refractory(ctx))
        temps = temps.subset((temps.counts >= MIN_UNIT_SPIKES) & (temps.ptp() > 0))
        temps.save(path)
    return temps


def _template_labels(sorting):
    """Per spike, the cluster whose template it belongs to (several clusters may make
    one output unit: refinement.drift_piece_units)."""
    return getattr(sorting, "template_labels", sorting.labels)


def _unit_of_template(sorting):
    """{template id: output unit id} from a sorting's template_labels and labels."""
    pairs = np.unique(np.stack([_template_labels(sorting), sorting.labels]), axis=1)
    return {int(t): int(u) for t, u in pairs.T if t >= 0}


# -- stage 9: matching

def match(ctx, sorting, motion_info, i) -> DARTsortSorting:
    path = ctx.out / f"matching{i}.h5"
    if not path.exists():
        temps = unit_templates(ctx, sorting, motion_info, f"templates{i}")
        with ctx.timer(f"matching{i}"):
            spikes, locs, leftovers = _match_pass(ctx, temps, motion_info, leftovers=True)
            temps, refreshed = _refreshed_small_templates(ctx, temps, spikes, locs, motion_info)
            first_id = 1 + max(int(temps.unit_ids.max(initial=-1)), int(sorting.labels.max(initial=-1)),
                               int(_template_labels(sorting).max(initial=-1)))
            new = leftover_templates(ctx, temps, spikes, leftovers, motion_info, first_id)
            first, n_old = spikes, temps.n_units
            if new.n_units or len(refreshed):
                temps, spikes, locs = _match_new_units(ctx, temps, new, spikes, locs, motion_info, refreshed)
            unit_of = _unit_of_template(sorting)
            units = np.array([unit_of.get(int(t), int(t)) for t in temps.unit_ids])
            units = _join_drift_pieces(ctx, first, n_old, spikes, locs, units, motion_info)
            spikes, locs = _without_echoes(ctx, spikes, locs, temps, units)
            spikes, locs = _without_tiny_units(spikes, locs, units)
            features = dict(point_source_localizations=locs, scales=spikes["scale"],
                            denoised_ptp_amplitudes=spikes["amplitude"],
                            upsampling_indices=spikes["upsample_index"].astype(np.int64))
            features["template_labels"] = temps.unit_ids[spikes["unit_index"]]
            # the templates these spikes were matched with (new units included): the analyzer's
            # templates and amplitudes come from them (analyzer.py)
            temps.save(ctx.out / f"matched_templates{i}.npz", with_bins=False)
            write_peeling_hdf5(path, times_samples=spikes["sample_index"], channels=spikes["channel_index"],
                               labels=units[spikes["unit_index"]], sampling_frequency=ctx.fs,
                               geom=ctx.geometry.geom, features=features)
    return DARTsortSorting.from_peeling_hdf5(path)


def _join_drift_pieces(ctx, first, n_old, spikes, locs, units, motion_info):
    """Output unit per template, with the units found among the leftovers (templates from n_old
    on; the first pass's n_old templates matched `first`) that are drift pieces of a known unit
    joined to it (refinement.pieces_of_known_units), then output units that are drift pieces of
    each other on their matched spikes (refinement.drift_piece_units). The clustering joins
    pieces on the detections; matched with drift-binned templates, two pieces the clustering
    kept apart each take the displacements they fit (NP1 drifting seed 5: GT 22, SNR 22, as
    two units of 374 and 97 spikes at displacements above and below -5 um)."""
    z_reg = motion_info.correct_s(spikes["sample_index"] / ctx.fs, locs[:, 2])
    drift = locs[:, 2] - z_reg
    kw = dict(times=spikes["sample_index"], refractory=_refractory(ctx))
    if len(units) > n_old:
        units = refinement.pieces_of_known_units(
            spikes["unit_index"], units, n_old, locs[:, 0], z_reg, drift, spikes["amplitude"],
            taken_from=_taken_from(first, spikes, units, n_old, ctx.dedup_samples), **kw)
    if not len(spikes):
        return units
    joined = refinement.drift_piece_units(units[spikes["unit_index"]], locs[:, 0], z_reg, drift,
                                          spikes["amplitude"], **kw)
    unit_of = np.arange(max(int(units.max(initial=-1)) + 1, len(joined)))  # units without spikes stay
    unit_of[:len(joined)] = joined
    return unit_of[units]


def _refreshed_small_templates(ctx, temps, spikes, locs, motion_info):
    """(templates, indices of the refreshed ones): the templates of the small units near the
    detection threshold, not taken by their matched filter anywhere, averaged again from the spikes
    the first pass matched to them, where it matched more than their clusters held and the new
    mean is the smaller (see REFRESH_NORM_FACTOR)."""
    counts = np.bincount(spikes["unit_index"], minlength=temps.n_units)
    norms = np.square(temps.data).sum((1, 2))
    peaks = np.abs(temps.data).max((1, 2))
    biased = refinement.detection_bias(peaks, ctx.cfg.voltage_threshold) > REFRESH_MIN_BIAS
    which = np.flatnonzero((norms < REFRESH_NORM_FACTOR * ctx.cfg.matching_threshold ** 2) & biased
                           & (counts > temps.counts) & (counts >= MIN_UNIT_SPIKES))
    if len(which):  # matched by its filter somewhere, a unit has its neighbours' spikes too
        which = which[~_small_somewhere(ctx, temps, motion_info)[which]]
    if not len(which):
        return temps, which
    of = np.isin(spikes["unit_index"], which)
    depths = locs[of, 2]
    depths = np.where(np.isfinite(depths), depths, motion_info.rgeom[temps.main_channels(), 1][spikes["unit_index"][of]])
    w = ctx.window
    fresh = estimate_templates(ctx.rec, spikes["sample_index"][of], spikes["unit_index"][of], motion_info,
                               depths_um=depths, n_before=w.n_before, n_after=w.n_after,
                               job_kwargs=ctx.job_kwargs)
    fresh = fresh.without_noise_channels(motion_info.rgeom, ctx.cfg.subtraction_radius_um)
    # only where the matched spikes' mean is smaller: the cluster's was pushed up by the detection
    # threshold. A bigger one took spikes of other units in with the unit's own (static NP1 seed 5,
    # GT 38, SNR 4.7: squared norm 216 -> 245, 152 -> 131 of its 163 spikes matched)
    smaller = np.square(fresh.data).sum((1, 2)) < norms[fresh.unit_ids]
    fresh, which = fresh.subset(smaller), fresh.unit_ids[smaller]
    if len(which):
        logger.info("dartsort: %d small units' templates averaged again from the spikes matching took",
                    len(which))
    return temps.replaced(which, fresh), which


def _taken_from(first, spikes, units, n_old, tolerance):
    """Per template, the output unit that held over half of its spikes (within tolerance
    samples) in the first pass, or -1 (always -1 for the first pass's own templates)."""
    out = np.full(len(units), -1)
    t0 = first["sample_index"]
    for k in range(n_old, len(units)):
        t = spikes["sample_index"][spikes["unit_index"] == k]
        if not len(t) or not len(t0):
            continue
        i = np.clip(np.searchsorted(t0, t), 1, len(t0) - 1)
        j = np.where(np.abs(t0[i] - t) < np.abs(t0[i - 1] - t), i, i - 1)
        held = units[first["unit_index"][j]][np.abs(t0[j] - t) <= tolerance]
        if len(held):
            ids, counts = np.unique(held, return_counts=True)
            if counts.max() > len(t) / 2:
                out[k] = ids[counts.argmax()]
    return out


def _match_new_units(ctx, temps, new, spikes, locs, motion_info, refreshed=()):
    """(templates, spikes, localizations) with the units the clustering missed (new) matched on
    the first pass's residual (_rematch), and the old units whose templates were averaged again
    (refreshed, _refreshed_small_templates) matched again there. A new unit that takes far more
    spikes than it has is left out and the rest matched again; if an old unit gains spikes, the
    first pass stands (_greedy_units)."""
    n_old = temps.n_units
    small = _small_somewhere(ctx, temps, motion_info)
    if new.n_units:
        greedy = _greedy_on_a_sample(ctx, temps, new, spikes, motion_info, small, refreshed)
        new = new.subset(~np.isin(np.arange(new.n_units), greedy))
    if not new.n_units and not len(refreshed):
        return temps, spikes, locs
    for _ in range(MAX_REMATCHES):
        more, both, both_locs = _rematch(ctx, temps, new, spikes, locs, motion_info, small, refreshed)
        greedy_old, greedy_new = _greedy_units(spikes, both, n_old, _leftover_events(ctx, new))
        if len(greedy_old) or not len(greedy_new):
            break
        new = new.subset(~np.isin(np.arange(new.n_units), greedy_new))
        if not new.n_units:
            break
    if len(greedy_old) or len(greedy_new):
        logger.warning("dartsort: units found among the leftovers took others' spikes; kept the first pass")
        return temps, spikes, locs
    keep = _spikes_of_kept_new_units(both, n_old, _leftover_events(ctx, new))
    return more, both[keep], both_locs[keep]


def _greedy_on_a_sample(ctx, temps, new, spikes, motion_info, small, refreshed=()):
    """Indices of the new units that are greedy (_greedy_units) on an even sample of the chunks
    (GREEDY_PROBE_FRACTION), their counts scaled to the whole recording; none when the recording
    has too few chunks for a sample to tell (the rematch over all of it is then short anyway)."""
    slices = _chunk_slices(ctx)
    n_probe = int(GREEDY_PROBE_FRACTION * len(slices))
    if n_probe < GREEDY_PROBE_MIN_CHUNKS:
        return np.zeros(0, int)
    sample = [slices[i] for i in np.linspace(0, len(slices) - 1, n_probe).round().astype(int)]
    n_samples = sum(end - start for _, start, end in sample)
    extra = _rematch(ctx, temps, new, spikes, None, motion_info, small, refreshed, slices=sample)[1]
    counts = np.bincount(extra["unit_index"], minlength=temps.n_units + new.n_units)[temps.n_units:]
    scaled = counts * ctx.rec.get_num_samples(0) / n_samples
    greedy = np.flatnonzero(_over_new_unit_limit(scaled, _leftover_events(ctx, new)))
    if len(greedy):
        logger.info("dartsort: new units %s greedy on %d sampled chunks (%s events -> %s spikes there); left out",
                    greedy.tolist(), n_probe, np.asarray(new.counts)[greedy].tolist(), counts[greedy].tolist())
    return greedy


def _rematch(ctx, temps, new, spikes, locs, motion_info, small, refreshed=(), slices=None):
    """(templates, spikes, localizations) of matching the new units on the first pass's residual
    together with the old units that could have taken their spikes in the first pass
    (matching.could_take_spikes): the other old units' spikes are subtracted chunk by chunk and
    kept as they are.
    Matching again with every template took as long as the first pass (10-12 s of a 60 s x
    128 ch sort); matching the new units alone left their spikes with the old units that took
    them in the first pass (NP1 drifting seed 1: an SNR-6 unit kept 7 spikes of an SNR-2 one).
    small: (old units,) the old units small somewhere (_small_somewhere), also redone when
    they could take a new unit's spikes at any decrease. refreshed: old units redone whatever the
    new units are (their templates changed since the first pass).
    With slices (a sample of the chunks), only what this pass matched there: (templates, spikes,
    localizations) of the units in redo."""
    more = temps.concat(new)
    n_old = temps.n_units
    data = torch.as_tensor(more.data)
    # where an old unit is small its matched filter takes spikes at any decrease
    thresholds = np.where(small, 0.0, ctx.cfg.matching_threshold ** 2)
    near = np.zeros(n_old, bool)
    if new.n_units:
        near = could_take_spikes(data[:n_old], data[n_old:], thresholds, ctx.cfg.amplitude_scaling_boundary).numpy()
    near[np.asarray(refreshed, dtype=np.int64)] = True
    redo = np.r_[np.flatnonzero(near), np.arange(n_old, more.n_units)]
    kept = ~near[spikes["unit_index"]]
    extra, extra_locs = _match_pass(ctx, more, motion_info, known=spikes[kept], match_units=redo,
                                    filter_units=np.arange(n_old, more.n_units), slices=slices)
    if slices is not None:  # a sample of the chunks: only what was matched there
        return more, extra, extra_locs
    both = np.concatenate([spikes[kept], extra])
    order = np.argsort(both["sample_index"], kind="stable")
    logger.info("dartsort: %d new units matched with the %d old units that could take their spikes",
                new.n_units, near.sum())
    return more, both[order], np.concatenate([locs[kept], extra_locs])[order]


def _small_somewhere(ctx, temps, motion_info, n_times=SMALL_SOMEWHERE_TIMES):
    """(K,) bool: units whose template as matching places it (kriged and drift-binned, low rank)
    has a squared norm under SMALL_UNIT_FACTOR x matching_threshold^2 at one of n_times times
    spread over the recording: matching takes them by their matched filter there. NP1 drifting
    seed 1: GT 16's unit (squared norm 90-182 as it drifts) kept the 66 spikes of GT 17 (SNR 2.2,
    25 um away) it took in the first pass, since the rematch of GT 17's new unit left it out (its
    decrease on them stays under the threshold)."""
    matcher = TemplateMatcher(ctx.rec, temps, motion_info, ctx.cfg, ctx.geometry, ctx.device,
                              small_unit_factor=SMALL_UNIT_FACTOR)
    duration = ctx.rec.get_num_samples(0) / ctx.fs
    lowest = torch.stack([matcher.chunk_templates(t).norms()[:, ctx.cfg.temporal_upsamples // 2]
                          for t in (np.arange(n_times) + 0.5) * duration / n_times]).amin(0)
    return matcher.filter_units_here(lowest).cpu().numpy()


def _without_echoes(ctx, spikes, locs, temps, units):
    """Matched spikes less those that are echoes of a bigger unit (matching.time_locked_echoes)."""
    echo = time_locked_echoes(spikes["sample_index"], spikes["unit_index"], temps.ptp(), units,
                              window=ctx.echo_window_samples, duration=ctx.rec.get_total_samples())
    if echo.any():
        logger.info("dartsort: %d matched spikes were echoes of bigger units; dropped", echo.sum())
    return spikes[~echo], locs[~echo]


def _without_tiny_units(spikes, locs, units):
    """Matched spikes less those of output units that matched under MIN_UNIT_SPIKES: a cluster's
    template that explains (almost) none of the recording is no neuron (300 s x 128 ch drifting:
    four units of 1-4 spikes, none a true unit's)."""
    of_spike = units[spikes["unit_index"]]
    ids, counts = np.unique(of_spike, return_counts=True)
    tiny = ids[counts < MIN_UNIT_SPIKES]
    if len(tiny):
        logger.info("dartsort: %d units matched under %d spikes; dropped with their %d spikes", len(tiny),
                    MIN_UNIT_SPIKES, counts[counts < MIN_UNIT_SPIKES].sum())
    keep = ~np.isin(of_spike, tiny)
    return spikes[keep], locs[keep]


def _leftover_events(ctx, new):
    """Each new unit's leftover events over the whole recording: those its template was averaged
    from, times the stride of the chunks the first pass searched (Context.leftover_stride)."""
    return new.counts * ctx.leftover_stride


def _greedy_units(before, after, n_old, new_events):
    """(old units, new units) that took others' spikes in the rematch. A unit found among the
    leftovers explains its own spikes, not everyone's: no old unit may gain more than half its
    spikes (+20) and no new unit take more than GREEDY_NEW_FACTOR times its leftover events
    (+20). A leftover cluster made of what matching failed to subtract from big units instead
    pulled tens of thousands of spikes into a loop between templates (60 s x 128 ch NP2:
    11,290 -> 180,179 spikes)."""
    old_before = np.bincount(before["unit_index"], minlength=n_old)
    counts_after = np.bincount(after["unit_index"], minlength=n_old + len(new_events))
    greedy_old = np.flatnonzero(counts_after[:n_old] > 1.5 * old_before + 20)
    greedy_new = np.flatnonzero(_over_new_unit_limit(counts_after[n_old:], new_events))
    if len(greedy_old) or len(greedy_new):
        logger.info("dartsort: greedy units in the rematch: old %s (%s -> %s spikes), new %s (%s events -> %s)",
                    greedy_old.tolist(), old_before[greedy_old].tolist(), counts_after[greedy_old].tolist(),
                    greedy_new.tolist(), np.asarray(new_events)[greedy_new].tolist(),
                    counts_after[n_old + greedy_new].tolist())
    return greedy_old, greedy_new


def _over_new_unit_limit(counts, new_events):
    """Mask of new units whose spike counts are over GREEDY_NEW_FACTOR times their leftover events (+20)."""
    return np.asarray(counts, float) > GREEDY_NEW_FACTOR * np.asarray(new_events, float) + 20


def _spikes_of_kept_new_units(spikes, n_old, new_counts):
    """Mask of spikes to keep: a new unit that matched under half its leftover events
    (or under MIN_UNIT_SPIKES) explains nothing real and is dropped with its spikes
    (60 s x 128 ch: three new units matched 11, 3 and 1 spikes, none a true unit)."""
    counts = np.bincount(spikes["unit_index"], minlength=n_old + len(new_counts))[n_old:]
    weak = n_old + np.flatnonzero(counts < np.maximum(MIN_UNIT_SPIKES, 0.5 * np.asarray(new_counts)))
    if len(weak):
        logger.info("dartsort: %d of %d new units matched too few spikes; dropped", len(weak), len(new_counts))
    return ~np.isin(spikes["unit_index"], weak)


def _match_pass(ctx, temps, motion_info, leftovers=False, known=None, match_units=None, filter_units=None,
                slices=None):
    """(spikes, localizations[, leftover events]) of one matching pass over the chunks in slices
    (None: all), spikes in time order (known, match_units: see TemplateMatcher; filter_units: the
    units found among the leftovers, also taken at NEW_UNIT_FILTER_Z)."""
    node = TemplateMatcher(ctx.rec, temps, motion_info, ctx.cfg, ctx.geometry, ctx.device,
                           leftover_threshold=LEFTOVER_THRESHOLD if leftovers else None,
                           dedup_samples=ctx.dedup_samples, known=known, match_units=match_units,
                           filter_units=filter_units, filter_threshold=NEW_UNIT_FILTER_Z,
                           precision=_noise_precision(ctx), small_unit_factor=SMALL_UNIT_FACTOR,
                           leftover_chunks=(ctx.job_kwargs["chunk_size"], ctx.leftover_stride))
    outs = _run_nodes(ctx, node, slices, "matching")
    spikes, locs = outs[0], outs[1]
    order = np.argsort(spikes["sample_index"], kind="stable")
    out = (spikes[order], locs[order])
    if leftovers:
        left = outs[2]
        out += (left[np.argsort(left["sample_index"], kind="stable")],)
    return out


def _noise_precision(ctx):
    """Matching's noise metric (matching.noise_precision), measured on the model-fitting chunks."""
    if "precision" not in ctx.cache:
        ctx.cache["precision"] = noise_precision(_read_chunks(ctx, _fit_chunks(ctx)))
        if ctx.cache["precision"] is None:
            logger.info("dartsort: too few quiet samples to measure the noise covariance; matching "
                        "with the plain norm")
    return ctx.cache["precision"]


def leftover_templates(ctx, temps, spikes, leftovers, motion_info, first_id) -> Templates:
    """Templates of units found among the events matching left unexplained, with ids
    from first_id on."""
    z_reg = motion_info.correct_s(leftovers["sample_index"] / ctx.fs, leftovers["z"])
    labels = refinement.cluster_leftovers(
        leftovers, z_reg, spikes, ctx.geometry.geom, amplitude_scale=AMPLITUDE_SCALE_UM,
        echo_samples=int(ECHO_MS * ctx.fs / 1000), echo_cluster_samples=int(ECHO_CLUSTER_MS * ctx.fs / 1000),
        echo_radius_um=ECHO_RADIUS_UM, echo_cluster_fraction=ECHO_CLUSTER_FRACTION)
    labels = refinement.drop_time_locked(labels, leftovers["sample_index"], spikes["sample_index"],
                                         spikes["unit_index"], window=ctx.echo_window_samples,
                                         duration=ctx.rec.get_total_samples(), min_lag=ctx.dedup_samples)
    if labels.max(initial=-1) < 0:
        return temps.subset(np.zeros(temps.n_units, bool))
    w = ctx.window
    new = estimate_templates(ctx.rec, leftovers["sample_index"], labels, motion_info,
                             depths_um=leftovers["z"], n_before=w.n_before, n_after=w.n_after,
                             job_kwargs=ctx.job_kwargs)
    new = new.without_noise_channels(motion_info.rgeom, ctx.cfg.subtraction_radius_um)
    new = new.subset((new.counts >= MIN_UNIT_SPIKES) & (new.ptp() > 0))
    new = _unexplained(ctx, new, temps, motion_info)
    # kept for crossing a threshold, the events average bigger than their unit
    factors = [refinement.selection_bias_factor(leftovers["score"][labels == u], LEFTOVER_THRESHOLD)
               for u in new.unit_ids]
    new = new.scaled(factors)
    # and once shrunk, a template must still be no known unit's
    new = _unexplained(ctx, new, temps, motion_info)
    new = new.renumbered(np.arange(first_id, first_id + new.n_units))
    logger.info("dartsort: %d new units from %d events no template explained", new.n_units, len(leftovers))
    return new


def _unexplained(ctx, new, temps, motion_info):
    """The new templates no known unit explains (refinement.drop_known). leftover_templates asks
    it of the leftover events' own average and again of the template shrunk by
    refinement.selection_bias_factor: what matching left of a known unit averages at that unit's
    size, and once shrunk it slipped past the amplitude test (rematch from matching1 of the 24
    cases: NP2 drifting seed 6, one redundant unit, static seed 7, one false positive)."""
    return refinement.drop_known(new, temps, motion_info.rgeom, amplitude_boundary=ctx.cfg.amplitude_scaling_boundary)
