"""`python -m edge bench`: the door loop's own step is what is timed, and it embeds only the faces it still needs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_times_the_door_loop_which_skips_faces_of_decided_tracks(models_dir):
    out = subprocess.run([sys.executable, "-m", "edge", "bench", "--frames", "20", "--no-reference", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    loop, every = report["door_loop"], report["video_640"]
    assert loop["frames"] == every["frames"] == 20 and loop["frames_with_face"] == every["frames_with_face"] > 0
    # The stranger at the door is embedded for a full vote window (5 frames), then every 5th frame (9, 14, 19);
    # a second, short-lived face makes a track of its own.
    assert loop["faces_seen"] >= 20 and 8 <= loop["faces_embedded"] <= loop["faces_seen"] // 2
    assert loop["events"] == {"unknown": 1}
    assert set(loop["stage_ms_median"]) == {"decode", "detect", "landmarks", "align", "embed", "liveness", "rest"}
    assert report["total_ms_median"] == loop["total_ms_median"]
    assert every["stage_ms_median"]["landmarks"] > 0  # a face in every frame: its landmark time is not lost
    assert every["faces_embedded"] == every["faces_seen"] == loop["faces_seen"]
    assert "door_loop (faces of decided tracks not embedded): 20 frames" in out.stderr and "every face embedded" in out.stderr
