"""The alternating A->B test of reverse-to-forward imitation (``offrl alternate``).

One environment per chain, no reset between tasks: policy A places the cube on the target (task A), then
policy B takes it from there to a goal drawn from the region (task B), then A again, and so on. Each attempt
gets ``horizon`` control steps; a chain stops at its first failed attempt or after ``max_cycles`` A->B cycles.
``consecutive_success`` of a chain is the number of full A->B cycles it completed.

**Hand-off.** Both tasks are the same scene: a task differs only in where the goal marker stands and where an
episode starts. So every chain runs in an ``offrl/PickPlaceA-v1`` env, reset once (chain ``j`` from seed
``seed + j``), and a switch of task edits the saved state instead of resetting: ``get_state`` -> move the
``goal_site`` actor (A's target, or B's goal drawn from ``[seed, j, cycle]``) -> zero the episode step counter
-> ``set_state``. Robot, cube and their velocities carry over exactly (tested). Each policy forgets its
history for that env (sequence policies replan).

**Chains in parallel.** Chains go in batches of ``env.num_envs`` consecutive chains to the SimHost actors
(round robin); the host runs the batch's envs in lock step. Results depend on the chain's seed only, not on
the number of hosts.

**Recording.** Every attempt becomes an episode of the task it attempted, in ManiSkill's format with env states:
``rollouts_A.h5`` / ``rollouts_B.h5`` (success labelled; a failed attempt ends truncated at the horizon).
``alternate.json`` holds the summary and every chain; ``consecutive_success.png`` the distribution.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from offrl.errors import OffrlError


def _index_tree(tree: dict, i: int) -> dict:
    return {k: (_index_tree(v, i) if isinstance(v, dict) else np.asarray(v[i]).copy()) for k, v in tree.items()}


def _stack_tree(trees: list) -> dict:
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack_tree([t[k] for t in trees]) for k in first}
    return np.stack(trees).astype(np.float32)


@contextlib.contextmanager
def _chain_mode(sim: Any):
    """No auto-reset and no time limit from the sim: the chain loop decides when an attempt ends."""
    auto, limit, ignore = sim.autoreset, sim._tl.max_episode_steps, getattr(sim, "ignore_terminations", False)
    sim.autoreset, sim._tl.max_episode_steps, sim.ignore_terminations = False, 10**9, False
    try:
        yield sim
    finally:
        sim.autoreset, sim._tl.max_episode_steps, sim.ignore_terminations = auto, limit, ignore


def task_goal(env: Any, task: str, seed: int, chain: int, cycle: int) -> np.ndarray:
    """Where the goal marker goes for ``task``: A's target ring, or B's goal drawn from the region with the
    generator ``[seed, chain, cycle]``."""
    if task == "A":
        return np.asarray(env.target_xy, np.float64)
    x0, x1, y0, y1 = env.region
    u = np.random.default_rng([int(seed), int(chain), int(cycle)]).random(2)
    return np.array([x0 + (x1 - x0) * u[0], y0 + (y1 - y0) * u[1]])


def switch_task(sim: Any, i: int, goal_xy: np.ndarray) -> np.ndarray:
    """Move env ``i``'s goal marker to ``goal_xy`` and restart its step counter, without a reset; returns the
    env's new observation ``[obs_dim]``."""
    st = sim.get_state([i])
    goal = st["sim"]["actors"]["goal_site"]
    goal[0, :2] = goal_xy
    goal[0, 7:] = 0.0
    st["elapsed_steps"][:] = 0
    return sim.set_state(st, [i])[0]


def _forget(policy: Any, sim: Any, i: int) -> None:
    if hasattr(policy, "reset") and hasattr(policy, "fresh"):
        policy.reset([i])
    elif hasattr(policy, "on_restore"):
        policy.on_restore(sim, [i])


