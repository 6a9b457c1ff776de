"""Typed config: defaults, bounds and unknown keys, each rejected with one line naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import Config, Section, load_config
from edge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid():
    config = load_config(ROOT / "config.yaml")
    assert isinstance(config, Config)
    assert 0 < config.match.threshold_l2 < 2


def test_defaults_without_a_file():
    config = load_config(None)
    assert config.detector.confidence == 0.5 and config.embedder.backend == "auto"


def test_unknown_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'detector.confidense'"):
        load_config(write(tmp_path, "detector:\n  confidense: 0.5\n"))


def test_out_of_bounds_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"match.threshold_l2"):
        load_config(write(tmp_path, "match:\n  threshold_l2: -1\n"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3$"):
        load_config(write(tmp_path, "match:\n  threshold_l2: [\n"))
    with pytest.raises(ConfigError, match=r"not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, name
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Section):
                walk(annotation)

    walk(Config)
