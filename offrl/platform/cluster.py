"""Starting or joining a Ray cluster."""

from __future__ import annotations

import os
import sys
from typing import Any

from offrl.errors import OffrlError


def init_ray(cluster_cfg: Any = None, quiet: bool = True) -> dict:
    """Join ``cluster.address`` (or ``$RAY_ADDRESS``) or start a fresh local cluster (``cluster.num_cpus``
    CPUs); returns its resources.

    Idempotent: an already initialised Ray is reused.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray starts worker processes at nice 15; SimHosts are the compute, so a local cluster runs them
    # at normal priority (a shared machine would otherwise starve them first).
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = getattr(cluster_cfg, "address", None)
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=not quiet,
                                  configure_logging=True, logging_level="ERROR")
    try:
        if address:
            ray.init(address=address, **kwargs)
        elif os.environ.get("RAY_ADDRESS"):
            # inside `ray job submit` (or a user's explicit RAY_ADDRESS): join that cluster
            ray.init(**kwargs)
        else:
            # "local" always starts a fresh local cluster; a bare ray.init() would silently join the
            # last cluster `ray start` recorded on this machine
            _start_local(getattr(cluster_cfg, "num_cpus", None), kwargs)
    except ConnectionError as e:
        raise OffrlError(f"cannot reach the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    return ray.cluster_resources()


def _start_local(num_cpus: Any, kwargs: dict, attempts: int = 3) -> None:
    """``ray.init(address="local")``, retried when the new node misses Ray's fixed 30 s startup window.

    On a loaded machine (a 2-core CI runner beside other jobs) the raylet can take longer than the 30 s
    Ray waits for it to register, and ray.init raises "The current node timed out during startup". The
    processes that attempt started are this process's new children; they are killed before the next try.
    """
    import psutil
    import ray

    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception for this one
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            ray.shutdown()
            started = [p for p in me.children(recursive=True) if p.pid not in before]
            for p in started:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(started, timeout=10)
            print(f"[offrl] the local Ray node missed its startup window (attempt {attempt} of {attempts}, "
                  "the machine is loaded); starting it again", file=sys.stderr)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