def _alternate_on_host(host: Any, spec_a: dict, spec_b: dict, batches: list[tuple[int, int]], seed: int,
                       max_cycles: int, horizon: int) -> dict:
    """Inside a SimHost: run the chains ``start .. start + n - 1`` of each batch; returns chains and attempts."""
    from offrl.platform.rollout import build_policy

    chains: list[dict] = []
    attempts: list[dict] = []
    with host.preserved() as sim, _chain_mode(sim):
        K = sim.num_envs
        envs = sim.raw_envs
        for start, n in batches:
            pols = {"A": build_policy(spec_a, sim, seed=seed + start), "B": build_policy(spec_b, sim, seed=seed + start)}
            obs = sim.reset(seed=seed + start)
            task = ["A"] * K
            active = np.zeros(K, bool)
            active[:n] = True
            cycles = np.zeros(K, np.int64)
            tried = {t: np.zeros(K, np.int64) for t in "AB"}
            won = {t: np.zeros(K, np.int64) for t in "AB"}
            ended = [""] * K
            state0 = sim.get_state()["sim"]
            buf = [{"obs": [obs[i].copy()], "states": [_index_tree(state0, i)], "actions": [], "rewards": [],
                    "success": []} for i in range(K)]
            steps = np.zeros(K, np.int64)
            while active.any():
                act = np.zeros((K, sim.act_dim), np.float32)
                for t in "AB":
                    mask = active & (np.array(task) == t)
                    if mask.any():
                        a, _ = pols[t](obs, sim)
                        act[mask] = a[mask]
                obs, rew, term, _trunc, info = sim.step(act)
                states = sim.get_state()["sim"]
                steps += active
                for i in np.flatnonzero(active):
                    b = buf[i]
                    b["actions"].append(act[i].copy())
                    b["rewards"].append(float(rew[i]))
                    b["success"].append(bool(info["success"][i]))
                    b["obs"].append(obs[i].copy())
                    b["states"].append(_index_tree(states, i))
                    ok = bool(info["success"][i])
                    if not ok and steps[i] < horizon:
                        continue
                    t = task[i]
                    tried[t][i] += 1
                    won[t][i] += ok
                    chain = start + int(i)
                    attempts.append({"chain": chain, "task": t, "cycle": int(cycles[i]), "success": ok,
                                     "obs": np.stack(b["obs"]).astype(np.float32),
                                     "actions": np.stack(b["actions"]).astype(np.float32),
                                     "rewards": np.asarray(b["rewards"], np.float32),
                                     "success_flags": np.asarray(b["success"], bool),
                                     "env_states": _stack_tree(b["states"]), "seed": seed + chain})
                    if not ok:
                        active[i], ended[i] = False, f"{t} failed"
                        continue
                    if t == "B":
                        cycles[i] += 1
                        if cycles[i] >= max_cycles:
                            active[i], ended[i] = False, "max_cycles"
                            continue
                    nxt = "B" if t == "A" else "A"
                    task[i] = nxt
                    obs[i] = switch_task(sim, int(i), task_goal(envs[i] if len(envs) > 1 else envs[0], nxt, seed,
                                                                chain, int(cycles[i])))
                    for p in pols.values():
                        _forget(p, sim, int(i))
                    steps[i] = 0
                    st = sim.get_state([int(i)])["sim"]
                    buf[i] = {"obs": [obs[i].copy()], "states": [_index_tree(st, 0)], "actions": [], "rewards": [],
                              "success": []}
            for i in range(n):
                chains.append({"chain": start + i, "seed": seed + start + i, "consecutive_success": int(cycles[i]),
                               "A_attempts": int(tried["A"][i]), "A_successes": int(won["A"][i]),
                               "B_attempts": int(tried["B"][i]), "B_successes": int(won["B"][i]), "ended": ended[i]})
    return {"chains": chains, "attempts": attempts}


def summarize_chains(chains: list[dict], max_cycles: int) -> dict:
    """consecutive_success (mean with a 95% bootstrap interval, median, max, distribution) and the per-task
    success rates over attempts (95% Wilson intervals)."""
    from offrl.platform.evaluate import wilson_interval

    cs = np.array([c["consecutive_success"] for c in chains], np.float64)
    rng = np.random.default_rng(0)
    boots = rng.choice(cs, size=(2000, len(cs)), replace=True).mean(1) if len(cs) > 1 else cs
    out = {"chains": len(chains), "max_cycles": int(max_cycles),
           "consecutive_success": {"mean": float(cs.mean()), "median": float(np.median(cs)), "max": int(cs.max()),
                                   "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
                                   "distribution": np.bincount(cs.astype(int), minlength=max_cycles + 1).tolist()}}
    for t in "AB":
        k = int(sum(c[f"{t}_successes"] for c in chains))
        n = int(sum(c[f"{t}_attempts"] for c in chains))
        lo, hi = wilson_interval(k, n) if n else (0.0, 1.0)
        out[f"{t}_success_rate"] = {"mean": k / n if n else None, "ci95": [lo, hi], "successes": k,
                                    "attempts": n}
    return out


