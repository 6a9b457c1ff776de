"""Routes of the admin page. Server-rendered (Starlette + Jinja2), forms with CSRF tokens, no front-end build.

Every page needs a login; every change is a POST carrying the session's CSRF token and is written to the audit log
with the admin's name. The page calls the same functions as the CLI (enrolment with its quality gates and
duplicate check, rename, erasure with audit anonymisation); it never re-implements them. Biometric data (faces,
embeddings) never appears in a URL: images are fetched by row id, changes are POSTed.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import cv2
import jinja2
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edge.audit import AuditLog, parse_since
from edge.config import Config
from edge.errors import EdgeError, InputError
from edge.store import ABSENT_DISTANCE_L2
from edge.web.auth import LoginLimiter, Sessions, read_admins, tokens_match, verify_password

log = logging.getLogger("edge.web")
HERE = Path(__file__).resolve().parent
COOKIE = "edge_session"
LOGIN_COOKIE = "edge_login"
MIB = 1 << 20
LIVE_STALE_S = 10.0
LABEL_WIDTH_PX = 800  # labels on the live frame are drawn at 0.6 × (frame width / this)
MAX_UPLOAD_FILES = 20
EVENTS = ("unlock", "unknown")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class State:
    """What the routes share: config, store, audit log, inbox, the lazily loaded pipeline, one lock for changes."""

    def __init__(self, config: Config, *, secure_cookies: bool) -> None:
        from edge.__main__ import open_store, surface_folders
        from edge.unknown import UnknownInbox

        self.config = config
        self.secure_cookies = secure_cookies
        self.store = open_store(config, SimpleNamespace(store=None))
        self.audit_path = Path(config.audit.path)
        self.audit = AuditLog(self.audit_path, retention_days=config.audit.retention_days)
        unknown_dir, self.live_dir = surface_folders(config, self.audit_path)
        self.inbox = UnknownInbox(unknown_dir, retention_days=config.unknown.retention_days)
        self.sessions = Sessions(config.web.session_hours * 3600)
        self.limiter = LoginLimiter(config.web.login_attempts, config.web.login_window_s)
        self.change_lock = threading.Lock()
        self._pipeline = None

    def pipeline(self):
        if self._pipeline is None:
            from edge.pipeline import Pipeline

            self._pipeline = Pipeline(self.config)
        return self._pipeline


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    env.filters["when"] = lambda t: datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"
    env.filters["size"] = human_size
    return env


TEMPLATES = templates()


def page(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    session = request.state.session
    flash = []
    if session is not None:
        flash, session.flash = session.flash, []
    html = TEMPLATES.get_template(template).render(request=request, session=session, flash=flash, **context)
    return HTMLResponse(html, status_code=status_code)


def redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


def flash(request: Request, kind: str, text: str) -> None:
    request.state.session.flash.append((kind, text))


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def admin_action(request: Request, action: str, detail: str) -> None:
    state: State = request.app.state.edge
    admin = request.state.session.admin
    state.audit.record_admin(admin, action, detail)
    log.info("event=admin_action admin=%s action=%s %s", admin, action, detail)


# ---- login ----------------------------------------------------------------------------------------------------

async def login_form(request: Request) -> Response:
    token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)
    response = page(request, "login.html", csrf=token, error=None)
    set_cookie(request, response, LOGIN_COOKIE, token, max_age=3600)
    return response


async def login(request: Request) -> Response:
    state: State = request.app.state.edge
    form = await request.form()
    client = client_of(request)
    token = request.cookies.get(LOGIN_COOKIE, "")
    if not token or not tokens_match(token, form.get("csrf")):
        return Response("missing or wrong CSRF token", status_code=403)
    retry_s = state.limiter.retry_after_s(client)
    if retry_s:
        return page(request, "login.html", 429, csrf=token,
                    error=f"too many failed logins: try again in {retry_s:.0f} s")
    name, password = str(form.get("name", "")), str(form.get("password", ""))
    admins = await run_in_threadpool(read_admins, state.config.web.admins_file)
    if not await run_in_threadpool(verify_password, admins, name, password):
        state.limiter.failed(client)
        log.warning("event=login_failed client=%s", client)
        return page(request, "login.html", 401, csrf=token, error="wrong name or password")
    state.limiter.succeeded(client)
    session_token, session = state.sessions.start(name)
    request.state.session = session
    admin_action(request, "login", f"from {client}")
    response = redirect("/people")
    set_cookie(request, response, COOKIE, session_token, max_age=int(state.config.web.session_hours * 3600))
    response.delete_cookie(LOGIN_COOKIE)
    return response


async def logout(request: Request) -> Response:
    state: State = request.app.state.edge
    admin_action(request, "logout", "")
    state.sessions.end(request.cookies.get(COOKIE))
    response = redirect("/login")
    response.delete_cookie(COOKIE)
    return response


def set_cookie(request: Request, response: Response, name: str, value: str, *, max_age: int) -> None:
    state: State = request.app.state.edge
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict", secure=state.secure_cookies)


# ---- people -----------------------------------------------------------------------------------------------------

async def people(request: Request) -> Response:
    from edge.gallery import thumbnail_path

    state: State = request.app.state.edge
    state.store.reload_if_changed()
    rows = [(p, thumbnail_path(state.store.path, p.id).exists(), state.store.rows(p.id)) for p in state.store.persons]
    return page(request, "people.html", people=rows)


async def thumbnail(request: Request) -> Response:
    from edge.gallery import thumbnail_path

    state: State = request.app.state.edge
    person_id = request.path_params["person_id"]
    path = thumbnail_path(state.store.path, person_id)
    if not re.fullmatch(r"[0-9a-f]+", person_id) or not path.is_file():
        return Response(status_code=404)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


async def change_then_report(request: Request, work, *, back: str, refused: str, done) -> Response:
    """Run one store change off the event loop. Refused (an EdgeError): flash `refused: why`. Done:
    `done(result)` gives (admin action, its detail, the flash message); the action is audited. Back to `back`."""
    try:
        result = await run_in_threadpool(work)
    except EdgeError as err:
        flash(request, "error", f"{refused}: {err}")
        return redirect(back)
    action, detail, message = done(result)
    admin_action(request, action, detail)
    flash(request, "ok", message)
    return redirect(back)


async def rename(request: Request) -> Response:
    state: State = request.app.state.edge
    form = await request.form()
    person_id, new_name = str(form.get("person_id", "")), str(form.get("new_name", ""))

    def change():
        with state.change_lock, state.store.edit():
            return state.store.rename(person_id, new_name)

    return await change_then_report(
        request, change, back="/people", refused="not renamed",
        done=lambda person: ("rename", f"person {person.id}", f"renamed to {person.name}"))


async def remove(request: Request) -> Response:
    from edge.__main__ import forget_in_audit
    from edge.gallery import forget_thumbnail

    state: State = request.app.state.edge
    form = await request.form()
    person_id = str(form.get("person_id", ""))

    def erase():
        with state.change_lock:
            with state.store.edit():
                removed = state.store.remove(person_id)
            forget_thumbnail(state.store.path, removed.id)
            return removed, forget_in_audit(state.config, SimpleNamespace(audit=state.audit_path), removed)

    def done(result):
        removed, forgotten = result
        return ("remove", f"person {removed.id}, {forgotten} log entries anonymised",
                f"removed {removed.name}: templates erased, {forgotten} log entries anonymised")

    return await change_then_report(request, erase, back="/people", refused="not removed", done=done)


# ---- enrolment ------------------------------------------------------------------------------------------------

async def enrol_form(request: Request) -> Response:
    state: State = request.app.state.edge
    return page(request, "enrol.html", max_mb=state.config.web.max_upload_mb, name="", errors=[])


async def drain(request: Request, limit_bytes: int) -> None:
    """Read and drop an oversized body (up to 16× the limit) so the browser gets our answer, not a reset."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > 16 * limit_bytes:
            break


