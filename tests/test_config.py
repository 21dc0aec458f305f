"""Config: defaults, YAML + --set precedence, scalar parsing, unknown keys, validation, presets, redaction."""

from __future__ import annotations

import datetime

import pytest

from pipeline.config import ConfigError, load_config, redacted, valid_keys


def load(*overrides, **kwargs):
    kwargs.setdefault("input_path", "in.parquet")
    kwargs.setdefault("output_path", "out")
    return load_config(kwargs.pop("path", None), list(overrides), **kwargs)


def test_defaults_follow_the_karlo_anchors():
    config = load("models.unclip=/ckpt/karlo")
    assert (config.stages.prior.steps, config.stages.prior.guidance_scale) == (25, 4.0)
    assert (config.stages.decoder.steps, config.stages.decoder.guidance_scale) == (25, 8.0)
    assert config.stages.upsampler_256.steps == 7
    assert config.rerank.candidates == config.rerank.keep == 1
    assert config.output.format == "files" and config.output.image_format == "png"


def test_yaml_then_set_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("models:\n  unclip: /a\nstages:\n  decoder:\n    steps: 50\n    batch_size: 2\n"
                    "input:\n  path: from-yaml.parquet\nseed: 3\n")
    config = load("stages.decoder.steps=10", "models.upsampler_1024=null", "stages.prior.num_gpus=0.5",
                  "dtype=fp16", path=str(path), input_path="flag.parquet")
    assert config.stages.decoder.steps == 10 and config.stages.decoder.batch_size == 2
    assert config.models.upsampler_1024 is None
    assert config.stages.prior.num_gpus == 0.5 and config.dtype == "fp16" and config.seed == 3
    assert config.input.path == "flag.parquet"


def test_set_values_are_yaml_scalars():
    config = load("models.unclip=/a", "stages.prior.guidance_scale=4", "stages.prior.replicas=auto",
                  "models.allow_pickle=true", "stages.decoder.num_gpus=1")
    assert config.stages.prior.guidance_scale == 4.0 and isinstance(config.stages.prior.guidance_scale, float)
    assert config.stages.prior.replicas == "auto" and config.models.allow_pickle is True
    assert config.stages.decoder.num_gpus == 1.0


@pytest.mark.parametrize("key,hint", [
    ("stages.decoder.step", "stages.decoder.steps"),
    ("rerank.candidate", "rerank.candidates"),
    ("stages.priors.steps", "stages.prior.steps"),
    ("output.fromat", "output.format"),
])
def test_unknown_keys_name_the_nearest_valid_key(key, hint):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'; did you mean '{hint}'"):
        load("models.unclip=/a", f"{key}=1")


@pytest.mark.parametrize("override,message", [
    ("stages.decoder.steps=0", "stages.decoder.steps must be an integer >= 1"),
    ("stages.prior.batch_size=-2", "stages.prior.batch_size must be 'auto' or an integer >= 1"),
    ("stages.prior.num_gpus=2", "stages.prior.num_gpus must be 'auto' or the GPU fraction of one actor"),
    ("run.gpus=-1", "run.gpus must be 'auto' or a number of GPUs >= 0"),
    ("run.gpu_kind=v100", "run.gpu_kind must be 'auto' or one of t4"),
    ("stages.decoder.dtype=fp8", "stages.decoder.dtype must be one of"),
    ("rerank.keep=3", "rerank.keep must be an integer between 1 and rerank.candidates"),
    ("rerank.at=prior", "rerank.at must be one of decoder, upsampler_256"),
    ("output.format=zip", "output.format must be one of files, webdataset"),
    ("stages.upsampler_256.replicas=many", "stages.upsampler_256.replicas must be 'auto' or an integer"),
    ("seed=-1", "seed must be an integer"),
])
def test_bad_values_give_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load("models.unclip=/a", override)
    assert "\n" not in str(info.value)


def test_required_keys_and_rerank_needs_clip():
    with pytest.raises(ConfigError, match="models.unclip is required"):
        load()
    with pytest.raises(ConfigError, match="input.path is required"):
        load("models.unclip=/a", input_path=None)
    with pytest.raises(ConfigError, match="needs models.clip"):
        load("models.unclip=/a", "rerank.candidates=4")


