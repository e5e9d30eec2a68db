"""Round trips for DARTsortSorting (h5 / npz / exports) and MotionInfo (motion maps)."""

import shutil

import h5py
import numpy as np
import pytest

from dartsort_si.motion_info import MotionInfo, dredge_to_si_motion, probe_pitch, si_motion_to_dredge
from dartsort_si.sorting import DARTsortSorting, write_peeling_hdf5

FS = 30000.0
PITCH = 20.0


def make_geom(n_rows=32, xs=(0.0, 32.0)):
    """2 columns x 32 rows, 20 um vertical spacing, sorted by (z, x)."""
    return np.array([[x, PITCH * r] for r in range(n_rows) for x in xs])


def make_spikes(n=200, n_chans=64, seed=0):
    rng = np.random.default_rng(seed)
    times = np.sort(rng.integers(0, 10 * int(FS), size=n))
    channels = rng.integers(0, n_chans, size=n)
    labels = rng.integers(-1, 5, size=n)
    locs = np.c_[rng.uniform(0, 32, n), rng.uniform(1, 50, n), rng.uniform(0, 620, n), rng.uniform(50, 200, n)]
    features = dict(
        point_source_localizations=locs,
        denoised_ptp_amplitudes=rng.uniform(3, 20, n),
        collisioncleaned_tpca_features=rng.normal(size=(n, 3, 5)),
    )
    return times, channels, labels, features


def write_h5(path, n=200, with_labels=True):
    geom = make_geom()
    times, channels, labels, features = make_spikes(n, len(geom))
    channel_index = np.tile(np.arange(5), (len(geom), 1))
    write_peeling_hdf5(
        path, times_samples=times, channels=channels, sampling_frequency=FS, geom=geom,
        channel_index=channel_index, labels=labels if with_labels else None, features=features,
    )
    return times, channels, labels, features, geom


# -- DARTsortSorting


def test_h5_feature_selection(tmp_path):
    h5_path = tmp_path / "subtraction.h5"
    times, channels, labels, features, geom = write_h5(h5_path)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file

    sorting = DARTsortSorting.from_peeling_hdf5(h5_path)
    assert sorting.sampling_frequency == FS and len(sorting) == len(times)
    np.testing.assert_array_equal(sorting.labels, labels)
    np.testing.assert_array_equal(sorting.geom, geom)
    assert sorting.channel_index.shape == (len(geom), 5)
    np.testing.assert_array_equal(sorting.point_source_localizations, features["point_source_localizations"])
    assert "collisioncleaned_tpca_features" not in sorting.features()  # matrix feature stays on disk

    full = DARTsortSorting.from_peeling_hdf5(h5_path, load_all_features=True)
    assert full.collisioncleaned_tpca_features.shape == (len(times), 3, 5)
    picked = DARTsortSorting.from_peeling_hdf5(h5_path, load_feature_names=["denoised_ptp_amplitudes"])
    assert set(picked.features()) == {"geom", "channel_index", "denoised_ptp_amplitudes"}
    with pytest.raises(KeyError):
        DARTsortSorting.from_peeling_hdf5(h5_path, load_feature_names=["nope"])
    DARTsortSorting.from_peeling_hdf5(h5_path, load_feature_names=["nope"], allow_missing=True)
    with pytest.raises(AttributeError):
        sorting.nope


def test_save_load_relative_pointer_survives_move(tmp_path):
    run = tmp_path / "run"
    times, channels, labels, features, _ = write_h5(run / "subtraction.h5")
    sorting = DARTsortSorting.from_peeling_hdf5(run / "subtraction.h5")
    new_labels = np.arange(len(times)) % 3
    relabeled = sorting.ephemeral_replace(labels=new_labels, score=np.ones(len(times)))
    np.testing.assert_array_equal(sorting.labels, labels)  # the original is untouched
    relabeled.save(run / "dartsort_sorting.npz")

    shutil.move(run, tmp_path / "moved")
    loaded = DARTsortSorting.load(tmp_path / "moved" / "dartsort_sorting.npz")
    assert loaded.parent_h5_path.resolve() == (tmp_path / "moved" / "subtraction.h5").resolve()
    np.testing.assert_array_equal(loaded.times_samples, times)
    np.testing.assert_array_equal(loaded.channels, channels)
    np.testing.assert_array_equal(loaded.labels, new_labels)
    np.testing.assert_array_equal(loaded.score, np.ones(len(times)))
    np.testing.assert_array_equal(loaded.denoised_ptp_amplitudes, features["denoised_ptp_amplitudes"])
    assert "collisioncleaned_tpca_features" not in loaded.features()

    more = DARTsortSorting.load(
        tmp_path / "moved" / "dartsort_sorting.npz",
        additional_persistent_features=["collisioncleaned_tpca_features"],
        load_ephemeral_feature_names=[],
    )
    assert more.collisioncleaned_tpca_features.shape == (len(times), 3, 5)
    assert "score" not in more.features()


