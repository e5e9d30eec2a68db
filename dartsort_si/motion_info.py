"""Motion in registered space: `MotionInfo` (a motion estimate and the probe structures
for registered channels) and conversions between DREDge and SpikeInterface estimates.

Sign convention (the same in DREDge and SpikeInterface):
registered depth = depth - displacement(t, depth).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .storage import atomic_savez, to_numpy

MOTION_FORMAT = "dartsort_si.MotionInfo/1"
_GEOM_TOL_UM = 0.01  # positions closer than this are the same contact


def probe_pitch(geom):
    """Smallest dz > 0 such that the probe shifted up by dz lands its overlapping channels on channels.

    Candidates are offsets of the lowest channel (it must land on a channel), up to half the
    z span so the overlap is a real part of the probe. Falls back to the min z spacing.
    """
    geom = np.asarray(geom, dtype=float)
    z = geom[:, 1]
    if z.size < 2 or np.ptp(z) <= _GEOM_TOL_UM:
        return 1.0  # flat probe: no vertical period; any positive step keeps the arithmetic sane
    tree = cKDTree(geom)
    candidates = np.unique(np.round(z - z.min(), 6))
    candidates = candidates[(candidates > _GEOM_TOL_UM) & (candidates <= np.ptp(z) / 2 + _GEOM_TOL_UM)]
    for dz in candidates:
        moved = geom + [0.0, dz]
        moved = moved[moved[:, 1] <= z.max() + _GEOM_TOL_UM]
        dist, _ = tree.query(moved)
        if np.all(dist <= _GEOM_TOL_UM):
            return float(dz)
    unique_z = np.unique(np.round(z, 6))
    return float(np.diff(unique_z).min())


def min_channel_distance(geom):
    geom = np.asarray(geom, dtype=float)
    if len(geom) < 2:
        return 0.0
    dist, _ = cKDTree(geom).query(geom, k=2)
    return float(dist[:, 1].min())


def registered_geometry(geom, pitch, extent_um):
    """geom shifted by whole pitches to cover +/- extent_um, deduplicated, sorted by (z, x).

    With nothing to cover, geom itself is returned (its own channel order), so registered
    channels and real channels coincide.
    """
    geom = np.asarray(geom, dtype=float)
    n_shifts = int(np.ceil(extent_um / pitch - 1e-9)) if extent_um > 0 else 0
    if n_shifts == 0:
        return geom.copy()
    shifts = np.arange(-n_shifts, n_shifts + 1) * pitch
    points = np.concatenate([geom + [0.0, s] for s in shifts])
    _, first = np.unique(np.round(points, 3), axis=0, return_index=True)
    points = points[first]
    return points[np.lexsort((points[:, 0], points[:, 1]))]


def si_motion_to_dredge(si_motion):
    """DREDge MotionEstimate equivalent to a single-segment SpikeInterface Motion."""
    from dredge.motion_util import NonrigidMotionEstimate, RigidMotionEstimate

    if si_motion.num_segments != 1:
        raise ValueError("Only single-segment SpikeInterface Motion objects are supported.")
    if si_motion.direction != "y":
        raise ValueError(f"Motion along {si_motion.direction!r}; only depth ('y') motion is supported.")
    disp = np.asarray(si_motion.displacement[0], dtype=float)  # (n_time, n_space)
    times = np.asarray(si_motion.temporal_bins_s[0], dtype=float)
    # the classes directly (not get_motion_estimate): its squeeze() breaks one-time-bin estimates
    if disp.shape[1] == 1:
        return RigidMotionEstimate(disp[:, 0], time_bin_centers_s=times)
    return NonrigidMotionEstimate(
        disp.T, time_bin_centers_s=times,
        spatial_bin_centers_um=np.asarray(si_motion.spatial_bins_um, dtype=float),
    )


def _dredge_arrays(motion_est, geom):
    """(displacement in DREDge layout, time centers, spatial centers or None).

    Estimates without a displacement array (ComposeMotionEstimates) are sampled on
    their time bins and the probe's channel depths.
    """
    if motion_est.displacement is not None:
        spatial = motion_est.spatial_bin_centers_um
        return (
            np.asarray(motion_est.displacement, dtype=float),
            np.asarray(motion_est.time_bin_centers_s, dtype=float),
            None if spatial is None else np.asarray(spatial, dtype=float),
        )
    times = np.asarray(motion_est.time_bin_centers_s, dtype=float)
    depths = np.unique(np.asarray(geom, dtype=float)[:, 1])
    tt, dd = np.meshgrid(times, depths)  # (n_space, n_time)
    disp = np.asarray(motion_est.disp_at_s(tt.ravel(), dd.ravel())).reshape(tt.shape)
    return disp, times, depths


def dredge_to_si_motion(motion_est, geom):
    """SpikeInterface Motion equivalent to a DREDge MotionEstimate.

    Does what dredge.motion_util.motion_estimate_to_spikeinterface_motion does (transpose to
    (n_time, n_space)); that helper imports Motion from a module path SpikeInterface 0.105
    no longer has, so it cannot be called here.
    """
    from spikeinterface.core.motion import Motion

    disp, times, spatial = _dredge_arrays(motion_est, geom)
    if disp.ndim == 1:
        # rigid: one spatial bin; SI clips depths to it, so its position does not matter
        spatial = np.array([float(np.mean(np.asarray(geom)[:, 1]))])
    return Motion(np.atleast_2d(disp).T.copy(), times, spatial)


def _dredge_from_arrays(disp, times, spatial):
    from dredge.motion_util import NonrigidMotionEstimate, RigidMotionEstimate

    if disp.ndim == 1:
        return RigidMotionEstimate(disp, time_bin_centers_s=times)
    return NonrigidMotionEstimate(disp, time_bin_centers_s=times, spatial_bin_centers_um=spatial)


class MotionInfo:
    """Motion estimate plus the probe structures used to work in registered space.

    Build with `MotionInfo.from_motion_est`. Attributes: drifting, dredge_motion_est,
    si_motion, geom (C, 2) [x, z] um, pitch, min_distance, rgeom (registered geometry),
    geom_kdtree, rgeom_kdtree, probe_boundary_padding_um.
    """

    def __init__(self, *, geom, dredge_motion_est=None, si_motion=None, rgeom=None,
                 probe_boundary_padding_um=100.0):
        self.geom = np.asarray(to_numpy(geom), dtype=float)
        self.dredge_motion_est = dredge_motion_est
        self.si_motion = si_motion
        self.drifting = dredge_motion_est is not None or si_motion is not None
        self.probe_boundary_padding_um = float(probe_boundary_padding_um)
        self.pitch = probe_pitch(self.geom)
        self.min_distance = min_channel_distance(self.geom)
        self.geom_kdtree = cKDTree(self.geom)
        if rgeom is None:
            extent = self.max_abs_displacement() + self.probe_boundary_padding_um
            rgeom = registered_geometry(self.geom, self.pitch, extent)
        self.rgeom = np.asarray(to_numpy(rgeom), dtype=float)
        self.rgeom_kdtree = cKDTree(self.rgeom)

    @classmethod
    def from_motion_est(cls, *, geom, dredge_motion_est=None, si_motion=None, rgeom=None,
                        probe_boundary_padding_um=100.0):
        """Main constructor; fills in whichever of the DREDge / SpikeInterface estimates is missing."""
        geom = np.asarray(to_numpy(geom), dtype=float)
        if dredge_motion_est is None and si_motion is not None:
            dredge_motion_est = si_motion_to_dredge(si_motion)
        if si_motion is None and dredge_motion_est is not None:
            si_motion = dredge_to_si_motion(dredge_motion_est, geom)
        return cls(
            geom=geom, dredge_motion_est=dredge_motion_est, si_motion=si_motion, rgeom=rgeom,
            probe_boundary_padding_um=probe_boundary_padding_um,
        )

    def __repr__(self):
        return (
            f"MotionInfo(drifting={self.drifting}, n_channels={len(self.geom)}, "
            f"n_registered_channels={len(self.rgeom)}, pitch={self.pitch}, "
            f"min_distance={self.min_distance})"
        )

    def max_abs_displacement(self):
        if not self.drifting:
            return 0.0
        return float(max(np.abs(d).max(initial=0.0) for d in self.si_motion.displacement))

    def to_si_motion(self):
        """The estimate as a SpikeInterface Motion (None when not drifting)."""
        return self.si_motion

    # -- depth maps

    def disp_at_s(self, times_s, depths_um):
        """Displacement (um) at times (s) and depths (um); zeros when not drifting."""
        times_s, depths_um = np.broadcast_arrays(
            np.asarray(times_s, dtype=float), np.asarray(depths_um, dtype=float)
        )
        if not self.drifting or times_s.size == 0:
            return np.zeros(times_s.shape)
        disp = self.dredge_motion_est.disp_at_s(times_s.ravel(), depths_um.ravel())
        return np.asarray(disp, dtype=float).reshape(times_s.shape)

    def correct_s(self, times_s, depths_um):
        """Registered depths: depth - displacement(t, depth)."""
        return np.asarray(depths_um, dtype=float) - self.disp_at_s(times_s, depths_um)

    def uncorrect_s(self, times_s, reg_depths_um, n_iter=50, tol_um=1e-4):
        """Depths whose registered depth is reg_depths_um: solve d = reg + disp(t, d).

        Fixed-point iteration; it converges when the displacement changes by less than
        1 um per um of depth (always the case for smooth estimates), and in one step if rigid.
        """
        reg = np.asarray(reg_depths_um, dtype=float)
        depths = reg.copy()
        for _ in range(n_iter):
            new = reg + self.disp_at_s(times_s, depths)
            done = np.max(np.abs(new - depths), initial=0.0) < tol_um
            depths = new
            if done:
                break
        return depths

    def pitch_shifts(self, *, sorting=None, times_s=None, depths_um=None, reg_depths_um=None,
                     shift_mode="round", motion_depth_mode="channel",
                     localizations_dset="point_source_localizations"):
        """Whole probe pitches between each spike's position and its registered position.

        Returns (n_pitches_shift int64, reg_depths_um), n = round|floor((depth - reg) / pitch).
        With a sorting, times come from it and depths from the main channel ('channel')
        or the localization's z ('localization').
        """
        if shift_mode not in ("round", "floor"):
            raise ValueError(f"shift_mode must be 'round' or 'floor', not {shift_mode!r}.")
        if motion_depth_mode not in ("channel", "localization"):
            raise ValueError(f"motion_depth_mode must be 'channel' or 'localization', not {motion_depth_mode!r}.")
        if sorting is not None:
            times_s = sorting.times_samples / sorting.sampling_frequency
            if depths_um is None and motion_depth_mode == "channel":
                depths_um = self.geom[sorting.channels, 1]
            elif depths_um is None:
                depths_um = np.asarray(getattr(sorting, localizations_dset))[:, 2]
        if times_s is None or depths_um is None:
            raise ValueError("Pass a sorting, or times_s and depths_um.")
        depths_um = np.asarray(depths_um, dtype=float)
        if reg_depths_um is None:
            reg_depths_um = self.correct_s(times_s, depths_um)
        ratio = (depths_um - np.asarray(reg_depths_um, dtype=float)) / self.pitch
        # the epsilon keeps exact multiples from flooring down through float error
        shifts = np.round(ratio) if shift_mode == "round" else np.floor(ratio + 1e-6)
        return shifts.astype(np.int64), reg_depths_um

    def registered_channel_map(self, n_pitches_shift, fill=-1):
        """Index into rgeom of each real channel moved by -k * pitch (fill where off rgeom).

        Scalar k gives shape (C,); an array of k gives shape (*k.shape, C).
        """
        shifts = np.asarray(n_pitches_shift, dtype=np.int64)
        unique, inverse = np.unique(shifts.ravel(), return_inverse=True)
        n_chans = len(self.geom)
        maps = np.full((unique.size, n_chans), fill, dtype=np.int64)
        for i, k in enumerate(unique):
            moved = self.geom - [0.0, k * self.pitch]
            dist, idx = self.rgeom_kdtree.query(moved, distance_upper_bound=_GEOM_TOL_UM)
            maps[i] = np.where(np.isfinite(dist), idx, fill)
        return maps[inverse].reshape(*shifts.shape, n_chans)

    # -- persistence

    def save(self, path):
        """Write an .npz (geom, rgeom, padding, and the estimate in DREDge layout), atomically."""
        arrays = {
            "format": np.array(MOTION_FORMAT),
            "geom": self.geom,
            "rgeom": self.rgeom,
            "probe_boundary_padding_um": np.array(self.probe_boundary_padding_um),
            "drifting": np.array(self.drifting),
        }
        if self.drifting:
            disp, times, spatial = _dredge_arrays(self.dredge_motion_est, self.geom)
            arrays.update(displacement=disp, time_bin_centers_s=times)
            edges = getattr(self.dredge_motion_est, "time_bin_edges_s", None)
            if edges is not None and len(edges) == len(times) + 1:
                arrays["time_bin_edges_s"] = np.asarray(edges, dtype=float)
            if spatial is not None:
                arrays["spatial_bin_centers_um"] = spatial
        atomic_savez(path, **arrays)

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        if "geom" not in data or "rgeom" not in data:
            raise ValueError(f"{path} is not a MotionInfo .npz file.")
        dredge_est = None
        if bool(data["drifting"]):
            dredge_est = _dredge_from_arrays(
                data["displacement"], data["time_bin_centers_s"], data.get("spatial_bin_centers_um")
            )
            if "time_bin_edges_s" in data:
                dredge_est.time_bin_edges_s = data["time_bin_edges_s"]
        return cls.from_motion_est(
            geom=data["geom"], dredge_motion_est=dredge_est, rgeom=data["rgeom"],
            probe_boundary_padding_um=float(data["probe_boundary_padding_um"]),
        )
