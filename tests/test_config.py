"""Typed config: defaults, bounds and unknown keys, each rejected with one line naming the key."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3: "):
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


# ---- generated input (issue 13): any bytes give a Config or one ConfigError line, never another exception ----------

EXAMPLES = settings(max_examples=100, deadline=None)
SHIPPED = (ROOT / "config.yaml").read_text()
SECTIONS = {"match": "threshold_l2: 0.4", "decide": "votes_needed: 2", "door": "pulse_s: 2.0",
            "enroll": "capture_frames: 5", "camera": "width: 320", "images": "max_megapixels: 20"}


def loaded(data: bytes):
    """load_config on a file holding `data`: the Config, or the ConfigError after checking it is one line."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(data)
        try:
            return load_config(path)
        except ConfigError as err:
            assert len(str(err).splitlines()) == 1 and str(err).startswith(f"config file {path}"), str(err)
            return err


@EXAMPLES
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 st.binary(max_size=40).map(lambda noise: SHIPPED.encode() + noise)))
def test_random_bytes_and_text_are_a_config_or_one_line(data):
    loaded(data)


@EXAMPLES
@given(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "utf-8-sig", "utf-8"]),
       st.text(st.characters(min_codepoint=0xa0, max_codepoint=0x2ff), min_size=1, max_size=20))
def test_other_encodings_are_named_not_crashed(encoding, comment):
    data = f"# {comment}\n{SHIPPED}".encode(encoding, errors="replace")
    result = loaded(data)
    if encoding.startswith("utf-8"):
        assert isinstance(result, Config)
    elif not isinstance(result, Config):
        assert "is not UTF-8 text" in str(result)


@EXAMPLES
@given(st.lists(st.sampled_from(sorted(SECTIONS)), min_size=1, max_size=8), st.booleans())
def test_a_key_given_twice_is_an_error_naming_it(sections, inner):
    if inner:  # the same key twice inside one section
        text = "".join(f"{name}:\n  {SECTIONS[name]}\n  {SECTIONS[name]}\n" for name in dict.fromkeys(sections))
        twice = SECTIONS[sections[0]].split(":")[0]
    else:
        text = "".join(f"{name}:\n  {SECTIONS[name]}\n" for name in sections)
        twice = next((name for i, name in enumerate(sections) if name in sections[:i]), None)
    result = loaded(text.encode())
    if twice is None:
        assert isinstance(result, Config)
    else:
        assert isinstance(result, ConfigError) and f"duplicate key '{twice}'" in str(result), result
