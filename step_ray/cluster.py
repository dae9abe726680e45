"""Connecting a job to Ray, and what one node of the cluster can hold.

A job joins a cluster only when RAY_ADDRESS names one: `ray job submit` sets it for the job's driver,
and a user may set it by hand (`RAY_ADDRESS=HEAD:6379`, or `auto` for the cluster `ray start` recorded
on this machine). Otherwise it starts a fresh local, single-node instance, even when `ray start` left
the address of a running cluster in Ray's temp folder (`<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`),
which a plain `ray.init()` would join. That instance is advertised on the loopback address, so its
dashboard, dashboard agent and Prometheus metrics endpoint listen on 127.0.0.1 only. (Ray replaces a
requested 127.0.0.1 node address by the host's address, and then binds the metrics endpoint to every
interface, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, its switch for single-node instances.) A remote
cluster's dashboard is reached through a port-forward (`ray dashboard cluster.yaml`), not an open port.

Ray places each actor, task or training worker whole on one node: a request for 1.75 CPUs waits forever
on a cluster of 1-CPU nodes, whatever the cluster's total. So resources are sized per node
(`alive_nodes`, `even_share`, `copies_that_fit`) and checked before a job waits on them
(step_ray.preflight.check_placement). Building a cluster by hand: infra/README.md.
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter
from typing import Mapping, Sequence

from step_ray import storage
from step_ray.config import verbose

LOCALHOST = "127.0.0.1"
_SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray keeps fractional resources to 4 decimals; a share rounded up there could exceed the node, so
# shares are rounded down to that.
_RESOURCE_STEPS = 10_000


def init_ray(**kwargs):
    import ray

    if ray.is_initialized():
        return None
    quiet = not verbose()
    if quiet:
        # Ray's INFO records (start-up, Ray Data's progress every few seconds) stay in the session's log
        # files; the console keeps warnings, errors and step_ray's own lines (`--verbose`: everything).
        kwargs.setdefault("logging_level", logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        os.environ.setdefault(_SINGLE_NODE, "0")  # read by the processes Ray starts
        if os.environ[_SINGLE_NODE] == "0":
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False  # read here when `ray` was imported before this call
        # address="local": without it ray.init() joins the cluster recorded in ray_current_cluster.
        context = ray.init(address="local", _node_ip_address=LOCALHOST, dashboard_host=LOCALHOST,
                           log_to_driver=True, **kwargs)
    if quiet and context.dashboard_url:
        print(f"[ray] {'joined ' + address if address else 'local instance'}, dashboard http://{context.dashboard_url}",
              flush=True)
    return context


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources (CPU, GPU, memory, custom ones) in the connected cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def copies_that_fit(bundle: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int:
    """How many copies of `bundle` (e.g. {"CPU": 1, "GPU": 1}) the nodes hold at once, each copy on one
    node. A bundle asking for nothing fits without limit: returned as a large number."""
    wanted = {k: v for k, v in bundle.items() if v > 0}
    if not wanted:
        return 1 << 30
    # the small tolerance keeps cap/m worth m copies despite float rounding
    return sum(max(0, min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in wanted.items())) for node in nodes)


def even_share(nodes: Sequence[Mapping[str, float]], count: int, resource: str = "CPU",
               alongside: Mapping[str, float] | None = None, reserve: float = 0.0) -> float:
    """The largest amount s of `resource` such that `count` bundles {resource: s, **alongside} fit on the
    nodes at once, with `reserve` of it left free on one node (for tasks that must keep room to run);
    0.0 when no s does. Rounded down to Ray's resource precision."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    alongside = {k: v for k, v in (alongside or {}).items() if k != resource}
    best = 0.0
    # Try each node as the one keeping the reserve (any will do when there is none).
    for keeper in range(len(nodes)) if reserve > 0 else [None]:
        capacities = [dict(n, **{resource: n.get(resource, 0.0) - (reserve if i == keeper else 0.0)})
                      for i, n in enumerate(nodes)]
        # Feasibility changes only where some node's floor(capacity / s) does, at capacity / m: the best s
        # is one of those. Smaller s fit more copies, so the candidates are searched by bisection.
        candidates = sorted({c[resource] / m for c in capacities if c[resource] > 0 for m in range(1, count + 1)})
        low, high = 0, len(candidates)  # candidates[:low] fit; candidates[high:] do not
        while low < high:
            mid = (low + high) // 2
            if copies_that_fit({resource: candidates[mid], **alongside}, capacities) >= count:
                low = mid + 1
            else:
                high = mid
        if low:
            best = max(best, candidates[low - 1])
    return math.floor(best * _RESOURCE_STEPS + 1e-6) / _RESOURCE_STEPS


