"""Time reversal of pick-and-place demonstrations (``offrl data reverse``): task B's episodes become task A's.

Pick-and-place is time-reversible: played backwards, "grasp at the target, carry, release at a random goal"
is "grasp at a random place, carry, release at the target". For each episode of ``offrl/PickPlaceB-v1``
(or A; the partner task is the other one) :func:`reverse_dataset`:

1. **States.** Reverses the simulator states (``env_states``, ManiSkill's layout) and negates every
   velocity in them (:func:`reverse_states`): an actor row is ``[p(3), q(4), v(3), w(3)]``, an articulation
   row ``[root pose(7), root v(3), root w(3), qpos(dof), qvel(dof)]``. The goal marker is moved to the partner
   task's goal: the target ring for A, and for B the place the cube started from.
2. **Observations.** Restores each reversed state in the partner task and reads its observation, so every
   field (the goal, the relative vectors, the negated joint velocities) is what that task would show.
3. **Actions** (``pd_ee_delta_pos`` only; :func:`rebuild_ee_actions`). The arm's action leads from reversed
   tool-centre point ``p_t`` to ``p_{t+1}``. The controller moves its target by ``s * a`` (``s`` its limit, 0.1 m
   per unit action), but the PD-driven arm covers only part of that in one control step and carries its
   momentum into it, so ``gain="auto"`` (default) fits the linear response ``d_t = c_t A + [qvel_t, 1] V``
   (``c = s * a``, ``d`` the displacement, ``qvel_t`` the arm's joint velocities) on the forward episodes' own
   (state, action, displacement) triples and solves it for ``c_t`` (:func:`fit_arm_dynamics`): the action is a
   function of the reversed state (whose velocities are the reversed motion's) and the next position, as a
   policy's action is. A number ``k`` uses ``a = clip((p_{t+1} - p_t) / (s * k), -1, 1)`` instead (``1``: the
   controller's nominal scale). Commands are clipped to the action bounds. The gripper closes (``-1``) on the
   steps that end with the fingers closed by more than 15% of their opening range and opens (``+1``) otherwise
   (:func:`gripper_commands`): the reversed release becomes a grasp at the mirrored time.
4. **Labels.** Success on every reversed state by the partner task's rule. The episode runs all the way back
   to the state the forward episode started from (the arm at rest), terminated there: the partner task's
   success region is entered a few steps earlier, and an episode cut at that boundary would teach (and replay
   to) a final state that a centimetre of drift takes back out of it. ``settle_steps`` (5) hold-still steps
   (zero arm command), simulated from the last reversed state, follow: the arm stays at rest there, and an
   open-loop replay, which arrives with some speed left, comes to rest. Rewards are recomputed under every
   reward mode of the partner task.

:func:`replay_reversed` checks the result in the simulator: from each reversed initial state it replays the
rebuilt actions open-loop in the partner task and counts the episodes that succeed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from offrl.data.collect import state_at
from offrl.data.format import REWARD_MODES, REWARD_PREFIX, Episode
from offrl.errors import OffrlError

SUPPORTED_CONTROL = ("pd_ee_delta_pos",)
TCP_FIELD = "extra/tcp_pose"
QPOS_FIELD = "agent/qpos"
QVEL_FIELD = "agent/qvel"
GRIPPER_EPS = 1e-4   # m: finger motion smaller than this keeps the last gripper command
SETTLE_STEPS = 5     # hold-still steps simulated after the last reversed state
GRIPPER_LEVEL = 0.85  # the gripper closes once the fingers are below this fraction of their opening range


def partner_task(env_id: str) -> str:
    """The task whose data a reversed episode of ``env_id`` is; OffrlError for tasks that have none."""
    from offrl.envs.tasks import TASK_A, TASK_B

    pairs = {TASK_A: TASK_B, TASK_B: TASK_A}
    if env_id not in pairs:
        raise OffrlError(f"cannot reverse episodes of {env_id!r}: time reversal is defined for the paired "
                         f"pick-and-place tasks {TASK_B} -> {TASK_A} (and back)")
    return pairs[env_id]


# ------------------------------------------------------------------------------------ pure parts

def reverse_states(tree: dict, kind: str = "") -> dict:
    """``env_states`` (nested dict of ``[T+1, ...]`` arrays) played backwards, every velocity negated.

    ``kind``: ``actors`` or ``articulations`` (taken from the top-level key when nested).
    """
    out: dict = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = reverse_states(v, kind or k)
            continue
        a = np.array(v[::-1], copy=True)
        if kind == "actors":
            if a.shape[-1] != 13:
                raise OffrlError(f"actor state {k!r} has {a.shape[-1]} values, expected 13 (pose, velocities)")
            a[..., 7:13] *= -1.0
        elif kind == "articulations":
            dof2 = a.shape[-1] - 13
            if dof2 < 0 or dof2 % 2:
                raise OffrlError(f"articulation state {k!r} has {a.shape[-1]} values, expected 13 + 2 * dof")
            a[..., 7:13] *= -1.0
            a[..., 13 + dof2 // 2:] *= -1.0
        else:
            raise OffrlError(f"env_states entry {k!r} is neither under actors/ nor articulations/")
        out[k] = a
    return out


def gripper_commands(finger: np.ndarray, level: float = GRIPPER_LEVEL) -> np.ndarray:
    """Gripper actions ``[T]`` for finger openings ``finger`` ``[T+1]``: close (-1) on the steps that end with
    the fingers closed by more than ``1 - level`` of the episode's opening range (below ``min + level * range``),
    open (+1) otherwise.

    Panda's fingers close in one control step but open over several, so a played-back release is a slow closing
    with the arm still at the cube: the command switches once that closing is under way, and a grasp played
    backwards (a one-step opening) switches back. A level rule, unlike one on the direction of motion, is not
    triggered by the last fraction of a millimetre of a slow opening."""
    finger = np.asarray(finger, np.float64).reshape(-1)
    lo, hi = finger.min(), finger.max()
    if hi - lo < 2 * GRIPPER_EPS:  # the gripper never moves: keep its state
        return np.full(finger.shape[0] - 1, 1.0 if finger[0] > 0.02 else -1.0, np.float32)
    return np.where(finger[1:] < lo + level * (hi - lo), -1.0, 1.0).astype(np.float32)


def rebuild_ee_actions(tcp: np.ndarray, finger: np.ndarray, scale: float = 0.1,
                       gain: Union[float, Sequence[float]] = 1.0, dynamics: Optional[np.ndarray] = None,
                       qvel: Optional[np.ndarray] = None) -> np.ndarray:
    """``pd_ee_delta_pos`` actions ``[T, 4]`` that lead along a path of tool-centre points ``tcp`` ``[T+1, 3]``
    with finger openings ``finger`` ``[T+1]``.

    Without ``dynamics``: ``a_t = clip((p_{t+1} - p_t) / (scale * gain), -1, 1)``. With ``dynamics`` (the
    ``[3 + J + 1, 3]`` matrix of :func:`fit_arm_dynamics`) and the arm's joint velocities ``qvel`` ``[T+1, J]``,
    the commanded step ``c_t = scale * a_t`` solves ``d_t = c_t A + [qvel_t, 1] V`` for the displacement
    ``d_t = p_{t+1} - p_t``: a function of the state at ``t`` (its velocities) and the next position only.
    Commands are clipped to the action bounds. The gripper follows :func:`gripper_commands`.
    """
    tcp = np.asarray(tcp, np.float64)
    finger = np.asarray(finger, np.float64).reshape(-1)
    if tcp.ndim != 2 or tcp.shape[1] != 3 or finger.shape[0] != tcp.shape[0] or tcp.shape[0] < 2:
        raise OffrlError(f"rebuild_ee_actions needs tcp [T+1, 3] and finger [T+1] with T >= 1, got "
                         f"{tcp.shape} and {finger.shape}")
    k = np.broadcast_to(np.asarray(gain, np.float64), (3,))
    if not (scale > 0 and np.all(k > 0)):
        raise OffrlError(f"scale and gain must be > 0, got {scale} and {k.tolist()}")
    T = tcp.shape[0] - 1
    d = np.diff(tcp, axis=0)
    a = np.empty((T, 4), np.float32)
    if dynamics is None:
        a[:, :3] = np.clip(d / (scale * k), -1.0, 1.0)
    else:
        W = np.asarray(dynamics, np.float64)
        v = np.asarray(qvel, np.float64)[:T]
        if v.ndim != 2 or v.shape[1] + 4 != W.shape[0]:
            raise OffrlError(f"dynamics {W.shape} needs qvel [T+1, {W.shape[0] - 4}], got {np.shape(qvel)}")
        rest = np.concatenate([v, np.ones((T, 1))], axis=1) @ W[3:]
        c = (d - rest) @ np.linalg.inv(W[:3])
        a[:, :3] = np.clip(c / scale, -1.0, 1.0)
    a[:, 3] = gripper_commands(finger)
    return a


def fit_tracking_gain(tcp: Sequence[np.ndarray], actions: Sequence[np.ndarray], scale: float = 0.1) -> np.ndarray:
    """Per-axis least-squares ``k`` in ``p_{t+1} - p_t ~= k * scale * a_t`` over episodes (``tcp`` ``[T+1, 3]``,
    ``actions`` ``[T, >=3]``), clipped to [0.05, 2]."""
    d = np.concatenate([np.diff(np.asarray(p, np.float64), axis=0) for p in tcp])
    c = np.concatenate([np.asarray(a, np.float64)[:, :3] for a in actions]) * scale
    den = (c * c).sum(0)
    k = np.where(den > 1e-12, (d * c).sum(0) / np.maximum(den, 1e-12), 1.0)
    return np.clip(k, 0.05, 2.0)


def fit_arm_dynamics(tcp: Sequence[np.ndarray], qvel: Sequence[np.ndarray], actions: Sequence[np.ndarray],
                     scale: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The linear model ``d_t = c_t A + [qvel_t, 1] V`` of how the arm follows ``pd_ee_delta_pos`` commands
    (``c = scale * a``; ``d`` the tool-centre point's displacement over the control step; ``qvel_t`` the arm's
    joint velocities at its start, the momentum the PD-driven arm carries in), fitted by least squares on
    episodes with their true actions. Returns ``W = [A; V]`` ``[3 + J + 1, 3]`` and the per-axis rms residual
    (m). On PickPlaceB expert data it explains the displacement to ~0.6 mm per step, where the best single
    gain per axis leaves ~4 mm."""
    X, Y = [], []
    for p, v, a in zip(tcp, qvel, actions):
        d = np.diff(np.asarray(p, np.float64), axis=0)
        c = np.asarray(a, np.float64)[:, :3] * scale
        vv = np.asarray(v, np.float64)[: len(d)]
        X.append(np.concatenate([c, vv, np.ones((len(d), 1))], axis=1))
        Y.append(d)
    if not X or sum(len(x) for x in X) < 30:
        raise OffrlError("too few steps to fit the arm's dynamics (need 30 or more; pass a numeric gain instead)")
    X, Y = np.concatenate(X), np.concatenate(Y)
    W, *_ = np.linalg.lstsq(X, Y, rcond=None)
    if abs(np.linalg.det(W[0:3])) < 1e-9:
        raise OffrlError("the fitted arm response is singular (the data never moves some axis); pass a numeric gain")
    return W, np.sqrt(((Y - X @ W) ** 2).mean(0))


