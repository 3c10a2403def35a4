"""Rollouts on a BatchedSim, run wherever the sim lives (inside a SimHost actor, or a bare process).

The same function serves SimHost actors and the benchmark's bare processes, so both do the same work.
Arrays are time-major ``[T, N, ...]``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from offrl.algos.networks import build_actor, load_numpy_state_dict


class RandomPolicy:
    """Uniform random actions in the action bounds."""

    def __init__(self, low: np.ndarray, high: np.ndarray, seed: int = 0):
        self.low, self.high = low, high
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs: np.ndarray, sim: Any) -> tuple[np.ndarray, np.ndarray]:
        a = self.rng.uniform(self.low, self.high, size=(obs.shape[0], self.low.shape[0])).astype(np.float32)
        return a, np.zeros(obs.shape[0], np.float32)


class MLPPolicy:
    """A :class:`GaussianActor` built from its architecture kwargs and numpy weights."""

    def __init__(self, arch: dict, weights: dict, deterministic: bool = False, seed: int = 0):
        self.net = build_actor({**arch, "kind": "mlp"})
        load_numpy_state_dict(self.net, weights)
        self.net.eval()
        self.deterministic = deterministic
        self.gen = torch.Generator().manual_seed(int(seed))

    def __call__(self, obs: np.ndarray, sim: Any, noise: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """``noise [N, a]``: standard normal draws to use instead of the policy's own generator."""
        a, logp, raw = self.net.act_raw(torch.from_numpy(obs), deterministic=self.deterministic, generator=self.gen,
                                        noise=None if noise is None else torch.from_numpy(noise))
        self.last_raw = raw.numpy()
        return a.numpy(), logp.numpy()


class SequencePolicy:
    """A stateful action-sequence policy (mlp_chunk, diffusion) for a batch of envs.

    Per env it keeps the last ``To`` observations and a queue of planned actions. An env whose
    ``sim.elapsed_steps`` is 0 (a reset, or an auto-reset after the previous step) or that was restored
    (:meth:`on_restore`, after ``sim.set_state``) starts afresh: its history is its current observation
    repeated ``To`` times and its queue is empty. Envs with an empty queue replan together, in one batched
    call of the network, and queue the ``Ta`` executed actions of the predicted sequence (receding horizon).
    ``replans`` counts those batched calls.
    """

    def __init__(self, arch: dict, weights: dict, seed: int = 0):
        self.net = build_actor(arch)
        load_numpy_state_dict(self.net, weights)
        self.net.eval()
        self.gen = torch.Generator().manual_seed(int(seed))
        self.To, self.Ta = self.net.obs_horizon, self.net.action_horizon
        self.hist: Optional[np.ndarray] = None   # [N, To, d]
        self.queue: Optional[np.ndarray] = None  # [N, Ta, a]
        self.left: Optional[np.ndarray] = None   # [N] actions still queued
        self.fresh: Optional[np.ndarray] = None  # [N] start afresh at the next call
        self.replans = 0

    def _alloc(self, n: int, obs_dim: int) -> None:
        self.hist = np.zeros((n, self.To, obs_dim), np.float32)
        self.queue = np.zeros((n, self.Ta, self.net.act_dim), np.float32)
        self.left = np.zeros(n, np.int64)
        self.fresh = np.ones(n, bool)

    def reset(self, env_ids: Any = None) -> None:
        """Forget the history and planned actions of ``env_ids`` (all by default)."""
        if self.fresh is not None:
            self.fresh[slice(None) if env_ids is None else np.asarray(env_ids, np.int64)] = True

    def on_restore(self, sim: Any, env_ids: Any) -> None:
        """Envs ``env_ids`` were restored from a saved state: their history and queue no longer apply."""
        self.reset(env_ids)

    def __call__(self, obs: np.ndarray, sim: Any) -> tuple[np.ndarray, np.ndarray]:
        n = obs.shape[0]
        if self.hist is None or self.hist.shape[0] != n:
            self._alloc(n, obs.shape[1])
        fresh = self.fresh.copy()
        elapsed = getattr(sim, "elapsed_steps", None)
        if elapsed is not None:
            fresh |= np.asarray(elapsed)[:n] == 0
        self.hist[~fresh] = np.concatenate([self.hist[~fresh, 1:], obs[~fresh, None]], axis=1)
        self.hist[fresh] = obs[fresh, None]
        self.left[fresh] = 0
        self.fresh[:] = False
        replan = self.left == 0
        if replan.any():
            seq = self.net.predict(torch.from_numpy(self.hist[replan]), self.gen)
            self.queue[replan] = self.net.executed(seq).numpy()
            self.left[replan] = self.Ta
            self.replans += 1
        act = self.queue[np.arange(n), self.Ta - self.left]
        self.left -= 1
        return act.astype(np.float32), np.zeros(n, np.float32)