def groups_that_fit(group: Sequence[Mapping[str, float]], nodes: Sequence[Mapping[str, float]],
                    limit: int = 1 << 16) -> int:
    """How many copies of a group of bundles (e.g. a Tune trial: its own process and its training workers)
    the nodes hold at once, every bundle whole on one node. First-fit with the largest bundles first, which
    may place fewer than an optimal packing could, never more: a count Ray can always place."""
    free = [dict(n) for n in nodes]
    order = sorted(({k: v for k, v in b.items() if v > 0} for b in group), key=lambda b: -sum(b.values()))
    if not any(order):
        return limit
    count = 0
    while count < limit:
        taken = []
        for bundle in order:
            node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())), None)
            if node is None:
                for n, b in taken:  # this copy does not fit whole: give back what it took
                    for k, v in b.items():
                        n[k] += v
                return count
            for k, v in bundle.items():
                node[k] = node.get(k, 0.0) - v
            taken.append((node, bundle))
        count += 1
    return count


def describe_nodes(nodes: Sequence[Mapping[str, float]], resources: Sequence[str] = ("CPU", "GPU")) -> str:
    """`2 nodes of 1 CPU 0 GPU`, `3 nodes: 1 of 8 CPU 0 GPU, 2 of 4 CPU 1 GPU`: the cluster in an error line."""
    kinds = Counter(" ".join(f"{n.get(r, 0.0):g} {r}" for r in resources) for n in nodes)
    plural = "s" if len(nodes) != 1 else ""
    if len(kinds) == 1:
        return f"{len(nodes)} node{plural} of {next(iter(kinds))}"
    return f"{len(nodes)} node{plural}: " + ", ".join(f"{count} of {kind}" for kind, count in kinds.most_common())


class PreflightError(RuntimeError):
    """A job cannot run as configured; raised before any expensive work."""


def check_placement(what: str, bundle: Mapping[str, float], count: int = 1,
                    nodes: Sequence[Mapping[str, float]] | None = None) -> None:
    """After ray.init: `count` copies of `bundle` (one actor's or worker's resources, e.g. {"CPU": 1,
    "GPU": 1}) fit on the alive nodes at once, each copy on one node. Ray never splits a bundle across
    nodes, so a cluster whose total suffices can still wait forever: two 1-CPU nodes never place a
    1.5-CPU worker. `what` names the request in the error line."""
    nodes = alive_nodes() if nodes is None else list(nodes)
    wanted = {k: v for k, v in bundle.items() if v > 0}
    fit = copies_that_fit(wanted, nodes)
    if fit >= count:
        return
    asks = ", ".join(f"{v:g} {k}" for k, v in wanted.items())
    shown = tuple(dict.fromkeys(["CPU", "GPU", *wanted]))
    if fit == 0:
        raise PreflightError(f"{what}: each asks for {asks} on one node, and no node of the Ray cluster has that "
                             f"({describe_nodes(nodes, shown)})")
    raise PreflightError(f"{what}: the nodes hold only {fit} at once of {asks} each "
                         f"({describe_nodes(nodes, shown)})")


SHARED_STORAGE_ENV = "STEP_RAY_SHARED_STORAGE"


def shared_storage_declared() -> bool:
    """STEP_RAY_SHARED_STORAGE=1: the user says every local path a job is given is on a filesystem that
    every node of the cluster mounts at the same path (NFS, EFS, a cluster-wide volume)."""
    return os.environ.get(SHARED_STORAGE_ENV, "").strip().lower() in ("1", "true", "yes")


def dataset_location(data) -> dict[str, str]:
    """A DataConfig's folder for check_shared_storage: data.root, or, when that is empty, the folder the
    driver generates the synthetic set in (on its own node)."""
    return {"data.root": data.root} if data.root else {"data.synthetic_dir": data.synthetic_dir}


def check_shared_storage(paths: Mapping[str, str]) -> None:
    """After ray.init: on a cluster of more than one alive node, the local paths a job's workers read or
    write (`paths`: setting name -> path; s3:// URIs and empty ones are fine) must be shared by every
    node, which only the user can know: refused unless STEP_RAY_SHARED_STORAGE=1 declares them shared.
    Otherwise a worker on another node would read an empty folder, or write checkpoints and TensorBoard
    files no one collects. One node: nothing to check."""
    if shared_storage_declared():
        return
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    for what, path in paths.items():
        if path and not storage.is_s3(path):
            raise PreflightError(f"{what}={path} is a local path, but the Ray cluster has {len(nodes)} nodes and "
                                 f"workers on the others would not see it: use an s3:// URI, or a folder every node "
                                 f"mounts at the same path and set {SHARED_STORAGE_ENV}=1")
