"""The optimism of a recipe search: the same search scored the plain way and nested per outer fold, side by side.

    python benchmarks/nested.py          # STSTNet's search (benchmarks/recipes/ststnet-cpu.yaml)
    python benchmarks/nested.py --recipe benchmarks/recipes/mmnet-flow-cpu.yaml

Plain: `mer tune` as the recipe file is committed. Its trials are scored on inner validation subjects of
`tune.search_folds` folds of `train.split`; those subjects are test subjects of the other folds, and the chosen
configuration is then evaluated on every fold (`inner` protocol), so the subjects that chose the recipe also score it.
Nested: the same command with `tune.nested: true` (docs/experiments.md, "Nested search"): every outer fold runs the
search on its own training subjects only, then trains its choice and predicts its test subjects. Both predict every
sample of the collection on the same folds, so the difference nested - plain is paired: its subject-bootstrap interval
and permutation p-value (mer.model.training.stats) say whether the plain estimate is measurably optimistic.

Writes `--out` (results/nested/): results.md (the two estimates with 95% intervals, the paired difference, each outer
fold's choice) and results.json. Cost on two idle cores: printed at the end; runs/recipes/<recipe>/ keeps the Tune
state, so an interrupted run resumes. Runs Ray: one Ray-using job at a time on a two-core machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("benchmarks.nested")


def estimate(results: Any, intervals: Any) -> dict[str, Any]:
    """Pooled UF1 / UAR / accuracy of a run's results with their subject-bootstrap intervals."""
    from mer.model.training.metrics import flat_metrics

    flat, _ = flat_metrics(results.predictions, results.summary.class_names, intervals)
    return {k: {"value": flat[k], "ci_low": flat.get(f"{k}_ci_low"), "ci_high": flat.get(f"{k}_ci_high")}
            for k in ("uf1", "uar", "accuracy")}


def report(recipe: str, plain: Any, nested: Any, intervals: Any, minutes: dict[str, float]) -> dict[str, Any]:
    """results.json's content: both estimates, the paired difference nested - plain, and what each search chose."""
    from mer.model.training.stats import paired_difference

    difference = paired_difference(nested.predictions, plain.predictions, plain.summary.class_names, intervals,
                                   names=("nested", "plain"))
    return {
        "recipe": recipe, "model": plain.summary.model, "split": plain.summary.split,
        "samples": len(plain.predictions), "subjects": int(plain.predictions["subject"].nunique()),
        "search": plain.summary.search, "plain": estimate(plain, intervals), "nested": estimate(nested, intervals),
        "nested_minus_plain": difference, "plain_chosen": plain.summary.chosen,
        "nested_chosen_per_fold": nested.summary.chosen_per_fold, "minutes": minutes,
        "intervals": {"confidence": intervals.confidence, "resamples": intervals.resamples},
    }


def markdown(result: dict[str, Any], command: str) -> str:
    from mer.model.training.stats import NOT_DISTINGUISHABLE, format_difference, format_interval, verdict

    def cell(estimate: dict[str, Any]) -> str:
        return format_interval(estimate["value"], estimate["ci_low"], estimate["ci_high"])

    model = result["model"]
    lines = [
        f"# Nested vs plain recipe search: {model.get('name')}/{model.get('config')}",
        "",
        f"`{result['recipe']}`, {result['samples']} samples, {result['subjects']} subjects, split "
        f"`{result['split']}`, {result['search'].get('num_samples')} trials x {result['search'].get('search_folds')} "
        f"inner folds per search; {int(result['intervals']['confidence'] * 100)}% subject-bootstrap intervals "
        f"({result['intervals']['resamples']} resamples). Produced by:",
        "",
        f"    {command}",
        "",
        "| estimate | UF1 | UAR | accuracy | minutes |",
        "|---|---|---|---|---|",
        *(f"| {name} | {cell(result[key]['uf1'])} | {cell(result[key]['uar'])} | {cell(result[key]['accuracy'])} | "
          f"{result['minutes'][key]:.1f} |" for key, name in (("plain", "plain search (recipe chosen on subjects it "
                                                                "is then scored on)"),
                                                               ("nested", "nested search (each outer fold's recipe "
                                                                "chosen on its training subjects only)"))),
        "",
        "| nested - plain | difference [interval], permutation p |",
        "|---|---|",
    ]
    for metric, diff in result["nested_minus_plain"].items():
        text = format_difference(diff["diff"], diff["ci_low"], diff["ci_high"], diff["p"])
        said = verdict(diff["ci_low"], diff["ci_high"])
        lines.append(f"| {metric.upper()} | {text}{'' if said == NOT_DISTINGUISHABLE else f', nested {said}'} |")
    lines += ["", f"Plain search's choice: `{json.dumps(result['plain_chosen'], sort_keys=True)}`", "",
              "| outer fold | its search's choice | best mean inner validation score |", "|---|---|---|"]
    for fold, chosen in sorted(result["nested_chosen_per_fold"].items()):
        score = chosen.get("inner_score")
        lines.append(f"| {fold} | `{json.dumps(chosen.get('chosen', {}), sort_keys=True)}` | "
                     f"{'–' if score is None else f'{score:.4f}'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="benchmarks/recipes/ststnet-cpu.yaml",
                        help="a committed recipe search (parameters file with tune.num_samples > 0)")
    parser.add_argument("--out", default=str(REPO / "results" / "nested"))
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="extra params override")
    args = parser.parse_args()

    from mer.components.settings import load_params
    from mer.model.io import atomic_write
    from mer.model.training.results import read_results
    from mer.pipelines.cli import main as mer

    params = load_params(REPO / args.recipe if not Path(args.recipe).is_absolute() else Path(args.recipe))
    stem = Path(args.recipe).stem
    base = ["--params", args.recipe, *[x for s in args.overrides for x in ("-S", s)]]
    nested_dir = Path(params.tune.results).parent / "nested"
    nested = [*base, "-S", "tune.nested=true", "-S", f"tune.experiment=nested-{stem}",
              "-S", f"tune.results={nested_dir}", "-S", f"tune.storage_path={Path(params.tune.storage_path)}-nested"]
    for stage in ("ingest", "preprocess"):
        if code := mer([stage, *base]):
            return code
    minutes: dict[str, float] = {}
    for key, argv in (("plain", base), ("nested", nested)):
        start = time.monotonic()
        log.info("mer tune %s", " ".join(argv))
        if code := mer(["tune", *argv]):
            return code
        minutes[key] = (time.monotonic() - start) / 60
    result = report(args.recipe, read_results(params.tune.results), read_results(nested_dir),
                    params.evaluate.intervals, minutes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/nested.py", "--recipe", args.recipe,
                        *[x for s in args.overrides for x in ("-S", s)]])
    atomic_write(out / "results.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    atomic_write(out / "results.md", markdown(result, command))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
