"""Benchmark every registered model: parameters, forward+backward throughput and peak memory.

Each (model, config) runs in a fresh spawned process so peak memory is its own: on CPU the growth of the process's
maximum resident set size over the baseline after imports (resource.getrusage), on GPU torch.cuda.max_memory_allocated.
Default batch = the paper's batch size (HTNet 256, MMNet/CVA+FPF 34, MOL 32, STSTNet 256); a few timed steps after
one warm-up step. On GPU, channels-last and bfloat16/float16 autocast are used as in training.

    python benchmarks/models.py                         # small configs on CPU, paper batch sizes
    python benchmarks/models.py --configs paper --device cuda
    python benchmarks/models.py --models htnet mol --batch-size 8 --steps 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from typing import Any

PAPER_BATCH = {"htnet": 256, "ststnet": 256, "mmnet": 34, "cva_fpf": 34, "mol": 32}
PAPER_CLASSES = {"htnet": 3, "ststnet": 3}  # MEGC2019 composite classes; the two-frame and MOL papers use 5
COLUMNS = f"{'model':<9} {'config':<8} {'device':<6} {'batch':>5} {'params':>12} {'samples/s':>10} {'peak MB':>9}"


def _batch(keys: tuple[str, ...], b: int, classes: int, frames: int, num_aus: int, device: Any) -> dict[str, Any]:
    import torch

    shapes = {
        "flow28": (b, 3, 28, 28), "points5": None, "onset224": (b, 3, 224, 224), "apex224": (b, 3, 224, 224),
        "frames128": (b, frames, 128, 128), "flows128": (b, frames - 1, 2, 128, 128), "landmarks68": None,
        "aus": (b, num_aus),
    }  # fmt: skip
    out: dict[str, Any] = {}
    for key in keys:
        if key == "label":
            out[key] = torch.arange(b) % classes
        elif key == "points5":
            pts = [[9.0, 10.0], [19.0, 10.0], [14.0, 15.0], [10.0, 20.0], [18.0, 20.0]]
            out[key] = torch.tensor(pts).expand(b, 5, 2)
        elif key == "landmarks68":
            out[key] = torch.rand(b, frames, 68, 2) * 128
        else:
            out[key] = torch.rand(*shapes[key])
    return {k: v.to(device) for k, v in out.items()}


def _measure(name: str, config: str, batch_size: int, steps: int, device_name: str, threads: int) -> dict[str, Any]:
    import torch

    from mer.model.models import autocast_dtype, count_parameters, create_model, prepare_for_device, to_device_batch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    classes = PAPER_CLASSES.get(name, 5)
    model = prepare_for_device(create_model(name, config, num_classes=classes), device).train()
    params = count_parameters(model)
    frames = getattr(model, "frames", 8)
    num_aus = getattr(model, "num_aus", 21)
    cpu_batch = _batch(model.inputs + model.targets, batch_size, classes, frames, num_aus, "cpu")
    batch = to_device_batch(cpu_batch, model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    use_amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=use_amp):
            loss, _ = model.loss(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, cudnn autotune, lazy init
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # KiB on Linux
    elapsed = time.perf_counter() - start
    return {"params": params, "sps": batch_size * steps / elapsed, "peak": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["htnet", "ststnet", "mmnet", "cva_fpf", "mol"])
    parser.add_argument("--configs", nargs="+", default=["small"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the paper's batch size of each model")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = mp.get_context("spawn")
    print(COLUMNS)
    for name in args.models:
        for config in args.configs:
            bs = args.batch_size or PAPER_BATCH.get(name, 32)
            with ctx.Pool(1) as pool:
                try:
                    r = pool.apply(_measure, (name, config, bs, args.steps, device, args.threads))
                except Exception as err:  # noqa: BLE001 - report the row, keep benchmarking the others
                    print(f"{name:<9} {config:<8} {device:<6} {bs:>5} failed: {type(err).__name__}: {err}")
                    continue
            print(f"{name:<9} {config:<8} {device:<6} {bs:>5} {r['params']:>12,} {r['sps']:>10.2f} {r['peak']:>9.0f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
