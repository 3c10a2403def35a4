"""Simulator throughput: bare processes versus SimHost actors, same core count, same run.

Both sides do the same work: ``--procs`` workers, each owning a CPU ManiSkill BatchedSim with
``--envs`` envs, roll out the same Gaussian MLP policy (torch with 1 thread) for ``--steps`` steps
per env through :func:`offrl.platform.rollout.run_rollout`. The bare side runs them as plain
processes started together; the actor side as SimHost actors on a local Ray cluster, one remote call
per worker. Simulator construction and a warm-up rollout are excluded from the timing on both sides.

Prints env-steps/s of each and the ratio actors / bare (target >= 0.9 on CPU). A third measurement
runs MC re-rollouts through the same actors (restore a saved state, then ``--horizon`` policy steps,
for every state of a recorded rollout) and reports its env-steps/s against the same bare figure. A fourth
runs full-horizon re-rollouts (to the end of each episode, as MC finetuning does) from states spread over
whole episodes, twice per round: stepping only the live re-rollouts (``step_active``, the default) and
stepping every env until the longest re-rollout of each chunk ends; it reports the ratio of the two.
Repeats ``--rounds`` times, alternating the sides, and reports medians.

    python bench/sim_throughput.py [--procs N] [--envs K] [--steps S] [--rounds R] [--horizon H] [--no-full-horizon]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

ENV = dict(id="PickCube-v1", control_mode="pd_ee_delta_pos", obs_mode="state", reward_mode="normalized_dense",
           max_episode_steps=50)


def _policy_spec(obs_dim: int, act_dim: int) -> dict:
    import torch

    from offrl.algos.networks import GaussianActor, numpy_state_dict

    torch.manual_seed(0)
    arch = dict(obs_dim=obs_dim, act_dim=act_dim, hidden=[256, 256])
    return {"kind": "mlp", "arch": arch, "weights": numpy_state_dict(GaussianActor(**arch))}


def _bare_worker(idx: int, envs: int, steps: int, rounds: int, barrier, queue) -> None:
    import torch

    torch.set_num_threads(1)
    from offrl.config import EnvConfig
    from offrl.envs import make_sim
    from offrl.platform.rollout import build_policy, run_rollout

    sim = make_sim(EnvConfig(num_envs=envs, **ENV))
    sim.reset(seed=idx * 1000)
    policy = build_policy(_policy_spec(sim.obs_dim, sim.act_dim), sim, seed=idx)
    run_rollout(sim, policy, 20)  # warm-up
    for _ in range(rounds):
        barrier.wait()
        t = time.perf_counter()
        run_rollout(sim, policy, steps)
        queue.put((idx, time.perf_counter() - t))
        barrier.wait()
    sim.close()


class Bare:
    """``procs`` plain processes that roll out in lock-step rounds."""

    def __init__(self, procs: int, envs: int, steps: int, rounds: int):
        ctx = mp.get_context("spawn")
        self.procs, self.steps, self.envs = procs, steps, envs
        self.barrier = ctx.Barrier(procs + 1)
        self.queue = ctx.Queue()
        self.ps = [ctx.Process(target=_bare_worker, args=(i, envs, steps, rounds, self.barrier, self.queue))
                   for i in range(procs)]
        for p in self.ps:
            p.start()

    def round(self) -> float:
        self.barrier.wait()  # all workers built and warmed up: go
        t = time.perf_counter()
        for _ in range(self.procs):
            self.queue.get()
        wall = time.perf_counter() - t
        self.barrier.wait()
        return self.procs * self.envs * self.steps / wall

    def close(self) -> None:
        for p in self.ps:
            p.join(timeout=60)


class Actors:
    """``procs`` SimHost actors on a local Ray cluster with ``procs`` CPUs."""

    def __init__(self, procs: int, envs: int, steps: int):
        import ray

        from offrl.config import ClusterConfig, EnvConfig
        from offrl.platform.cluster import init_ray
        from offrl.platform.simhost import SimHostPool

        init_ray(ClusterConfig(num_cpus=procs))
        self.ray = ray
        self.pool = SimHostPool(EnvConfig(num_envs=envs, **ENV), ClusterConfig(num_hosts=procs), seed=0)
        self.spec = _policy_spec(self.pool.spec["obs_dim"], self.pool.spec["act_dim"])
        self.procs, self.envs, self.steps = procs, envs, steps
        self.pool.rollout(self.spec, 20)  # warm-up

    def round(self) -> float:
        t = time.perf_counter()
        self.pool.rollout(self.spec, self.steps)
        wall = time.perf_counter() - t
        return self.procs * self.envs * self.steps / wall

    def rerollout_round(self, horizon: int) -> float:
        """MC re-rollouts through the actors: restore saved states, then step ``horizon`` steps each."""
        from offrl.platform.rerollout import index_state, rerollout_pool, stack_states

        if not hasattr(self, "_states"):
            res = self.pool.rollout(self.spec, 10, reset_seed=123, record_states=True)
            # states of the first 10 steps: all envs stay alive for the whole horizon (< 50 - 10)
            self._states = stack_states([index_state(r["states"][t], n) for r in res for t in range(10)
                                         for n in range(r["obs"].shape[1])])
        out = rerollout_pool(self.pool, self.spec, self._states, None, samples=1, horizon=horizon, gamma=0.8)
        return out["steps"] / out["seconds"]

    def full_horizon_round(self, live_only: bool) -> float:
        """Full-horizon re-rollouts (``horizon=None``) from a quarter of the states of a 50-step rollout, so
        each chunk mixes re-rollouts with 1 to 50 steps left; live env-steps/s."""
        from offrl.platform.rerollout import index_state, rerollout_pool, stack_states

        if not hasattr(self, "_spread"):
            res = self.pool.rollout(self.spec, 50, reset_seed=321, record_states=True)
            every = [index_state(r["states"][t], n) for r in res for t in range(50) for n in range(r["obs"].shape[1])]
            pick = np.random.default_rng(0).choice(len(every), size=max(1, len(every) // 4), replace=False)
            self._spread = stack_states([every[i] for i in pick])
        out = rerollout_pool(self.pool, self.spec, self._spread, None, samples=1, horizon=None, gamma=0.8,
                             live_only=live_only)
        return out["steps"] / out["seconds"]

    def close(self) -> None:
        self.pool.shutdown()
        self.ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=os.cpu_count(), help="workers on each side (default: all cores)")
    ap.add_argument("--envs", type=int, default=4, help="envs per worker (single-env physx_cpu instances)")
    ap.add_argument("--steps", type=int, default=250, help="steps per env per timed rollout")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per side; medians are reported")
    ap.add_argument("--horizon", type=int, default=35,
                    help="MC re-rollout horizon per restored state (0 skips the re-rollout measurement)")
    ap.add_argument("--no-full-horizon", dest="full_horizon", action="store_false",
                    help="skip the full-horizon re-rollout comparison (live envs only vs every env)")
    args = ap.parse_args()

    print(f"PickCube-v1 {ENV['control_mode']}, {args.procs} workers x {args.envs} envs, "
          f"{args.steps} steps per env per round, {args.rounds} rounds per side", flush=True)
    bare_sps: list[float] = []
    actor_sps: list[float] = []
    rr_sps: list[float] = []
    fh_live: list[float] = []
    fh_all: list[float] = []
    # Interleave: bare round, actor round, ... so drifting machine load hits both sides alike.
    bare = Bare(args.procs, args.envs, args.steps, args.rounds)
    # keep the bare workers alive but idle while the actors run: they sit at a barrier (no CPU)
    actors = None
    try:
        for r in range(args.rounds):
            bare_sps.append(bare.round())
            if actors is None:
                actors = Actors(args.procs, args.envs, args.steps)
            actor_sps.append(actors.round())
            rr_sps.append(actors.rerollout_round(args.horizon) if args.horizon else float("nan"))
            if args.full_horizon:
                fh_all.append(actors.full_horizon_round(live_only=False))
                fh_live.append(actors.full_horizon_round(live_only=True))
            print(f"  round {r + 1}: bare {bare_sps[-1]:8.1f} steps/s   actors {actor_sps[-1]:8.1f} steps/s   "
                  f"re-rollouts {rr_sps[-1]:8.1f} steps/s"
                  + (f"   full-horizon live {fh_live[-1]:8.1f}, every env {fh_all[-1]:8.1f} steps/s"
                     if args.full_horizon else ""), flush=True)
    finally:
        bare.close()
        if actors is not None:
            actors.close()
    # Ratios are taken per round (each side's round ran back to back) and then their median is
    # reported: on a shared machine the load drifts between rounds, much less within one.
    b, a = statistics.median(bare_sps), statistics.median(actor_sps)
    ratio = statistics.median(x / y for x, y in zip(actor_sps, bare_sps))
    print(f"bare processes : {b:8.1f} env-steps/s (median)")
    print(f"SimHost actors : {a:8.1f} env-steps/s (median)")
    print(f"ratio actors/bare: {ratio:.3f}  (median of per-round ratios; target >= 0.9)")
    if args.horizon:
        rr = statistics.median(rr_sps)
        rratio = statistics.median(x / y for x, y in zip(rr_sps, bare_sps))
        print(f"MC re-rollouts : {rr:8.1f} env-steps/s (median; restore + {args.horizon} steps per saved state)")
        print(f"ratio re-rollouts/bare: {rratio:.3f}  (median of per-round ratios; target >= 0.9)")
    if args.full_horizon:
        print(f"full-horizon re-rollouts, live envs only : {statistics.median(fh_live):8.1f} live env-steps/s (median)")
        print(f"full-horizon re-rollouts, every env      : {statistics.median(fh_all):8.1f} live env-steps/s (median)")
        print(f"ratio live-only/every-env: {statistics.median(x / y for x, y in zip(fh_live, fh_all)):.3f}  "
              "(median of per-round ratios)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    raise SystemExit(main())
