"""One way to reach Ray for every component: a cluster when an address is given, else a private local Ray.

Every failure to reach or start Ray is one line naming the setting (exit code 2 from the CLI), within a bounded time:
an unreachable address is found by a plain TCP connection before `ray.init`, which would otherwise retry for minutes.

A local Ray is a head of this command's own (`start_local_ray`): `ray start --head --block` bound to 127.0.0.1 with
every port free and explicit and its own temp dir. `ray.init()` cannot be used for that: it cannot move the dashboard
agent off its fixed default port (52365), so a second `mer` command (or any other Ray on the host) collided with the
first and died after ~70 s with a Ray traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from mer.model.errors import ServiceError

log = logging.getLogger(__name__)

CONNECT_CHECK_S = 5.0  # one TCP connection attempt to a cluster address
LOCAL_START_TIMEOUT_S = 300.0  # a busy two-core machine takes 20-90 s to start a head; beyond this it is stuck
LOOPBACK = "127.0.0.1"
# An ephemeral loopback cluster of one process tree: no auth token (every process that joins must use the same mode,
# so the joining process gets it too), no usage reporting.
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
_PR_SET_PDEATHSIG = 1


def check_ray_address(address: str, key: str) -> None:
    """`address` (`host:port` of the GCS, or `ray://host:port` of Ray Client) accepts a TCP connection; "auto" (the
    cluster this machine belongs to, found by Ray itself) is left to `ray.init`. ServiceError naming `key`."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ServiceError(f"{key}: {address!r}: expected host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_CHECK_S):
            pass
    except OSError as err:
        raise ServiceError(f"{key}: {address}: no Ray cluster reachable ({err.strerror or err})") from None


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started it dies, even by SIGKILL, so a killed
    `mer` command leaves no Ray behind (`ray start --block` stops its node on SIGTERM)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class LocalRay:
    """A running private Ray head (`start_local_ray`). `stop()` ends its whole process session and removes its temp
    dir; it is idempotent."""

    address: str  # GCS address, what `ray.init(address=...)` and RAY_ADDRESS take
    dashboard: str | None  # http URL of the job server, when started with one
    temp_dir: Path
    process: subprocess.Popen

    @property
    def log(self) -> Path:
        return self.temp_dir / "head.log"

    def stop(self, timeout: float = 2.0) -> None:
        """SIGTERM to the head's whole session, SIGKILL after `timeout` s: `ray start --block` was not seen to end
        on SIGTERM within 30 s, so a longer grace only delayed every command's exit (by 10 s before); the private
        head holds nothing to flush, and its temp dir is removed here."""
        proc = self.process
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ray_cli() -> str:
    """The `ray` command of this interpreter's environment (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise ServiceError("local Ray: no `ray` command beside this Python or on PATH (install ray[default])")
    return found


def _log_tail(path: Path, lines: int = 1) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(line.strip() for line in text[-lines:]) or "no output"


def start_local_ray(num_cpus: int | None = None, dashboard: bool = False, env: dict[str, str | None] | None = None,
                    timeout: float = LOCAL_START_TIMEOUT_S, options: Mapping[str, str] | None = None) -> LocalRay:
    """Start `ray start --head --block` in its own process session: loopback only, every port free and explicit
    (GCS, node manager, object manager, Ray Client server, dashboard agent listen/gRPC, runtime-env agent, metrics),
    its own short temp dir (Ray's socket paths must stay under 108 characters), `num_cpus` (None = every core).

    `dashboard` adds the dashboard (the job server of `ray job submit`) on a free port. `env` is added to the head's
    environment (None removes a variable), which its workers and job drivers inherit. `options` are more `ray start`
    options (name without the dashes -> value, e.g. "autoscaling-config"), replacing a default of the same name (e.g.
    "port": a GCS port chosen by the caller). Returns once the runtime
    started (and the dashboard answers); raises ServiceError in one line with the log's last line when `ray start`
    exits or is not ready within `timeout` seconds, after ending what it started. A start that Ray itself gave up
    because the machine was busy is tried again once (BUSY_START).
    """
    deadline = time.monotonic() + timeout
    try:
        return _start_head(num_cpus, dashboard, env, timeout, deadline, options)
    except ServiceError as err:
        if BUSY_START not in str(err) or time.monotonic() > deadline:
            raise
    log.warning("local Ray: the head did not come up in Ray's own time (a busy machine); trying once more")
    return _start_head(num_cpus, dashboard, env, timeout, deadline, options)


# Ray waits a fixed 30 s for the head's raylet to register (ray/_private/node.py) and then `ray start` exits 1 with
# this message: on a busy machine (several Ray heads starting at once on two cores) nothing is wrong but time.
BUSY_START = "timed out during startup"


def _start_head(num_cpus: int | None, dashboard: bool, env: dict[str, str | None] | None, timeout: float,
                deadline: float, options: Mapping[str, str] | None) -> LocalRay:
    """One `ray start` attempt of start_local_ray, ready by `deadline` (time.monotonic)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="mer-ray-", dir="/tmp"))
    ports = {name: free_port() for name in ("port", "node-manager-port", "object-manager-port",
                                            "ray-client-server-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                            "metrics-export-port")}
    dash_port = free_port() if dashboard else None
    chosen = {**{name: str(port) for name, port in ports.items()}, **(options or {})}
    cmd = [_ray_cli(), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
           *[f"--{name}={value}" for name, value in chosen.items()], f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    cmd += ([f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dash_port}"] if dashboard
            else ["--include-dashboard=false"])
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    changes: dict[str, str | None] = {"RAY_ADDRESS": None, **LOCAL_RAY_ENV, **(env or {})}
    child_env = {k: v for k, v in (os.environ | changes).items() if v is not None}
    with (temp_dir / "head.log").open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env, start_new_session=True,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl only, no locks taken
    head = LocalRay(f"{LOOPBACK}:{chosen['port']}", f"http://{LOOPBACK}:{dash_port}" if dashboard else None, temp_dir,
                    proc)
    try:
        while not _ready(head):
            if proc.poll() is not None:
                raise ServiceError(f"local Ray: `ray start` exited with {proc.returncode} ({_log_tail(head.log)})")
            if time.monotonic() > deadline:
                raise ServiceError(f"local Ray: not started within {timeout:g} s ({_log_tail(head.log)})")
            time.sleep(0.2)
    except BaseException:
        head.stop()
        raise
    log.info("local Ray head %s (temp dir %s)", head.address, temp_dir)
    return head


def _ready(head: LocalRay) -> bool:
    if "Ray runtime started" not in head.log.read_text(errors="replace"):
        return False
    if head.dashboard is None:
        return True
    try:
        with urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


AUTH_REFUSED = ("InvalidAuthToken", "Unauthenticated", "Missing authorization header")


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[Path]:
    """File descriptor 2 redirected to a temp file while the block runs (yields its path): Ray's C++ client logs a
    warning per second while a cluster refuses it (e.g. ~20 lines of "InvalidAuthToken" before `ray.init` gives up),
    which would bury the one line the user needs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.NamedTemporaryFile(prefix="mer-rayinit-", suffix=".log") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield Path(capture.name)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _join_error(key: str, address: str | None, err: Exception, native: str) -> str:
    """One line for a failed `ray.init(address=...)`: a refused auth token said as such (Ray only says it in its
    C++ log), else Ray's own first line."""
    if any(marker in native or marker in str(err) for marker in AUTH_REFUSED):
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        return (f"{key}: {address}: the Ray cluster refused this process's authentication (RAY_AUTH_MODE={mode}); "
                "give it the cluster's token (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{key}: {address}: cannot join the Ray cluster ({type(err).__name__}: {first})"


_private_head: LocalRay | None = None  # the head connect_ray started for this process, if it did


def _connected_address() -> str | None:
    """The GCS address this process's Ray worker is connected to."""
    import ray

    return ray.get_runtime_context().gcs_address


def connect_ray(address: str | None = None, num_cpus: int | None = None, key: str = "tune.ray_address") -> bool:
    """Join `address` (the setting `key`, or RAY_ADDRESS, e.g. inside `ray job submit`); otherwise start a private
    local Ray head (`start_local_ray`, `num_cpus` None = every core) that ends with this process. Returns True when
    this process is on such a private head (a cluster of one node that never grows), False on a cluster it joined.

    Raises ServiceError (one line naming `key`, or "local Ray") when the cluster cannot be reached or joined, e.g. it
    refuses the auth token, or the local head does not start.
    """
    import ray

    global _private_head
    if ray.is_initialized():
        return _private_head is not None and _private_head.address == _connected_address()
    if not address and os.environ.get("RAY_ADDRESS"):
        address, key = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    said = ""  # what Ray's C++ side wrote to stderr while joining
    try:
        if address:
            check_ray_address(address, key)
        else:
            head = start_local_ray(num_cpus or None)
            atexit.register(head.stop)  # registered before ray.init's own shutdown hook, so it runs after it
            os.environ.update(LOCAL_RAY_ENV)  # the joining process must use the head's auth mode
            address, key = head.address, "local Ray"
            _private_head = head
        with _native_stderr_captured() as native:
            try:
                ray.init(address=address, configure_logging=False, logging_level=logging.WARNING)
            finally:
                said = native.read_text(errors="replace")
        sys.stderr.write(said)  # joined: what Ray's C++ side said is the user's to see
    except ServiceError:
        raise
    except Exception as err:  # noqa: BLE001 - Ray raises many kinds here (ConnectionError, RuntimeError, auth, ...)
        raise ServiceError(_join_error(key, address, err, said)) from None
    log.info("Ray cluster resources: %s", ray.cluster_resources())
    return _private_head is not None and _private_head.address == address

