"""`mer preprocess`: the ingested annotation table -> the per-modality cache, samples processed in parallel Ray tasks.

Only the modalities asked for are computed (`preprocess.modalities`, by default what `model` reads: its inputs and
loss targets, from the model registry), and of those only what the cache lacks or whose inputs changed
(`mer.model.preprocess.cache`). Each sample with anything to compute is one single-threaded Ray task
(`mer.model.preprocess.process_row`), so throughput scales with the CPUs Ray has: local Ray by default
(`preprocess.num_workers` CPUs, 0 = all), or a cluster with `preprocess.ray_address` (then the data root and the
cache directory must be on storage every node sees; workers return the npz bytes and only the driver writes).

A sample whose modality fails (missing/corrupt frame, frame size changing inside the clip, zero motion, a grey or
flat flow map, NaN/inf, too short a clip, no face and no landmarks) is recorded with its reason in index.csv,
modalities.csv and manifest.json (counted per reason) and logged; the rest completes and every finished entry is
written as it arrives. With `data.strict` the stage then fails with the first failure's line (exit code 2; what was
finished stays cached). Without it, the stage fails only when no sample at all is usable.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mer.components.common import check_output_dir
from mer.components.settings import Params
from mer.model.config import PreprocessConfig
from mer.model.data.schema import read_table
from mer.model.errors import DataError
from mer.model.io import read_json
from mer.model.preprocess.cache import Cache, failed_result, process_row
from mer.model.preprocess.modalities import requested
from mer.components.ray_session import connect_ray
from mer.components.settings import Params

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # without a terminal: a progress line at most this often


def run_parallel(work: Sequence[tuple[dict[str, Any], tuple[str, ...]]], cfg: PreprocessConfig, root: Path,
                 cache: Cache) -> None:
    """Process (row, modalities) pairs as Ray tasks, writing each finished sample as it arrives, with a done/total
    progress bar on a terminal (elsewhere, e.g. under `dvc repro` into a log, a line every PROGRESS_EVERY_S seconds
    and one at the end: a redrawn bar is one unreadable line there). A task whose worker process dies (e.g. a native
    crash) is retried once by Ray, then recorded as failed."""
    import ray
    from tqdm import tqdm

    started = not ray.is_initialized()
    connect_ray(cfg.ray_address, cfg.num_workers, key="preprocess.ray_address")
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(process_row)
        cfg_ref = ray.put(cfg)
        pending = {task.remote(row, cfg_ref, root, modalities): (str(row["sample_id"]), modalities)
                   for row, modalities in work}
        interactive, total, finished = sys.stderr.isatty(), len(pending), 0
        start = last = time.monotonic()
        with tqdm(total=len(pending), desc="preprocess", unit="clip", disable=not interactive) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                sample_id, modalities = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayError as err:
                    line = f"sample {sample_id}: worker failed: {err}".splitlines()[0]
                    result = failed_result(sample_id, modalities, line, "worker failed")
                cache.write(result)
                bar.update(1)
                finished += 1
                now = time.monotonic()
                if not interactive and (now - last >= PROGRESS_EVERY_S or not pending):
                    last = now
                    log.info("preprocess: %d/%d clips done, elapsed %s", finished, total,
                             tqdm.format_interval(now - start))
    finally:
        if started:
            ray.shutdown()


def _class_names(ingested: Path) -> list[str] | None:
    """Class names from ingest's summary beside the table (the training store reads them from our manifest); a
    corrupt summary is named in one line."""
    summary = ingested.with_name(f"{ingested.stem}.summary.json")
    if not summary.is_file():
        return None
    return read_json(summary, "ingest summary (re-run `mer ingest`)").get("classes")


def preprocess(params: Params) -> dict[str, Any]:
    """Run the stage; returns the manifest written to `<preprocess.out>/manifest.json`."""
    cfg = params.preprocess
    modalities = requested(cfg, params.model)  # validates the model too: fail now, not after the work
    check_output_dir(cfg.out, "preprocess.out")  # fail now, not after hours of TV-L1
    ingested = Path(params.data.ingested)
    table = read_table(ingested)
    class_names = _class_names(ingested)
    cache = Cache(cfg.out)
    todo = cache.plan(table, cfg, modalities)
    log.info("preprocess: %d samples x %s; %d samples to compute (%d entries) -> %s", len(table),
             "+".join(modalities), len(todo), sum(len(m) for m in todo.values()), cfg.out)
    rows = table.set_index("sample_id", drop=False)
    work = [(rows.loc[sid].to_dict(), todo[sid]) for sid in todo]
    if work:
        run_parallel(work, cfg, Path(params.data.root), cache)
    extra = {"data_source": params.data.source, "ingested": str(ingested), "class_names": class_names}
    manifest = cache.finish(table, cfg, modalities, extra)
    counts = manifest["counts"]
    for failure in manifest["failures"][:20]:
        log.warning("excluded: %s", failure["error"])
    log.info("preprocess: %d of %d samples have %s (%s); excluded %s; %d computed, %d reused; estimated %s",
             counts["ok"], counts["total"], "+".join(modalities),
             ", ".join(f"{k} {v}" for k, v in sorted(counts["face"].items())) or "-",
             ", ".join(f"{k}: {v}" for k, v in counts["excluded"].items()) or "none", counts["computed"],
             counts["reused"], ", ".join(f"{k} {v}" for k, v in counts["estimated"].items()) or "nothing")
    if params.data.strict and manifest["failures"]:
        first = manifest["failures"][0]
        raise DataError(f"data.strict: {counts['failed']} samples excluded; first: {first['error']}",
                        file=str(cache.index_path))
    if counts["ok"] == 0:
        raise DataError("no sample could be preprocessed (see index.csv)", file=str(cache.index_path))
    return manifest
