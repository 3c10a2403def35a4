"""Monte-Carlo re-rollouts from saved simulator states, run inside SimHost actors.

A job is a saved single-env state ``s`` (from a rollout's ``states``) and, for Q, an action ``a``.
A host restores up to ``num_envs`` jobs at once into its envs, takes ``a`` (Q) or a policy action (V),
then follows the re-rollout policy until the episode ends or ``horizon`` steps have passed (``horizon=None``:
until the episode ends, by success or by its time limit), and returns the discounted return of each of the
``M`` samples. Sampling noise differs between samples. With ``common_noise`` (common random numbers, the
"vine" estimator of Schulman et al. 2015, TRPO, Sec. 5.2) sample ``m`` of Q(s, a) and sample ``m`` of V(s)
draw the same policy noise at every step, so Q_m - V_m differs by the first action and what follows from
it, not by the luck of two independent continuations. The host's
own rollout state (sim state, current observation, episode tracker) is saved before and restored after,
so re-rollouts never disturb the main rollout.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from offrl.algos.rewards import add_success_bonus


def stack_states(states: list[dict]) -> dict:
    """Concatenate state trees (leading batch dim) along axis 0."""
    out = {}
    for k, v in states[0].items():
        out[k] = stack_states([s[k] for s in states]) if isinstance(v, dict) else np.concatenate([s[k] for s in states], 0)
    return out


def index_state(state: dict, idx: Any) -> dict:
    """Rows ``idx`` of a state tree (keeps the batch dim for an int index)."""
    if isinstance(idx, (int, np.integer)):
        idx = slice(int(idx), int(idx) + 1)
    return {k: (index_state(v, idx) if isinstance(v, dict) else v[idx]) for k, v in state.items()}


def draws_gaussian_noise(policy_spec: dict) -> bool:
    """Whether a policy spec samples per-step standard normal noise that re-rollouts can share (a stochastic
    Gaussian MLP; not chunked, diffusion, expert or deterministic policies)."""
    return policy_spec.get("kind") == "mlp" and not policy_spec.get("deterministic", False)


def _max_steps(sim: Any, horizon: Optional[int]) -> int:
    """The most steps a re-rollout takes: the horizon, or the episode's time limit when it is None."""
    return int(sim.max_episode_steps) if horizon is None else int(horizon)


def rerollout_on_sim(sim: Any, policy: Any, states: dict, actions: Optional[np.ndarray], samples: int,
                     horizon: Optional[int], gamma: float, success_bonus: float = 0.0,
                     live_only: bool = True, noise: Optional[np.ndarray] = None,
                     first: Optional[dict] = None) -> tuple[np.ndarray, int]:
    """Discounted returns ``[B, samples]`` of re-rollouts from the ``B`` states in ``states``.

    ``horizon=None`` follows every re-rollout to the end of its episode: the restored ``elapsed_steps``
    make the sim's time limit cut it after the remaining ``max_episode_steps - elapsed`` steps, so the
    return is the full-horizon one (no neglected tail).

    ``actions [B, a]``: the first action of every re-rollout (Q(s, a)); None: the policy picks it (V(s)).
    Returns (returns, env steps taken). ``sim`` must be an auto-resetting BatchedSim; steps after an
    env's episode ended are ignored. Where the sim has ``step_active`` (the CPU backend), an env whose
    re-rollout has ended, or that holds no job in the last chunk, is neither stepped nor reset: every live
    re-rollout takes the same steps with the same policy noise as before (the policy still acts on every
    row; rows are independent), at the cost of the live steps only (``live_only=False`` steps every env,
    for comparison). On ManiSkill's CPU backend a restore does not bring back the contact caches, so a
    re-rollout's return depends slightly on what its env ran before, on either path. The host restores
    its sim afterwards (``SimHostImpl.preserved``) either way. ``success_bonus`` is added to the reward of
    a step that ends the episode with success (see :mod:`offrl.algos.rewards`).

    ``noise [B, samples, steps, a]``: the standard normal draws of every re-rollout's policy at every step
    (``steps`` at least the horizon), for a policy that takes ``noise=`` (:class:`MLPPolicy`); None: the
    policy draws its own.

    ``first``: with ``actions`` None and a policy that keeps its raw draw (:class:`MLPPolicy`), filled with
    the observation, env action, raw action and log-prob of every re-rollout's first step (``[B, samples,
    ...]`` arrays under ``obs``, ``actions``, ``raw_actions``, ``logprob``): the on-policy actions whose
    returns V's samples are.
    """
    B = len(states["elapsed_steps"])
    K = sim.num_envs
    jobs = [(b, m) for b in range(B) for m in range(samples)]
    out = np.zeros((B, samples), np.float64)
    steps = 0
    # a sim that can step a subset of its envs (the CPU backend) steps only the live re-rollouts and resets
    # none; the others step every env, finished ones included (auto-reset), and ignore what they return
    step_active = getattr(sim, "step_active", None) if live_only else None
    limit = _max_steps(sim, horizon)
    if noise is not None and noise.shape[2] < limit:
        raise ValueError(f"noise covers {noise.shape[2]} steps, the re-rollouts take up to {limit}")
    for start in range(0, len(jobs), K):
        chunk = jobs[start:start + K]
        n = len(chunk)
        env_ids = list(range(n))
        obs = sim.set_state(index_state(states, np.array([b for b, _ in chunk])), env_ids)
        if hasattr(policy, "on_restore"):
            policy.on_restore(sim, env_ids)
        full_obs = sim._obs.copy() if hasattr(sim, "_obs") else None
        if full_obs is not None:
            full_obs[:n] = obs
        alive = np.zeros(K, bool)
        alive[:n] = True
        ret = np.zeros(K, np.float64)
        disc = np.ones(K, np.float64)
        cur = full_obs if full_obs is not None else obs
        jb, jm = np.array([b for b, _ in chunk]), np.array([m for _, m in chunk])
        for t in range(limit):
            if noise is None:
                act, logp = policy(cur, sim)
            else:  # rows past the chunk hold no job: any draw will do
                rows = np.zeros((K, noise.shape[3]), np.float32)
                rows[:n] = noise[jb, jm, t]
                act, logp = policy(cur, sim, noise=rows)
            if t == 0 and actions is not None:
                act = act.copy()
                act[:n] = actions[jb]
            elif t == 0 and first is not None:
                _record_first(first, (B, samples), jb, jm, {"obs": cur[:n], "actions": act[:n],
                                                            "raw_actions": policy.last_raw[:n], "logprob": logp[:n]})
            if step_active is not None:
                cur, rew, term, trunc, info = step_active(act, alive)
            else:
                cur, rew, term, trunc, info = sim.step(act)
            steps += int(alive.sum())
            rew = add_success_bonus(rew, term, info["success"], success_bonus)
            ret += np.where(alive, disc * rew, 0.0)
            disc *= gamma
            alive &= ~info["done"]
            if not alive.any():
                break
        for j, (b, m) in enumerate(chunk):
            out[b, m] = ret[j]
    return out, steps


