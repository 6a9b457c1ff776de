"""Command line: `python -m edge COMMAND …`. --json prints one JSON document on stdout; humans read stderr.

Exit codes: 0 done, 1 a negative answer (no match), 2 bad input or setup (one line says why), 3 an internal error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from edge.config import Config, load_config
from edge.console import OneLineUsageParser, emit_json, positive_int, say
from edge.errors import EdgeError, InputError, StoreError, first_line
from edge.images import IMAGE_SUFFIXES, photos_by_person
from edge.names import clean_name, shown
from edge.redact import RedactingFormatter, redact

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = PROJECT_ROOT / "samples"


def rounded(values, digits: int = 6) -> list:
    return [round(float(v), digits) for v in values]


def load_pipeline(config: Config):
    from edge.pipeline import Pipeline

    return Pipeline(config)


def faces_in(pipeline, path: Path):
    """Embedded faces of one image file, raising InputError when there is none."""
    from edge.images import load_image

    faces = pipeline.analyze(load_image(path, max_megapixels=pipeline.config.images.max_megapixels), thorough=True)
    if not faces:
        raise InputError(f"{path}: no face found")
    return faces


def largest_face(pipeline, path: Path):
    """The largest face of an image; says so on stderr when there were several."""
    faces = faces_in(pipeline, path)
    if len(faces) > 1:
        say(f"{path}: {len(faces)} faces found, using the largest")
    return faces[0]


def cmd_embed(args, config: Config) -> int:
    pipeline = load_pipeline(config)
    results = []
    for path in args.images:
        faces = faces_in(pipeline, path)
        say(f"{path}: {len(faces)} face(s)")
        results.append(
            {
                "image": str(path),
                "faces": [
                    {
                        "box": rounded(f.face.box, 1),
                        "score": round(f.face.score, 4),
                        "landmarks": [rounded(p, 2) for p in f.face.landmarks],
                        "embedding": rounded(f.embedding),
                    }
                    for f in faces
                ],
            }
        )
    if args.json:
        emit_json({"model": pipeline.embedder.fingerprint, "backend": pipeline.embedder.name, "images": results})
    return 0


def verify_pair(pipeline, image_a: Path, image_b: Path, threshold_l2: float) -> dict:
    import numpy as np

    a, b = largest_face(pipeline, image_a), largest_face(pipeline, image_b)
    distance = float(np.linalg.norm(a.embedding - b.embedding))
    return {"distance_l2": round(distance, 6), "threshold_l2": threshold_l2, "match": distance < threshold_l2}


def cmd_verify(args, config: Config) -> int:
    result = verify_pair(load_pipeline(config), args.image_a, args.image_b, config.match.threshold_l2)
    verdict = "same person" if result["match"] else "different people"
    say(f"{verdict}: distance {result['distance_l2']:.3f} (threshold {result['threshold_l2']})")
    if args.json:
        emit_json(result)
    return 0 if result["match"] else 1


def cmd_demo(args, config: Config) -> int:
    """Real pipeline and door loop on the bundled sample media (see edge/demo.py)."""
    from types import SimpleNamespace

    from edge.demo import run_demo
    from edge.store import Store

    enrol_args = SimpleNamespace(largest=False, force=False, note="demo")

    def open_store_at(path: Path, fingerprint: str):
        return Store.open(path, fingerprint=fingerprint)

    def enrol(pipeline, store, name, photos):
        return enrol_person(pipeline, store, name, photos, config, enrol_args)

    return run_demo(config, samples=SAMPLES, out_dir=args.out, verify_pair=verify_pair, enrol_person=enrol,
                    open_store_at=open_store_at)


def cmd_bench(args, config: Config) -> int:
    if args.what == "store":
        import tempfile

        from edge.bench_store import bench_store

        with tempfile.TemporaryDirectory() as tmp:
            report = bench_store(args.size, rows_per_person=args.rows, tmp_dir=Path(tmp))
        say("  ".join(f"{k} {v}" for k, v in report.items()))
    elif args.what == "degrade":
        from edge.degrade import format_rows, run_suite
        from edge.evaluate.pairs import read_pairs

        if not args.pairs:
            raise InputError("bench degrade needs --pairs FILE (a file_x,file_y,Decision CSV or an LFW pairs.txt)")
        pairs = read_pairs(args.pairs, args.root or args.pairs.parent, None)
        rows, recommendation = run_suite(pairs, config, reference=not args.no_reference)
        say(format_rows(rows))
        say("recommended threshold_l2 (best accuracy over all variants, no false accept on clean pairs): "
            + "  ".join(f"{k} {v}" for k, v in recommendation.items()))
        report = {"rows": rows, "recommendation": recommendation}
    else:
        from edge.bench import format_report, run_bench

        photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if args.photos else []
        if args.threads:
            config = config.model_copy(update={
                "detector": config.detector.model_copy(update={"threads": args.threads}),
                "embedder": config.embedder.model_copy(update={"threads": args.threads}),
            })
        report = run_bench(config, video=args.video, photos=photos, frame_limit=args.frames, reference=not args.no_reference)
        say(format_report(report))
    if args.json:
        emit_json(report)
    return 0


INTERNAL_ERROR = 3


def open_store(config: Config, args, fingerprint: str | None = None):
    """The store named by --store (else config.store.path), stamped with the current model's fingerprint."""
    from edge.embed import store_fingerprint
    from edge.store import Store

    path = getattr(args, "store", None) or config.store.path
    fingerprint = fingerprint or store_fingerprint(config)
    return Store.open(
        path, fingerprint=fingerprint, key_path=config.store.key_file,
        max_embeddings_per_person=config.enroll.max_embeddings_per_person,
    )