def attempts_dataset(attempts: list[dict], task: str, env_cfg: Any, layout: list, horizon: int,
                     source: str) -> Optional[Any]:
    """The attempts at ``task`` as an offrl dataset of that task (None when there are none)."""
    from offrl.config import to_dict
    from offrl.data.dataset import OfflineDataset
    from offrl.data.format import Episode
    from offrl.envs.tasks import TASK_A, TASK_B

    eps = []
    for a in (x for x in attempts if x["task"] == task):
        T = len(a["actions"])
        term = np.zeros(T, bool)
        trunc = np.zeros(T, bool)
        if a["success"]:
            term[-1] = True
        else:
            trunc[-1] = True
        eps.append(Episode(obs=a["obs"], actions=a["actions"], terminated=term, truncated=trunc,
                           success=a["success_flags"], rewards={"rewards": a["rewards"]}, env_states=a["env_states"],
                           info={"episode_seed": int(a["seed"]), "reset_kwargs": {"seed": int(a["seed"])},
                                 "control_mode": env_cfg.control_mode, "chain": int(a["chain"]),
                                 "cycle": int(a["cycle"]), "elapsed_steps": T, "success": bool(a["success"])}))
    if not eps:
        return None
    env_kwargs = dict(obs_mode=env_cfg.obs_mode, control_mode=env_cfg.control_mode, reward_mode=env_cfg.reward_mode,
                      sim_backend="physx_cpu", **dict(env_cfg.kwargs))
    meta = {"env_info": {"env_id": TASK_A if task == "A" else TASK_B, "env_kwargs": env_kwargs,
                         "max_episode_steps": int(horizon)},
            "source_type": "offrl-alternate", "source_desc": f"offrl alternate: every task-{task} attempt ({source})",
            "offrl": {"obs_layout": layout, "reward_mode": env_cfg.reward_mode, "env": to_dict(env_cfg)}}
    return OfflineDataset(eps, meta)


def plot_distribution(summary: dict, path: Path, title: str = "") -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dist = summary["consecutive_success"]["distribution"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(len(dist)), dist, color="tab:blue")
    cs = summary["consecutive_success"]
    ax.axvline(cs["mean"], color="k", ls="--", lw=1, label=f"mean {cs['mean']:.2f}")
    ax.set_xlabel("consecutive_success (A->B cycles before the first failure)")
    ax.set_ylabel("chains")
    ax.set_xticks(range(len(dist)))
    a, b = summary["A_success_rate"], summary["B_success_rate"]
    rate = {t: "-" if r["mean"] is None else f"{r['mean']:.2f}" for t, r in (("A", a), ("B", b))}
    ax.set_title(title or f"{summary['chains']} chains; A {rate['A']}, B {rate['B']} success per attempt", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _rate(r: dict) -> str:
    if r["mean"] is None:
        return "- (no attempt)"
    return f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['successes']}/{r['attempts']})"


def _task_config(ckpt: str, want: str, flag: str, overrides: Sequence[str], log: Any) -> tuple:
    from offrl.platform.iterate import policy_checkpoint
    from offrl.platform.pretrain import load_acting_actor

    ckpt_path, cfg, actor, arch, _ = load_acting_actor(str(policy_checkpoint(ckpt)), overrides, log)
    if cfg.env.id != want:
        raise OffrlError(f"{flag} {ckpt}: the checkpoint was trained for {cfg.env.id}, {flag} needs a policy for {want}")
    return ckpt_path, cfg, actor, arch