def build_policy(spec: dict, sim: Any, seed: int = 0):
    """A callable ``policy(obs [N, d], sim) -> (actions [N, a], logprob [N])`` from a picklable spec.

    Specs: ``{"kind": "random"}``; ``{"kind": "mlp", "arch": {...}, "weights": {...}, "deterministic": bool}``;
    ``{"kind": "mlp_chunk" | "diffusion", "arch": {...}, "weights": {...}}`` (stateful
    :class:`SequencePolicy`); ``{"kind": "expert", "name": ...}`` (scripted experts in :mod:`offrl.envs.experts`).
    """
    kind = spec.get("kind")
    if kind == "random":
        return RandomPolicy(sim.action_low, sim.action_high, seed)
    if kind == "mlp":
        return MLPPolicy(spec["arch"], spec["weights"], spec.get("deterministic", False), seed)
    if kind in ("mlp_chunk", "diffusion"):
        return SequencePolicy(spec["arch"], spec["weights"], seed)
    if kind == "expert":
        from offrl.envs.experts import make_expert

        kwargs = {"seed": seed, **spec.get("kwargs", {})}
        return make_expert(spec["name"], sim, **kwargs)
    raise ValueError(f"unknown policy kind {kind!r}")


class EpisodeTracker:
    """Running per-env episode return/length/success, emitting finished episodes."""

    def __init__(self, n: int):
        self.ret = np.zeros(n, np.float64)
        self.length = np.zeros(n, np.int64)
        self.success_once = np.zeros(n, bool)

    def reset(self) -> None:
        self.ret[:] = 0
        self.length[:] = 0
        self.success_once[:] = False

    def step(self, reward: np.ndarray, success: np.ndarray, done: np.ndarray) -> list[dict]:
        self.ret += reward
        self.length += 1
        self.success_once |= success
        out = []
        for i in np.flatnonzero(done):
            out.append({"env": int(i), "return": float(self.ret[i]), "length": int(self.length[i]),
                        "success_once": bool(self.success_once[i]), "success_at_end": bool(success[i])})
            self.ret[i] = 0
            self.length[i] = 0
            self.success_once[i] = False
        return out


def run_rollout(sim: Any, policy: Any, num_steps: int, tracker: Optional[EpisodeTracker] = None,
                obs: Optional[np.ndarray] = None, record_states: bool = False) -> dict:
    """Step ``sim`` ``num_steps`` times with ``policy``; returns numpy arrays ``[T, N, ...]``.

    Keys: obs, actions (as sent to the env), raw_actions (before clipping; ``logprob`` is theirs), logprob, rewards, terminated, truncated, success, next_obs (the observation
    after the action, i.e. the final observation of an episode that ended), episodes (list of finished
    episodes' stats), last_obs ``[N, d]``; with ``record_states`` also ``states`` (a list of T snapshots).
    """
    T, N = int(num_steps), sim.num_envs
    if obs is None:
        obs = sim._obs.copy() if hasattr(sim, "_obs") else sim.reset()
    tracker = tracker or EpisodeTracker(N)
    buf = {
        "obs": np.empty((T, N, sim.obs_dim), np.float32),
        "actions": np.empty((T, N, sim.act_dim), np.float32),
        "logprob": np.empty((T, N), np.float32),
        "rewards": np.empty((T, N), np.float32),
        "terminated": np.empty((T, N), bool),
        "truncated": np.empty((T, N), bool),
        "success": np.empty((T, N), bool),
        "next_obs": np.empty((T, N, sim.obs_dim), np.float32),
        # the sampled action before clipping to the bounds: log-probs are recomputed on it (PPO ratios)
        "raw_actions": np.empty((T, N, sim.act_dim), np.float32),
    }
    states = [] if record_states else None
    episodes: list[dict] = []
    for t in range(T):
        if record_states:
            states.append(sim.get_state())
        act, logp = policy(obs, sim)
        nobs, rew, term, trunc, info = sim.step(act)
        buf["obs"][t] = obs
        buf["actions"][t] = act
        buf["raw_actions"][t] = getattr(policy, "last_raw", act)
        buf["logprob"][t] = logp
        buf["rewards"][t] = rew
        buf["terminated"][t] = term
        buf["truncated"][t] = trunc
        buf["success"][t] = info["success"]
        buf["next_obs"][t] = info["final_obs"]
        episodes += tracker.step(rew, info["success"], info["done"])
        obs = nobs
    buf["episodes"] = episodes
    buf["last_obs"] = obs
    if record_states:
        buf["states"] = states
    return buf


def summarize_episodes(episodes: list[dict]) -> dict[str, float]:
    """Mean success/return/length of finished episodes (empty -> {})."""
    if not episodes:
        return {}
    return {
        "success_rate": float(np.mean([e["success_at_end"] for e in episodes])),
        "success_once": float(np.mean([e["success_once"] for e in episodes])),
        "return": float(np.mean([e["return"] for e in episodes])),
        "length": float(np.mean([e["length"] for e in episodes])),
        "episodes": float(len(episodes)),
    }