def enrolment_face(pipeline, path: Path, config: Config, *, largest: bool):
    """The one face of an enrolment photo that passes the quality gates, else InputError with the reason."""
    from edge.quality import quality_problem

    faces = faces_in(pipeline, path)
    if len(faces) > 1 and not largest:
        raise InputError(f"{path}: {len(faces)} faces found; enrolment needs exactly one (or pass --largest)")
    problem = quality_problem(faces[0], config.enroll)
    if problem:
        raise InputError(f"{path}: {problem}")
    return faces[0]


def check_not_duplicate(store, name: str, embedding, threshold_l2: float, force: bool, path: Path) -> None:
    """Refuse a face closer to another person than `threshold_l2` — unless it is at least as close to `name`."""
    import numpy as np

    other, distance = store.nearest(embedding)
    if other is None or other.name.casefold() == name.casefold() or distance >= threshold_l2 or force:
        return
    try:
        own_l2 = float(np.linalg.norm(store.embeddings(name) - embedding, axis=1).min())
    except StoreError:
        own_l2 = float("inf")
    if own_l2 > distance:
        raise InputError(
            f"{path}: looks like {other.name} (distance {distance:.3f} < {threshold_l2}); "
            f"use --force if {name} really is someone else"
        )


def enrol_person(pipeline, store, name: str, paths: list[Path], config: Config, args) -> dict:
    """Embed every photo and add each one that passes the gates as a row, in one atomic edit; the others are
    skipped with their reason (InputError when none passes)."""
    name = clean_name(name)  # a refused name costs no model time
    faces, used, skipped = [], [], []
    for path in paths:
        try:
            faces.append(enrolment_face(pipeline, path, config, largest=args.largest))
            used.append(path)
        except InputError as err:
            if len(paths) == 1:
                raise
            say(f"  skipped {err}")
            skipped.append({"photo": str(path), "reason": str(err)})
    if not faces:
        raise InputError(f"none of the {len(paths)} photos of {name} can be enrolled (first: {skipped[0]['reason']})")
    return enrol_faces(store, name, faces, used, [f"photo {path.name}" for path in used], config, args, skipped)