def test_empty_file_round_trip(tmp_path):
    write_peeling_hdf5(
        tmp_path / "empty.h5", times_samples=[], channels=[], sampling_frequency=FS,
        geom=make_geom(), labels=[], features=dict(point_source_localizations=np.zeros((0, 4))),
    )
    sorting = DARTsortSorting.from_peeling_hdf5(tmp_path / "empty.h5")
    assert len(sorting) == 0 and sorting.n_units == 0
    assert sorting.point_source_localizations.shape == (0, 4)
    sorting.save(tmp_path / "empty.npz")
    loaded = DARTsortSorting.load(tmp_path / "empty.npz")
    assert len(loaded) == 0 and loaded.point_source_localizations.shape == (0, 4)
    assert len(loaded.to_numpy_sorting().unit_ids) == 0
    assert len(loaded.to_pandas()) == 0


def test_exports(tmp_path):
    write_h5(tmp_path / "s.h5")
    sorting = DARTsortSorting.from_peeling_hdf5(tmp_path / "s.h5")
    labels = sorting.labels

    np_sorting = sorting.to_numpy_sorting()
    assert list(np_sorting.unit_ids) == list(sorting.unit_ids) == [0, 1, 2, 3, 4]
    for unit in sorting.unit_ids:
        assert len(np_sorting.get_unit_spike_train(unit)) == np.sum(labels == unit)

    df = sorting.to_pandas()
    assert len(df) == len(sorting)
    for col in ("times_samples", "times_seconds", "channels", "labels", "denoised_ptp_amplitudes",
                "x", "y", "z", "alpha"):
        assert col in df.columns
    np.testing.assert_allclose(df["z"], sorting.point_source_localizations[:, 2])

    group = sorting.to_tsgroup()
    assert len(group) == sorting.n_units
    weighted = sorting.to_tsgroup(weight_key="denoised_ptp_amplitudes")
    assert len(weighted[0].values) == np.sum(labels == 0)


def test_drop_doubles_and_subset_reload(tmp_path):
    times = np.array([10, 10, 10, 20, 20, 30, 30])
    labels = np.array([1, 1, 2, 3, -1, 4, 4])
    write_peeling_hdf5(
        tmp_path / "d.h5", times_samples=times, channels=np.zeros(7), sampling_frequency=FS,
        geom=make_geom(), labels=labels, features=dict(amp=np.arange(7.0)),
    )
    sorting = DARTsortSorting.from_peeling_hdf5(tmp_path / "d.h5")
    single = sorting.drop_doubles()
    assert len(single) == 5  # one double in unit 1, one in unit 4
    np.testing.assert_array_equal(single.amp, [0, 2, 3, 4, 5])

    single.save(tmp_path / "single.npz")
    loaded = DARTsortSorting.load(tmp_path / "single.npz")
    np.testing.assert_array_equal(loaded.amp, [0, 2, 3, 4, 5])  # h5 rows follow the subset


def test_features_add_and_errors(tmp_path):
    write_h5(tmp_path / "s.h5", n=20)
    sorting = DARTsortSorting.from_peeling_hdf5(tmp_path / "s.h5")
    with pytest.raises(ValueError):
        sorting.add_ephemeral_feature("bad", np.zeros(19))
    sorting.add_ephemeral_feature("good", np.zeros(20))
    with pytest.raises(ValueError):
        sorting.add_ephemeral_feature("good", np.ones(20))
    sorting.add_ephemeral_feature("good", np.ones(20), overwrite=True)
    assert sorting.good.sum() == 20

    sorting.add_feature("new_amp", np.arange(20.0))  # writable h5: goes to disk
    with h5py.File(tmp_path / "s.h5", "r") as h5:
        np.testing.assert_array_equal(h5["new_amp"][()], np.arange(20.0))
    memory_only = DARTsortSorting(times_samples=np.arange(3), channels=np.zeros(3, int))
    memory_only.add_feature("amp", np.ones(3))
    assert "amp" in memory_only.ephemeral_features
    assert "n_spikes=3" in repr(memory_only)


