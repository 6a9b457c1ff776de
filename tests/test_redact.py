"""Secrets never leave the process: camera passwords are masked in every printed line, log line, event and JSON
document (generated URIs, then the real CLI); what we create is private whatever the umask."""
from __future__ import annotations

import logging
import os
import string
from pathlib import Path

from conftest import cli
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.redact import RedactingFormatter, redact

PLAIN = string.ascii_letters + string.digits + " ,.=()[]'\"-_"
USER = st.text(string.ascii_letters + string.digits + "._-~%", max_size=12)
# Anything but whitespace, '@' included: users paste passwords into URIs without percent-encoding them.
PASSWORD = st.text(st.characters(exclude_categories=("Z", "C")), min_size=1, max_size=24)
HOST = st.from_regex(r"[a-z0-9-]{1,12}(\.[a-z0-9-]{1,8}){0,3}(:\d{1,5})?", fullmatch=True)
PATH = st.from_regex(r"(/[A-Za-z0-9._-]{0,10}){0,3}", fullmatch=True)
EXAMPLES = settings(max_examples=100, deadline=None)


@EXAMPLES
@given(scheme=st.sampled_from(["rtsp", "rtsps", "http", "https", "rtmp"]), user=USER, password=PASSWORD, host=HOST,
       path=PATH, before=st.text(PLAIN, max_size=30), after=st.text(PLAIN, max_size=30))
def test_a_uri_password_is_masked_wherever_it_appears_in_a_line(scheme, user, password, host, path, before, after):
    line = f"{before} {scheme}://{user}:{password}@{host}{path} {after}"
    assert redact(line) == f"{before} {scheme}://{user}:***@{host}{path} {after}"


@EXAMPLES
@given(key=st.sampled_from(["password", "PASSWORD", "pwd", "token", "passwd", "api_key", "key"]),
       secret=st.text(string.ascii_letters + string.digits + "!$()*+,-.:/@", min_size=1, max_size=24), host=HOST)
def test_a_secret_query_parameter_is_masked(key, secret, host):
    uri = f"rtsp://{host}/stream?channel=1&{key}={secret}&subtype=0"
    assert redact(f"source={uri} status=lost") == f"source=rtsp://{host}/stream?channel=1&{key}=***&subtype=0 status=lost"


def test_log_lines_and_their_tracebacks_are_masked():
    uri = "rtsp://admin:hunter2@cam.local/live"
    record = logging.LogRecord("edge.camera", logging.WARNING, __file__, 1, "camera_lost source=%s", (uri,), None)
    try:
        raise ValueError(f"cannot open {uri}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    text = RedactingFormatter("%(levelname)s %(name)s %(message)s").format(record)
    assert "hunter2" not in text and text.count("rtsp://admin:***@cam.local/live") == 2


def test_the_cli_never_shows_a_camera_password_and_creates_private_files_under_umask_022(tmp_path, models_dir):
    uri = "rtsp://admin:hun@ter2:x@127.0.0.1:9/stream?password=s3cret"
    state = tmp_path / "state"
    previous = os.umask(0o022)
    try:
        run = cli("-v", "run", "--source", uri, "--door", "simulated", "--store", state / "people.edgestore",
                  "--audit", state / "log" / "audit.sqlite", "--events", state / "events.jsonl")
        doctor = cli("doctor", "--json", "--source", uri, "--store", state / "people.edgestore", "--audit",
                     state / "log" / "audit.sqlite")
    finally:
        os.umask(previous)
    assert run.returncode == 2 and doctor.returncode == 2
    for text in (run.stdout, run.stderr, doctor.stdout, doctor.stderr, (state / "events.jsonl").read_text()):
        assert "ter2" not in text and "s3cret" not in text, text
    assert "rtsp://admin:***@127.0.0.1:9/stream?password=***" in run.stderr
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in sorted(state.rglob("*"))}
    modes[state.name] = state.stat().st_mode & 0o777
    assert modes == {"state": 0o700, "state/log": 0o700, "state/log/audit.sqlite": 0o600,
                     "state/events.jsonl": 0o600}, modes
