"""The simulator protocol every backend implements.

Shapes: ``N = num_envs``; observations ``[N, obs_dim]`` float32, actions ``[N, act_dim]`` float32,
rewards/terminated/truncated/success ``[N]``. Everything crossing this interface is numpy, so it can
leave a Ray actor without pickling torch tensors.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class BatchedSim(Protocol):
    """A batch of ``num_envs`` environments stepped together.

    ``step`` auto-resets finished envs: the returned ``obs`` row of a finished env is the first
    observation of its next episode, and ``info["final_obs"]`` holds the observation that ended the
    episode (use it to bootstrap on truncation). Episode step counts and time limits are tracked by
    the adapter itself, so a restored state carries its own step counter.
    """

    num_envs: int
    obs_dim: int
    act_dim: int
    action_low: np.ndarray
    action_high: np.ndarray
    max_episode_steps: int

    def reset(self, seed: Optional[int] = None) -> np.ndarray:
        """Reset every env; env ``i`` is seeded with ``seed + i``. Returns obs ``[N, obs_dim]``."""

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Step all envs. Returns (obs, reward, terminated, truncated, info).

        ``info`` has ``success [N] bool``, ``final_obs [N, obs_dim]``, ``done [N] bool`` and
        ``elapsed_steps [N] int`` (steps taken in the episode that just ended or goes on).
        """

    # Optional: ``step_active(actions, active [N] bool)`` steps only the active envs and resets none
    # (MC re-rollouts use it where present; see ManiSkillCPUSim.step_active).

    def get_state(self, env_ids: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """Snapshot envs ``env_ids`` (all by default) as a dict of numpy arrays with a leading batch dim."""

    def set_state(self, state: dict[str, Any], env_ids: Optional[Sequence[int]] = None) -> np.ndarray:
        """Restore a snapshot into envs ``env_ids``; returns their observations ``[len(env_ids), obs_dim]``."""

    def close(self) -> None:
        """Release the simulator."""