def run_alternate(policy_a: str, policy_b: str, *, chains: int = 20, max_cycles: int = 10, horizon: int = 0,
                  seed: int = 0, out: str | Path = "runs/alternate", overrides: Sequence[str] = (),
                  overwrite: bool = False, log: Any = print) -> dict:
    """Run the alternating test (see the module docstring) and write its outputs into ``out``."""
    from offrl.data.collect import _host_layout
    from offrl.envs.tasks import TASK_A, TASK_B
    from offrl.platform.cluster import init_ray
    from offrl.platform.pretrain import actor_spec
    from offrl.platform.simhost import SimHostPool

    for name, v, lo in (("--chains", chains, 1), ("--max-cycles", max_cycles, 1), ("--horizon", horizon, 0),
                        ("--seed", seed, 0)):
        if v < lo:
            raise OffrlError(f"{name} must be >= {lo}, got {v}")
    out = Path(out)
    if (out / "alternate.json").exists() and not overwrite:
        raise OffrlError(f"{out / 'alternate.json'} exists already (pass --overwrite to run again)")
    ca, cfg_a, actor_a, arch_a = _task_config(policy_a, TASK_A, "--policy-a", overrides, log)
    cb, cfg_b, actor_b, arch_b = _task_config(policy_b, TASK_B, "--policy-b", overrides, log)
    if dict(cfg_a.env.kwargs) != dict(cfg_b.env.kwargs) or cfg_a.env.control_mode != cfg_b.env.control_mode:
        raise OffrlError(f"the policies were trained on different task settings: env.kwargs {dict(cfg_a.env.kwargs)} / "
                         f"{dict(cfg_b.env.kwargs)}, control modes {cfg_a.env.control_mode} / {cfg_b.env.control_mode}")
    horizon = horizon or int(cfg_a.env.max_episode_steps)
    env_cfg = cfg_a.env
    init_ray(cfg_a.cluster)
    pool = SimHostPool(env_cfg, cfg_a.cluster, seed=seed)
    t0 = time.time()
    try:
        K = pool.spec["num_envs"]
        batches = [(j, min(K, chains - j)) for j in range(0, chains, K)]
        per_host: list[list] = [[] for _ in range(len(pool))]
        for i, b in enumerate(batches):
            per_host[i % len(pool)].append(b)
        spec_a = actor_spec(actor_a, arch_a, cfg_a.eval.deterministic)
        spec_b = actor_spec(actor_b, arch_b, cfg_b.eval.deterministic)
        active = [(h, bs) for h, bs in zip(pool.hosts, per_host) if bs]
        log(f"[alternate] {chains} chains (max {max_cycles} A->B cycles, {horizon} steps per attempt) on "
            f"{len(active)} SimHost(s) x {K} envs")
        results = pool._get([h.apply.remote(_alternate_on_host, spec_a, spec_b, bs, seed, max_cycles, horizon)
                             for h, bs in active])
        layout = pool._get([pool.hosts[0].apply.remote(_host_layout)])[0]
    finally:
        pool.shutdown()
    dt = time.time() - t0
    all_chains = sorted((c for r in results for c in r["chains"]), key=lambda c: c["chain"])
    attempts = sorted((a for r in results for a in r["attempts"]), key=lambda a: (a["chain"], a["cycle"], a["task"]))
    summary = summarize_chains(all_chains, max_cycles)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for t in "AB":
        ds = attempts_dataset(attempts, t, env_cfg, layout, horizon, f"{ca.name} / {cb.name}")
        path = out / f"rollouts_{t}.h5"
        if ds is not None:
            ds.save(path)
            files[t] = str(path)
        else:
            for p in (path, path.with_suffix(".json")):
                p.unlink(missing_ok=True)
    summary.update({"policy_a": str(ca), "policy_b": str(cb), "horizon": horizon, "seed": seed, "seconds": dt,
                    "rollouts": files, "per_chain": all_chains})
    plot = plot_distribution(summary, out / "consecutive_success.png")
    tmp = out / "alternate.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "alternate.json")
    cs = summary["consecutive_success"]
    a, b = summary["A_success_rate"], summary["B_success_rate"]
    log(f"[alternate] consecutive_success mean {cs['mean']:.2f} [{cs['ci95'][0]:.2f}, {cs['ci95'][1]:.2f}], median "
        f"{cs['median']:.1f}, max {cs['max']}; distribution {cs['distribution']}")
    log(f"[alternate] A_success_rate {_rate(a)}; B_success_rate {_rate(b)}; {dt:.0f} s")
    log(f"[alternate] wrote {out / 'alternate.json'}" + (f", {plot.name}" if plot else "") +
        "".join(f", {Path(f).name}" for f in files.values()))
    return summary
