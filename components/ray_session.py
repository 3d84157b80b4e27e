"""One way to reach Ray for every component: a cluster when an address is given, else a local loopback-only Ray."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS, e.g. inside `ray job submit`); otherwise start local Ray bound to 127.0.0.1.

    Local Ray gets `num_cpus` (None = every core) and no dashboard. Ray 2.60 replaces a loopback node address with the
    machine's unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so that is set for the local case.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False, logging_level=logging.WARNING)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(num_cpus=num_cpus or None, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=False, logging_level=logging.WARNING)
    log.info("Ray cluster resources: %s", ray.cluster_resources())
