"""One way to reach Ray for every component: a cluster when an address is given, else a local loopback-only Ray.

Every failure to reach or start Ray is one line naming the setting (exit code 2 from the CLI), within seconds: an
unreachable address is found by a plain TCP connection before `ray.init`, which would otherwise retry for minutes.
"""

from __future__ import annotations

import logging
import os
import socket

from mer_model.errors import ServiceError

log = logging.getLogger(__name__)

CONNECT_CHECK_S = 5.0  # one TCP connection attempt to a cluster address


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


def connect_ray(address: str | None = None, num_cpus: int | None = None, key: str = "tune.ray_address") -> None:
    """Join `address` (the setting `key`, or RAY_ADDRESS, e.g. inside `ray job submit`); otherwise start local Ray
    bound to 127.0.0.1.

    Local Ray gets `num_cpus` (None = every core) and no dashboard; components/__init__.py sets the variable that makes
    Ray keep the loopback node address.
    """
    import ray

    if ray.is_initialized():
        return
    if not address and os.environ.get("RAY_ADDRESS"):
        address, key = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    try:
        if address:
            check_ray_address(address, key)
            ray.init(address=address, configure_logging=False, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus or None, include_dashboard=False, _node_ip_address="127.0.0.1",
                     configure_logging=False, logging_level=logging.WARNING)
    except ServiceError:
        raise
    except Exception as err:  # noqa: BLE001 - Ray raises many kinds here (ConnectionError, RuntimeError, auth, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        where = f"{key}: {address}: cannot join the Ray cluster" if address else "local Ray: failed to start"
        raise ServiceError(f"{where} ({type(err).__name__}: {first})") from None
    log.info("Ray cluster resources: %s", ray.cluster_resources())