def _record_first(first: dict, shape: tuple[int, int], jb: np.ndarray, jm: np.ndarray, rows: dict) -> None:
    """Write one chunk's first-step ``rows`` into ``first``'s ``[B, samples, ...]`` arrays at (jb, jm)."""
    for k, v in rows.items():
        v = np.asarray(v)
        if k not in first:
            first[k] = np.zeros(shape + v.shape[1:], np.float32)
        first[k][jb, jm] = v


def rerollout_on_host(host: Any, policy_spec: dict, states: dict, actions: Optional[np.ndarray], samples: int,
                      horizon: Optional[int], gamma: float, seed: int, success_bonus: float = 0.0,
                      live_only: bool = True, common_noise: bool = False, v_actions: bool = False) -> dict:
    """SimHost entry point (``host.apply``): re-rollouts with the host's sim, leaving its rollout untouched.
    ``common_noise``: Q's and V's sample ``m`` of a job share one table of policy noise (Gaussian MLP policies).
    ``v_actions``: also return ``v_first``, the first step of each of V's samples (see :func:`rerollout_on_sim`)."""
    from offrl.platform.rollout import build_policy

    t0 = time.perf_counter()
    for wanted, what in ((common_noise, "common re-rollout noise"), (v_actions, "learning from V's first actions")):
        if wanted and not draws_gaussian_noise(policy_spec):
            raise ValueError(f"{what} needs a stochastic Gaussian MLP re-rollout policy, got "
                             f"kind {policy_spec.get('kind')!r}")
    with host.preserved() as sim:
        policy = build_policy(policy_spec, sim, seed=seed)
        noise = None
        if common_noise:
            noise = np.random.default_rng(seed).standard_normal(
                (len(states["elapsed_steps"]), samples, _max_steps(sim, horizon), len(sim.action_low)),
                dtype=np.float32)
        q, steps = rerollout_on_sim(sim, policy, states, actions, samples, horizon, gamma, success_bonus, live_only,
                                    noise)
        v, first = None, ({} if v_actions else None)
        if actions is not None:
            v, steps_v = rerollout_on_sim(sim, policy, states, None, samples, horizon, gamma, success_bonus,
                                          live_only, noise, first)
            steps += steps_v
    out = {"q": q, "v": v, "steps": steps, "seconds": time.perf_counter() - t0}
    if first is not None and v is not None:
        out["v_first"] = first
    return out


def rerollout_pool(pool: Any, policy_spec: dict, states: dict, actions: Optional[np.ndarray], samples: int,
                   horizon: Optional[int], gamma: float, seed: int = 0, success_bonus: float = 0.0,
                   live_only: bool = True, common_noise: bool = False, v_actions: bool = False) -> dict:
    """Spread ``B`` jobs over the pool's hosts; returns q ``[B, M]``, v ``[B, M]`` (when actions given),
    total env steps and wall seconds; with ``v_actions`` (and actions given) also ``v_first``, ``[B, M, ...]``
    arrays of V's first steps. ``common_noise``, ``v_actions``: see :func:`rerollout_on_host`."""
    B = len(states["elapsed_steps"])
    parts = np.array_split(np.arange(B), len(pool))
    refs, order = [], []
    t0 = time.perf_counter()
    for i, (h, idx) in enumerate(zip(pool.hosts, parts)):
        if len(idx) == 0:
            continue
        sub_actions = None if actions is None else actions[idx]
        refs.append(h.apply.remote(rerollout_on_host, policy_spec, index_state(states, idx), sub_actions,
                                   samples, horizon, gamma, seed + 7919 * i, success_bonus, live_only,
                                   common_noise, v_actions))
        order.append(idx)
    results = pool._get(refs)
    q = np.zeros((B, samples))
    v = np.zeros((B, samples)) if actions is not None else None
    first: dict = {}
    for idx, r in zip(order, results):
        q[idx] = r["q"]
        if v is not None:
            v[idx] = r["v"]
        for k, a in r.get("v_first", {}).items():
            first.setdefault(k, np.zeros((B,) + a.shape[1:], a.dtype))[idx] = a
    out = {"q": q, "v": v, "steps": sum(r["steps"] for r in results), "seconds": time.perf_counter() - t0}
    if first:
        out["v_first"] = first
    return out
