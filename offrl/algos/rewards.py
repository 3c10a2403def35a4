"""Reward shaping shared by pretraining, finetuning and MC re-rollouts (pure numpy/torch, no simulator).

ManiSkill tasks such as PickCube-v1 *terminate* the episode on success. With a dense reward that keeps
paying up to its maximum while the robot hovers near the goal, termination makes finishing worth less
than dawdling: with ``normalized_dense`` (max 1 per step) and gamma 0.8, an agent that holds the cube just
short of success collects up to 1 / (1 - 0.8) = 5, while the succeeding step ends the return. Policy
gradient then learns to *avoid* finishing (measured: PPO took a BC policy from 0.48 to 0.10 success while
its rollout return rose).

The fix used here is a terminal *success bonus*: the step that ends an episode with success
(``terminated and success``) gets ``bonus`` added to its reward, as if the episode went on in an
absorbing state paying the maximum reward. :func:`auto_success_bonus` picks
``sum_{k < H} gamma^k = (1 - gamma^H) / (1 - gamma)`` for ``normalized_dense`` (H: the episode time
limit), the return of staying at the maximum reward to the end of a full-length episode, so no
behaviour near the goal can beat finishing. Other reward modes get 0 unless a bonus is given
(``sparse`` already pays only on success).
"""

from __future__ import annotations

from typing import Optional, TypeVar

import numpy as np

Array = TypeVar("Array")


def auto_success_bonus(bonus: Optional[float], reward_mode: Optional[str], gamma: float, horizon: int) -> float:
    """``bonus`` when given; else the default of the module docstring for ``reward_mode``."""
    if bonus is not None:
        return float(bonus)
    if reward_mode != "normalized_dense":
        return 0.0
    if gamma >= 1.0:
        return float(horizon)
    return float((1.0 - gamma ** horizon) / (1.0 - gamma))


def add_success_bonus(rewards: Array, terminated: Array, success: Array, bonus: float) -> Array:
    """``rewards + bonus`` where ``terminated & success``; any shape, numpy arrays or torch tensors.

    Returns a new array/tensor (the inputs are not modified); ``bonus == 0`` returns ``rewards`` itself.
    """
    if bonus == 0:
        return rewards
    hit = terminated & success
    if isinstance(rewards, np.ndarray):
        return (rewards + bonus * hit.astype(rewards.dtype)).astype(rewards.dtype)
    return rewards + bonus * hit.to(rewards.dtype)