def test_guidance_only_where_a_stage_has_it():
    with pytest.raises(ConfigError, match="unknown config key 'stages.upsampler_256.guidance_scale'"):
        load("models.unclip=/a", "stages.upsampler_256.guidance_scale=2")


def test_tiny_preset_fills_models_unless_set():
    config = load(preset="tiny")
    assert config.models.unclip == "tiny://unclip" and config.models.clip == "tiny://clip"
    assert load("models.upsampler_1024=null", preset="tiny").models.upsampler_1024 is None
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load(preset="huge")


def test_storage_credentials_are_redacted():
    config = load("models.unclip=/a", "storage_options.key=AKIA123", "storage_options.secret=hunter2",
                  "storage_options.endpoint_url=http://127.0.0.1:9000")
    shown = redacted(config)["storage_options"]
    assert shown == {"key": "***", "secret": "***", "endpoint_url": "http://127.0.0.1:9000"}
    assert "hunter2" not in str(redacted(config))


def test_every_documented_key_exists():
    keys = set(valid_keys())
    for key in ("models.unclip", "models.upsampler_1024", "models.clip", "rerank.candidates", "rerank.keep",
                "rerank.at", "prior.best_of", "input.prompt_column", "output.format", "output.image_format",
                "seed", "dtype"):
        assert key in keys
    for stage in ("text_encoder", "prior", "decoder", "upsampler_256", "upsampler_1024", "reranker"):
        for setting in ("batch_size", "num_gpus", "replicas", "dtype"):
            assert f"stages.{stage}.{setting}" in keys


def test_yaml_syntax_errors_name_the_line_and_column(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stages:\n  decoder:\n    steps: 3\n   batch_size: 2\n")
    with pytest.raises(ConfigError, match=r"run.yaml is not valid YAML: line 4, column 4: expected <block end>"):
        load_config(str(path))


@pytest.mark.parametrize("given, expected", [("2026-11-24", "2026-11-24"), ("2026-11-24T05", "2026-11-24T05"),
                                             (datetime.date(2026, 2, 3), "2026-02-03")])
def test_a_window_is_a_calendar_day_or_hour(given, expected):
    config = load_config(None, ["models.unclip=/x", f"run.window={given}"], input_path="in/{window}",
                         output_path="out/{window}")
    assert config.run.window == expected and config.output.path == f"out/{expected}"


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-45", "2026-02-30", "2026-1-5", "2026-11-24T25", "20261124"])
def test_a_window_that_is_not_a_real_date_is_refused(bad):
    with pytest.raises(ConfigError, match=rf"run.window '{bad}' is not a date \(YYYY-MM-DD"):
        load_config(None, ["models.unclip=/x"], input_path="in", output_path="out", window=bad)


@pytest.mark.parametrize("sets,message", [
    (["mode=interpolate"], r"mode must be one of text, variation, interpolation, textdiff, got 'interpolate'"),
    (["mode=interpolation", "interpolation.frames=1"], r"interpolation.frames must be an integer >= 2"),
    (["mode=textdiff", "textdiff.theta_max=1.5"], r"textdiff.theta_max must be a number in \(0, 1\]"),
    (["mode=interpolation", "models.clip=/c", "rerank.candidates=3", "rerank.keep=1"],
     r"interpolation keeps every frame of every candidate; set rerank.keep to rerank.candidates \(3\)"),
])
def test_mode_settings_are_checked(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["models.unclip=/x", *sets], input_path="in", output_path="out")


def test_karlo_preset_pins_every_hub_source_to_a_commit():
    import re

    config = load(preset="karlo")
    for key in ("unclip", "upsampler_1024", "clip", "image_encoder"):
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", getattr(config.models, key)), key
    assert config.dtype == "auto"  # fp16 wherever a stage runs on a GPU
    assert config.model_layouts() == {"unclip": "unclip", "upsampler_1024": "upsampler_1024", "clip": "clip"}
    variation = load("mode=variation", preset="karlo")
    assert variation.model_layouts()["unclip"] == "unclip_decoding"  # no prior needed, encoder from CLIP
    assert variation.model_layouts()["image_encoder"] == "image_encoder"