def test_non_sorting_npz_is_rejected(tmp_path):
    np.savez(tmp_path / "other.npz", foo=np.arange(3))
    with pytest.raises(ValueError, match="not a DARTsortSorting"):
        DARTsortSorting.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError):
        DARTsortSorting.load(tmp_path / "text.npz")


def test_in_memory_sorting_keeps_features_without_h5(tmp_path):
    sorting = DARTsortSorting(
        times_samples=np.arange(4), channels=np.zeros(4, int), labels=None, sampling_frequency=1000,
        persistent_features=dict(amp=np.arange(4.0)),
    )
    sorting.save(tmp_path / "s.npz")
    loaded = DARTsortSorting.load(tmp_path / "s.npz")
    assert loaded.labels is None and loaded.sampling_frequency == 1000
    np.testing.assert_array_equal(loaded.amp, np.arange(4.0))


# -- MotionInfo


def rigid_estimate(disp_fn=lambda t: 30 * np.sin(t / 3)):
    from dredge.motion_util import get_motion_estimate

    t = np.arange(0.5, 60.0, 1.0)
    return get_motion_estimate(disp_fn(t), time_bin_centers_s=t)


def nonrigid_estimate():
    from dredge.motion_util import get_motion_estimate

    t = np.arange(0.5, 60.0, 1.0)
    z = np.arange(0.0, 640.0, 80.0)
    # slope in depth well under 1 um/um, as for real estimates
    disp = 20 * np.sin(t / 5)[None, :] + 0.1 * z[:, None] * np.cos(t / 7)[None, :]
    return get_motion_estimate(disp, time_bin_centers_s=t, spatial_bin_centers_um=z)


def test_not_drifting():
    geom = make_geom()
    motion = MotionInfo.from_motion_est(geom=geom, probe_boundary_padding_um=0.0)
    assert not motion.drifting and motion.si_motion is None and motion.to_si_motion() is None
    assert motion.pitch == PITCH and motion.min_distance == PITCH
    np.testing.assert_array_equal(motion.rgeom, geom)
    np.testing.assert_array_equal(motion.disp_at_s([1.0, 2.0], [0.0, 100.0]), 0.0)
    shifts, reg = motion.pitch_shifts(times_s=np.ones(3), depths_um=np.array([0.0, 50.0, 600.0]))
    np.testing.assert_array_equal(shifts, 0)
    np.testing.assert_array_equal(reg, [0.0, 50.0, 600.0])
    np.testing.assert_array_equal(motion.registered_channel_map(0), np.arange(len(geom)))


def test_pitch_of_staggered_probe():
    # NP1-like checkerboard: rows alternate x offsets, so the period is two rows
    geom = np.array([[(16.0 if r % 2 else 0.0) + x, PITCH * r] for r in range(16) for x in (0.0, 32.0)])
    assert probe_pitch(geom) == 2 * PITCH
    assert probe_pitch(make_geom()) == PITCH


@pytest.mark.parametrize("make_est", [rigid_estimate, nonrigid_estimate])
def test_correct_uncorrect_round_trip(make_est):
    motion = MotionInfo.from_motion_est(geom=make_geom(), dredge_motion_est=make_est())
    rng = np.random.default_rng(1)
    times, depths = rng.uniform(0, 60, 500), rng.uniform(0, 620, 500)
    reg = motion.correct_s(times, depths)
    np.testing.assert_allclose(reg, depths - motion.dredge_motion_est.disp_at_s(times, depths))
    assert np.abs(motion.uncorrect_s(times, reg) - depths).max() < 0.5


