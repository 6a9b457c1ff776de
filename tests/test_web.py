"""The admin web page, end to end: the real server (`python -m edge web`) on a random localhost port with a real
store, audit log and unknown-face inbox filled by a real door-loop run, driven by Debian's headless chromium
through Selenium (system chromedriver, nothing downloaded), plus the security properties over plain HTTP.

Screenshots go to out/web/. The tests run in file order: they share one server and one browser.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, cli, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = ROOT / "out" / "web"
PASSWORD = "correct horse battery staple"
SERVER_START_S = 60.0
EXTRA_LOG_ROWS = 12
PAGE_SIZE = 5
SAMPLE_VIDEO = ROOT / "samples" / "video" / "walk_toward_camera.mp4"
ROSE = [ROOT / "samples" / "people" / "rose_leslie" / name for name in ("img1.jpg", "img2.jpg")]
KIT = ROOT / "samples" / "people" / "kit_harington" / "john1.jpeg"
BIDEN = ROOT / "samples" / "people" / "biden" / "biden.jpg"
OBAMA = [ROOT / "samples" / "people" / "obama" / "obama.jpg", ROOT / "samples" / "people" / "obama" / "obama2.jpg"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory, models_dir):
    """Config, admin account, a door-loop run on the sample video (audit rows + snapshots, unknown inbox, live frame),
    then the web server in a child process."""
    from edge.audit import AuditLog
    from edge.decide import Decision

    folder = tmp_path_factory.mktemp("web")
    port = free_port()
    config = folder / "config.yaml"
    config.write_text(
        f"store:\n  path: {folder / 'store.edgestore'}\n"
        f"audit:\n  path: {folder / 'audit.sqlite'}\n  snapshots: true\n"
        "decide:\n  unknown_interval_s: 0\n"
        f"unknown:\n  keep: true\n  path: {folder / 'unknown'}\n"
        f"web:\n  port: {port}\n  admins_file: {folder / 'admins.json'}\n  page_size: {PAGE_SIZE}\n"
        f"  live_dir: {folder / 'live'}\n  live_interval_s: 0.2\n  max_upload_mb: 20\n  login_attempts: 5\n"
    )
    made = subprocess.run([sys.executable, "-m", "edge", "admin", "set-password", "ann", "--config", str(config)],
                          cwd=ROOT, input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    run = cli("run", "--config", config, "--source", f"file://{SAMPLE_VIDEO}", "--door", "simulated")
    assert run.returncode == 0, run.stderr
    keep_as_the_door_would(folder / "unknown", ROSE, models_dir)
    log = AuditLog(folder / "audit.sqlite")
    for i in range(EXTRA_LOG_ROWS):  # older rows, so the log has several pages
        log.record(Decision("unknown", None, 100 + i, i, 0.0, 0.9, 0.1, 3, i, (0, 0, 1, 1)), door_action="none",
                   t_unix=time.time() - 86400 - i * 60)
    log.close()
    server = subprocess.Popen([sys.executable, "-m", "edge", "web", "--config", str(config)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert wait_until(lambda: server.poll() is not None or http_get(port, "/login").status == 200,
                          SERVER_START_S), "web server did not answer"
        assert server.poll() is None, server.communicate()[1]
        yield SimpleNamespace(folder=folder, config=config, port=port, url=f"http://127.0.0.1:{port}", server=server)
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=10)
        assert "Traceback" not in stderr, stderr


def keep_as_the_door_would(folder: Path, photos: list[Path], models_dir: Path) -> None:
    """Two photos of one person into the inbox (the sample video has each stranger in one track only)."""
    from edge.config import Config
    from edge.evaluate.embedding import largest_face
    from edge.pipeline import Pipeline
    from edge.unknown import UnknownInbox

    pipeline = Pipeline(Config(models_dir=models_dir))
    inbox = UnknownInbox(folder)
    try:
        for photo in photos:
            inbox.add(largest_face(pipeline, photo), track=None)
    finally:
        inbox.close()
        pipeline.close()


def http_get(port: int, path: str, headers: dict | None = None):
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        response.body = response.read()
        return response
    except OSError:
        return SimpleNamespace(status=0)


def http_post(port: int, path: str, fields: dict, cookie: str = ""):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", path, urllib.parse.urlencode(fields),
                       {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie})
    response = connection.getresponse()
    response.body = response.read()
    return response


def cookie_of(response, name: str) -> str:
    match = re.search(rf"{name}=([^;]+)", response.getheader("set-cookie") or "")
    assert match, f"no {name} cookie in {response.getheader('set-cookie')!r}"
    return f"{name}={match.group(1)}"


def http_login(port: int, password: str = PASSWORD):
    """(response, session cookie or None) of one login through the form's own CSRF cookie."""
    form = http_get(port, "/login")
    login_cookie = cookie_of(form, "edge_login")
    csrf = re.search(rb'name="csrf" value="([^"]+)"', form.body).group(1).decode()
    response = http_post(port, "/login", {"csrf": csrf, "name": "ann", "password": password}, login_cookie)
    session = cookie_of(response, "edge_session") if response.status == 303 else None
    return response, session