def enrol_faces(store, name: str, faces: list, labels: list, sources: list[str], config: Config, args,
                skipped: list | None = None) -> dict:
    """Add faces that passed the gates (from photos, the door camera or the unknown inbox) as rows of a person in
    one atomic edit, after the duplicate check against everyone else; `labels` name the faces in messages,
    `sources` are kept with the rows."""
    import numpy as np

    name = clean_name(name)
    skipped = skipped or []
    embeddings = np.stack([f.embedding for f in faces])
    with store.edit():
        for face, label in zip(faces, labels):
            check_not_duplicate(store, name, face.embedding, config.match.threshold_l2, args.force, label)
        try:
            existing = store.find(name)
        except StoreError:
            existing = None
        if existing is None:
            person, action = store.add_person(name, embeddings, note=args.note, sources=sources), "enrolled"
        else:
            person, action = store.add_embeddings(existing.id, embeddings, sources=sources), "added to"
    say(f"{action} {person.name}: {len(faces)} photo(s), {person.embedding_count} template(s)"
        + (f", {len(skipped)} photo(s) skipped" if skipped else ""))
    return {"name": person.name, "id": person.id, "photos": [str(p) for p in labels], "templates": person.embedding_count,
            "skipped": skipped}


def cmd_enroll(args, config: Config) -> int:
    if args.name is not None:
        clean_name(args.name)  # a refused name costs no model loading
    pipeline = load_pipeline(config)
    store = open_store(config, args, pipeline.embedder.fingerprint)
    if args.from_dir:
        people = photos_by_person(args.from_dir)
        enrolled, refused = [], []
        for i, (folder, photos) in enumerate(people.items(), 1):
            try:  # one bad folder name or photo costs that person only; the batch goes on
                name = clean_name(folder)
                say(f"[{i}/{len(people)}] {name}: {len(photos)} photo(s)")
                enrolled.append(enrol_person(pipeline, store, name, photos, config, args))
            except EdgeError as err:
                say(f"[{i}/{len(people)}] skipped {shown(folder)}: {err}")
                refused.append({"name": folder, "reason": str(err)})
        if args.json:
            emit_json({"enrolled": enrolled, "refused": refused})
        if refused:
            say(f"error: {len(refused)} of {len(people)} people not enrolled: "
                f"{', '.join(shown(r['name']) for r in refused)} (reasons above)")
            return 2
        return 0
    if not args.name or not args.images:
        raise InputError("enroll needs NAME and at least one IMAGE, or --from-dir DIR")
    result = enrol_person(pipeline, store, args.name, args.images, config, args)
    if args.json:
        emit_json(result)
    return 0


def person_dict(person) -> dict:
    return {"id": person.id, "name": person.name, "created": person.created_utc, "note": person.note,
            "templates": person.embedding_count}


PEOPLE_ARGUMENTS = {"list": "people list", "show": "people show PERSON", "rename": "people rename PERSON NEW_NAME",
                    "remove": "people remove PERSON", "forget-row": "people forget-row PERSON ROW"}


def cmd_people(args, config: Config) -> int:
    arguments = [a for a in (args.person, args.new_name) if a is not None]
    if len(arguments) != len(PEOPLE_ARGUMENTS[args.action].split()) - 2:
        raise InputError(f"usage: python -m edge {PEOPLE_ARGUMENTS[args.action]} (PERSON: a name or an id from "
                         "`python -m edge people list`)")
    store = open_store(config, args)
    if args.action == "list":
        people = [person_dict(p) for p in store.persons]
        for p in people:
            say(f"{p['name']:<30} {p['templates']:>3} template(s)  since {p['created']}  id {p['id']}")
        say(f"{len(people)} people")
        result = {"people": people}
    elif args.action == "show":
        result = person_dict(store.find(args.person))
        say("  ".join(f"{k}: {v}" for k, v in result.items()))
        result["rows"] = [{"row": r.index, "source": r.source, "added": r.added_utc} for r in store.rows(result["id"])]
        for row in result["rows"]:
            say(f"  row {row['row']}: {row['source']}, added {row['added']}")
    elif args.action == "forget-row":
        if not args.new_name.isdigit():
            raise InputError("people forget-row needs PERSON and ROW (a row number from `people show`)")
        with store.edit():
            row = store.forget_row(args.person, int(args.new_name))
            result = {**person_dict(store.find(args.person)), "forgotten_row": {"row": row.index, "source": row.source,
                                                                                 "added": row.added_utc}}
        say(f"forgot row {row.index} of {result['name']} ({row.source}, added {row.added_utc}); "
            f"{result['templates']} left")
    elif args.action == "rename":
        with store.edit():
            result = person_dict(store.rename(args.person, args.new_name))
        say(f"renamed to {result['name']}")
    else:
        from edge.gallery import forget_thumbnail

        with store.edit():
            removed = store.remove(args.person)
        forget_thumbnail(store.path, removed.id)
        forgotten = forget_in_audit(config, args, removed)
        result = {**person_dict(removed), "removed": True, "audit_rows_anonymised": forgotten}
        say(f"removed {removed.name}: templates erased, {forgotten} log entries anonymised")
    if args.json:
        emit_json(result)
    return 0