def enrol_faces_from(state: State, name: str, photos: list[Path], note: str, force: bool, *, largest: bool,
                     source: str):
    """The CLI's enrolment (gates, duplicate check, atomic edit) plus the first face as the thumbnail."""
    from edge.__main__ import enrol_faces, enrolment_face
    from edge.gallery import save_thumbnail
    from edge.names import clean_name

    clean_name(name)  # a refused name costs no model time
    pipeline = state.pipeline()
    faces = [enrolment_face(pipeline, path, state.config, largest=largest) for path in photos]
    with state.change_lock:
        result = enrol_faces(state.store, name, faces, [p.name for p in photos], [f"{source} {p.name}" for p in photos],
                             state.config,
                             SimpleNamespace(force=force, note=note))
    save_thumbnail(state.store.path, result["id"], faces[0].chip)
    return result


async def enrol(request: Request) -> Response:
    state: State = request.app.state.edge
    limit_bytes = int(state.config.web.max_upload_mb * MIB)

    def refuse(name: str, message: str, status_code: int = 400) -> Response:
        return page(request, "enrol.html", status_code, max_mb=state.config.web.max_upload_mb, name=name,
                    errors=[message])

    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        return refuse("", "the upload must state its size (Content-Length)", 411)
    if int(length) > limit_bytes:
        await drain(request, limit_bytes)
        return refuse("", f"upload too large: {int(length) / MIB:.1f} MB, the limit is "
                          f"{state.config.web.max_upload_mb:g} MB (web.max_upload_mb)", 413)
    form = await request.form(max_files=MAX_UPLOAD_FILES)
    csrf_error = check_csrf(request, form)
    if csrf_error:
        return csrf_error
    name = str(form.get("name", ""))
    uploads = [f for f in form.getlist("photos") if hasattr(f, "filename") and f.filename]
    if not uploads:
        return refuse(name, "choose at least one photo")
    with tempfile.TemporaryDirectory(prefix="edge-upload-") as folder:
        photos = []
        for i, upload in enumerate(uploads, 1):
            safe = SAFE_NAME.sub("_", Path(upload.filename).name)[-64:].lstrip(".") or "photo"
            path = Path(folder) / str(i) / safe  # one folder per upload: two files may share a name
            path.parent.mkdir()
            path.write_bytes(await upload.read())
            photos.append(path)
        try:
            result = await run_in_threadpool(
                enrol_faces_from, state, name, photos, f"web upload by {request.state.session.admin}",
                form.get("force") == "on", largest=False, source="web upload")
        except EdgeError as err:
            return refuse(name, re.sub(rf"{re.escape(folder)}/\d+/", "", str(err)))
    admin_action(request, "enrol", f"person {result['id']}, {len(photos)} photo(s) uploaded")
    flash(request, "ok", f"enrolled {result['name']}: {len(photos)} photo(s), {result['templates']} template(s)")
    return redirect("/people")