def people_in_store(site) -> list[str]:
    from edge.__main__ import open_store
    from edge.config import load_config

    return [p.name for p in open_store(load_config(site.config), SimpleNamespace(store=None)).persons]


@pytest.fixture(scope="module")
def browser(site):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver not installed (Debian: apt-get install chromium chromium-driver; "
                    "`make test` installs them when run as root on Debian/Ubuntu)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def by(what: str):
    from selenium.webdriver.common.by import By

    return getattr(By, what)


def shoot(driver, name: str) -> None:
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, max(900, min(height + 40, 3000)))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(1280, 900)


def navigate(driver, click) -> None:
    """Click something that loads a new page (accepting a confirm dialog if one opens) and wait for that page: the
    old page's window carries a mark the new one lacks (Chrome's staleness checks can race a navigation)."""
    from selenium.common.exceptions import NoAlertPresentException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.__edgeOldPage = true")
    click.click()
    try:
        driver.switch_to.alert.accept()
    except NoAlertPresentException:
        pass
    WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(lambda d: d.execute_script(
        "return window.__edgeOldPage === undefined && document.readyState === 'complete'"))


def main_text(driver) -> str:
    return driver.find_element(by("TAG_NAME"), "main").text


def submit_enrolment(driver, site, name: str, files: list[Path]) -> None:
    driver.get(site.url + "/enrol")
    form = driver.find_element(by("CSS_SELECTOR"), "form[action='/enrol']")
    driver.execute_script("arguments[0].querySelectorAll('[required]').forEach(e => e.removeAttribute('required'));"
                          "document.getElementById('enrol-name').value = arguments[1];", form, name)
    if files:
        driver.find_element(by("ID"), "photos").send_keys("\n".join(str(f) for f in files))
    navigate(driver, driver.find_element(by("ID"), "enrol"))


# ---- security over plain HTTP ---------------------------------------------------------------------------------

def test_pages_and_images_need_a_login(site):
    for path in ("/people", "/enrol", "/log", "/live", "/live/frame.jpg", "/status", "/unknown", "/unknown/1/chip.jpg",
                 "/log/1/snapshot.jpg"):
        response = http_get(site.port, path)
        assert (response.status, response.getheader("location")) == (303, "/login"), path
    assert http_post(site.port, "/people/remove", {"person_id": "x"}).status == 303


def test_cookies_are_httponly_strict_and_login_needs_its_csrf_token(site):
    form = http_get(site.port, "/login")
    assert re.search(r"HttpOnly.*SameSite=strict", form.getheader("set-cookie"), re.I)
    assert "default-src 'self'" in form.getheader("content-security-policy")
    refused = http_post(site.port, "/login", {"name": "ann", "password": PASSWORD}, cookie_of(form, "edge_login"))
    assert refused.status == 403
    response, session = http_login(site.port)
    assert response.status == 303 and session
    assert re.search(r"HttpOnly.*SameSite=strict", response.getheader("set-cookie"), re.I)