def forget_in_audit(config: Config, args, person) -> int:
    """Right to be forgotten: the audit log keeps the events but drops the person's id, name and snapshots,
    whatever name they had when each row was written."""
    from edge.audit import AuditLog

    path = getattr(args, "audit", None) or config.audit.path
    if not Path(path).exists():
        return 0
    log = AuditLog(path)
    try:
        return log.forget_person(person.id, legacy_name=person.name)
    finally:
        log.close()


def cmd_identify(args, config: Config) -> int:
    pipeline = load_pipeline(config)
    store = open_store(config, args, pipeline.embedder.fingerprint)
    import numpy as np

    faces = faces_in(pipeline, args.image)
    matches = store.match(
        np.stack([f.embedding for f in faces]), threshold_l2=config.match.threshold_l2, margin_l2=config.match.margin_l2
    )
    nobody = len(store) == 0  # then there are no distances: the store's placeholder for "nobody" is not one
    if nobody:
        say(f"identify: nobody is enrolled in {store.path}; every face is unknown (enrol with `python -m edge enroll`)")
    results = []
    for face, match in zip(faces, matches):
        box = [int(v) for v in face.face.box]
        distance, margin = (None, None) if nobody else (round(match.distance_l2, 4), round(match.margin_l2, 4))
        results.append({"box": rounded(face.face.box, 1), "name": match.person, "distance_l2": distance, "margin": margin})
        if nobody:
            say(f"unknown at {box}")
        else:
            who = match.person or f"unknown (closest {match.candidate}, {match.distance_l2:.3f})"
            say(f"{who} at {box} distance {match.distance_l2:.3f} margin {match.margin_l2:.3f}")
    if args.json:
        emit_json({"faces": results})
    return 0 if any(r["name"] for r in results) else 1


def make_door(config: Config, kind: str):
    from edge.door import GpioDoor, SimulatedDoor

    d = config.door
    if kind == "simulated":
        return SimulatedDoor(pulse_s=d.pulse_s)
    from edge.gpio_gpiod import pin_factory

    return GpioDoor(relay_pin=d.relay_pin, active_high=d.active_high, pulse_s=d.pulse_s, led_pin=d.led_pin,
                    buzzer_pin=d.buzzer_pin, pin_factory=pin_factory(d.gpio_backend))


def event_sink(target: str | None):
    """JSON lines to stdout ('-') or appended to a private (0600) file; None → no sink. Returns (emit, close)."""
    from edge.private import open_private

    if target is None:
        return (lambda event: None), (lambda: None)
    try:
        stream = sys.stdout if target == "-" else open_private(target, "a", buffering=1)
    except OSError as err:
        raise InputError(f"--events {target}: cannot be written ({err.strerror or err})") from None

    def emit(event: dict) -> None:
        stream.write(redact(json.dumps(event)) + "\n")
        stream.flush()

    return emit, (lambda: None) if stream is sys.stdout else stream.close


def open_camera(config: Config, uri: str):
    """The source for a URI; local cameras get the configured capture size."""
    from edge.camera import open_source

    local = uri.startswith(("v4l2:", "/dev/", "csi:"))
    return open_source(uri, **({"width": config.camera.width, "height": config.camera.height} if local else {}))


def cmd_run(args, config: Config) -> int:
    """The door controller loop; a file source runs to its end and exits 0, as does a stop by SIGTERM/SIGINT."""
    from edge.kiosk import StopRequest

    stop = StopRequest().install()  # from here on a signal asks to stop and never interrupts anything
    try:
        return run_door_loop(args, config, stop)
    finally:
        stop.ignore()


