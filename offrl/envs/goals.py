"""Hindsight goal relabelling for goal-reaching tasks with a sparse success reward (``finetune.her_relabel``).

Hindsight experience replay (Andrychowicz et al. 2017) turns a transition that missed its goal into one that
reached another: the goal is moved to where the object actually is at a later step of the same episode
(the "future" strategy), the goal-dependent parts of the observation are recomputed, and the reward is the
task's own success test evaluated against the new goal. On PickCube-v1 the sparse reward only says
"within 2.5 cm of the goal and static"; relabelled transitions put many such successes into the replay, at
every distance the episodes visit, so the critics learn how the success depends on the last few
centimetres instead of seeing it only where the original goals happened to be reached.

A task is relabelled from its flat state observation alone, by the names of its parts
(:func:`offrl.envs.maniskill.obs_fields`), so the simulator is never asked. :data:`TASKS` describes each
supported task; the success test is the task's ``evaluate()`` written over those parts (for PickCube-v1:
``||goal - cube|| <= goal_thresh`` and every arm joint velocity within 0.2, ``Panda.is_static``), and
``tests/envs/test_goals.py`` checks it against the flags the real simulator reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class GoalTask:
    """Where a task's goal lives in its observation and how its success is judged."""

    goal: str                      # the goal position's field
    achieved: str                  # the field whose first 3 entries are the object's position
    to_goal: tuple[str, ...]       # fields holding goal - object position (recomputed)
    qvel: str                      # joint velocities' field
    arm_joints: int                # leading joints of qvel the static test reads (Panda: 7, not the fingers)
    goal_thresh: float             # success distance (m)
    static_thresh: float           # max |joint velocity| of a static robot (rad/s)


TASKS: dict[str, GoalTask] = {
    # ManiSkill's PickCube-v1: goal_thresh 0.025, is_static(0.2) over qvel[..., :-2]
    "PickCube-v1": GoalTask(goal="extra/goal_pos", achieved="extra/obj_pose", to_goal=("extra/obj_to_goal_pos",),
                            qvel="agent/qvel", arm_joints=7, goal_thresh=0.025, static_thresh=0.2),
}


