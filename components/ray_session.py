"""One way to reach Ray for every component: a cluster when an address is given, else a local loopback-only Ray."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS, e.g. inside `ray job submit`); otherwise start local Ray bound to 127.0.0.1.

    Local Ray gets `num_cpus` (None = every core) and no dashboard; components/__init__.py sets the variable that makes
    Ray keep the loopback node address.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=False, logging_level=logging.WARNING)
    log.info("Ray cluster resources: %s", ray.cluster_resources())
