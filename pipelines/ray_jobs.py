"""The LOSO driver (and `mer preprocess`) as a Ray job on a cluster (Ray Jobs SDK,
`ray.job_submission.JobSubmissionClient`): what the Kubeflow tune and preprocess steps do when they are given the
cluster's job server (`ray_dashboard`, http://host:8265).

Ray's docs advise against driving Ray Tune through Ray Client: the driver would run in the step's pod and lose the
experiment when the pod or its connection goes. As a job the driver runs on the head next to the GCS, and the step
only submits it, copies its log into the step's log and waits. The job's submission id is derived from the run id
and the resolved parameters, so a retried step finds the job its first attempt submitted and attaches to it instead
of starting the experiment twice.

Every failure is one line naming the setting or the job: an unreachable job server (`ray_dashboard`), a job that
ends FAILED or STOPPED (its id, status, Ray's message and the last line of its log), or one still running when the
step's time is up (`ray_job_timeout_s`; the job is then stopped, so nothing runs unattended).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Any

from mer.components.ray_session import check_ray_address
from mer.model.errors import ServiceError

log = logging.getLogger(__name__)

DASHBOARD_KEY = "ray_dashboard"  # the pipeline parameter naming the job server
TIMEOUT_KEY = "ray_job_timeout_s"  # ... and the one bounding the wait for the job
DEFAULT_TIMEOUT_S = 86400  # a day: a full LOSO search on a small GPU cluster fits comfortably
STOP_WAIT_S = 30.0  # after a stop request: how long the job may take to end


def check_dashboard(address: str, key: str = DASHBOARD_KEY) -> None:
    """`address` is an http(s)://host:port URL accepting TCP connections (within seconds, before the SDK's own
    retries); ServiceError naming `key` otherwise."""
    if not address.startswith(("http://", "https://")):
        raise ServiceError(f"{key}: {address!r}: expected the Ray job server's URL, http://host:port (port 8265)")
    check_ray_address(address, key)


def submission_id(run_id: str, experiment: dict[str, Any], step: str = "tune") -> str:
    """The job's id: the step, the pipeline run (or the cached steps' data key) and a digest of the resolved
    parameters, so the same run retried gets the same id and another experiment in the same run (different
    parameters) another one."""
    digest = hashlib.sha256(json.dumps(experiment, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"mer-{step}-{run_id}-{digest}"


class RayJobs:
    """One Ray job server, through the Jobs SDK; every error is a ServiceError naming `key`."""

    def __init__(self, address: str, key: str = DASHBOARD_KEY) -> None:
        check_dashboard(address, key)
        from ray.job_submission import JobSubmissionClient  # after the check: Ray's import takes seconds

        self.address = address
        try:
            self.client = JobSubmissionClient(address)
        except Exception as err:  # noqa: BLE001 - the SDK raises ConnectionError, RuntimeError, ValueError...
            raise ServiceError(f"{key}: {address}: not a Ray job server ({_first_line(err)})") from None

    def status(self, job_id: str) -> str | None:
        """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), None when no such job exists."""
        found = [job for job in self.client.list_jobs() if job.submission_id == job_id]
        return str(found[0].status.value) if found else None

    def submit(self, job_id: str, entrypoint: str, env: dict[str, str]) -> None:
        """Submit `entrypoint` (a shell command run on the head) as `job_id`; a job of that id that FAILED or was
        STOPPED is deleted first (its record only: what it wrote stays, so the driver resumes from it)."""
        if self.status(job_id) in ("FAILED", "STOPPED"):
            self.client.delete_job(job_id)
        # No CPU or GPU asked for the driver: Ray then runs it on the head, which has num-cpus 0 on KubeRay.
        self.client.submit_job(entrypoint=entrypoint, submission_id=job_id,
                               runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", **env}})
        log.info("submitted Ray job %s to %s: %s", job_id, self.address, entrypoint)

    def wait(self, job_id: str, timeout_s: float) -> None:
        """Copy the job's log into this process's log as it comes and return when the job SUCCEEDED; ServiceError
        (job id, status, Ray's message, the log's last line) when it FAILED or was STOPPED, or when it is still
        running after `timeout_s` seconds (it is stopped then)."""
        deadline = time.monotonic() + timeout_s
        try:
            asyncio.run(asyncio.wait_for(self._follow(job_id), timeout=timeout_s))
        except TimeoutError:
            pass
        except Exception as err:  # noqa: BLE001 - a broken log stream (websocket) must not end the wait
            log.warning("Ray job %s: its log stream broke (%s); waiting on its status alone", job_id, _first_line(err))
        # The stream ends with the job; the status follows within a second (or, after a broken stream, by the end).
        _wait_for(lambda: self.status(job_id) not in ("PENDING", "RUNNING"), max(0.0, deadline - time.monotonic()))
        status = self.status(job_id)
        if status == "SUCCEEDED":
            log.info("Ray job %s SUCCEEDED", job_id)
            return
        if status in ("PENDING", "RUNNING"):
            self.client.stop_job(job_id)
            _wait_for(lambda: self.status(job_id) not in ("PENDING", "RUNNING"), STOP_WAIT_S)
            raise ServiceError(f"{TIMEOUT_KEY}: Ray job {job_id} still {status} after {timeout_s:g} s, stopped; "
                               f"last log line: {self.last_line(job_id)}")
        info = self.client.get_job_info(job_id)
        message = (info.message or "").strip().splitlines()
        raise ServiceError(f"Ray job {job_id} {status}" + (f" ({message[0]})" if message else "")
                           + f"; last log line: {self.last_line(job_id)}")

    async def _follow(self, job_id: str) -> None:
        async for chunk in self.client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                if line.strip():
                    log.info("[%s] %s", job_id, line)

    def last_line(self, job_id: str) -> str:
        lines = [line for line in self.client.get_job_logs(job_id).splitlines() if line.strip()]
        return lines[-1].strip() if lines else "(empty log)"


def _wait_for(condition: Any, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < end:
        time.sleep(1.0)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
