"""The dartsort-si command line: sort a recording on disk, resume, refuse bad input early."""

import subprocess
import sys

import numpy as np
import probeinterface as pi
import pytest
import spikeinterface.full as si

from dartsort_si.cli import main, parse_sets, read_input

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


def _write_spikeglx(folder, traces_uv, fs):
    """A SpikeGLX run folder with one Neuropixels 1.0 probe's AP stream (int16, gain 500, the
    first traces_uv.shape[1] channels saved plus the sync channel), written from its format."""
    n_saved = traces_uv.shape[1]
    imec = folder / "run_g0" / "run_g0_imec0"
    imec.mkdir(parents=True)
    uv_per_bit = 0.6 / 512 / 500 * 1e6
    data = np.zeros((len(traces_uv), n_saved + 1), np.int16)
    data[:, :n_saved] = np.clip(np.round(traces_uv / uv_per_bit), -32768, 32767)
    (imec / "run_g0_t0.imec0.ap.bin").write_bytes(data.tobytes())
    meta = {
        "acqApLfSy": "384,384,1", "fileName": "run_g0_t0.imec0.ap.bin", "fileSizeBytes": data.nbytes, "fileTimeSecs": len(data) / fs, "firstSample": 0,
        "imAiRangeMax": 0.6, "imAiRangeMin": -0.6, "imMaxInt": 512, "imDatPrb_pn": "PRB_1_4_0480_1",
        "imDatPrb_type": 0, "imSampRate": fs, "nSavedChans": n_saved + 1, "snsApLfSy": f"{n_saved},0,1",
        "snsSaveChanSubset": f"0:{n_saved - 1},768", "typeThis": "imec",
        "~imroTbl": "(0,384)" + "".join(f"({c} 0 0 500 250 1)" for c in range(384)),
        "~snsChanMap": f"({n_saved},0,1)" + "".join(f"(AP{c};{c}:{c})" for c in range(n_saved)) + f"(SY0;{n_saved}:768)",
        "~snsShankMap": "(1,2,480)" + "".join(f"(0:{c % 2}:{c // 2}:1)" for c in range(n_saved)),
    }
    (imec / "run_g0_t0.imec0.ap.meta").write_text("".join(f"{k}={v}\n" for k, v in meta.items()))
    return folder / "run_g0"


def test_sort_a_spikeglx_folder(tmp_path):
    # the folder is recognised, its probe (Neuropixels 1.0 staggered columns) and its gains to uV
    # are read from the .meta, and the int16 samples are sorted in uV
    n_chans = 32
    probe = pi.Probe(ndim=2)
    probe.set_contacts(np.c_[np.array([16.0, 48.0, 0.0, 32.0])[np.arange(n_chans) % 4], 20.0 * (np.arange(n_chans) // 2)],
                       shapes="square", shape_params=dict(width=12))
    probe.set_device_channel_indices(np.arange(n_chans))
    rec, gt = si.generate_ground_truth_recording(durations=[8.0], probe=probe, num_units=4, seed=5)
    folder = _write_spikeglx(tmp_path, rec.get_traces(), rec.sampling_frequency)
    read = read_input(folder)
    assert read.get_num_channels() == n_chans and read.get_dtype() == np.int16
    assert np.allclose(read.get_channel_locations(), probe.contact_positions)
    assert np.allclose(read.get_channel_gains(), 0.6 / 512 / 500 * 1e6)
    out = tmp_path / "out"
    assert main(["sort", str(folder), str(out), "--set", "nn_denoiser_class_name=SingleChannelWaveformDenoiser"]) == 0
    assert _well(gt, si.load(out / "sorting")) >= 3


def _write_open_ephys(folder, traces_uv, fs, bit_volts=0.195):
    """An Open Ephys binary-format session (one int16 stream, no probe settings), from its format."""
    import json

    rec_dir = folder / "session" / "Record Node 101" / "experiment1" / "recording1"
    stream = "Acquisition_Board-100.Rhythm Data"
    (rec_dir / "continuous" / stream).mkdir(parents=True)
    n, c = traces_uv.shape
    data = np.clip(np.round(traces_uv / bit_volts), -32768, 32767).astype(np.int16)
    (rec_dir / "continuous" / stream / "continuous.dat").write_bytes(data.tobytes())
    np.save(rec_dir / "continuous" / stream / "sample_numbers.npy", np.arange(n, dtype=np.int64))
    np.save(rec_dir / "continuous" / stream / "timestamps.npy", np.arange(n) / fs)
    channels = [{"channel_name": f"CH{i + 1}", "description": "", "identifier": "", "history": "",
                 "bit_volts": bit_volts, "units": "uV", "source_processor_index": i, "recorded_processor_index": i}
                for i in range(c)]
    oebin = {"GUI version": "0.6.7", "events": [], "spikes": [], "continuous": [{
        "folder_name": stream + "/", "sample_rate": fs, "source_processor_name": "Acquisition Board",
        "source_processor_id": 100, "stream_name": "Rhythm Data", "recorded_processor": "Acquisition Board",
        "recorded_processor_id": 100, "num_channels": c, "channels": channels}]}
    (rec_dir / "structure.oebin").write_text(json.dumps(oebin))
    return folder / "session"


def test_sort_an_open_ephys_folder_with_a_probe_file(tmp_path, recording, capsys):
    # Open Ephys without probe settings describes no probe: refused with the fix named, then
    # sorted with --probe
    rec, gt = recording
    folder = _write_open_ephys(tmp_path, rec.get_traces(), rec.sampling_frequency)
    assert main(["sort", str(folder), str(tmp_path / "refused"), *FAST]) == 2
    assert "set_probe" in capsys.readouterr().err
    pi.write_probeinterface(tmp_path / "probe.json", rec.get_probe())
    out = tmp_path / "out"
    assert main(["sort", str(folder), str(out), "--probe", str(tmp_path / "probe.json"), *FAST]) == 0
    assert _well(gt, si.load(out / "sorting")) >= 3