def test_a_change_without_the_csrf_token_is_refused(site):
    _, session = http_login(site.port)
    for path in ("/people/remove", "/people/rename", "/unknown/discard", "/logout"):
        response = http_post(site.port, path, {"person_id": "x", "new_name": "y", "face": "1"}, session)
        assert response.status == 403, path
        assert b"CSRF" in response.body
    wrong = http_post(site.port, "/unknown/discard", {"face": "1", "csrf": "not-the-token"}, session)
    assert wrong.status == 403
    assert http_get(site.port, "/unknown/1/chip.jpg", {"Cookie": session}).status == 200  # still there


# ---- the browser ----------------------------------------------------------------------------------------------

def test_log_in(browser, site):
    browser.get(site.url + "/people")
    assert browser.current_url.endswith("/login")
    browser.find_element(by("ID"), "name").send_keys("ann")
    browser.find_element(by("ID"), "password").send_keys("wrong password here")
    navigate(browser, browser.find_element(by("ID"), "login"))
    assert "wrong name or password" in main_text(browser)
    browser.find_element(by("ID"), "name").send_keys("ann")
    browser.find_element(by("ID"), "password").send_keys(PASSWORD)
    shoot(browser, "01-login")
    navigate(browser, browser.find_element(by("ID"), "login"))
    assert browser.current_url.endswith("/people")
    assert "Nobody is enrolled yet" in main_text(browser)


def test_enrol_by_upload_and_see_the_person(browser, site):
    submit_enrolment(browser, site, "Barack Obama", OBAMA)
    assert browser.current_url.endswith("/people"), main_text(browser)
    assert "enrolled Barack Obama: 2 photo(s), 2 template(s)" in main_text(browser)
    row = browser.find_element(by("CSS_SELECTOR"), "tr[data-person='Barack Obama']")
    thumb = row.find_element(by("CSS_SELECTOR"), "img.thumb")
    assert browser.execute_script("return arguments[0].naturalWidth", thumb) == 150
    assert "web upload by ann" in row.text
    rows = [item.text for item in row.find_elements(by("CSS_SELECTOR"), "ol.rows li")]
    assert [r.split(" ")[:3] for r in rows] == [["web", "upload", "obama.jpg"], ["web", "upload", "obama2.jpg"]], rows
    shoot(browser, "02-people-after-upload")
    assert people_in_store(site) == ["Barack Obama"]