@pytest.mark.parametrize("make_est", [rigid_estimate, nonrigid_estimate])
def test_si_dredge_conversions_agree(make_est):
    dredge_est = make_est()
    si_motion = dredge_to_si_motion(dredge_est, make_geom())
    n_space = 1 if np.ndim(dredge_est.displacement) == 1 else dredge_est.displacement.shape[0]
    assert si_motion.displacement[0].shape == (len(dredge_est.time_bin_centers_s), n_space)
    rng = np.random.default_rng(2)
    times, depths = rng.uniform(0, 60, 300), rng.uniform(0, 620, 300)
    expected = dredge_est.disp_at_s(times, depths)
    np.testing.assert_allclose(si_motion.get_displacement_at_time_and_depth(times, depths), expected, atol=1e-9)

    from_si = MotionInfo.from_motion_est(geom=make_geom(), si_motion=si_motion)
    assert from_si.drifting and from_si.si_motion is si_motion
    np.testing.assert_allclose(from_si.disp_at_s(times, depths), expected, atol=1e-9)
    np.testing.assert_allclose(si_motion_to_dredge(si_motion).disp_at_s(times, depths), expected, atol=1e-9)


def test_pitch_shifts_known_shift():
    geom = make_geom()
    # displacement grows with depth: 15 um at z=0 and 45 um at z=300
    from dredge.motion_util import get_motion_estimate

    t, z = np.array([0.0, 100.0]), np.array([0.0, 600.0])
    disp = np.array([[15.0, 15.0], [75.0, 75.0]])  # (n_space, n_time)
    motion = MotionInfo.from_motion_est(
        geom=geom, dredge_motion_est=get_motion_estimate(disp, time_bin_centers_s=t, spatial_bin_centers_um=z)
    )
    channels = np.array([0, 1])  # both at z=0
    locs = np.array([[0.0, 10.0, 0.0, 100.0], [0.0, 10.0, 300.0, 100.0]])
    sorting = DARTsortSorting(
        times_samples=np.array([30000, 60000]), channels=channels, sampling_frequency=FS,
        ephemeral_features=dict(point_source_localizations=locs),
    )
    # channel depth 0 -> disp 15 -> 0.75 pitches; localization depth 300 -> disp 45 -> 2.25 pitches
    expected = {("round", "channel"): [1, 1], ("floor", "channel"): [0, 0],
                ("round", "localization"): [1, 2], ("floor", "localization"): [0, 2]}
    for (shift_mode, depth_mode), want in expected.items():
        shifts, reg = motion.pitch_shifts(sorting=sorting, shift_mode=shift_mode, motion_depth_mode=depth_mode)
        np.testing.assert_array_equal(shifts, want)
        assert shifts.dtype == np.int64
    _, reg = motion.pitch_shifts(sorting=sorting, motion_depth_mode="localization")
    np.testing.assert_allclose(reg, [-15.0, 255.0])
    with pytest.raises(ValueError):
        motion.pitch_shifts(sorting=sorting, shift_mode="ceil")
    with pytest.raises(ValueError):
        motion.pitch_shifts(sorting=sorting, motion_depth_mode="amplitude")


def test_rgeom_and_channel_map(tmp_path):
    geom = make_geom()
    motion = MotionInfo.from_motion_est(geom=geom, dredge_motion_est=rigid_estimate(), probe_boundary_padding_um=50)
    rgeom = motion.rgeom
    dist, _ = motion.rgeom_kdtree.query(geom)
    assert dist.max() < 1e-9  # rgeom contains geom
    extent = 30 + 50  # max |disp| + padding
    assert rgeom[:, 1].min() <= geom[:, 1].min() - extent
    assert rgeom[:, 1].max() >= geom[:, 1].max() + extent
    assert len(np.unique(rgeom, axis=0)) == len(rgeom)
    assert np.all(np.diff(rgeom[:, 1]) >= 0)

    maps = motion.registered_channel_map(np.array([0, 2, -3]))
    assert maps.shape == (3, len(geom))
    for row, k in zip(maps, (0, 2, -3)):
        np.testing.assert_allclose(rgeom[row], geom - [0, k * PITCH])
    far = motion.registered_channel_map(100)
    assert np.all(far == -1)

    motion.save(tmp_path / "motion.npz")
    loaded = MotionInfo.load(tmp_path / "motion.npz")
    np.testing.assert_array_equal(loaded.rgeom, rgeom)
    times, depths = np.linspace(0, 60, 50), np.linspace(0, 600, 50)
    np.testing.assert_allclose(loaded.disp_at_s(times, depths), motion.disp_at_s(times, depths))
    still = MotionInfo.from_motion_est(geom=geom)
    still.save(tmp_path / "still.npz")
    assert not MotionInfo.load(tmp_path / "still.npz").drifting
