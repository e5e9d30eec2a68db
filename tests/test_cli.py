"""The dartsort-si command line: sort a recording on disk, resume, refuse bad input early."""

import subprocess
import sys

import numpy as np
import probeinterface as pi
import pytest
import spikeinterface.full as si

from dartsort_si.cli import main, parse_sets

FAST = ["--set", "nn_denoiser_class_name=SingleChannelWaveformDenoiser", "--set", "preprocessing=standardize"]


@pytest.fixture(scope="module")
def recording():
    rec, gt = si.generate_ground_truth_recording(durations=[8.0], num_channels=16, num_units=4, seed=3)
    return rec, gt


def _well(gt, sorting):
    return si.compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True).count_well_detected_units(0.8)


def test_sort_a_saved_folder_and_resume(tmp_path, recording):
    rec, gt = recording
    rec.save(folder=tmp_path / "rec", n_jobs=1, progress_bar=False)
    out = tmp_path / "out"
    assert main(["sort", str(tmp_path / "rec"), str(out), *FAST]) == 0
    sorting = si.load(out / "sorting")
    assert _well(gt, sorting) >= 3
    log = (out / "dartsort.log").read_text()
    assert "subtraction done" in log and "units" in log
    # the same command again finds every step done: same result, nothing recomputed
    assert main(["sort", str(tmp_path / "rec"), str(out), *FAST]) == 0
    again = si.load(out / "sorting")
    assert np.array_equal(again.to_spike_vector(), sorting.to_spike_vector())
    assert (out / "dartsort.log").read_text().count("subtraction done") == 1


def test_sort_a_raw_binary_file_with_a_probe_file(tmp_path, recording):
    rec, gt = recording
    traces = rec.get_traces().astype("float32")
    traces.tofile(tmp_path / "data.bin")
    pi.write_probeinterface(tmp_path / "probe.json", rec.get_probe())
    out = tmp_path / "out"
    args = ["sort", str(tmp_path / "data.bin"), str(out), "--probe", str(tmp_path / "probe.json"),
            "--sampling-frequency", str(rec.sampling_frequency), "--num-channels", "16", "--dtype", "float32"]
    assert main(args + FAST) == 0
    assert _well(gt, si.load(out / "sorting")) >= 3


def test_raw_binary_without_its_layout_is_refused(tmp_path, capsys):
    np.zeros((1000, 4), "float32").tofile(tmp_path / "data.bin")
    assert main(["sort", str(tmp_path / "data.bin"), str(tmp_path / "out")]) == 2
    assert "--probe" in capsys.readouterr().err


def test_bad_config_is_refused_before_anything_is_written(tmp_path, capsys):
    assert main(["sort", str(tmp_path), str(tmp_path / "out"), "--set", "voltage_treshold=4"]) == 2
    assert "voltage_threshold" in capsys.readouterr().err  # did you mean
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_ours_is_left_alone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(["sort", str(tmp_path), str(out)]) == 2
    assert "not a dartsort-si output folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_set_values_are_read_as_json_or_text():
    assert parse_sets(["a=4", "b=true", "c=cpu", "d=null", "e=[1, 2]"]) == dict(a=4, b=True, c="cpu", d=None,
                                                                                e=[1, 2])
    with pytest.raises(ValueError, match="key=value"):
        parse_sets(["novalue"])


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "dartsort_si.cli", "sort", "--help"], capture_output=True,
                         text=True, check=True)
    assert "SpikeGLX" in out.stdout and "--set" in out.stdout


def test_report_has_its_figures_and_a_row_per_unit(tmp_path, recording):
    import base64
    import re

    rec, _ = recording
    rec.save(folder=tmp_path / "rec", n_jobs=1, progress_bar=False)
    out = tmp_path / "out"
    assert main(["sort", str(tmp_path / "rec"), str(out), *FAST]) == 0
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [title for title, _ in images] == ["Drift raster", "Units along the probe", "Amplitude over time",
                                             "ISI violations"]
    for _, data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    n_units = len(si.load(out / "sorting").unit_ids)
    assert page.count("<tr><td>") == n_units
    assert main(["report", str(tmp_path / "nothing")]) == 2
    _renders_in_chromium(out / "report.html", [title for title, _ in images], n_units)


def _renders_in_chromium(page, titles, n_units):
    """The browser decodes every figure and lays out the unit table (headless Chromium: Qt WebEngine)."""
    import json
    from pathlib import Path

    pytest.importorskip("PySide6.QtWebEngineCore")
    script = Path(__file__).with_name("render_page.py")
    done = subprocess.run([sys.executable, str(script), str(page)], capture_output=True, text=True, timeout=120)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert [i["alt"] for i in seen["images"]] == titles, seen
    assert all(i["complete"] and i["width"] >= 200 and i["height"] >= 200 for i in seen["images"]), seen
    assert seen["rows"] == n_units + 1  # and the header


def _write_nwb(path, rec):
    """An NWB file as acquisition systems write it: int16 samples with a conversion to volts, and
    the electrodes table holding the contact positions (rel_x, rel_y)."""
    from datetime import datetime, timezone

    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.ecephys import ElectricalSeries

    nwb = NWBFile("generated", "gt", datetime(2026, 1, 1, tzinfo=timezone.utc))
    device = nwb.create_device("probe")
    group = nwb.create_electrode_group("shank0", "generated", "nowhere", device)
    nwb.add_electrode_column("rel_x", "x on the probe (um)")
    nwb.add_electrode_column("rel_y", "y on the probe (um)")
    for x, y in rec.get_channel_locations():
        nwb.add_electrode(group=group, location="nowhere", rel_x=float(x), rel_y=float(y))
    region = nwb.create_electrode_table_region(list(range(rec.get_num_channels())), "all")
    gain_uv = 0.195
    data = np.round(rec.get_traces() / gain_uv).astype("int16")
    nwb.add_acquisition(ElectricalSeries(name="ElectricalSeries", data=data, electrodes=region,
                                         rate=rec.sampling_frequency, conversion=gain_uv * 1e-6))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


def test_sort_an_nwb_file(tmp_path, recording):
    pytest.importorskip("pynwb")
    rec, gt = recording
    _write_nwb(tmp_path / "rec.nwb", rec)
    out = tmp_path / "out"
    assert main(["sort", str(tmp_path / "rec.nwb"), str(out), *FAST]) == 0
    sorting = si.load(out / "sorting")
    assert _well(gt, sorting) >= 3
    amp = sorting.get_property("amplitude_uv")  # the file's conversion to volts reached the units
    assert amp is not None and np.all((amp > 10) & (amp < 2000))
