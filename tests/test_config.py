import json

import pytest

from dartsort_si import DARTsortUserConfig
from dartsort_si.config import load_config


def test_defaults_match_reference():
    cfg = DARTsortUserConfig()
    assert cfg.voltage_threshold == 3.0
    assert cfg.matching_threshold == 8.0
    assert cfg.initial_threshold == 10.0
    assert cfg.ms_before == 1.4
    assert cfg.ms_after == pytest.approx(2.6 + 0.1 / 3)
    assert cfg.subsampling_spikes == 2048000
    assert cfg.nn_denoiser_class_name == "Decollider"
    assert cfg.amplitude_scaling_boundary == pytest.approx(1 / 3)
    assert cfg.temporal_upsamples == 4
    assert cfg.rigid is False
    assert cfg.peak_sign == "both"
    assert len(DARTsortUserConfig.field_defaults()) == 44  # every field of the reference


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(voltage_threshold="4"), ["voltage_threshold", "float"]),
        (dict(voltage_threshold=-1.0), ["voltage_threshold", "> 0"]),
        (dict(peak_sign="up"), ["peak_sign", "'neg'", "'both'", "'pos'"]),
        (dict(preprocessing="cmr"), ["preprocessing", "'ibllikecmr'"]),
        (dict(temporal_upsamples=0), ["temporal_upsamples", ">= 1"]),
        (dict(temporal_pca_rank=2.5), ["temporal_pca_rank", "int"]),
        (dict(rigid=1), ["rigid", "bool"]),
        (dict(subsampling_presence=2.0), ["subsampling_presence", "between 0 and 1"]),
        (dict(feature_ms_before=3.0), ["feature_ms_before"]),
    ],
)
def test_validation_errors_name_field_and_allowed_values(kwargs, words):
    with pytest.raises(ValueError) as err:
        DARTsortUserConfig(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="'voltage_treshold' \\(did you mean 'voltage_threshold'\\?\\)"):
        load_config({"voltage_treshold": 4.0})


def test_dict_toml_json(tmp_path):
    assert load_config({"voltage_threshold": 4}).voltage_threshold == 4.0
    toml = tmp_path / "cfg.toml"
    toml.write_text('voltage_threshold = 5.0\npeak_sign = "neg"\nsubsampling_spikes = 1000\n')
    cfg = load_config(toml)
    assert (cfg.voltage_threshold, cfg.peak_sign, cfg.subsampling_spikes) == (5.0, "neg", 1000)
    js = tmp_path / "cfg.json"
    js.write_text(json.dumps({"rigid": True, "device": None}))
    assert load_config(js).rigid is True
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "cfg.yaml"
    bad.write_text("a: 1")
    with pytest.raises(ValueError, match=".toml or .json"):
        load_config(bad)
    with pytest.raises(ValueError):
        load_config(3)


def test_replace_revalidates():
    cfg = DARTsortUserConfig().replace(voltage_threshold=4.5)
    assert cfg.voltage_threshold == 4.5
    with pytest.raises(ValueError):
        cfg.replace(voltage_threshold=0.0)
