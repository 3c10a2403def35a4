"""The offline dataset API: episodes, transitions as torch tensors, MC returns, splits, statistics, merging.

:class:`OfflineDataset` holds a list of :class:`~offrl.data.format.Episode` in memory together with the
file's JSON metadata. Later stages (pretraining, finetuning, MC re-rollouts) use it like this::

    ds = OfflineDataset.load("datasets/PickCube-v1_expert.h5")   # validates; OffrlError on any problem
    train, val = ds.split(val_fraction=0.1, seed=0)              # by episode, deterministic
    batch = train.transitions(reward="sparse")                   # dict of flat [N, ...] tensors
    g = train.mc_returns(gamma=0.99, reward="sparse")            # [N], aligned with batch
    obs_norm = train.obs_stats()                                 # NormStats(mean, std, min, max)

Rewards: ``"rewards"`` is the dataset stored under that name (the env's configured reward mode, as
ManiSkill writes it); ``"sparse"``, ``"dense"`` and ``"normalized_dense"`` pick that mode (offrl stores all
of them as ``rewards_<mode>``); ``"success"`` uses the success flag as a 0/1 reward (for files written
without rewards). Asking for rewards the file does not have raises OffrlError listing what it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from offrl.data.format import REWARD_MODES, REWARD_PREFIX, Episode, read_trajectories, write_trajectories
from offrl.errors import OffrlError


@dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of observations or actions (float32 tensors of shape ``[dim]``)."""

    mean: torch.Tensor
    std: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor

    def normalize(self, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """``(x - mean) / max(std, eps)``."""
        return (x - self.mean) / self.std.clamp_min(eps)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """As a flat dict of numpy arrays (e.g. for safetensors next to a checkpoint)."""
        return {k: getattr(self, k).numpy() for k in ("mean", "std", "min", "max")}

    @classmethod
    def of(cls, x: np.ndarray) -> "NormStats":
        x64 = np.asarray(x, dtype=np.float64)
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        return cls(mean=t(x64.mean(0)), std=t(x64.std(0)), min=t(x64.min(0)), max=t(x64.max(0)))


class OfflineDataset:
    """Episodes of one task in one control mode, plus the metadata of the file they came from."""

    def __init__(self, episodes: list[Episode], meta: dict, path: Optional[str | Path] = None):
        if not episodes:
            raise OffrlError(f"{path or 'dataset'}: has no episodes")
        self.episodes = list(episodes)
        self.meta = meta
        self.path = Path(path) if path is not None else None

    # ---------------------------------------------------------------------------------------- I/O
    @classmethod
    def load(cls, path: str | Path, progress: bool = False) -> "OfflineDataset":
        """Read and validate a ManiSkill trajectory file (``.h5`` with its ``.json``)."""
        episodes, meta = read_trajectories(path, progress=progress)
        return cls(episodes, meta, path)

    def save(self, path: str | Path, progress: bool = False) -> Path:
        """Write as a ManiSkill trajectory pair (atomically; episodes renumbered from 0)."""
        meta = dict(self.meta)
        meta["offrl"] = dict(meta.get("offrl", {}))
        if self.obs_layout is not None:
            meta["offrl"]["obs_layout"] = self.obs_layout
        return write_trajectories(path, self.episodes, meta, progress=progress)

    def __repr__(self) -> str:
        return (f"OfflineDataset({self.env_id}, {self.control_mode}, episodes={len(self)}, steps={self.num_steps}, "
                f"obs_dim={self.obs_dim}, act_dim={self.act_dim}, path={str(self.path) if self.path else None})")

    # ----------------------------------------------------------------------------------- metadata
    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "dataset"

    @property
    def env_id(self) -> str:
        return str(self.meta.get("env_info", {}).get("env_id", ""))

    @property
    def env_kwargs(self) -> dict:
        return dict(self.meta.get("env_info", {}).get("env_kwargs") or {})

    @property
    def control_mode(self) -> Optional[str]:
        modes = {e.info.get("control_mode") for e in self.episodes} - {None}
        if len(modes) > 1:
            raise OffrlError(f"{self.name}: episodes use different control modes {sorted(modes)}")
        return modes.pop() if modes else self.env_kwargs.get("control_mode")

    @property
    def obs_mode(self) -> Optional[str]:
        return self.env_kwargs.get("obs_mode")

    @property
    def reward_mode(self) -> Optional[str]:
        """The reward mode of the ``rewards`` dataset (the env's reward_mode when the data was recorded)."""
        return self.meta.get("offrl", {}).get("reward_mode") or self.env_kwargs.get("reward_mode")

    @property
    def max_episode_steps(self) -> Optional[int]:
        v = self.meta.get("env_info", {}).get("max_episode_steps")
        return int(v) if v is not None else None

    @property
    def obs_layout(self) -> Optional[list]:
        """``[[field name, size], ...]`` naming the observation columns in order, when known."""
        layout = self.meta.get("offrl", {}).get("obs_layout")
        return [[str(n), int(s)] for n, s in layout] if layout else None

    @property
    def obs_dim(self) -> int:
        return int(self.episodes[0].obs.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.episodes[0].actions.shape[1])

    @property
    def has_env_states(self) -> bool:
        return all(e.env_states is not None for e in self.episodes)

    @property
    def reward_keys(self) -> list[str]:
        """Reward datasets present in every episode (``rewards``, ``rewards_sparse``, ...)."""
        keys = set(self.episodes[0].rewards)
        for e in self.episodes[1:]:
            keys &= set(e.rewards)
        return sorted(keys)

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def lengths(self) -> np.ndarray:
        """Steps (actions) per episode, ``[E]`` int64."""
        return np.array([e.length for e in self.episodes], dtype=np.int64)

    @property
    def num_steps(self) -> int:
        return int(self.lengths.sum())

    @property
    def success(self) -> Optional[np.ndarray]:
        """Success at the end of each episode ``[E]`` bool, or None when the data has no success labels."""
        s = [e.succeeded for e in self.episodes]
        return None if any(v is None for v in s) else np.array(s, dtype=bool)

    def field_slice(self, *names: str) -> Optional[slice]:
        """Columns of the first observation field called one of ``names`` (per :attr:`obs_layout`)."""
        if not self.obs_layout:
            return None
        start = 0
        spans = {}
        for n, size in self.obs_layout:
            spans[n] = slice(start, start + size)
            start += size
        for n in names:
            if n in spans:
                return spans[n]
        return None

    # -------------------------------------------------------------------------------------- views
    def _reward_key(self, reward: str) -> str:
        keys = self.reward_keys
        if reward == "success":
            if self.success is None or any(e.success is None for e in self.episodes):
                raise OffrlError(f"{self.name}: has no success flags to use as rewards")
            return "success"
        if reward == "rewards" and "rewards" in keys:
            return "rewards"
        if reward in REWARD_MODES:
            if REWARD_PREFIX + reward in keys:
                return REWARD_PREFIX + reward
            if "rewards" in keys and self.reward_mode == reward:
                return "rewards"
        if reward.startswith(REWARD_PREFIX) and reward in keys:
            return reward
        have = [k for k in keys] + (["success"] if self.success is not None else [])
        hint = (" (ManiSkill's replay_trajectory writes rewards only with --record-rewards)"
                if not keys else "")
        raise OffrlError(f"{self.name}: no '{reward}' rewards; available: {', '.join(have) or 'none'}{hint}")

    def episode_rewards(self, reward: str = "rewards", success_bonus: float = 0.0) -> list[np.ndarray]:
        """Per-episode reward arrays ``[T_i]`` float32 for the chosen reward (see module docstring).

        ``success_bonus`` is added to the step that ends an episode with success (terminated and success;
        see :mod:`offrl.algos.rewards`); it needs success flags in the data.
        """
        key = self._reward_key(reward)
        if success_bonus != 0 and any(e.success is None for e in self.episodes):
            raise OffrlError(f"{self.name}: a success bonus needs per-step success flags, which this data lacks "
                             "(set pretrain.success_bonus=0)")
        return [self._rewards_of(e, key, success_bonus) for e in self.episodes]

    @staticmethod
    def _rewards_of(e: Episode, key: str, success_bonus: float = 0.0) -> np.ndarray:
        r = e.success.astype(np.float32) if key == "success" else e.rewards[key]
        if success_bonus == 0:
            return r
        from offrl.algos.rewards import add_success_bonus

        return add_success_bonus(r, e.terminated, e.success.astype(bool), success_bonus)

    def episode(self, i: int, reward: str = "rewards") -> dict[str, torch.Tensor]:
        """Episode ``i`` as tensors: obs ``[T+1, d]``, action ``[T, a]``, reward, terminated, truncated ``[T]``."""
        e = self.episodes[i]
        out = {"obs": torch.from_numpy(e.obs), "action": torch.from_numpy(e.actions),
               "terminated": torch.from_numpy(e.terminated), "truncated": torch.from_numpy(e.truncated)}
        out["reward"] = torch.from_numpy(self._rewards_of(e, self._reward_key(reward)))
        if e.success is not None:
            out["success"] = torch.from_numpy(e.success)
        return out

    def transitions(self, reward: Optional[str] = "rewards", device: Any = None,
                    success_bonus: float = 0.0) -> dict[str, torch.Tensor]:
        """All steps as flat tensors ``[N, ...]``, episodes in order.

        Keys: ``obs`` and ``next_obs`` [N, obs_dim] float32, ``action`` [N, act_dim] float32, ``reward`` [N]
        float32 (absent with ``reward=None``: behaviour cloning reads no reward), ``terminated``, ``truncated``, ``last`` (the final step of its episode) [N] bool, ``episode``
        and ``step`` [N] int64, and ``success`` [N] bool when the data has it.
        """
        eps = self.episodes
        rewards = None if reward is None else self.episode_rewards(reward, success_bonus)
        lengths = self.lengths
        last = np.zeros(int(lengths.sum()), bool)
        last[np.cumsum(lengths) - 1] = True
        out = {
            "obs": np.concatenate([e.obs[:-1] for e in eps]),
            "next_obs": np.concatenate([e.obs[1:] for e in eps]),
            "action": np.concatenate([e.actions for e in eps]),
            "terminated": np.concatenate([e.terminated for e in eps]),
            "truncated": np.concatenate([e.truncated for e in eps]),
            "last": last,
            "episode": np.repeat(np.arange(len(eps), dtype=np.int64), lengths),
            "step": np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]),
        }
        if rewards is not None:
            out["reward"] = np.concatenate(rewards).astype(np.float32)
        if all(e.success is not None for e in eps):
            out["success"] = np.concatenate([e.success for e in eps])
        return {k: torch.as_tensor(v, device=device) for k, v in out.items()}

    def mc_returns(self, gamma: float, reward: str = "rewards", success_bonus: float = 0.0) -> torch.Tensor:
        """Discounted return-to-go per step, ``[N]`` float32 aligned with :meth:`transitions`.

        ``G_t = r_t + gamma * G_{t+1}`` within an episode and ``G_T = 0`` after its last step (the end of
        the recorded episode is not bootstrapped; there is no value function here).
        """
        if not 0.0 <= gamma <= 1.0:
            raise OffrlError(f"gamma must be in [0, 1], got {gamma}")
        rewards = self.episode_rewards(reward, success_bonus)
        lengths = self.lengths
        E, Tmax = len(rewards), int(lengths.max())
        r = np.zeros((E, Tmax), np.float64)
        for i, x in enumerate(rewards):
            r[i, : len(x)] = x
        g = np.zeros_like(r)
        acc = np.zeros(E, np.float64)
        for t in range(Tmax - 1, -1, -1):  # padded steps carry reward 0, so they add nothing
            acc = r[:, t] + gamma * acc
            g[:, t] = acc
        mask = np.arange(Tmax)[None, :] < lengths[:, None]
        return torch.as_tensor(g[mask].astype(np.float32))

    def returns(self, reward: str = "rewards") -> np.ndarray:
        """Undiscounted return of each episode, ``[E]`` float64."""
        return np.array([float(np.sum(r, dtype=np.float64)) for r in self.episode_rewards(reward)])

    def obs_stats(self) -> NormStats:
        """Per-dimension mean/std/min/max over every observation row (``T + 1`` per episode)."""
        return NormStats.of(np.concatenate([e.obs for e in self.episodes]))

    def action_stats(self) -> NormStats:
        """Per-dimension mean/std/min/max over every action."""
        return NormStats.of(np.concatenate([e.actions for e in self.episodes]))

    # ---------------------------------------------------------------------------- subsets, merges
    def subset(self, indices: Sequence[int]) -> "OfflineDataset":
        """The episodes at ``indices`` (shared arrays, same metadata)."""
        idx = [int(i) for i in indices]
        if not idx:
            raise OffrlError(f"{self.name}: empty subset")
        return OfflineDataset([self.episodes[i] for i in idx], self.meta, self.path)

    def split(self, val_fraction: float, seed: int = 0) -> tuple["OfflineDataset", "OfflineDataset"]:
        """(train, validation) by episode: a seeded permutation; ``round(E * val_fraction)`` episodes
        (at least 1) go to validation, in their original order. Same data and seed -> same split."""
        E = len(self)
        if not 0.0 < val_fraction < 1.0:
            raise OffrlError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if E < 2:
            raise OffrlError(f"{self.name}: needs at least 2 episodes to split, has {E}")
        n_val = min(E - 1, max(1, int(round(E * val_fraction))))
        perm = np.random.default_rng(seed).permutation(E)
        val = np.sort(perm[:n_val])
        train = np.sort(perm[n_val:])
        return self.subset(train), self.subset(val)

    def incompatibility(self, other: "OfflineDataset") -> Optional[str]:
        """Why ``other`` cannot be merged into this dataset, or None when it can."""
        checks = [
            ("env id", self.env_id, other.env_id),
            ("control mode", self.control_mode, other.control_mode),
            ("obs mode", self.obs_mode, other.obs_mode),
            ("observation size", self.obs_dim, other.obs_dim),
            ("action size", self.act_dim, other.act_dim),
        ]
        for what, a, b in checks:
            if a != b:
                return f"{what} {b} != {a}"
        if self.obs_layout is not None and other.obs_layout is not None and self.obs_layout != other.obs_layout:
            diff = next(((x, y) for x, y in zip(self.obs_layout, other.obs_layout) if x != y),
                        (self.obs_layout[-1], other.obs_layout[-1]))
            return f"observation layout differs (field {diff[1][0]}:{diff[1][1]} vs {diff[0][0]}:{diff[0][1]})"
        if (self.reward_keys or other.reward_keys) and not set(self.reward_keys) & set(other.reward_keys):
            return (f"reward datasets {other.reward_keys or 'none'} and {self.reward_keys or 'none'} have nothing in "
                    "common (ManiSkill's replay_trajectory records rewards with --record-rewards)")
        if "rewards" in self.reward_keys and "rewards" in other.reward_keys and self.reward_mode != other.reward_mode:
            return f"'rewards' were recorded in reward mode {other.reward_mode} != {self.reward_mode}"
        if (self.success is None) != (other.success is None):
            return "one has success flags and the other does not"
        if self.has_env_states != other.has_env_states:
            return "one has env_states and the other does not"
        if None not in (self.max_episode_steps, other.max_episode_steps) and \
                self.max_episode_steps != other.max_episode_steps:
            return f"max_episode_steps {other.max_episode_steps} != {self.max_episode_steps}"
        return None

    @classmethod
    def merge(cls, datasets: Sequence["OfflineDataset"]) -> "OfflineDataset":
        """Concatenate datasets of the same task, control mode and observation layout; refuse otherwise.

        Reward datasets present in only some inputs (e.g. ``rewards_dense`` in offrl data but not in a
        ManiSkill-converted file) are dropped from the result; ``meta["offrl"]["merge_notes"]`` says which.
        """
        if not datasets:
            raise OffrlError("nothing to merge")
        first = datasets[0]
        for d in datasets[1:]:
            why = first.incompatibility(d)
            if why:
                raise OffrlError(f"cannot merge {d.name} with {first.name}: {why}")
        def keys(d: "OfflineDataset") -> set[str]:
            # 'rewards' recorded in reward mode m also provides rewards_m
            alias = {REWARD_PREFIX + d.reward_mode} if "rewards" in d.reward_keys and d.reward_mode in REWARD_MODES else set()
            return set(d.reward_keys) | alias

        common = set.intersection(*(keys(d) for d in datasets))
        dropped = sorted(set.union(*(keys(d) for d in datasets)) - common)
        episodes = []
        for d in datasets:
            src = Path(d.name).name
            for i, e in enumerate(d.episodes):
                info = dict(e.info)
                info.setdefault("offrl_source", f"{src}#{i}")
                rewards = {k: e.rewards[k] if k in e.rewards else e.rewards["rewards"] for k in sorted(common)}
                episodes.append(Episode(e.obs, e.actions, e.terminated, e.truncated, e.success, rewards,
                                        e.env_states, e.extras, info))
        meta = dict(first.meta)
        meta["offrl"] = dict(meta.get("offrl", {}))
        meta["offrl"]["merged_from"] = [d.name for d in datasets]
        meta["offrl"]["merge_notes"] = [f"dropped {k} (not in every input)" for k in dropped]
        if first.obs_layout is None:
            layout = next((d.obs_layout for d in datasets if d.obs_layout is not None), None)
            if layout is not None:
                meta["offrl"]["obs_layout"] = layout
        if first.reward_mode is None:
            mode = next((d.reward_mode for d in datasets if d.reward_mode), None)
            if mode is not None:
                meta["offrl"]["reward_mode"] = mode
        return cls(episodes, meta)