def huge_png_header() -> bytes:
    """A valid PNG structure whose header claims 65000×65000 pixels (12.7 GB decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 65000, 65000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_bad_input_gives_a_message_and_stores_nothing(browser, site, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a photo\n")
    huge = tmp_path / "huge.png"
    huge.write_bytes(huge_png_header())
    big = tmp_path / "big.jpg"
    big.write_bytes(OBAMA[0].read_bytes() + os.urandom(50 * 1024 * 1024))
    cases = [
        ("a file that is not an image", "Eve", [text], "notes.jpg: not a readable image"),
        ("a 65000×65000 header", "Eve", [huge], "huge.png: its header declares over 179 megapixels, above the limit of 50 megapixels"),
        ("a 50 MB file", "Eve", [big], "the limit is 20 MB (web.max_upload_mb)"),
        ("an empty name", "", [BIDEN], "person name must be 1 to 64 characters"),
        ("a name with control characters", "Eve\x07\x1b[2J", [BIDEN], "contains U+0007 (Cc: control"),
    ]
    for what, name, files, message in cases:
        submit_enrolment(browser, site, name, files)
        shown = browser.find_element(by("CSS_SELECTOR"), "p.msg.error").text
        assert message in shown, (what, shown)
        assert people_in_store(site) == ["Barack Obama"], what
        assert http_get(site.port, "/login").status == 200, f"server down after {what}"
        if what == "a 50 MB file":
            shoot(browser, "03-enrol-refused-50mb")
    assert site.server.poll() is None


def test_rename(browser, site):
    browser.get(site.url + "/people")
    row = browser.find_element(by("CSS_SELECTOR"), "tr[data-person='Barack Obama']")
    row.find_element(by("NAME"), "new_name").send_keys("Barack")
    navigate(browser, row.find_element(by("XPATH"), ".//button[text()='Rename']"))
    assert "renamed to Barack" in main_text(browser)
    assert people_in_store(site) == ["Barack"]


def test_enrol_a_group_from_the_unknown_inbox(browser, site):
    browser.get(site.url + "/unknown")
    groups = browser.find_elements(by("CSS_SELECTOR"), "section.group")
    assert len(groups) >= 2, "the door run kept no unknown face"
    chips = groups[0].find_elements(by("CSS_SELECTOR"), "img.chip")
    assert len(chips) == 2, "Rose's two faces are one group, the largest"
    assert all(browser.execute_script("return arguments[0].naturalWidth", c) == 150 for c in chips)
    chip_files = sorted((site.folder / "unknown" / "chips").glob("*.jpg"))
    shoot(browser, "06-unknown-inbox")
    groups[0].find_element(by("NAME"), "name").send_keys("Rose Leslie")
    navigate(browser, groups[0].find_element(by("XPATH"), ".//button[text()='Enrol this group']"))
    assert "enrolled Rose Leslie: 2 face(s) from the inbox" in main_text(browser)
    assert people_in_store(site) == ["Barack", "Rose Leslie"]
    left = sorted((site.folder / "unknown" / "chips").glob("*.jpg"))
    assert len(left) == len(chip_files) - len(chips)
    remaining = browser.find_elements(by("CSS_SELECTOR"), "section.group")  # "not a person / discard": chips deleted
    discarded = len(remaining[0].find_elements(by("CSS_SELECTOR"), "img.chip"))
    navigate(browser, remaining[0].find_element(by("XPATH"), ".//button[contains(text(), 'discard')]"))
    assert f"discarded {discarded} face(s)" in main_text(browser)
    assert len(list((site.folder / "unknown" / "chips").glob("*.jpg"))) == len(left) - discarded
    browser.get(site.url + "/people")
    row = browser.find_element(by("CSS_SELECTOR"), "tr[data-person='Rose Leslie']")
    assert "unknown inbox, by ann" in row.text
    assert browser.execute_script("return arguments[0].naturalWidth",
                                  row.find_element(by("CSS_SELECTOR"), "img.thumb")) == 150


def test_remove_anonymises_the_log(browser, site):
    from edge.__main__ import open_store
    from edge.audit import AuditLog
    from edge.config import load_config
    from edge.decide import Decision

    store = open_store(load_config(site.config), SimpleNamespace(store=None))
    person = store.find("Barack")
    log = AuditLog(site.folder / "audit.sqlite", snapshot_dir=site.folder / "snapshots")
    chip = np.full((150, 150, 3), 90, np.uint8)
    for i in range(2):  # the door let him in twice
        log.record(Decision("unlock", "Barack", 900 + i, i, 0.0, 0.2, 0.3, 3, i, (0, 0, 1, 1)), door_action="pulse",
                   snapshot=chip, person_id=person.id)
    snapshots = [Path(r["snapshot"]) for r in log.rows() if r["person"] == "Barack"]
    log.close()
    assert len(snapshots) == 2 and all(p.exists() for p in snapshots)
    browser.get(site.url + "/log?person=Barack")
    assert "2 decision(s)" in main_text(browser)
    assert len(browser.find_elements(by("CSS_SELECTOR"), "img.snap")) == 2

    browser.get(site.url + "/people")
    row = browser.find_element(by("CSS_SELECTOR"), "tr[data-person='Barack']")
    navigate(browser, row.find_element(by("XPATH"), ".//button[text()='Remove']"))
    assert "removed Barack: templates erased, 2 log entries anonymised" in main_text(browser)
    assert people_in_store(site) == ["Rose Leslie"]
    assert not any(p.exists() for p in snapshots)
    from edge.gallery import thumbnail_path

    assert not thumbnail_path(store.path, person.id).exists()
    browser.get(site.url + "/log?event=unlock")
    text = main_text(browser)
    assert "Barack" not in text.split("Admin actions")[0]
    assert "2 decision(s)" in text
    assert not browser.find_elements(by("CSS_SELECTOR"), "img.snap")
    assert "remove" in text.split("Admin actions")[1] and "ann" in text.split("Admin actions")[1]
    shoot(browser, "04-log-anonymised")


def test_page_through_the_log(browser, site):
    browser.get(site.url + "/log")
    total = int(re.search(r"(\d+) decision\(s\)", main_text(browser)).group(1))
    pages = -(-total // PAGE_SIZE)
    assert pages >= 3
    assert browser.find_element(by("ID"), "page-of").text == f"page 1 of {pages}"
    assert len(browser.find_elements(by("CSS_SELECTOR"), "table.log tbody tr")) == PAGE_SIZE
    with_snapshot = browser.find_elements(by("CSS_SELECTOR"), "img.snap")
    assert with_snapshot and all(browser.execute_script("return arguments[0].naturalWidth", i) == 150
                                 for i in with_snapshot)  # the door run's unknown snapshots
    shoot(browser, "05-log-page-1")
    seen = set()
    for number in range(2, pages + 1):
        navigate(browser, browser.find_element(by("ID"), "older"))
        assert browser.find_element(by("ID"), "page-of").text == f"page {number} of {pages}"
        rows = browser.find_elements(by("CSS_SELECTOR"), "table.log tbody tr")
        seen.update(r.text for r in rows)
    assert not browser.find_elements(by("ID"), "older")
    assert len(rows) == total - (pages - 1) * PAGE_SIZE


def test_live_and_status(browser, site):
    browser.get(site.url + "/live")
    image = browser.find_element(by("ID"), "live")
    assert wait_until(lambda: browser.execute_script("return arguments[0].naturalWidth", image) == 960, 5)
    assert "Door locked" in main_text(browser)
    shoot(browser, "07-live")
    browser.get(site.url + "/status")
    text = main_text(browser)
    assert "1 (" in text and "templates" in text and "free of" in text
    status = site.folder / "live" / "status.json"
    document = json.loads(status.read_text())
    status.write_text(json.dumps({**document, "t_unix": time.time() - 60}))  # the loop went quiet a minute ago
    browser.refresh()
    assert re.match(r"no frame for 6\d s: stopped or stalled", browser.find_element(by("ID"), "loop").text)
    shoot(browser, "08-status")


def test_enrol_from_the_door_camera(browser, site):
    frame = site.folder / "live" / "frame.jpg"
    os.utime(frame, (time.time() - 60, time.time() - 60))  # the loop stopped a minute ago

    def capture(name: str) -> None:
        browser.get(site.url + "/enrol")
        form = browser.find_element(by("CSS_SELECTOR"), "form[action='/enrol/capture']")
        form.find_element(by("NAME"), "name").send_keys(name)
        navigate(browser, form.find_element(by("TAG_NAME"), "button"))

    capture("Kit")
    assert "no recent frame from the door camera" in browser.find_element(by("CSS_SELECTOR"), "p.msg.error").text
    shutil.copyfile(KIT, frame)  # the loop's latest frame: Kit at the door
    capture("Kit")
    assert "enrolled Kit from the door camera" in main_text(browser)
    assert people_in_store(site) == ["Rose Leslie", "Kit"]
    row = browser.find_element(by("CSS_SELECTOR"), "tr[data-person='Kit']")
    assert "door camera, by ann" in row.text


def test_wrong_passwords_are_rate_limited(site):
    statuses = [http_login(site.port, "not the password")[0].status for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    response, session = http_login(site.port)  # even the right password waits out the window
    assert response.status == 429 and session is None
    assert b"too many failed logins" in response.body