def run_door_loop(args, config: Config, stop) -> int:
    """Load, open and loop (see cmd_run); `stop` is the installed StopRequest the loop watches."""
    from edge.audit import AuditLog
    from edge.kiosk import Kiosk

    pipeline = load_pipeline(config)
    store = open_store(config, args, pipeline.embedder.fingerprint)
    audit_path = Path(args.audit or config.audit.path)
    audit = AuditLog(audit_path, retention_days=config.audit.retention_days,
                     snapshot_dir=audit_path.parent / "snapshots" if config.audit.snapshots else None)
    audit.prune()
    uri = args.source or config.camera.source
    source = open_camera(config, uri)
    door = make_door(config, args.door or config.door.kind)
    emit, close_sink = event_sink(args.events)
    bridge = open_mqtt(config, door, audit_path)
    kiosk = Kiosk(config=config, pipeline=pipeline, store=store, door=door, audit=audit,
                  emit=emit if bridge is None else bridge.tee(emit), press_button_at=set(args.press_button_at or []),
                  **surface_feeds(config, audit_path))
    if bridge is not None:
        bridge.stats = lambda: {"fps": round(kiosk.recent_fps(), 1), "people": len(store)}
        bridge.start()
    button = attach_button(config, kiosk) if (args.door or config.door.kind) == "gpio" else None
    fleet = start_fleet(config, store.path, audit_path, store.fingerprint)
    say(f"run: source {uri}, door {args.door or config.door.kind}, {len(store)} people enrolled, backend {pipeline.embedder.name}")
    started = time.perf_counter()
    try:
        with source:
            frames = kiosk.run(source, stop=stop)
    finally:
        if button is not None:
            button.close()
        if bridge is not None:
            bridge.close()
        if fleet is not None:
            fleet.stop()
        audit.close()
        close_sink()
    elapsed_s = time.perf_counter() - started
    summary = kiosk.summary(frames, elapsed_s)
    say("run: " + "  ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def open_mqtt(config: Config, door, audit_path: Path):
    """The MQTT bridge when `mqtt.enabled` (not started yet), with its own audit connection for remote unlocks."""
    if not config.mqtt.enabled:
        return None
    from edge.audit import AuditLog
    from edge.mqtt import MqttBridge

    cfg = config.mqtt if config.mqtt.outbox_path else config.mqtt.model_copy(
        update={"outbox_path": audit_path.parent / "mqtt_outbox.sqlite"})
    return MqttBridge(cfg, door=door, audit=AuditLog(audit_path, retention_days=config.audit.retention_days))

def surface_folders(config: Config, audit_path: Path) -> tuple[Path, Path]:
    """(unknown-face inbox, live frame) folders: configured, else next to the audit log like its snapshots."""
    return config.unknown.path or audit_path.parent / "unknown", config.web.live_dir or audit_path.parent / "live"


def surface_feeds(config: Config, audit_path: Path) -> dict:
    """The door loop's feeds for the admin page: the unknown-face inbox (unknown.keep) and the live frame/status."""
    from edge.live import LiveWriter
    from edge.unknown import UnknownCollector, UnknownInbox

    unknown_dir, live_dir = surface_folders(config, audit_path)
    feeds = {}
    if config.unknown.keep:
        inbox = UnknownInbox(unknown_dir, retention_days=config.unknown.retention_days)
        inbox.prune()
        feeds["unknown"] = UnknownCollector(inbox, config.enroll, min_frames=config.decide.votes_needed)
    if config.web.live_interval_s > 0:
        feeds["live"] = LiveWriter(live_dir, interval_s=config.web.live_interval_s)
    return feeds


def start_fleet(config: Config, store_path: Path, audit_path: Path, fingerprint: str):
    """The fleet sync thread beside the door loop, or None when no fleet is configured."""
    if config.fleet.dsn is None and config.fleet.dsn_file is None:
        return None
    from edge.fleet.sync import start_agent

    return start_agent(config, store_path=store_path, audit_path=audit_path, fingerprint=fingerprint)


def attach_button(config: Config, kiosk):
    if config.door.button_pin is None:
        return None
    from gpiozero import Button

    from edge.gpio_gpiod import pin_factory

    button = Button(config.door.button_pin, pull_up=True, bounce_time=0.05,
                    pin_factory=pin_factory(config.door.gpio_backend))
    button.when_pressed = kiosk.press_button
    return button


def cmd_log(args, config: Config) -> int:
    from edge.audit import AuditLog, parse_since

    path = Path(args.audit or config.audit.path)
    if not path.exists():
        raise InputError(f"audit log {path} not found (the door controller creates it on first run)")
    log = AuditLog(path)
    try:
        rows = log.rows(parse_since(args.since) if args.since else 0.0)
    finally:
        log.close()
    from datetime import datetime

    for row in rows:
        when = datetime.fromtimestamp(row["t_unix"]).isoformat(timespec="seconds")
        distance = "-" if row["distance_l2"] is None else f"{row['distance_l2']:.3f}"  # none for a remote unlock
        say(f"{when}  {row['event']:<8} {row['person'] or '-':<24} distance {distance}  door {row['door_action']}  "
            f"liveness {row['liveness'] or '-'}")
    say(f"{len(rows)} decision(s)")
    if args.json:
        emit_json({"decisions": rows})
    return 0


def doctor_checks(config: Config, args):
    """(name, check) pairs; each check returns a detail string or raises with the reason."""
    import numpy as np

    from engines.fetch import verify_models

    def models():
        return f"{len(verify_models(config.resolved_models_dir()))} files match their sha256"

    def embedder():
        from edge.embed import CHIP_PX, create_embedder

        emb = create_embedder(config.embedder, config.resolved_models_dir())
        vector = emb.embed(np.full((1, CHIP_PX, CHIP_PX, 3), 128, np.uint8))
        emb.close()
        return f"backend {emb.name}, output {vector.shape[1]}-D"

    def store():
        opened = open_store(config, args)
        return f"{len(opened)} people, {opened.embedding_count} templates ({opened.path})"

    def audit():
        path = Path(args.audit or config.audit.path)
        folder = path.parent if path.parent.exists() else path.parent.parent
        if not os.access(folder, os.W_OK):
            raise EdgeError(f"{folder} is not writable by this user")
        return str(path)

    def camera():
        with open_camera(config, args.source or config.camera.source) as source:
            frame = source.read(timeout_s=3.0)
        if frame is None:
            raise EdgeError(f"no frame within 3 s from {args.source or config.camera.source}")
        return f"{frame.image.shape[1]}x{frame.image.shape[0]} from {args.source or config.camera.source}"

    def door():
        if config.door.kind != "gpio":
            return "simulated (set door.kind: gpio to drive the relay)"
        relay = make_door(config, "gpio")
        relay.open()
        relay.close()
        return f"relay on {config.door.relay_pin} claimed and released (locked)"

    checks = [("config", lambda: str(args.config or "built-in defaults")), ("models", models), ("embedder", embedder),
              ("store", store), ("audit", audit), ("door", door)]
    if not args.no_camera:
        checks.append(("camera", camera))
    if config.mqtt.enabled:
        from edge.mqtt import check_broker

        checks.append(("mqtt", lambda: check_broker(config.mqtt)))
    return checks


def cmd_doctor(args, config: Config) -> int:
    """Validate config, models, store, camera and GPIO without starting the loop."""
    results = []
    for name, check in doctor_checks(config, args):
        try:
            detail, ok = check(), True
        except Exception as err:  # report every failure, keep checking the rest
            detail, ok = str(err) or type(err).__name__, False
        say(f"{'ok  ' if ok else 'FAIL'}  {name}: {detail}")
        results.append({"name": name, "ok": ok, "detail": detail})
    if args.json:
        emit_json({"checks": results, "ok": all(r["ok"] for r in results)})
    return 0 if all(r["ok"] for r in results) else 2


def cmd_web(args, config: Config) -> int:
    """The admin web page (edge/web): a process of its own next to the door controller."""
    from edge.web.app import serve

    def updated(section, **fields):
        return section.model_copy(update={k: v for k, v in fields.items() if v is not None})

    return serve(config.model_copy(update={
        "web": updated(config.web, host=args.host, port=args.port, admins_file=args.admins),
        "store": updated(config.store, path=args.store), "audit": updated(config.audit, path=args.audit)}))


def cmd_admin(args, config: Config) -> int:
    """`admin set-password NAME`: the password from the terminal (asked twice) or one line on stdin."""
    import getpass

    from edge.web.auth import set_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"new password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise InputError("the two passwords differ; nothing changed")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    path = args.admins or config.web.admins_file
    set_password(path, args.name, password)
    say(f"password set for {args.name} in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineUsageParser(prog="python -m edge", description="Face-recognition door controller")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        p.set_defaults(func=func)
        return p

    p = command("embed", cmd_embed, "print box, landmarks and unit 128-D embedding of every face")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p = command("verify", cmd_verify, "are the largest faces of two photos the same person? (exit 1: no)")
    p.add_argument("image_a", type=Path, metavar="IMG_A")
    p.add_argument("image_b", type=Path, metavar="IMG_B")
    p = command("demo", cmd_demo, "run the real pipeline and door loop on the bundled sample media")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "out" / "demo", help="where the demo writes its files")
    p = command("bench", cmd_bench, "per-stage timings vs face_recognition in the same run (or: bench store)")
    p.add_argument("what", nargs="?", choices=("pipeline", "store", "degrade"), default="pipeline")
    p.add_argument("--pairs", type=Path, default=None, help="bench degrade: pairs file (CSV or LFW pairs.txt)")
    p.add_argument("--root", type=Path, default=None, help="bench degrade: image folder (default: the pairs file's)")
    p.add_argument("--video", type=Path, default=SAMPLES / "video" / "walk_toward_camera.mp4", help="video to time")
    p.add_argument("--photos", type=Path, default=None, help="also time every photo under this folder")
    p.add_argument("--frames", type=positive_int, default=None, help="use only the first N video frames")
    p.add_argument("--no-reference", action="store_true", help="skip face_recognition (it is a dev dependency)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="detector and embedder threads (e.g. 1 under `taskset -c 0` for the one-core Pi-class figure)")
    p.add_argument("--size", type=positive_int, default=100_000, help="bench store: number of synthetic people")
    p.add_argument("--rows", type=positive_int, default=3, help="bench store: embeddings per synthetic person")

    def store_command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = command(name, func, help_text)
        p.add_argument("--store", type=Path, default=None, help="store file (default: store.path in the config)")
        return p

    p = store_command("enroll", cmd_enroll, "enrol a person from photos (or a folder per person with --from-dir)")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    p.add_argument("--from-dir", type=Path, default=None, metavar="DIR", help="DIR/NAME/*.jpg, one folder per person")
    p.add_argument("--largest", action="store_true", help="photos with several faces: use the largest")
    p.add_argument("--force", action="store_true", help="enrol even if the face matches another person")
    p.add_argument("--note", default=None, help="free text kept with the person")
    p = store_command("people", cmd_people, "list, show, rename or remove enrolled people, or forget one of their rows")
    p.add_argument("action", choices=tuple(PEOPLE_ARGUMENTS))
    p.add_argument("person", nargs="?", metavar="PERSON", help="name or id")
    p.add_argument("new_name", nargs="?", metavar="NEW_NAME|ROW", help="rename: the new name; forget-row: the row "
                   "number `people show` lists")
    p.add_argument("--audit", type=Path, default=None, help="remove: audit log to anonymise (default: audit.path)")
    from edge.evaluate import calibrate, ident, pairs, templates

    p = command("eval-pairs", pairs.cmd_eval_pairs, "1:1 accuracy, VAL@FAR and ROC on an LFW pairs.txt or a CSV")
    pairs.add_eval_pairs_arguments(p)
    p = command("eval-ident", ident.cmd_eval_ident, "open-set 1:N: DIR and FPIR on a folder per person")
    ident.add_eval_ident_arguments(p)
    p = command("eval-templates", templates.cmd_eval_templates,
                "FRR at FAR 1e-3…1e-6 with K-photo templates and M-photo probes on a folder per person")
    templates.add_eval_templates_arguments(p)
    p = command("calibrate", calibrate.cmd_calibrate, "recommend match.threshold_l2 for a target FAR, or each security "
                "level's for a template regime (--write: into --config)")
    calibrate.add_calibrate_arguments(p)
    from edge import pad

    p = command("make-attacks", pad.cmd_make_attacks, "presentation-attack clips (print, screen-still, replay) from photos/videos")
    pad.add_make_attacks_arguments(p)
    p = command("eval-pad", pad.cmd_eval_pad, "liveness: APCER per attack type, BPCER per genuine track, time to pass")
    pad.add_eval_pad_arguments(p)
    p = store_command("identify", cmd_identify, "who is in this photo? (exit 1: nobody known)")
    p.add_argument("image", type=Path, metavar="IMG")
    p = store_command("run", cmd_run, "run the door controller (camera → recognition → relay)")
    p.add_argument("--source", default=None, help="camera URI (default: camera.source in the config)")
    p.add_argument("--door", choices=("gpio", "simulated"), default=None, help="default: door.kind in the config")
    p.add_argument("--events", default=None, metavar="FILE|-", help="write events as JSON lines ('-' = stdout)")
    p.add_argument("--audit", type=Path, default=None, help="audit log (default: audit.path in the config)")
    p.add_argument("--press-button-at", type=int, action="append", metavar="FRAME",
                   help="simulate an enrolment button press at this frame (demos and tests; repeatable)")
    # Listed for --help; main() hands its arguments straight to engines.build_trt (see there for options).
    sub.add_parser("build-engine", help="build the TensorRT engine: --precision fp16|fp32, --max-batch, --dry-run …")
    p = store_command("doctor", cmd_doctor, "check config, models, store, camera and GPIO without starting")
    p.add_argument("--source", default=None, help="camera URI to test (default: camera.source in the config)")
    p.add_argument("--audit", type=Path, default=None, help="audit log (default: audit.path in the config)")
    p.add_argument("--no-camera", action="store_true", help="skip the camera check")
    from edge import sandbox

    command("sandbox", sandbox.cmd_sandbox,
            "print the systemd drop-in that opens the sandbox to the configured camera and MQTT broker")
    from edge.fleet import cli as fleet_cli

    p = command("fleet", fleet_cli.cmd_fleet, "PostgreSQL fleet: init, status, sync this door, erase a person, bench")
    fleet_cli.add_arguments(p)
    p = command("web", cmd_web, "serve the admin web page (people, enrolment, log, live view, unknown faces)")
    p.add_argument("--host", default=None, help="listen address (default: web.host, 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=None, help="TCP port (default: web.port)")
    p.add_argument("--store", type=Path, default=None, help="store file (default: store.path), as the door's --store")
    p.add_argument("--audit", type=Path, default=None, help="audit log (default: audit.path), as the door's --audit")
    p.add_argument("--admins", type=Path, default=None, help="admins file (default: web.admins_file)")
    p = command("admin", cmd_admin, "manage admin accounts of the web page")
    p.add_argument("action", choices=("set-password",))
    p.add_argument("name", metavar="NAME")
    p.add_argument("--admins", type=Path, default=None, help="admins file (default: web.admins_file)")
    p = command("log", cmd_log, "show the door decisions from the audit log")
    p.add_argument("--since", default=None, help="15m, 2h, 7d or an ISO time")
    p.add_argument("--audit", type=Path, default=None, help="audit log (default: audit.path in the config)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build-engine"]:
        from engines.build_trt import main as build_engine

        return build_engine(argv[1:])
    args = build_parser().parse_args(argv)
    quiet = logging.INFO if args.command == "run" else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else quiet, handlers=[handler])
    try:
        config = load_config(args.config)
        return args.func(args, config)
    except EdgeError as err:
        say(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as err:  # a bug, not bad input: one line here, the traceback with -v
        logging.getLogger("edge").debug("unexpected error", exc_info=True)
        say(f"error: unexpected {type(err).__name__}: {first_line(err)} (run with -v for details)")
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
