"""Connecting to Ray: the cluster named by `address` / RAY_ADDRESS, or an embedded local one.

Every job (train, batch, evaluate, serve) goes through `init_ray` and checks its demand with
`require_resources` *before* starting anything, because Ray waits forever for resources that never
come: seen here, a TorchTrainer holding both CPUs of a 2-core machine left Ray Data's file-listing task
pending with no error. Ray's CPU is a scheduling token, not a core, so the local cluster advertises
at least `LOCAL_MIN_CPUS` of them: trainer workers and the data pipeline then share the real cores
instead of deadlocking over tokens.
"""

from __future__ import annotations

import logging
import os

LOCAL_MIN_CPUS = 4


class ResourceError(RuntimeError):
    """The Ray cluster cannot hold what a job asks for (raised before any worker starts)."""


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int | None = None,
    quiet: bool = True,
) -> dict:
    """Start or connect to Ray once per process; returns the cluster's total resources.

    address: "auto", "ray://host:10001" or a head address; None uses RAY_ADDRESS, else starts a local
    cluster with `num_cpus` logical CPUs (default: max(cores, LOCAL_MIN_CPUS)) and an object store of
    `object_store_mb` (default: Ray's). An already initialised Ray is reused as it is.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=not quiet)
        else:
            ray.init(
                num_cpus=num_cpus or max(os.cpu_count() or 1, LOCAL_MIN_CPUS),
                object_store_memory=None if object_store_mb is None else object_store_mb * 2**20,
                include_dashboard=False,
                log_to_driver=not quiet,
            )
    return ray.cluster_resources()


def require_resources(demand: dict[str, float], what: str) -> None:
    """Raise ResourceError naming `what`, the demand and the cluster's totals if any resource falls short
    of the cluster's total; log one warning when the total suffices but other work holds part of it now."""
    import ray

    total = ray.cluster_resources()
    short = {k: (v, total.get(k, 0.0)) for k, v in demand.items() if v > 0 and total.get(k, 0.0) < v}
    if short:
        detail = ", ".join(f"{k}: needs {need:g}, cluster has {have:g}" for k, (need, have) in short.items())
        raise ResourceError(
            f"{what} cannot fit on this Ray cluster ({detail}); lower the request or add resources "
            f"(a local cluster takes num_cpus / `ray start --num-cpus N`)"
        )
    # The cluster can hold it, but not now: other work (a Serve app, another job) holds what is missing,
    # and Ray waits for it without a word. Say so once, since a fixed cluster may wait forever.
    free = ray.available_resources()
    held = {k: (v, free.get(k, 0.0)) for k, v in demand.items() if v > 0 and free.get(k, 0.0) < v}
    if held:
        detail = ", ".join(f"{k}: needs {need:g}, {have:g} free now" for k, (need, have) in held.items())
        logging.getLogger("ppcr").warning(
            f"{what} waits for resources other work on this Ray cluster holds ({detail}); it starts when "
            "they are released (`ray status` shows who holds them)"
        )
