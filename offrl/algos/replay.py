"""A replay buffer of online transitions and the online/offline minibatch mix (pure torch).

Off-policy finetuning (``finetune.replay: true``) keeps every online transition in a circular
:class:`ReplayBuffer` and draws each minibatch from it and from the offline dataset at a fixed ratio
(:func:`mixed_batch`): ``round(offline_ratio * B)`` rows come from the offline data and the rest from the
buffer. ``offline_ratio = 0.5`` is RLPD's symmetric sampling (Ball et al. 2023). Until the buffer holds
anything, the whole minibatch is offline.

Batch contract (flat ``[B]`` unless noted, as :class:`offrl.algos.finetune.FinetuneLearner` reads it):
obs ``[B, d]``, actions ``[B, a]`` (as executed), raw_actions ``[B, a]`` (the sample whose log-prob is
``logprob``), logprob, rewards, next_obs ``[B, d]``, terminated (bool), and the optional ``nsteps``: the number of
environment steps between ``obs`` and ``next_obs`` (1 where a batch leaves it out; :func:`n_step` makes
rows of several). :func:`mixed_batch` adds ``offline`` (bool), which marks the rows drawn from the offline
data.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

REQUIRED = ("obs", "actions", "raw_actions", "logprob", "rewards", "next_obs", "terminated")
FIELDS = (*REQUIRED, "nsteps")


def _with_defaults(batch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``batch`` with ``nsteps`` filled in as 1 where it is absent (a one-step transition)."""
    if "nsteps" in batch:
        return batch
    return {**batch, "nsteps": torch.ones(batch["obs"].shape[0])}


def n_step(rewards: torch.Tensor, terminated: torch.Tensor, ends: torch.Tensor, next_obs: torch.Tensor,
           n: int, gamma: float) -> dict[str, torch.Tensor]:
    """n-step transitions of time-major arrays ``[T, N, ...]`` (one column per env; a flat list of whole
    episodes is ``[T, 1]``): row ``(t, i)`` gets ``rewards = sum_{j<k} gamma^j r_{t+j}``, the ``next_obs`` and
    ``terminated`` of step ``t+k-1`` and ``nsteps = k``, where ``k <= n`` stops early at the end of the episode
    (``ends``: terminated or truncated) and at the end of the arrays. The TD target of such a row is
    ``rewards + gamma^nsteps (1 - terminated) V(next_obs)``: the reward reaches ``k`` steps back at once
    (uncorrected for the behaviour policy, as in Rainbow and DrQ-v2)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    T = rewards.shape[0]
    ret = rewards.clone().float()
    nxt, term = next_obs.clone(), terminated.clone().bool()
    steps = torch.ones_like(ret)
    alive = ~ends.bool()
    for j in range(1, min(n, T)):
        go = torch.zeros_like(alive)
        go[: T - j] = alive[: T - j]               # the episode goes on past step t+j-1 and t+j is in the arrays
        ret[: T - j] += go[: T - j] * gamma ** j * rewards[j:]
        nxt[: T - j][go[: T - j]] = next_obs[j:][go[: T - j]]
        term[: T - j] = torch.where(go[: T - j], terminated[j:].bool(), term[: T - j])
        steps[: T - j] += go[: T - j].float()
        alive = go.clone()
        alive[: T - j] &= ~ends[j:].bool()
    return {"rewards": ret, "next_obs": nxt, "terminated": term, "nsteps": steps}


def _check_fields(batch: Mapping[str, torch.Tensor], what: str) -> int:
    missing = [k for k in REQUIRED if k not in batch]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)}")
    n = batch["obs"].shape[0]
    bad = {k: tuple(batch[k].shape) for k in FIELDS if k in batch and batch[k].shape[0] != n}
    if bad:
        raise ValueError(f"{what}: fields disagree on the number of rows ({n} obs rows): {bad}")
    return n


class ReplayBuffer:
    """Circular buffer of the last ``capacity`` online transitions (oldest overwritten first)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        shapes = {"obs": (obs_dim,), "actions": (act_dim,), "raw_actions": (act_dim,), "logprob": (),
                  "rewards": (), "next_obs": (obs_dim,), "terminated": (), "nsteps": ()}
        self.data = {k: torch.zeros((self.capacity, *s), dtype=torch.bool if k == "terminated" else torch.float32)
                     for k, s in shapes.items()}
        self.size = 0   # rows held
        self.pos = 0    # next row written
        self.added = 0  # rows ever added

    def __len__(self) -> int:
        return self.size

    def add(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Append the rows of a flat batch (at most the last ``capacity`` are kept)."""
        n = _check_fields(batch, "replay batch")
        batch = _with_defaults(batch)
        start = max(0, n - self.capacity)
        idx = (self.pos + torch.arange(n - start)) % self.capacity
        for k in FIELDS:
            self.data[k][idx] = batch[k][start:].to(self.data[k].dtype)
        self.pos = int((self.pos + n - start) % self.capacity)
        self.size = min(self.capacity, self.size + n - start)
        self.added += n

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """``n`` rows drawn uniformly with replacement."""
        if self.size == 0:
            raise ValueError("the replay buffer is empty")
        idx = torch.randint(0, self.size, (int(n),), generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    # -- checkpointing: the rows held, in insertion order, plus the counters
    def state_dict(self) -> dict[str, Any]:
        if self.size < self.capacity:
            order = torch.arange(self.size)
        else:
            order = (self.pos + torch.arange(self.capacity)) % self.capacity
        return {"rows": {k: v[order].clone() for k, v in self.data.items()}, "added": self.added}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rows = state["rows"]
        n = int(rows["obs"].shape[0])
        if n > self.capacity:
            raise ValueError(f"saved replay holds {n} rows, more than the capacity {self.capacity}")
        rows = _with_defaults(rows)  # checkpoints written before nsteps existed hold one-step rows
        for k in FIELDS:
            self.data[k][:n] = rows[k]
        self.size, self.pos, self.added = n, n % self.capacity, int(state["added"])


def offline_counts(batch_size: int, offline_ratio: float, replay_size: int) -> tuple[int, int]:
    """(offline rows, online rows) of one minibatch; all offline while the replay is empty."""
    if replay_size == 0:
        return batch_size, 0
    n_off = int(round(offline_ratio * batch_size))
    return n_off, batch_size - n_off


def mixed_batch(replay: ReplayBuffer, offline: Optional[Mapping[str, torch.Tensor]], batch_size: int,
                offline_ratio: float, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """One minibatch: ``round(offline_ratio * batch_size)`` offline rows (uniform, with replacement) and the
    rest from ``replay``. ``offline=None`` (or ratio 0) samples only the replay."""
    if offline is None or offline_ratio == 0:
        out = replay.sample(batch_size, generator)
        out["offline"] = torch.zeros(batch_size, dtype=torch.bool)
        return out
    n_off, n_on = offline_counts(batch_size, offline_ratio, len(replay))
    m = offline["obs"].shape[0]
    idx = torch.randint(0, m, (n_off,), generator=generator)
    parts = [_with_defaults({k: offline[k][idx] for k in FIELDS if k in offline})]
    if n_on:
        parts.append(replay.sample(n_on, generator))
    out = {k: torch.cat([p[k].to(replay.data[k].dtype) for p in parts]) for k in FIELDS}
    out["offline"] = torch.cat([torch.ones(n_off, dtype=torch.bool), torch.zeros(n_on, dtype=torch.bool)])
    return out
