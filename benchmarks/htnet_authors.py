"""HTNet's paper configuration: our training step against the authors' own model, side by side in one process.

The authors' model is built at run time from a checkout the user provides (github.com/wangzhifengharrison/HTNet:
its `Model.py`, which needs `einops`); nothing of it is in this repository. Both models get the same batch (ours
reads flow28 + points5 and tiles the four regions itself, theirs reads the tiled 28x28 BGR 0..255 map its data
script builds), the same loss (cross-entropy) and optimizer (Adam, lr 5e-5, the authors' recipe: ours through the
trainer's `make_optimizer`, theirs as their main_HTNet.py builds it), and their steps alternate (ours, theirs, ours,
...) after one warm-up step each, so a machine shared with other work slows both alike. Printed: seconds per step
(median) of each and their ratio.

    python benchmarks/htnet_authors.py --authors /path/to/HTNet --batch 64 --steps 3 --threads 2
    python benchmarks/htnet_authors.py --batch 8   # ours only (the authors' row is skipped without --authors)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def authors_model(checkout: Path) -> Any:
    """The authors' HTNet (paper configuration of their main_HTNet.py), built from their Model.py."""
    path = checkout / "Model.py"
    if not path.is_file():
        raise SystemExit(f"--authors {checkout}: no Model.py (a checkout of github.com/wangzhifengharrison/HTNet)")
    spec = importlib.util.spec_from_file_location("htnet_authors_model", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        raise SystemExit(f"{path}: needs {err.name} (pip install {err.name})") from None
    return module.HTNet(image_size=28, patch_size=7, dim=256, heads=3, num_hierarchies=3, block_repeats=(2, 2, 10),
                        num_classes=3)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", type=Path, help="checkout of github.com/wangzhifengharrison/HTNet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from mer.model.config import TrainConfig
    from mer.model.models import count_parameters, create_model
    from mer.model.training.trainer import make_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch
    flow = torch.rand(b, 3, 28, 28)
    points = torch.tensor([[9.0, 10.0], [19.0, 10.0], [14.0, 15.0], [10.0, 20.0], [18.0, 20.0]]).expand(b, 5, 2)
    label = torch.arange(b) % 3
    ours = create_model("htnet", "paper", num_classes=3).train()
    batch = {"flow28": flow, "points5": points, "label": label}
    tiled = ours.prepare_input(batch).detach()  # what the authors' data script feeds their model
    models: dict[str, Any] = {"ours": ours}
    if args.authors is not None:
        models["authors"] = authors_model(args.authors).train()
    # Ours: the trainer's optimizer for the recipe (mer.model.training.trainer.make_optimizer); theirs: their
    # main_HTNet.py's torch.optim.Adam(model.parameters(), lr=learning_rate).
    optimizers = {"ours": make_optimizer(ours.parameters(), TrainConfig(optimizer="adam", lr=5e-5))}
    if "authors" in models:
        optimizers["authors"] = torch.optim.Adam(models["authors"].parameters(), lr=5e-5)

    def step(name: str) -> tuple[float, float]:
        """(forward + backward seconds, optimizer-step seconds) of one training step."""
        start = time.perf_counter()
        model = models[name]
        if name == "ours":
            loss, _ = model.loss(model(batch), batch)
        else:
            loss = F.cross_entropy(model(tiled), label)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        middle = time.perf_counter()
        optimizers[name].step()
        return middle - start, time.perf_counter() - middle

    for name in models:  # warm-up
        step(name)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(args.steps):
        for name in models:
            times[name].append(step(name))
    out = {name: statistics.median(sum(t) for t in ts) for name, ts in times.items()}
    print(f"HTNet paper configuration, batch {b}, {args.threads} threads, {args.steps} alternating steps each")
    for name, model in models.items():
        model_s = statistics.median(t[0] for t in times[name])
        optim_s = statistics.median(t[1] for t in times[name])
        print(f"  {name:<8} {count_parameters(model):>12,} parameters  {out[name]:8.3f} s/step  (median forward + "
              f"backward {model_s:.2f} s, optimizer {optim_s:.2f} s; steps: "
              f"{', '.join(f'{sum(t):.2f}' for t in times[name])})")
    if "authors" in out:
        print(f"  ours / authors speed: {out['authors'] / out['ours']:.2f}x")
    else:
        print("  authors: skipped (no --authors checkout)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
