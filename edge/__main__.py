"""Command line: `python -m edge COMMAND …`. --json prints one JSON document on stdout; humans read stderr.

Exit codes: 0 done, 1 a negative answer (no match), 2 bad input or setup (one line says why).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge.config import Config, load_config
from edge.errors import EdgeError, InputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = PROJECT_ROOT / "samples"


def say(message: str) -> None:
    """Human-facing text goes to stderr so stdout stays a clean JSON document."""
    print(message, file=sys.stderr)


def emit_json(document: object) -> None:
    print(json.dumps(document, indent=2))


def rounded(values, digits: int = 6) -> list:
    return [round(float(v), digits) for v in values]


def load_pipeline(config: Config):
    from edge.pipeline import Pipeline

    return Pipeline(config)


def faces_in(pipeline, path: Path):
    """Embedded faces of one image file, raising InputError when there is none."""
    from edge.images import load_image

    faces = pipeline.analyze(load_image(path))
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
    from edge.images import load_image

    results = []
    for path in args.images:
        faces = pipeline.analyze(load_image(path))
        if not faces:
            raise InputError(f"{path}: no face found")
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
    """Real pipeline on the bundled photos: the same person matches, another does not."""
    pipeline = load_pipeline(config)
    photos = SAMPLES / "photos"
    pairs = [("obama.jpg", "obama2.jpg", True), ("obama.jpg", "biden.jpg", False)]
    ok = True
    for a, b, expected in pairs:
        result = verify_pair(pipeline, photos / a, photos / b, config.match.threshold_l2)
        verdict = "match" if result["match"] else "no match"
        say(f"verify {a} vs {b}: {verdict} (distance {result['distance_l2']:.3f}, threshold {result['threshold_l2']})")
        ok &= result["match"] == expected
    return 0 if ok else 1


def cmd_bench(args, config: Config) -> int:
    if args.what == "store":
        import tempfile

        from edge.store import bench_store

        with tempfile.TemporaryDirectory() as tmp:
            report = bench_store(args.size, tmp_dir=Path(tmp))
        say("  ".join(f"{k} {v}" for k, v in report.items()))
    else:
        from edge.bench import format_report, run_bench

        photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"}) if args.photos else []
        report = run_bench(config, video=args.video, photos=photos, frame_limit=args.frames, reference=not args.no_reference)
        say(format_report(report))
    if args.json:
        emit_json(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edge", description="Face-recognition door controller")
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
    command("demo", cmd_demo, "run the real pipeline on the bundled sample media")
    p = command("bench", cmd_bench, "per-stage timings vs face_recognition in the same run (or: bench store)")
    p.add_argument("what", nargs="?", choices=("pipeline", "store"), default="pipeline")
    p.add_argument("--video", type=Path, default=SAMPLES / "video" / "walk_toward_camera.mp4", help="video to time")
    p.add_argument("--photos", type=Path, default=None, help="also time every photo under this folder")
    p.add_argument("--frames", type=int, default=None, help="use only the first N video frames")
    p.add_argument("--no-reference", action="store_true", help="skip face_recognition (it is a dev dependency)")
    p.add_argument("--size", type=int, default=100_000, help="bench store: number of synthetic people")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s %(message)s"
    )
    try:
        config = load_config(args.config)
        return args.func(args, config)
    except EdgeError as err:
        say(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
