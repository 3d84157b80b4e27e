"""Preprocessing throughput: clips/second for face detection + alignment, TV-L1 at 224 and 128 px, and a whole sample,
with 1 and 2 worker processes (each single-threaded, as the Ray stage runs them), and the CPU seconds one clip costs
(workers / CPU s is the throughput an otherwise idle machine reaches).

Input: the real CASME II clip in ../shared/data/casme2-clip when present, else frames cut from scikit-image's
astronaut photo. Parameters come from params.yaml (`preprocess`), so the figures match what `mer preprocess` does.

    python benchmarks/preprocess.py [--params params.yaml] [--clips 4] [--workers 1 2]

`--demo` measures instead what the per-modality cache changes for the demo: the 80 synthetic clips of params.yaml's
`synth` section (generated into a temporary folder, ingested with the real loader), preprocessed once with every
modality (what `mer preprocess` computed for every model before) and once with what the demo model reads
(`model` in params.yaml), each from an empty cache: CPU seconds per clip (each clip timed in its worker with
`process_row`, the function the Ray stage runs, 2 single-threaded workers) and the wall time of the real stage
(`mer preprocess` with preprocess.num_workers=2, Ray start included). It starts Ray: run it under the shared lock.

    flock /tmp/mer-ray.lock python benchmarks/preprocess.py --demo
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mer.components.settings import load_params
from mer.model.config import PreprocessConfig
from mer.model.preprocess import face as facelib
from mer.model.preprocess.cache import process_row
from mer.model.preprocess.flow import compute_flow, tvl1
from mer.model.preprocess.sample import sampled_frames

SHARED_CLIP = Path(os.environ.get("MER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "casme2-clip"


def clip_folder(workdir: Path) -> tuple[Path, str, int]:
    """(frames folder, frame template, frame count): the real clip, else 10 synthetic frames written to `workdir`."""
    if SHARED_CLIP.is_dir():
        return SHARED_CLIP, "{:03d}.jpg", len(list(SHARED_CLIP.glob("*.jpg")))
    import skimage.data

    base = cv2.cvtColor(skimage.data.astronaut()[40:220, 130:310], cv2.COLOR_RGB2BGR)
    for k in range(10):
        moved = cv2.warpAffine(base, np.float32([[1, 0, 0.3 * k], [0, 1, 0]]), base.shape[1::-1],
                               borderMode=cv2.BORDER_REFLECT)
        cv2.imwrite(str(workdir / f"{k + 1:03d}.jpg"), moved)
    return workdir, "{:03d}.jpg", 10


_STATE: dict[str, Any] = {}


def _init(folder: Path, template: str, count: int, cfg: PreprocessConfig) -> None:
    """Per worker: single-threaded OpenCV, models loaded and frames read once (not part of the timings)."""
    cv2.setNumThreads(1)
    facelib.dlib_models()
    frames = [cv2.imread(str(folder / template.format(n)), cv2.IMREAD_GRAYSCALE) for n in range(1, count + 1)]
    _STATE.update(folder=folder, template=template, count=count, cfg=cfg, frames=frames)


def detect_align(_: int) -> None:
    cfg, frames = _STATE["cfg"], _STATE["frames"]
    box = facelib.detect_face(frames[0], cfg.detector_upsample)
    align = facelib.alignment_from_landmarks(facelib.predict_landmarks(frames[0], box), cfg.margin)
    for frame in frames:
        align.warp(frame, cfg.face_size)
        align.warp(frame, cfg.seq_size)


def _aligned(size: int) -> list[np.ndarray]:
    key = f"aligned{size}"
    if key not in _STATE:
        cfg, frames = _STATE["cfg"], _STATE["frames"]
        align = facelib.alignment_from_landmarks(
            facelib.predict_landmarks(frames[0], facelib.detect_face(frames[0], cfg.detector_upsample)), cfg.margin)
        _STATE[key] = [align.warp(f, size) for f in frames]
    return _STATE[key]


def tvl1_224(_: int) -> None:
    """One onset->apex flow at 224 px (flow28's source)."""
    frames = _aligned(224)
    compute_flow(tvl1(_STATE["cfg"].flow), frames[0], frames[len(frames) // 2])


def tvl1_128(_: int) -> None:
    """The seq_frames-1 consecutive flows at 128 px of one clip (flows128)."""
    cfg = _STATE["cfg"]
    frames = _aligned(cfg.seq_size)
    picked = [frames[n - 1] for n in sampled_frames(1, len(frames), cfg.seq_frames)]
    solver = tvl1(cfg.flow)
    for a, b in zip(picked[:-1], picked[1:]):
        compute_flow(solver, a, b)


def whole_sample(_: int) -> None:
    count = _STATE["count"]
    row = {"sample_id": "bench/sub/clip", "frames_dir": str(_STATE["folder"]), "frame_template": _STATE["template"],
           "onset": 1, "apex": count // 2, "offset": count, "aus": "", "landmarks_path": "", "flow_path": "",
           "apex_path": "", "points5": ""}
    result = process_row(row, _STATE["cfg"], Path("."))
    failed = [e.error for e in result.entries.values() if e.status != "ok"]
    if failed:
        raise RuntimeError(failed[0])


TASKS: dict[str, Callable[[int], None]] = {
    "detect+align": detect_align, "tvl1@224": tvl1_224, "tvl1@128 x(N-1)": tvl1_128, "whole sample": whole_sample,
}


def _cpu_timed(task: Callable[[int], None], item: int) -> float:
    """CPU seconds the task took in its worker: unlike wall time, barely affected by other load on the machine."""
    start = time.process_time()
    task(item)
    return time.process_time() - start


def clips_per_second(task: Callable[[int], None], workers: int, clips: int, init_args: tuple[Any, ...]
                     ) -> tuple[float, float]:
    """(clips per wall-clock second, mean CPU seconds per clip) with `workers` processes."""
    with ProcessPoolExecutor(max_workers=workers, initializer=_init, initargs=init_args) as pool:
        list(pool.map(task, range(workers)))  # warm-up: every worker has run the task once
        start = time.perf_counter()
        cpu = list(pool.map(functools.partial(_cpu_timed, task), range(clips * workers)))
        return clips * workers / (time.perf_counter() - start), float(np.mean(cpu))


def _demo_worker() -> None:
    """Single-threaded OpenCV and dlib's models loaded before any clip is timed."""
    cv2.setNumThreads(1)
    facelib.dlib_models()


def _timed_row(row: dict[str, Any], cfg: PreprocessConfig, modalities: tuple[str, ...]) -> tuple[float, int]:
    """(CPU seconds, failed entries) of one clip in a worker."""
    start = time.process_time()
    result = process_row(row, cfg, Path("."), modalities)
    return time.process_time() - start, sum(e.status != "ok" for e in result.entries.values())


def demo(params_path: str, workers: int) -> None:
    """Before/after of the per-modality cache on the demo's synthetic clips (module docstring)."""
    from mer.components.ingest import ingest
    from mer.components.preprocess import preprocess
    from mer.components.synth import synthesize
    from mer.model.config import set_dotted
    from mer.model.data import read_table
    from mer.model.preprocess.modalities import MODALITIES, requested

    params = load_params(params_path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = params.model_dump(mode="json", by_alias=True)
        overrides = {"synth.out": f"{tmp}/synthetic", "data.source": "synthetic", "data.root": f"{tmp}/synthetic",
                     "data.ingested": f"{tmp}/ingested/annotations.csv", "preprocess.num_workers": workers}
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        base = params.model_validate(raw)
        synthesize(base.synth)
        ingest(base)
        rows = read_table(base.data.ingested).to_dict("records")
        demo_keys = requested(base.preprocess, base.model)
        synth = base.synth
        print(f"{len(rows)} synthetic clips ({synth.image_size} px, {synth.min_frames}-{synth.max_frames} frames); "
              f"{workers} workers; cores: {os.cpu_count()}; model {base.model.name}/{base.model.config}")
        print(f"{'modalities':<58}{'CPU s/clip':>11}{'CPU s total':>12}{'pool wall s':>12}{'stage wall s':>13}")
        for label, keys in (("every modality (before)", MODALITIES), ("what the model reads (after)", demo_keys)):
            cfg = base.preprocess.model_copy(update={"modalities": list(keys)})
            # spawn, not fork: this process already ran OpenCV/dlib threads (synth, ingest), which a fork can deadlock
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, initializer=_demo_worker, mp_context=spawn) as pool:
                start = time.perf_counter()
                timed = list(pool.map(_timed_row, rows, [cfg] * len(rows), [tuple(keys)] * len(rows)))
                pool_wall = time.perf_counter() - start
            cpu = [c for c, _ in timed]
            failed = sum(f for _, f in timed)
            stage = base.model_copy(update={"preprocess": cfg.model_copy(update={"out": f"{tmp}/cache-{len(keys)}"})})
            start = time.perf_counter()
            manifest = preprocess(stage)
            stage_wall = time.perf_counter() - start
            assert manifest["counts"]["computed"] == len(rows), manifest["counts"]
            print(f"{label + ': ' + '+'.join(keys):<58}{np.mean(cpu):>11.2f}{sum(cpu):>12.1f}{pool_wall:>12.1f}"
                  f"{stage_wall:>13.1f}" + (f"  ({failed} entries failed)" if failed else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clips", type=int, default=4, help="clips per worker per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--demo", action="store_true", help="before/after on the demo's synthetic clips (starts Ray)")
    args = parser.parse_args()
    if args.demo:
        demo(args.params, args.workers[-1])
        return
    cfg = load_params(args.params).preprocess
    with tempfile.TemporaryDirectory() as tmp:
        folder, template, count = clip_folder(Path(tmp))
        print(f"input: {folder} ({count} frames); cores: {os.cpu_count()}; opencv {cv2.__version__}")
        print(f"{'task':<18}" + "".join(f"{f'{w} worker(s)':>14}" for w in args.workers)
              + f"{'speed-up':>10}{'CPU s/clip':>12}")
        for name, task in TASKS.items():
            measured = [clips_per_second(task, w, args.clips, (folder, template, count, cfg)) for w in args.workers]
            rates = [rate for rate, _ in measured]
            print(f"{name:<18}" + "".join(f"{r:>10.2f} c/s" for r in rates)
                  + f"{rates[-1] / rates[0]:>9.2f}x{measured[0][1]:>12.3f}")


if __name__ == "__main__":
    main()
