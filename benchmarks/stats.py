"""Cost and stability of the subject-bootstrap intervals and paired tests (mer.model.training.stats).

    python benchmarks/stats.py [--subjects 68] [--samples 442] [--resamples 500 1000 2000 4000 8000] [--seeds 20]

Synthetic predictions of a benchmark row's shape (the MEGC2019 composite: 68 subjects, 442 samples, 3 classes, three
source datasets, about 0.75 accuracy; a second run that agrees with the first on most samples). Prints, per resample
count B, on ONE core (torch/BLAS threads are not involved: NumPy + SciPy):

* the seconds per table row (the least of three timings): intervals of UF1/UAR/accuracy pooled and per dataset (`metric_intervals`) plus one
  paired comparison to a baseline row (`paired_difference`: bootstrap interval + permutation p-value);
* how stable the bounds are: over `--seeds` bootstrap seeds, the largest standard deviation of any bound and the
  largest distance of a bound from its median (what the default B must keep under 0.005).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402 - after the thread settings
import pandas as pd  # noqa: E402

from mer.model.config import IntervalConfig  # noqa: E402
from mer.model.training.stats import metric_intervals, paired_difference  # noqa: E402

CLASSES = ["negative", "positive", "surprise"]


def synthetic_run(subjects: int, samples: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two runs' pooled predictions over the same samples (run B agrees with A on ~85 % of them)."""
    rng = np.random.default_rng(seed)
    datasets = np.array(["casme2", "samm", "smic"])[np.arange(subjects) % 3]
    subject = rng.integers(0, subjects, samples)
    subject[:subjects] = np.arange(subjects)  # every subject has a sample
    label = rng.choice(3, samples, p=[0.56, 0.23, 0.21])
    pred_a = np.where(rng.random(samples) < 0.75, label, rng.integers(0, 3, samples))
    pred_b = np.where(rng.random(samples) < 0.85, pred_a, rng.integers(0, 3, samples))
    frame = pd.DataFrame({"sample_id": [f"s{i}" for i in range(samples)],
                          "subject": [f"{datasets[s]}/sub{s:02d}" for s in subject],
                          "dataset": datasets[subject], "label": label})
    return frame.assign(pred=pred_a), frame.assign(pred=pred_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=68)
    parser.add_argument("--samples", type=int, default=442)
    parser.add_argument("--resamples", type=int, nargs="+", default=[500, 1000, 2000, 4000, 8000])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    a, b = synthetic_run(args.subjects, args.samples)
    print(f"{args.subjects} subjects, {args.samples} samples, {len(CLASSES)} classes; one core; "
          f"stability over {args.seeds} seeds")
    print(f"{'B':>6} {'s per row':>10} {'max sd of a bound':>18} {'max |bound - median|':>21}")
    for resamples in args.resamples:
        cfg = IntervalConfig(resamples=resamples)
        paired_difference(a, b, CLASSES, cfg)  # warm-up: SciPy's imports are not a row's cost
        times = []
        for _ in range(3):
            start = time.perf_counter()
            metric_intervals(a, CLASSES, cfg)
            paired_difference(a, b, CLASSES, cfg)
            times.append(time.perf_counter() - start)
        per_row = min(times)  # the machine is shared: the least disturbed of three
        bounds = []
        for seed in range(args.seeds):
            seeded = IntervalConfig(resamples=resamples, seed=seed)
            values = metric_intervals(a, CLASSES, seeded)
            paired = paired_difference(a, b, CLASSES, seeded)
            values |= {f"d_{m}_{k}": v[k] for m, v in paired.items() for k in ("ci_low", "ci_high")}
            bounds.append(values)
        table = pd.DataFrame(bounds)
        sd = float(table.std().max())
        spread = float((table - table.median()).abs().max().max())
        print(f"{resamples:>6} {per_row:>10.3f} {sd:>18.4f} {spread:>21.4f}")


if __name__ == "__main__":
    main()