async def capture(request: Request) -> Response:
    state: State = request.app.state.edge
    form = await request.form()
    name = str(form.get("name", ""))
    frame = state.live_dir / "frame.jpg"
    try:
        age_s = time.time() - frame.stat().st_mtime
    except FileNotFoundError:
        age_s = float("inf")
    if age_s > LIVE_STALE_S:
        return page(request, "enrol.html", 400, max_mb=state.config.web.max_upload_mb, name=name,
                    errors=["no recent frame from the door camera: is the door controller running "
                            "(with web.live_interval_s > 0)?"])
    with tempfile.TemporaryDirectory(prefix="edge-capture-") as folder:
        still = Path(folder) / "door-camera.jpg"
        shutil.copyfile(frame, still)
        try:
            result = await run_in_threadpool(
                enrol_faces_from, state, name, [still], f"door camera, by {request.state.session.admin}",
                form.get("force") == "on", largest=True, source="door camera")
        except EdgeError as err:
            return page(request, "enrol.html", 400, max_mb=state.config.web.max_upload_mb, name=name,
                        errors=[str(err).replace(f"{folder}/", "")])
    admin_action(request, "enrol", f"person {result['id']}, from the door camera")
    flash(request, "ok", f"enrolled {result['name']} from the door camera")
    return redirect("/people")


# ---- log ----------------------------------------------------------------------------------------------------------