# ------------------------------------------------------------------------------------- simulator

def _np_tree(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _np_tree(v) for k, v in x.items()}
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def task_kwargs(env_kwargs: dict) -> dict:
    """The pick-and-place tasks' own keywords among a dataset's ``env_kwargs``."""
    from offrl.envs.tasks import DEFAULTS

    return {k: v for k, v in dict(env_kwargs or {}).items() if k in DEFAULTS}


def make_task_env(env_id: str, ds: Any, reward_mode: Optional[str] = None) -> Any:
    """One unwrapped physx_cpu env of ``env_id`` with the dataset's controller, obs mode and task keywords."""
    from offrl.envs.maniskill import make_maniskill_env

    mode = reward_mode or ds.reward_mode or "normalized_dense"
    env = make_maniskill_env(env_id, num_envs=1, sim_backend="physx_cpu", control_mode=ds.control_mode,
                             obs_mode=ds.obs_mode or "state", reward_mode=mode if mode in REWARD_MODES else "sparse",
                             extra=task_kwargs(ds.env_kwargs))
    env.reset(seed=0)
    return env


@dataclass
class ReverseReport:
    """What :func:`reverse_dataset` did."""

    source: str
    target_env: str
    episodes: int
    kept: int
    gain: list[float]
    arm_model: str                    #: how the arm's actions were rebuilt
    reversed_success: int             #: reversed episodes whose final state succeeds in the partner task
    replay_success: Optional[int] = None
    replay_episodes: int = 0
    seconds: float = 0.0
    dropped: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"reversed {self.kept} of {self.episodes} episodes of {self.source} into {self.target_env} "
               f"(arm actions: {self.arm_model}; {self.seconds:.1f} s)",
               f"reversed final states that succeed in {self.target_env}: {self.reversed_success}/{self.kept}"]
        if self.replay_success is not None:
            out.append(f"open-loop replay of the rebuilt actions in {self.target_env}: {self.replay_success}/"
                       f"{self.replay_episodes} succeed ({self.replay_success / max(1, self.replay_episodes):.1%})")
        out += [f"dropped: {d}" for d in self.dropped]
        return out