class GoalRelabeller:
    """Relabels rounds of ``[T, N]`` transitions of one task (see the module docstring)."""

    def __init__(self, env_id: str, fields: Optional[Sequence[Sequence]]):
        from offrl.errors import ConfigError

        if env_id not in TASKS:
            raise ConfigError("finetune.her_relabel", f"no goal layout known for {env_id} (known: {', '.join(TASKS)})")
        if not fields:
            raise ConfigError("finetune.her_relabel", f"{env_id}'s observation has no named parts to relabel")
        task = TASKS[env_id]
        by_name = {str(f[0]): (int(f[1]), int(f[2])) for f in fields}
        need = [task.goal, task.achieved, task.qvel, *task.to_goal]
        missing = [n for n in need if n not in by_name]
        if missing:
            raise ConfigError("finetune.her_relabel", f"{env_id}'s observation lacks {', '.join(missing)}")
        self.task = task
        self.goal = slice(by_name[task.goal][0], by_name[task.goal][0] + 3)
        self.pos = slice(by_name[task.achieved][0], by_name[task.achieved][0] + 3)
        self.to_goal = [slice(by_name[n][0], by_name[n][0] + 3) for n in task.to_goal]
        q0 = by_name[task.qvel][0]
        self.arm_qvel = slice(q0, q0 + task.arm_joints)

    def success(self, obs: np.ndarray, goal: Optional[np.ndarray] = None) -> np.ndarray:
        """The task's success in observation ``obs`` (``[..., d]``), against ``goal`` (default: the observed one)."""
        g = obs[..., self.goal] if goal is None else goal
        placed = np.linalg.norm(g - obs[..., self.pos], axis=-1) <= self.task.goal_thresh
        static = np.abs(obs[..., self.arm_qvel]).max(-1) <= self.task.static_thresh
        return placed & static

    def with_goal(self, obs: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """A copy of ``obs`` whose goal is ``goal`` (goal-relative parts recomputed)."""
        out = obs.copy()
        out[..., self.goal] = goal
        for s in self.to_goal:
            out[..., s] = goal - obs[..., self.pos]
        return out

    @staticmethod
    def episode_ends(done: np.ndarray) -> np.ndarray:
        """``[T, N]``: the last step of the episode each step belongs to, within the round (a round's last
        step ends the segment: an episode running on into the next round is relabelled from this part)."""
        T = done.shape[0]
        end = np.empty(done.shape, np.int64)
        end[T - 1] = T - 1
        for t in range(T - 2, -1, -1):
            end[t] = np.where(done[t], t, end[t + 1])
        return end

    @staticmethod
    def episode_starts(done: np.ndarray) -> np.ndarray:
        """``[T, N]``: the first step of the episode each step belongs to, within the round (an episode that
        began in an earlier round starts at the round's first step here)."""
        start = np.empty(done.shape, np.int64)
        start[0] = 0
        for t in range(1, done.shape[0]):
            start[t] = np.where(done[t - 1], t, start[t - 1])
        return start

    def relabel(self, data: Mapping[str, np.ndarray], copies: int, rng: np.random.Generator,
                min_move: float = 0.0, move_from: str = "transition") -> tuple[dict[str, torch.Tensor], float]:
        """``copies`` relabelled versions of every transition of a round (arrays ``[T, N, ...]`` with obs,
        actions, raw_actions, logprob, next_obs, terminated, truncated), flat in the replay batch contract,
        and the share of them that reach their new goal. Each copy's goal is the object's position after a
        step drawn uniformly from this one to the end of its episode (HER's "future" goals, the same step
        included: that copy always counts as reached when the robot is static). ``min_move > 0`` drops the
        copies whose goal lies within ``min_move`` of where the object is at the transition's start (goals the
        episode never moved the object to: "reached" there by holding still); with ``move_from="episode"``,
        of where it was at its episode's start (the first step of the episode in this round) instead, so a
        goal the object was carried to and held still at stays, and only "reached without moving it" goes."""
        obs, nxt = data["obs"], data["next_obs"]
        T, N = obs.shape[:2]
        done = np.asarray(data["terminated"]) | np.asarray(data["truncated"])
        end = self.episode_ends(done)
        t = np.arange(T)[:, None]
        cols = np.broadcast_to(np.arange(N)[None, :], (T, N))
        if move_from not in ("transition", "episode"):
            raise ValueError(f"move_from must be 'transition' or 'episode', got {move_from!r}")
        if min_move > 0:  # where the object is measured from: the transition's start or its episode's
            origin = obs if move_from == "transition" else obs[self.episode_starts(done), cols]
            ref = origin[..., self.pos]
        parts: dict[str, list] = {k: [] for k in ("obs", "actions", "raw_actions", "logprob", "rewards",
                                                  "next_obs", "terminated")}
        for _ in range(int(copies)):
            fut = t + np.floor(rng.random((T, N)) * (end - t + 1)).astype(np.int64)
            goal = nxt[fut, cols][..., self.pos]                                   # [T, N, 3]
            keep = np.linalg.norm(goal - ref, axis=-1) >= min_move if min_move > 0 else \
                np.ones((T, N), bool)
            hit = self.success(nxt, goal)
            parts["obs"].append(self.with_goal(obs, goal)[keep])
            parts["next_obs"].append(self.with_goal(nxt, goal)[keep])
            parts["rewards"].append(hit.astype(np.float32)[keep])
            parts["terminated"].append(hit[keep])
            for k in ("actions", "raw_actions", "logprob"):
                parts[k].append(np.asarray(data[k])[keep])
        flat = {k: torch.from_numpy(np.ascontiguousarray(np.concatenate(v))) for k, v in parts.items()}
        rate = float(flat["rewards"].mean()) if flat["rewards"].numel() else 0.0
        return flat, rate
