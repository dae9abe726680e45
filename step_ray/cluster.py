"""Connecting a job to Ray.

Under `ray job submit` (or with RAY_ADDRESS set) a job joins that cluster. Otherwise it starts a local,
single-node instance advertised on the loopback address, so its dashboard, dashboard agent and
Prometheus metrics endpoint listen on 127.0.0.1 only. (Ray replaces a requested 127.0.0.1 node address
by the host's address, and then binds the metrics endpoint to every interface, unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, its switch for single-node instances.) A remote cluster's dashboard
is reached through a port-forward (`ray dashboard cluster.yaml`), not an open port.
"""
from __future__ import annotations

import os

LOCALHOST = "127.0.0.1"
_SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(**kwargs):
    import ray

    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        return ray.init(address=address, log_to_driver=True, **kwargs)
    os.environ.setdefault(_SINGLE_NODE, "0")  # read by the processes Ray starts
    if os.environ[_SINGLE_NODE] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read here when `ray` was imported before this call
    return ray.init(_node_ip_address=LOCALHOST, dashboard_host=LOCALHOST, log_to_driver=True, **kwargs)
