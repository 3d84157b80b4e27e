"""`mer preprocess`: the ingested annotation table -> the per-sample cache, samples processed in parallel Ray tasks.

Each sample is one single-threaded Ray task (`mer_model.preprocess.process_row`), so throughput scales with the CPUs
Ray has: local Ray by default (`preprocess.num_workers` CPUs, 0 = all), or a cluster with `preprocess.ray_address`
(then the data root and the cache directory must be on storage every node sees; workers return the npz bytes and
only the driver writes). A sample that fails (missing/corrupt frame, too short a clip, apex outside onset..offset, no
face and no landmarks) is recorded in index.csv and manifest.json and logged; the rest completes. The stage fails
only when no sample at all could be processed.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.common import add_params_arguments, check_output_dir, params_from_args
from mer_model.config import Params, PreprocessConfig
from mer_model.data.schema import read_table
from mer_model.errors import DataError
from mer_model.preprocess.cache import Cache, SampleResult, process_row
from components.ray_session import connect_ray

log = logging.getLogger(__name__)


def run_parallel(rows: Sequence[dict[str, Any]], cfg: PreprocessConfig, root: Path, cache: Cache) -> list[SampleResult]:
    """Process `rows` as Ray tasks, writing each finished sample as it arrives, with a done/total progress bar.

    A task whose worker process dies (e.g. a native crash) is retried once by Ray, then recorded as failed.
    """
    import ray
    from tqdm import tqdm

    started = not ray.is_initialized()
    connect_ray(cfg.ray_address, cfg.num_workers)
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(process_row)
        cfg_ref = ray.put(cfg)
        pending = {task.remote(row, cfg_ref, root): str(row["sample_id"]) for row in rows}
        results: list[SampleResult] = []
        with tqdm(total=len(pending), desc="preprocess", unit="clip") as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                sample_id = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayError as err:
                    result = SampleResult(sample_id, "failed", f"sample {sample_id}: worker failed: {err}".splitlines()[0])
                cache.write(result)
                results.append(result)
                bar.update(1)
        return results
    finally:
        if started:
            ray.shutdown()


def _class_names(ingested: Path) -> list[str] | None:
    """Class names from ingest's summary beside the table (the training store reads them from our manifest)."""
    summary = ingested.with_name(f"{ingested.stem}.summary.json")
    if not summary.is_file():
        return None
    return json.loads(summary.read_text()).get("classes")


def preprocess(params: Params) -> dict[str, Any]:
    """Run the stage; returns the manifest written to `<preprocess.out>/manifest.json`."""
    cfg = params.preprocess
    check_output_dir(cfg.out, "preprocess.out")  # fail now, not after hours of TV-L1
    ingested = Path(params.data.ingested)
    table = read_table(ingested)
    cache = Cache(cfg.out)
    todo, reused = cache.plan(table, cfg)
    log.info("preprocess: %d samples, %d cached, %d to compute -> %s", len(table), len(reused), len(todo), cfg.out)
    rows = table.set_index("sample_id", drop=False).loc[todo].to_dict("records") if todo else []
    results = run_parallel(rows, cfg, Path(params.data.root), cache) if rows else []
    extra = {"data_source": params.data.source, "ingested": str(ingested), "class_names": _class_names(ingested)}
    manifest = cache.finish(table, results, reused, cfg, extra)
    counts = manifest["counts"]
    for failure in manifest["failures"]:
        log.warning("failed: %s", failure["error"])
    log.info("preprocess: %d ok (%s), %d failed, %d computed, %d reused", counts["ok"],
             ", ".join(f"{k} {v}" for k, v in sorted(counts["face"].items())) or "-", counts["failed"],
             counts["computed"], counts["reused"])
    if counts["ok"] == 0:
        raise DataError("no sample could be preprocessed (see index.csv)", file=str(cache.index_path))
    return manifest


def _run(args: argparse.Namespace) -> int:
    preprocess(params_from_args(args))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("preprocess", help="align faces, TV-L1 flow, strain, landmarks -> per-sample cache")
    add_params_arguments(parser)
    parser.set_defaults(func=_run)