async def log_page(request: Request) -> Response:
    state: State = request.app.state.edge
    query = request.query_params
    person, event, since = query.get("person", ""), query.get("event", ""), query.get("since", "")
    page_size = state.config.web.page_size
    try:
        number = max(int(query.get("page", "1")), 1)
        since_unix = parse_since(since) if since else 0.0
    except (ValueError, InputError) as err:
        flash(request, "error", str(err) if isinstance(err, InputError) else "page must be a number")
        number, since_unix = 1, 0.0
    rows, total = state.audit.page(person=person or None, event=event or None, since_unix=since_unix,
                                   limit=page_size, offset=(number - 1) * page_size)
    pages = max((total + page_size - 1) // page_size, 1)
    return page(request, "log.html", rows=rows, total=total, number=number, pages=pages, person=person,
                event=event, since=since, events=EVENTS, actions=state.audit.admin_actions(10),
                absent_l2=ABSENT_DISTANCE_L2)


async def snapshot(request: Request) -> Response:
    state: State = request.app.state.edge
    path = state.audit.snapshot_of(int(request.path_params["row_id"]))
    folder = (state.audit_path.parent / "snapshots").resolve()
    if path is None or not path.is_file() or path.resolve().parent != folder:
        return Response(status_code=404)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


# ---- live and status ------------------------------------------------------------------------------------------

async def live(request: Request) -> Response:
    from edge.live import read_status

    state: State = request.app.state.edge
    return page(request, "live.html", status=read_status(state.live_dir))


def annotated_frame(state: State) -> bytes | None:
    """The loop's latest frame with boxes and names drawn from its status document."""
    from edge.images import decode_quietly
    from edge.live import FRAME_FILE, read_status

    try:
        image = decode_quietly((state.live_dir / FRAME_FILE).read_bytes())
    except OSError:
        return None
    if image is None:
        return None
    scale = max(image.shape[1] / LABEL_WIDTH_PX, 0.4)
    thickness = max(int(round(2 * scale)), 1)
    for face in (read_status(state.live_dir) or {}).get("faces", []):
        left, top, right, bottom = (int(v) for v in face["box"])
        colour = (0, 170, 0) if face["name"] else (0, 0, 220)
        cv2.rectangle(image, (left, top), (right, bottom), colour, thickness)
        label = f"{face['name']} {face['distance_l2']:.2f}" if face["name"] else "unknown"
        cv2.putText(image, label, (left, max(top - 3 * thickness, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, colour,
                    thickness, cv2.LINE_AA)
    return cv2.imencode(".jpg", image)[1].tobytes()


async def live_frame(request: Request) -> Response:
    jpeg = await run_in_threadpool(annotated_frame, request.app.state.edge)
    if jpeg is None:
        return Response(status_code=404)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def status_facts(state: State) -> dict:
    from edge.embed import store_fingerprint
    from edge.live import read_status

    store = state.store
    store.reload_if_changed()
    try:
        digest = hashlib.sha256(store.path.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        digest = "no store file yet"
    usage = shutil.disk_usage(store.path.parent if store.path.parent.exists() else Path.cwd())
    live_status = read_status(state.live_dir)
    return {
        "loop": live_status, "loop_age_s": time.time() - live_status["t_unix"] if live_status else None,
        "stale_s": LIVE_STALE_S,
        "people": len(store), "templates": store.embedding_count, "model": store_fingerprint(state.config),
        "store_fingerprint": store.fingerprint, "store_sha256": digest, "store_path": store.path,
        "disk_free": usage.free, "disk_total": usage.total,
        "sizes": {"store": store.path.stat().st_size if store.path.exists() else 0,
                  "audit log": state.audit_path.stat().st_size if state.audit_path.exists() else 0,
                  "snapshots": folder_bytes(state.audit_path.parent / "snapshots"),
                  "unknown inbox": folder_bytes(state.inbox.folder)},
        "events": state.audit.page(limit=10)[0],
    }


async def status(request: Request) -> Response:
    facts = await run_in_threadpool(status_facts, request.app.state.edge)
    return page(request, "status.html", **facts)


# ---- unknown-face inbox ---------------------------------------------------------------------------------------

async def unknown(request: Request) -> Response:
    state: State = request.app.state.edge
    await run_in_threadpool(state.inbox.prune)
    groups = await run_in_threadpool(state.inbox.groups, state.config.unknown.group_l2)
    return page(request, "unknown.html", groups=groups, keep=state.config.unknown.keep,
                retention_days=state.config.unknown.retention_days)


async def unknown_chip(request: Request) -> Response:
    state: State = request.app.state.edge
    path = state.inbox.chip_path(int(request.path_params["face_id"]))
    if path is None or not path.is_file():
        return Response(status_code=404)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


def face_ids(form) -> list[int]:
    return [int(v) for v in form.getlist("face") if str(v).isdigit()]


async def unknown_enrol(request: Request) -> Response:
    from edge.__main__ import enrol_faces
    from edge.gallery import save_thumbnail
    from edge.images import decode_quietly

    state: State = request.app.state.edge
    form = await request.form()
    name, ids = str(form.get("name", "")), face_ids(form)
    faces = state.inbox.faces(ids)
    if not faces:
        flash(request, "error", "that group is no longer in the inbox")
        return redirect("/unknown")

    def add():
        with state.change_lock:
            labels = [f"unknown face {f.id}" for f in faces]
            result = enrol_faces(state.store, name, faces, labels, [f"inbox: {label}" for label in labels], state.config,
                                 SimpleNamespace(force=form.get("force") == "on",
                                                 note=f"unknown inbox, by {request.state.session.admin}"))
        best = max(faces, key=lambda f: f.quality)
        chip = decode_quietly(best.chip.read_bytes())
        if chip is not None:
            save_thumbnail(state.store.path, result["id"], chip)
        state.inbox.discard([f.id for f in faces])
        return result

    return await change_then_report(
        request, add, back="/unknown", refused="not enrolled",
        done=lambda result: ("enrol", f"person {result['id']}, {len(faces)} face(s) from the unknown inbox",
                             f"enrolled {result['name']}: {len(faces)} face(s) from the inbox"))


async def unknown_discard(request: Request) -> Response:
    state: State = request.app.state.edge
    form = await request.form()
    removed = await run_in_threadpool(state.inbox.discard, face_ids(form))
    admin_action(request, "discard", f"{removed} unknown face(s)")
    flash(request, "ok", f"discarded {removed} face(s)")
    return redirect("/unknown")


# ---- the gate: login and CSRF ---------------------------------------------------------------------------------

def check_csrf(request: Request, form) -> Response | None:
    if not tokens_match(request.state.session.csrf, form.get("csrf")):
        log.warning("event=csrf_refused path=%s client=%s", request.url.path, client_of(request))
        return Response("missing or wrong CSRF token: reload the page and try again", status_code=403)
    return None


def guarded(endpoint, *, check_form: bool = True):
    """Login required (else to /login); a POST must carry the session's CSRF token (else 403)."""
    async def handler(request: Request) -> Response:
        state: State = request.app.state.edge
        session = state.sessions.get(request.cookies.get(COOKIE))
        request.state.session = session
        if session is None:
            return redirect("/login")
        if request.method == "POST" and check_form:
            error = check_csrf(request, await request.form())
            if error:
                return error
        return await endpoint(request)

    return handler


def public(endpoint):
    """A page that needs no login (the login form itself)."""
    async def handler(request: Request) -> Response:
        request.state.session = None
        return await endpoint(request)

    return handler


async def home(request: Request) -> Response:
    return redirect("/people")


class SecurityHeaders:
    """Every response: scripts, styles and images from this server only; no framing, sniffing or referrers."""

    HEADERS = [(b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
               (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
               (b"x-frame-options", b"DENY")]

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + self.HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def create_app(config: Config, *, secure_cookies: bool = False) -> Starlette:
    routes = [
        Route("/login", public(login_form)), Route("/login", public(login), methods=["POST"]),
        Route("/logout", guarded(logout), methods=["POST"]),
        Route("/", guarded(home)),
        Route("/people", guarded(people)),
        Route("/people/{person_id}/thumbnail.jpg", guarded(thumbnail)),
        Route("/people/rename", guarded(rename), methods=["POST"]),
        Route("/people/remove", guarded(remove), methods=["POST"]),
        Route("/enrol", guarded(enrol_form)),
        Route("/enrol", guarded(enrol, check_form=False), methods=["POST"]),  # checks size first, then CSRF
        Route("/enrol/capture", guarded(capture), methods=["POST"]),
        Route("/log", guarded(log_page)),
        Route("/log/{row_id:int}/snapshot.jpg", guarded(snapshot)),
        Route("/live", guarded(live)),
        Route("/live/frame.jpg", guarded(live_frame)),
        Route("/status", guarded(status)),
        Route("/unknown", guarded(unknown)),
        Route("/unknown/{face_id:int}/chip.jpg", guarded(unknown_chip)),
        Route("/unknown/enrol", guarded(unknown_enrol), methods=["POST"]),
        Route("/unknown/discard", guarded(unknown_discard), methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
    app.state.edge = State(config, secure_cookies=secure_cookies)
    return app


def serve(config: Config) -> int:
    """`python -m edge web`: refuses to start without an admin account; HTTPS when web.tls_cert/tls_key are set."""
    import uvicorn

    from edge.console import say
    from edge.errors import ConfigError

    web = config.web
    if not read_admins(web.admins_file):
        raise ConfigError(f"no admin account in {web.admins_file}: create one with "
                          "`python -m edge admin set-password NAME` (there is no default password)")
    tls = web.tls_cert is not None
    app = create_app(config, secure_cookies=tls)
    server = uvicorn.Server(uvicorn.Config(
        app, host=web.host, port=web.port, log_level="warning", access_log=False, server_header=False,
        ssl_certfile=str(web.tls_cert) if tls else None, ssl_keyfile=str(web.tls_key) if tls else None,
    ))
    scheme = "https" if tls else "http"
    say(f"web: admin page on {scheme}://{web.host}:{web.port}/ (store {app.state.edge.store.path})")
    asyncio.run(server.serve())
    return 0 if server.started else 2