def _check_source(ds: Any) -> str:
    target = partner_task(ds.env_id)
    if ds.control_mode not in SUPPORTED_CONTROL:
        raise OffrlError(f"{ds.name}: control mode {ds.control_mode!r} cannot be reversed (actions are rebuilt for "
                         f"{', '.join(SUPPORTED_CONTROL)} only; collect or convert the data in that mode)")
    if not ds.has_env_states:
        raise OffrlError(f"{ds.name}: has no env_states; reversal restores simulator states")
    for name in (TCP_FIELD, QPOS_FIELD, QVEL_FIELD):
        if ds.field_slice(name) is None:
            raise OffrlError(f"{ds.name}: its observation layout has no {name} field")
    return target


def _episode_paths(ds: Any, e: Episode) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tool-centre points [T+1, 3], finger opening [T+1] and arm joint velocities [T+1, J] of an episode."""
    tcp = e.obs[:, ds.field_slice(TCP_FIELD)][:, :3]
    finger = e.obs[:, ds.field_slice(QPOS_FIELD)][:, -2]
    qvel = e.obs[:, ds.field_slice(QVEL_FIELD)][:, :-2]  # the arm's joints (the last two are the fingers)
    return tcp, finger, qvel


def reverse_episode(env: Any, ds: Any, e: Episode, gain: np.ndarray, goal_xy: Optional[np.ndarray],
                    dynamics: Optional[np.ndarray] = None, index: int = -1, settle_steps: int = SETTLE_STEPS) -> Episode:
    """One episode of ``ds`` reversed in ``env`` (the partner task; see the module docstring)."""
    import torch

    states = reverse_states(e.env_states)
    goal = states["actors"]["goal_site"]
    g = np.asarray(goal_xy if goal_xy is not None else e.env_states["actors"]["cube"][0, :2], np.float32)
    goal[:, :2] = g
    T = e.length
    trees = [_index_np(states, t) for t in range(T + 1)]
    obs = []
    for t in range(T + 1):
        env.set_state_dict(state_at(states, t))
        obs.append(_np_tree(env.get_obs())[0].astype(np.float32))
    obs = np.stack(obs)
    tcp = obs[:, ds.field_slice(TCP_FIELD)][:, :3]
    finger = obs[:, ds.field_slice(QPOS_FIELD)][:, -2]
    qvel = obs[:, ds.field_slice(QVEL_FIELD)][:, :-2]  # negated with the states: the reversed motion's velocity
    scale = float(env.agent.controller.controllers["arm"].config.pos_upper)
    actions = list(rebuild_ee_actions(tcp, finger, scale=scale, gain=gain, dynamics=dynamics, qvel=qvel))
    obs = list(obs)
    # hold still at the end, simulated from the last reversed state: the arm must come to rest there, and an
    # open-loop replay arrives with some speed left
    env.set_state_dict(state_at(states, T))
    hold = np.array([0.0, 0.0, 0.0, actions[-1][3]], np.float32)
    for _ in range(settle_steps):
        o, _, _, _, _ = env.step(torch.as_tensor(hold[None]))
        obs.append(_np_tree(o)[0].astype(np.float32))
        trees.append({k: {n: v[0] for n, v in grp.items()} for k, grp in _np_tree(env.get_state_dict()).items()})
        actions.append(hold.copy())
    end = len(actions)
    modes = [m for m in REWARD_MODES if m in getattr(env, "SUPPORTED_REWARD_MODES", REWARD_MODES)]
    per_mode: dict[str, list] = {m: [] for m in modes}
    succ = []
    for t in range(end):
        env.set_state_dict(state_at(_stack([trees[t + 1]]), 0))
        info = env.evaluate()
        succ.append(bool(info["success"].reshape(-1)[0]))
        a = torch.as_tensor(np.asarray(actions[t : t + 1], np.float32))
        for m in modes:
            per_mode[m].append(float(getattr(env, f"compute_{m}_reward")(obs=None, action=a, info=info).reshape(-1)[0]))
    rewards = {REWARD_PREFIX + m: np.asarray(per_mode[m], np.float32) for m in modes}
    if ds.reward_mode in modes:
        rewards["rewards"] = rewards[REWARD_PREFIX + ds.reward_mode]
    success = np.asarray(succ, bool)
    terminated = np.zeros(end, bool)
    truncated = np.zeros(end, bool)
    terminated[-1] = bool(success[-1])
    truncated[-1] = not success[-1]
    info = {k: v for k, v in e.info.items() if k in ("episode_seed", "control_mode")}
    info.update(reversed_from=int(index), reset_kwargs={}, elapsed_steps=int(end), success=bool(success[-1]),
                settle_steps=int(settle_steps))
    return Episode(obs=np.stack(obs), actions=np.stack(actions).astype(np.float32), terminated=terminated,
                   truncated=truncated, success=success, rewards=rewards, env_states=_stack(trees), extras={}, info=info)


def _index_np(tree: dict, t: int) -> dict:
    return {k: (_index_np(v, t) if isinstance(v, dict) else np.asarray(v[t])) for k, v in tree.items()}


def _stack(trees: list) -> dict:
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack([x[k] for x in trees]) for k in first}
    return np.stack([np.asarray(x, np.float32) for x in trees])


def replay_reversed(env: Any, episodes: Sequence[Episode], progress: Optional[Callable[[int], None]] = None) -> int:
    """Open-loop replay of each episode's actions from its initial state in ``env``; episodes that succeed."""
    import torch

    ok = 0
    for e in episodes:
        env.set_state_dict(state_at(e.env_states, 0))
        won = False
        for t in range(e.length):
            _, _, _, _, info = env.step(torch.as_tensor(e.actions[t : t + 1]))
            if bool(info["success"].reshape(-1)[0]):
                won = True
                break
        ok += won
        if progress:
            progress(1)
    return ok


