"""SimHost actors and the pool that sizes itself to the Ray cluster.

A :class:`SimHost` owns one BatchedSim and runs whole rollouts inside the actor with policy weights
sent to it (one remote call per *rollout*, not per step: per-step calls cost ~3x throughput on small
machines). Results come back as numpy. Actors are created with ``max_restarts`` and
``max_task_retries=-1``: when a SimHost process dies mid-call, Ray restarts it (rebuilding and
re-seeding the sim) and redoes the call, so the caller still receives a complete result.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Any, Optional, Sequence

import numpy as np

from offrl.errors import OffrlError


def _normal_priority() -> None:
    """Undo Ray's worker niceness (15) where allowed: simulators are the work, not a background chore."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (PermissionError, OSError):
        pass


class SimHostImpl:
    """The body of a SimHost actor; also usable in-process (no Ray) for unit tests and benchmarks."""

    def __init__(self, env_cfg: dict, seed: int = 0, torch_threads: int = 1, host_index: int = 0):
        import torch

        torch.set_num_threads(int(torch_threads))
        _normal_priority()
        from offrl.config import EnvConfig, from_dict
        from offrl.envs import make_sim
        from offrl.platform.rollout import EpisodeTracker

        self.env_cfg = from_dict(env_cfg, EnvConfig)
        self.host_index = int(host_index)
        self.seed = int(seed) + 1_000_003 * self.host_index
        self.sim = make_sim(self.env_cfg)
        self.tracker = EpisodeTracker(self.sim.num_envs)
        self.obs = self.sim.reset(seed=self.seed)
        self.calls = 0
        self.incarnation_started = time.time()

    # -- introspection
    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on (hex id)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def spec(self) -> dict:
        s = self.sim
        return {"num_envs": s.num_envs, "obs_dim": s.obs_dim, "act_dim": s.act_dim,
                "action_low": s.action_low, "action_high": s.action_high,
                "max_episode_steps": s.max_episode_steps, "env_id": self.env_cfg.id,
                "env_kwargs": dict(getattr(s, "env_kwargs", {})), "pid": os.getpid()}

    def ping(self) -> bool:
        return True

    # -- work
    def reset(self, seed: Optional[int] = None) -> np.ndarray:
        self.obs = self.sim.reset(seed=seed)
        self.tracker.reset()
        return self.obs

    def rebuild(self) -> None:
        """Close the sim and make a new one (then :meth:`reset` it): the envs lose every trace of what they
        ran before, e.g. the PhysX contact caches that a CPU state restore does not bring back.

        CPU backend only; on the GPU backend this does nothing: re-creating a physx_cuda system inside a
        running process, and whether GPU restores carry history, have not been verified on a GPU."""
        from offrl.envs import make_sim

        if getattr(self.sim, "backend", "cpu") != "cpu":
            return
        self.sim.close()
        self.sim = make_sim(self.env_cfg)

    def rollout(self, policy_spec: dict, num_steps: int, reset_seed: Optional[int] = None,
                record_states: bool = False, policy_seed: Optional[int] = None) -> dict:
        """Run ``num_steps`` steps with the policy in ``policy_spec`` (see ``build_policy``)."""
        from offrl.platform.rollout import build_policy, run_rollout

        if reset_seed is not None:
            self.reset(reset_seed)
        self.calls += 1
        pseed = policy_seed if policy_seed is not None else self.seed + 7919 * self.calls
        policy = build_policy(policy_spec, self.sim, seed=pseed)
        out = run_rollout(self.sim, policy, num_steps, tracker=self.tracker, obs=self.obs,
                          record_states=record_states)
        self.obs = out["last_obs"]
        out["host"] = self.host_index
        return out

    def apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(host, *args, **kwargs)`` inside the actor (``fn`` must be a module-level function).

        Lets later stages (data collection, MC re-rollouts, evaluation) run whole loops next to the sim
        without growing this class; ``host.sim`` is the BatchedSim, ``host.obs`` its current observation.
        """
        return fn(self, *args, **kwargs)

    @contextlib.contextmanager
    def preserved(self):
        """Run side work (evaluation, re-rollouts) on the sim, then put back the rollout in progress:
        sim state, current observation and episode tracker."""
        state, obs, tracker = self.sim.get_state(), self.obs.copy(), self.tracker
        try:
            yield self.sim
        finally:
            self.sim.set_state(state)
            self.obs, self.tracker = obs, tracker

    def snapshot(self, env_ids: Optional[Sequence[int]] = None) -> dict:
        return self.sim.get_state(env_ids)

    def restore(self, state: dict, env_ids: Optional[Sequence[int]] = None) -> np.ndarray:
        obs = self.sim.set_state(state, env_ids)
        self.obs = self.sim._obs.copy() if hasattr(self.sim, "_obs") else self.obs
        return obs

    def close(self) -> None:
        self.sim.close()


def _remote_cls():
    import ray

    return ray.remote(SimHostImpl)


class SimHostPool:
    """A set of SimHost actors sized to the cluster; calls fan out and results come back as numpy.

    ``num_hosts=0`` sizes the pool to the cluster: one host per ``cpus_per_host`` free CPUs for the CPU
    backend, one per ``gpus_per_host`` (default 1) GPU for the GPU backend.
    """

    def __init__(self, env_cfg: Any, cluster_cfg: Any, seed: int = 0):
        import ray

        from offrl.config import to_dict

        if not ray.is_initialized():
            raise RuntimeError("call offrl.platform.cluster.init_ray() first")
        from offrl.envs.maniskill import probe_env

        probe_env(env_cfg)  # fail fast in the driver (one line, no actor traceback), before any actor starts
        self.env_cfg, self.cluster_cfg = env_cfg, cluster_cfg
        gpu = env_cfg.backend == "gpu"
        cpus = float(cluster_cfg.cpus_per_host)
        gpus = float(cluster_cfg.gpus_per_host) or (1.0 if gpu else 0.0)
        n = cluster_cfg.num_hosts or self.auto_size(cpus, gpus)
        if n < 1:
            what = f"{gpus:g} GPU" if gpus else f"{cpus:g} CPU"
            raise OffrlError(f"the Ray cluster has no room for a SimHost ({what} each); "
                             f"free resources: {ray.available_resources()}")
        opts: dict[str, Any] = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=cluster_cfg.max_restarts,
                                    max_task_retries=-1)
        strategy = self.scheduling_strategy(cluster_cfg.placement)
        if strategy is not None:  # a restarted actor (process or node died) is placed again the same way
            opts["scheduling_strategy"] = strategy
        cls = _remote_cls().options(**opts)
        env_dict = to_dict(env_cfg)
        self.hosts = [cls.remote(env_dict, seed, cluster_cfg.torch_threads, i) for i in range(n)]
        self.specs = self._get([h.spec.remote() for h in self.hosts])
        self.spec = self.specs[0]

    @staticmethod
    def scheduling_strategy(placement: str) -> Optional[str]:
        """Ray's strategy for the SimHost actors: SPREAD for ``placement="spread"``, except inside a
        placement group that captures child actors (a Tune trial's), whose bundles already hold them."""
        import ray

        if placement != "spread":
            return "DEFAULT"
        if (ray.util.get_current_placement_group() is not None
                and ray.get_runtime_context().should_capture_child_tasks_in_placement_group):
            return None
        return "SPREAD"

    @staticmethod
    def auto_size(cpus_per_host: float, gpus_per_host: float) -> int:
        import ray

        avail = ray.available_resources()
        if gpus_per_host > 0:
            return int(avail.get("GPU", 0.0) // gpus_per_host)
        return max(0, int(avail.get("CPU", 0.0) // max(cpus_per_host, 1e-9)))

    def __len__(self) -> int:
        return len(self.hosts)

    @property
    def num_envs(self) -> int:
        return sum(s["num_envs"] for s in self.specs)

    def _get(self, refs: list) -> list:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(refs)
        except RayActorError as e:
            m = re.search(r"OffrlError: ([^\n]+)", str(e))
            if m:  # the actor's constructor refused the config (e.g. a bad control mode)
                raise OffrlError(m.group(1).strip()) from None
            raise OffrlError(f"a SimHost died and could not be restarted "
                             f"(cluster.max_restarts={self.cluster_cfg.max_restarts}): {str(e).splitlines()[0]}") from None
        except RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, OffrlError):
                raise OffrlError(str(cause).splitlines()[0]) from None
            raise

    def rollout(self, policy_spec: dict, num_steps: int, reset_seed: Optional[int] = None,
                record_states: bool = False, policy_seed: Optional[int] = None) -> list[dict]:
        """Every host runs ``num_steps`` steps; the policy spec is put in the object store once.

        ``reset_seed`` / ``policy_seed``: host ``i`` resets its envs with ``reset_seed + 1_000_003 i`` and
        samples actions with ``policy_seed + 1_000_003 i`` (None: no reset / the host's own call counter),
        so a round can be replayed exactly by fresh actors (finetuning's resume)."""
        return self.collect(self.rollout_async(policy_spec, num_steps, reset_seed, record_states, policy_seed))

    def rollout_async(self, policy_spec: dict, num_steps: int, reset_seed: Optional[int] = None,
                      record_states: bool = False, policy_seed: Optional[int] = None) -> list:
        """Start :meth:`rollout` on every host and return at once; :meth:`collect` waits for the results.
        The spec is serialised here, so the caller may change its weights while the hosts roll out."""
        import ray

        ref = ray.put(policy_spec)

        def per_host(base: Optional[int]) -> list[Optional[int]]:
            return [None if base is None else base + 1_000_003 * i for i in range(len(self.hosts))]

        return [h.rollout.remote(ref, num_steps, s, record_states, p)
                for h, s, p in zip(self.hosts, per_host(reset_seed), per_host(policy_seed))]

    def collect(self, pending: list) -> list[dict]:
        """The results of a :meth:`rollout_async` call, one dict per host."""
        return self._get(pending)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Call ``method`` on every host with the same arguments."""
        return self._get([getattr(h, method).remote(*args, **kwargs) for h in self.hosts])

    def apply(self, fn: Any, args_per_host: Optional[list[tuple]] = None, **kwargs: Any) -> list:
        """``fn(host, *args_per_host[i], **kwargs)`` on every host i (see :meth:`SimHostImpl.apply`)."""
        args_per_host = args_per_host or [() for _ in self.hosts]
        if len(args_per_host) != len(self.hosts):
            raise ValueError(f"need {len(self.hosts)} argument tuples, got {len(args_per_host)}")
        return self._get([h.apply.remote(fn, *a, **kwargs) for h, a in zip(self.hosts, args_per_host)])

    def pids(self) -> list[int]:
        return self.call("pid")

    def node_ids(self) -> list[str]:
        """The Ray node of every host, in host order."""
        return self.call("node_id")

    def shutdown(self, wait_s: float = 10.0) -> None:
        """Kill the actors and wait (up to ``wait_s``) until Ray has given their resources back, so a
        pool created right after can size itself to the whole cluster again."""
        import ray

        if not self.hosts:
            return
        cpus = float(self.cluster_cfg.cpus_per_host) * len(self.hosts)
        before = ray.available_resources().get("CPU", 0.0) if ray.is_initialized() else 0.0
        for h in self.hosts:
            try:
                ray.kill(h)
            except Exception:
                pass
        self.hosts = []
        deadline = time.time() + wait_s
        while ray.is_initialized() and time.time() < deadline:
            if ray.available_resources().get("CPU", 0.0) >= before + cpus - 1e-6:
                break
            time.sleep(0.05)


def concat_rollouts(results: list[dict]) -> dict:
    """Join per-host rollouts along the env axis (axis 1); episode lists are concatenated."""
    keys = [k for k, v in results[0].items() if isinstance(v, np.ndarray) and v.ndim >= 2 and k != "last_obs"]
    out = {k: np.concatenate([r[k] for r in results], axis=1) for k in keys}
    out["last_obs"] = np.concatenate([r["last_obs"] for r in results], axis=0)
    out["episodes"] = [e for r in results for e in r["episodes"]]
    return out
