import shutil

import pytest
import torch

import dartsort_si  # noqa: F401  (registers the sorter)

# Small torch ops on 2 busy cores run far faster on one thread than on two.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gt_data(tmp_path_factory):
    """A small drifting ground-truth recording (saved binary) and its sorting."""
    from dartsort_si.ground_truth import generate_ground_truth

    folder = tmp_path_factory.mktemp("gt") / "rigid_12s_48ch"
    rec, gt, info = generate_ground_truth(folder, duration=12.0, num_channels=48, num_units=12,
                                          drift="rigid", drift_um=15.0, seed=2)
    return rec, gt, info


FAST_PARAMS = dict(nn_denoiser_class_name="SingleChannelWaveformDenoiser", preprocessing="standardize")


@pytest.fixture(scope="session")
def sorted_with_run_sorter(gt_data, tmp_path_factory):
    """One whole sort through si.run_sorter, shared by the tests that inspect its output."""
    import spikeinterface.full as si

    rec, gt, info = gt_data
    folder = tmp_path_factory.mktemp("sort") / "dartsort_run"
    sorting = si.run_sorter("dartsort", rec, folder=folder, verbose=False, **FAST_PARAMS)
    return sorting, folder


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst
