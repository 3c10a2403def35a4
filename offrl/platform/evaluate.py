"""Policy evaluation on SimHost actors with fixed seeds.

Episode ``j`` of an evaluation always starts from seed ``eval.seed + j``, whatever the number of hosts
or envs per host, so two checkpoints evaluated with the same settings face the same initial states.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from offrl import metrics as M


def _eval_chunks_on_host(host: Any, policy_spec: dict, starts: list[int], count: list[int],
                         ignore_terminations: bool = False) -> list[dict]:
    """Run inside a SimHost: for each chunk, reset env i to seed ``start + i`` and play one episode each.

    The host's sim state, observation and episode tracker are restored afterwards, so evaluation never
    disturbs a rollout in progress. With ``ignore_terminations`` episodes run to the time limit.
    A fresh policy (fresh state for stateful policies, generator seeded with ``start``) plays each chunk.
    """
    from offrl.platform.rollout import EpisodeTracker, build_policy

    out: list[dict] = []
    with host.preserved() as sim, _terminations_ignored(sim, ignore_terminations):
        for start, n in zip(starts, count):
            policy = build_policy(policy_spec, sim, seed=start)
            obs = sim.reset(seed=start)
            tracker = EpisodeTracker(sim.num_envs)
            finished: dict[int, dict] = {}
            for _ in range(sim.max_episode_steps):
                act, _ = policy(obs, sim)
                obs, rew, term, trunc, info = sim.step(act)
                for ep in tracker.step(rew, info["success"], info["done"]):
                    if ep["env"] < n and ep["env"] not in finished:
                        finished[ep["env"]] = {**ep, "seed": start + ep["env"]}
                if len(finished) >= n:
                    break
            out += [finished[i] for i in sorted(finished)]
    return out


@contextlib.contextmanager
def _terminations_ignored(sim: Any, on: bool):
    before = getattr(sim, "ignore_terminations", False)
    sim.ignore_terminations = bool(on)
    try:
        yield
    finally:
        sim.ignore_terminations = before


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (better than the normal one near 0 and 1)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(x: np.ndarray, z: float = 1.96) -> tuple[float, float, float]:
    """Mean and normal-approximation 95% interval."""
    x = np.asarray(x, np.float64)
    if len(x) == 0:
        return (math.nan, math.nan, math.nan)
    m = float(x.mean())
    half = z * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else 0.0
    return (m, m - half, m + half)


def summarize(episodes: list[dict]) -> dict:
    """success_once, success_at_end (mean + Wilson CI), return and length (mean + CI), per-episode rows."""
    n = len(episodes)
    out: dict[str, Any] = {"episodes": n}
    for key in ("success_once", "success_at_end"):
        k = sum(bool(e[key]) for e in episodes)
        lo, hi = wilson_interval(k, n)
        out[key] = {"mean": k / n if n else math.nan, "ci95": [lo, hi]}
    for key in ("return", "length"):
        m, lo, hi = mean_ci(np.array([e[key] for e in episodes]))
        out[key] = {"mean": m, "ci95": [lo, hi]}
    out["per_episode"] = [{k: e[k] for k in ("seed", "success_once", "success_at_end", "return", "length")}
                          for e in episodes]
    return out


def evaluate(pool: Any, policy_spec: dict, episodes: int, seed: int, ignore_terminations: bool = False) -> dict:
    """Evaluate ``policy_spec`` for ``episodes`` episodes on every host of ``pool`` (chunks of num_envs seeds).

    ``ignore_terminations``: episodes run the full ``max_episode_steps`` (success_once as ManiSkill's
    learning-from-demos baselines report it)."""
    k = pool.spec["num_envs"]
    chunks = [(seed + j, min(k, episodes - j)) for j in range(0, episodes, k)]
    per_host: list[tuple[list[int], list[int]]] = [([], []) for _ in range(len(pool))]
    for i, (s, n) in enumerate(chunks):
        per_host[i % len(pool)][0].append(s)
        per_host[i % len(pool)][1].append(n)
    active = [(h, a) for h, a in zip(pool.hosts, per_host) if a[0]]
    results = pool._get([h.apply.remote(_eval_chunks_on_host, policy_spec, a[0], a[1], ignore_terminations)
                         for h, a in active])
    eps = sorted((e for r in results for e in r), key=lambda e: e["seed"])
    return summarize(eps)


def eval_metrics(summary: dict) -> dict[str, float]:
    """The logged scalars of an evaluation summary."""
    return {M.EVAL_SUCCESS_RATE: summary["success_at_end"]["mean"], M.EVAL_SUCCESS_ONCE: summary["success_once"]["mean"],
            M.EVAL_RETURN: summary["return"]["mean"], M.EVAL_EPISODE_LENGTH: summary["length"]["mean"]}


def write_eval_json(path: Path, summary: dict, extra: Optional[dict] = None) -> Path:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**(extra or {}), **summary}, indent=2))
    tmp.replace(path)
    return path