def reverse_dataset(ds: Any, gain: Union[str, float] = "auto", replay: bool = True, progress: bool = False,
                    only_successful: bool = True) -> tuple[Any, ReverseReport]:
    """Reverse every (successful) episode of ``ds``; returns the partner task's dataset and a report."""
    from tqdm import tqdm

    from offrl.data.dataset import OfflineDataset
    from offrl.envs.tasks import TASK_A

    t0 = time.time()
    target = _check_source(ds)
    keep = [i for i, e in enumerate(ds.episodes) if not only_successful or e.succeeded]
    eps = [ds.episodes[i] for i in keep]
    dropped = [] if len(eps) == len(ds) else [f"{len(ds) - len(eps)} failed episodes (only successes reverse "
                                                "into demonstrations)"]
    if not eps:
        raise OffrlError(f"{ds.name}: no successful episode to reverse")
    paths = [_episode_paths(ds, e) for e in eps]
    dynamics, residual = None, None
    k = fit_tracking_gain([p[0] for p in paths], [e.actions for e in eps])
    if gain == "auto":
        dynamics, residual = fit_arm_dynamics([p[0] for p in paths], [p[2] for p in paths], [e.actions for e in eps])
    else:
        try:
            g = float(gain)
        except (TypeError, ValueError):
            raise OffrlError(f"gain must be 'auto' or a number > 0, got {gain!r}") from None
        if not (np.isfinite(g) and g > 0):
            raise OffrlError(f"gain must be 'auto' or a finite number > 0, got {gain!r}")
        k = np.full(3, g)
    env = make_task_env(target, ds)
    try:
        goal_xy = np.asarray(env.target_xy, np.float32) if target == TASK_A else None
        out = []
        for i in tqdm(keep, desc=f"reverse -> {target}", unit="ep", disable=not progress, leave=False):
            out.append(reverse_episode(env, ds, ds.episodes[i], k, goal_xy, dynamics, index=i))
        reached = sum(bool(e.success[-1]) for e in out)
        model = (f"fitted arm dynamics, rms residual {', '.join(f'{1000 * r:.2f}' for r in residual)} mm per step"
                 if dynamics is not None else f"gain {', '.join(f'{g:.3f}' for g in k)}")
        report = ReverseReport(source=ds.name, target_env=target, episodes=len(ds), kept=len(out),
                               gain=[float(x) for x in k], arm_model=model, reversed_success=reached, dropped=dropped)
        if replay:
            bar = tqdm(total=len(out), desc="replay", unit="ep", disable=not progress, leave=False)
            env.reset(seed=0)
            report.replay_success = replay_reversed(env, out, progress=bar.update)
            report.replay_episodes = len(out)
            bar.close()
    finally:
        env.close()
    meta = dict(ds.meta)
    env_info = dict(meta.get("env_info", {}))
    env_info["env_id"] = target
    meta["env_info"] = env_info
    meta["source_type"] = "offrl-time-reversed"
    meta["source_desc"] = (f"time-reversed from {ds.name} ({ds.env_id}) by offrl data reverse: states reversed "
                           "with velocities negated, observations recomputed in the partner task, pd_ee_delta_pos "
                           "actions rebuilt from next-step tool-centre points")
    meta["offrl"] = dict(meta.get("offrl", {}))
    meta["offrl"]["reverse"] = {"source": ds.name, "source_env": ds.env_id, "gain": report.gain,
                                "arm_model": report.arm_model,
                                "dynamics": dynamics.tolist() if dynamics is not None else None,
                                "reversed_final_success": reached, "episodes": len(out),
                                "replay_success": report.replay_success, "replay_episodes": report.replay_episodes}
    report.seconds = time.time() - t0
    return OfflineDataset(out, meta), report
