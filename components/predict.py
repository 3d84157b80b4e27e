"""`mer predict`: class probabilities for new clips (folders of frames or video files) from a trained model.

    mer predict --model models:/mer-model@champion path/to/clip_frames/ video.mp4 [--onset N --apex N] [--json]

Each clip goes through the preprocessing of training (`mer.model.inference`) with the preprocessing parameters the
model was trained with. A clip that cannot be used (missing, empty folder, corrupt frame, undecodable video, no face)
is reported with its name and the others continue; the exit code is 1 when any clip failed. Key frames not given are
chosen by the documented default (onset = first frame, apex = largest flow magnitude from the onset) and reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mer.components.settings import Params
from mer.model.errors import ConfigError, NonFiniteError, SampleError

log = logging.getLogger(__name__)


def predict_clips(loaded: Any, clips: Sequence[str], onset: int | None = None, apex: int | None = None,
                  offset: int | None = None, aus: str = "") -> list[dict[str, Any]]:
    """One result dict per clip: `status` ok (key frames, probabilities, predicted class) or failed (`error`)."""
    from mer.model.inference import default_key_frames, input_batch, open_clip, predict_proba, preprocess_clip  # torch

    if "aus" in loaded.model.inputs and not aus:
        raise ConfigError("--aus: this model reads the clip's annotated AUs (au_mode=annotated); give them, e.g. "
                          "--aus 4+7")
    results = []
    for path in clips:
        with tempfile.TemporaryDirectory(prefix="mer-predict-") as work:
            try:
                clip = open_clip(path, Path(work))
                keys = default_key_frames(clip, loaded.preprocess, onset, apex, offset)
                arrays = preprocess_clip(clip, keys, loaded.preprocess, aus)
                probs = predict_proba(loaded.model, input_batch(arrays, loaded.model.inputs))[0]
            except (SampleError, NonFiniteError) as err:
                log.error("%s", err)
                message = str(err) if isinstance(err, SampleError) else f"clip {Path(path).name}: {err}"
                results.append({"clip": Path(path).name, "path": str(path), "status": "failed", "error": message})
                continue
        probabilities = {name: round(float(p), 6) for name, p in zip(loaded.class_names, probs)}
        results.append({
            "clip": clip.clip_id, "path": str(path), "status": "ok", "source": clip.source,
            "frames": [clip.numbers[0], clip.numbers[-1]],
            "onset": keys.onset, "apex": keys.apex, "offset": keys.offset, "key_frames": dict(keys.chosen),
            "probabilities": probabilities, "predicted": max(probabilities, key=probabilities.__getitem__),
        })
    return results


def format_text(results: Sequence[dict[str, Any]]) -> str:
    """Human-readable block per clip: key frames with how they were chosen, probabilities, predicted class."""
    lines = []
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['clip']}: FAILED: {r['error']}")
            continue
        first, last = r["frames"]
        lines.append(f"{r['clip']} ({r['source']}, frames {first}..{last})")
        lines.append("  key frames: " + ", ".join(f"{k} {r[k]} ({r['key_frames'][k]})"
                                                  for k in ("onset", "apex", "offset")))
        width = max(len(name) for name in r["probabilities"])
        for name, p in sorted(r["probabilities"].items(), key=lambda item: -item[1]):
            mark = "  <- predicted" if name == r["predicted"] else ""
            lines.append(f"  {name:<{width}}  {p:.3f}{mark}")
    return "\n".join(lines)


def predict_command(params: Params, args: argparse.Namespace) -> int:
    """`mer predict` (add_arguments); exit code 1 when any clip failed."""
    from mer.components.tracking.pyfunc import load_for_inference  # mlflow + torch

    loaded = load_for_inference(args.model, params)
    log.info("model %s (%s): %s, classes %s", args.model, loaded.source, type(loaded.model).__name__,
             ", ".join(loaded.class_names))
    if loaded.leaky:
        log.warning("model %s was chosen with test-label information (oracle protocol or annotated AUs)", args.model)
    results = predict_clips(loaded, args.clips, args.onset, args.apex, args.offset, args.aus)
    output = json.dumps(results, indent=2) if args.json else format_text(results)
    sys.stdout.write(output + "\n")
    failed = sum(r["status"] != "ok" for r in results)
    log.info("predict: %d clip(s), %d ok, %d failed", len(results), len(results) - failed, failed)
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`mer predict`'s own options."""
    parser.add_argument("--model", required=True, metavar="MODEL_URI",
                        help="models:/NAME/VERSION, runs:/RUN_ID/PATH, an MLflow model directory or a checkpoint file")
    parser.add_argument("clips", nargs="+", metavar="CLIP_DIR_OR_VIDEO", help="folder of frames or a video file")
    parser.add_argument("--onset", type=int, help="onset frame number (default: the first frame)")
    parser.add_argument("--apex", type=int, help="apex frame number (default: max flow magnitude from the onset)")
    parser.add_argument("--offset", type=int, help="offset frame number (default: the last frame)")
    parser.add_argument("--aus", default="", help="the clip's action units, e.g. 4+7 (only models reading "
                                                  "annotated AUs need them)")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
