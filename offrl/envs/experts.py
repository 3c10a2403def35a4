"""Scripted experts that use privileged simulator state, and the task -> expert registry.

An expert is a small state machine over the privileged poses of one task (for PickCube-v1: the
tool-centre point, the cube and the goal). Its core, :meth:`ScriptedExpert.act`, is vectorised numpy
over a batch of envs, so one expert serves three callers:

* :func:`make_expert` wraps it as an offrl policy ``policy(obs [N, d], sim) -> (actions [N, a], logprob [N])``
  for any :class:`offrl.envs.BatchedSim` (``build_policy({"kind": "expert", ...})`` uses it);
* data collection (:mod:`offrl.data.collect`) drives one unwrapped ManiSkill env per episode;
* tests call it directly.

Action noise (for suboptimal data) is Gaussian, added after the state machine, then clipped to the
action bounds; its generator is seeded, so a noisy expert is still deterministic.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from offrl.errors import OffrlError


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


class ScriptedExpert:
    """Base class: a batch of ``n`` per-env state machines with optional Gaussian action noise."""

    #: the ManiSkill controller the expert's actions are meant for
    control_mode: str = ""
    #: action dimension
    act_dim: int = 0

    def __init__(self, n: int = 1, action_noise: float = 0.0, seed: int = 0):
        if action_noise < 0:
            raise OffrlError(f"expert action_noise must be >= 0, got {action_noise}")
        self.n = int(n)
        self.action_noise = float(action_noise)
        self.rng = np.random.default_rng(seed)
        self.phase = np.zeros(self.n, np.int64)
        self.counter = np.zeros(self.n, np.int64)

    def reset(self, mask: Optional[np.ndarray] = None) -> None:
        """Restart the state machine of the envs in ``mask`` (all by default)."""
        m = slice(None) if mask is None else np.asarray(mask, bool)
        self.phase[m] = 0
        self.counter[m] = 0

    def seed(self, seed: Any) -> None:
        """Reseed the noise generator (data collection reseeds per episode)."""
        self.rng = np.random.default_rng(seed)

    def privileged(self, env: Any) -> dict[str, np.ndarray]:
        """The privileged state the expert reads from one unwrapped ManiSkill env, as ``[b, ...]`` arrays."""
        raise NotImplementedError

    def resume(self, s: dict[str, np.ndarray], ids: Any, envs: list) -> None:
        """Set the state machines of envs ``ids`` for a scene restored mid-episode (default: start over)."""
        mask = np.zeros(self.n, bool)
        mask[list(ids)] = True
        self.reset(mask)

    def clean_action(self, s: dict[str, np.ndarray]) -> np.ndarray:
        """Noise-free actions ``[n, act_dim]`` for the privileged state ``s``; advances the state machines."""
        raise NotImplementedError

    def act(self, s: dict[str, np.ndarray]) -> np.ndarray:
        """Actions ``[n, act_dim]`` float32 in [-1, 1]: the state machine's plus clipped Gaussian noise."""
        return self.act_and_label(s)[0]

    def act_and_label(self, s: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(executed, label)``, both ``[n, act_dim]`` float32 in [-1, 1]: the noisy action to run and the
        state machine's own noise-free action for the same state (the label DART records)."""
        clean = np.clip(self.clean_action(s), -1.0, 1.0)
        a = clean
        if self.action_noise > 0:
            a = np.clip(clean + self.rng.normal(0.0, self.action_noise, size=clean.shape), -1.0, 1.0)
        return a.astype(np.float32), clean.astype(np.float32)


class PickCubeExpert(ScriptedExpert):
    """PickCube-v1 in ``pd_ee_delta_pos``: hover above the cube, descend, close, lift, carry to the goal, hold.

    Actions are ``[dx, dy, dz, gripper]``; the controller maps ``dx = 1`` to a 0.1 m target offset, and the
    gripper is open at ``+1`` and closed at ``-1``. Each phase moves the tool-centre point (TCP) towards a
    target with a proportional step ``gain * (target - tcp) / 0.1`` whose norm is capped per phase (slower
    while descending and carrying, so the grasp holds). CARRY ends with the cube held still on the goal,
    which is what PickCube-v1's success needs (cube within 2.5 cm of the goal and the arm static). A cube
    dropped on the way is grasped again. Measured: 500/500 seeds solved in 12-33 steps.
    """

    control_mode = "pd_ee_delta_pos"
    act_dim = 4

    HOVER, DESCEND, CLOSE, LIFT, CARRY = range(5)
    hover_height = 0.05    # m above the cube centre before descending
    xy_tol = 0.006         # m: the TCP is above the cube
    z_tol = 0.005          # m: the TCP is at the cube centre
    close_steps = 3        # control steps with the gripper closing before lifting
    lift_height = 0.05     # m: lift the cube this far before carrying it sideways
    drop_dist = 0.04       # m: the cube this far from the TCP while carried counts as dropped (grasp again)
    max_step = {HOVER: 1.0, DESCEND: 0.6, CLOSE: 0.0, LIFT: 0.8, CARRY: 0.6}  # cap on |a_xyz|, per phase

    def __init__(self, n: int = 1, action_noise: float = 0.0, seed: int = 0, gain: float = 1.5):
        super().__init__(n, action_noise, seed)
        self.gain = float(gain)
        self.anchor = np.zeros((self.n, 3))   # where the gripper closed
        self.offset = np.zeros((self.n, 3))   # TCP minus cube centre when the cube was lifted

    def privileged(self, env: Any) -> dict[str, np.ndarray]:
        return {"tcp": _np(env.agent.tcp.pose.p), "cube": _np(env.cube.pose.p), "goal": _np(env.goal_site.pose.p)}

    def resume(self, s: dict[str, np.ndarray], ids: Any, envs: list) -> None:
        """A restored scene: carry on if the cube is in the gripper (LIFT below the carry height, else
        CARRY, keeping the current TCP-to-cube offset), keep descending if the open gripper is already
        over the cube, otherwise start over from HOVER."""
        grasped = np.concatenate([_np(e.agent.is_grasping(e.cube)).reshape(-1) for e in envs]).astype(bool)
        for i in ids:
            self.counter[i] = 0
            if grasped[i]:
                self.offset[i] = s["tcp"][i] - s["cube"][i]
                lifted = s["cube"][i][2] >= max(s["goal"][i][2], self.lift_height) - 0.01
                self.phase[i] = self.CARRY if lifted else self.LIFT
            elif (np.linalg.norm((s["cube"][i] - s["tcp"][i])[:2]) < 2 * self.xy_tol
                  and s["tcp"][i][2] < s["cube"][i][2] + self.hover_height + 0.01):
                self.phase[i] = self.DESCEND  # above the cube on the way down: keep descending
            else:
                self.phase[i] = self.HOVER

    def _move(self, tcp: np.ndarray, target: np.ndarray, cap: float) -> np.ndarray:
        d = self.gain * (target - tcp) / 0.1
        norm = np.linalg.norm(d)
        return d * (cap / norm) if norm > cap else d

    def clean_action(self, s: dict[str, np.ndarray]) -> np.ndarray:
        a = np.zeros((self.n, 4))
        for i in range(self.n):
            a[i] = self._step_one(i, s["tcp"][i], s["cube"][i], s["goal"][i])
        return a

    def _grasp(self, i: int, ph: int, tcp: np.ndarray, cube: np.ndarray, held: tuple) -> tuple[int, Any]:
        """HOVER -> DESCEND -> CLOSE -> LIFT, the grasp every expert here starts with; a cube that leaves the
        gripper in one of the ``held`` phases is grasped again. Returns the phase and the target of the last
        grasp phase run (None when none ran)."""
        target = None
        if ph in held and np.linalg.norm(tcp - cube) > self.drop_dist:
            ph = self.HOVER  # dropped: grasp again
        if ph == self.HOVER:
            target = cube + [0.0, 0.0, self.hover_height]
            if np.linalg.norm((cube - tcp)[:2]) < self.xy_tol:
                ph = self.DESCEND
        if ph == self.DESCEND:
            # straight down over the cube; re-centre in xy on the way
            target = cube.copy()
            if abs(tcp[2] - cube[2]) < self.z_tol:
                ph, self.counter[i], self.anchor[i] = self.CLOSE, 0, tcp
        if ph == self.CLOSE:
            target = self.anchor[i]
            self.counter[i] += 1
            if self.counter[i] > self.close_steps:
                ph, self.offset[i] = self.LIFT, tcp - cube
        return ph, target

    def _step_one(self, i: int, tcp: np.ndarray, cube: np.ndarray, goal: np.ndarray) -> np.ndarray:
        ph, target = self._grasp(i, self.phase[i], tcp, cube, (self.LIFT, self.CARRY))
        if ph == self.LIFT:
            lift_to = max(goal[2], cube[2] + self.lift_height) + self.offset[i, 2]
            target = np.array([tcp[0], tcp[1], lift_to])
            if tcp[2] > lift_to - 0.01 or goal[2] < cube[2] + self.lift_height:
                ph = self.CARRY
        if ph == self.CARRY:
            target = goal + self.offset[i]  # carry the cube centre (not the TCP) onto the goal
        self.phase[i] = ph
        out = np.empty(4)
        out[:3] = self._move(tcp, target, self.max_step[ph])
        out[3] = 1.0 if ph in (self.HOVER, self.DESCEND) else -1.0
        return out


class PickPlaceExpert(PickCubeExpert):
    """offrl's pick-and-place tasks (``offrl/PickPlaceA-v1``, ``offrl/PickPlaceB-v1``) in ``pd_ee_delta_pos``.

    PickCubeExpert's grasp (hover, descend, close, lift), then: carry the cube over the goal at
    ``carry_height``, lower it until it rests on the table, open the gripper and hold still for
    until the fingers are fully open (their slow opening then never overlaps the retreat, so the same episode
    played backwards shows open fingers on the way down), lift straight up until the tool-centre point is ``retreat_height`` above the cube, and go
    back to the home point, every move ramping up its speed as gently as the proportional step slows it down
    near its target (so the episode reversed in time approaches its targets as gently; without the ramp,
    policies trained on reversed B data placed the cube on A's target less than half as often) (the tasks succeed once the cube rests on the goal and the arm is home). The same
    machine solves both tasks: it reads the cube, the goal and home, wherever they are. A cube dropped before
    release is grasped again.
    """

    HOVER, DESCEND, CLOSE, LIFT, CARRY, LOWER, RELEASE, RETREAT, HOME = range(9)
    carry_height = 0.08    # m: cube centre height while carried
    place_tol = 0.004      # m: the cube is over the goal (xy) before lowering
    release_steps = 12     # at most this many control steps with the gripper opening before lifting off
    open_width = 0.039     # m: ... or fewer, once each finger is this far open (Panda's fingers open to 0.04)
    retreat_height = 0.08  # m: TCP above the cube centre before heading home
    max_step = {HOVER: 1.0, DESCEND: 0.6, CLOSE: 0.0, LIFT: 0.8, CARRY: 0.6, LOWER: 0.4, RELEASE: 0.0,
                RETREAT: 0.8, HOME: 0.8}
    ramp = 0.15            # |a_xyz| cap grows by this per step of a phase: moves start as gently as they end

    def __init__(self, n: int = 1, action_noise: float = 0.0, seed: int = 0, gain: float = 1.5):
        super().__init__(n, action_noise, seed, gain)
        self.since = np.zeros(self.n, np.int64)  # steps spent in the current phase

    def reset(self, mask: Optional[np.ndarray] = None) -> None:
        super().reset(mask)
        self.since[slice(None) if mask is None else np.asarray(mask, bool)] = 0

    def privileged(self, env: Any) -> dict[str, np.ndarray]:
        goal = _np(env.goal_site.pose.p).copy()
        goal[:, 2] = 0.02  # where the cube's centre rests on the table (the tasks' 4 cm cube)
        home = np.tile(np.asarray(env.home_xyz, np.float64), (goal.shape[0], 1))
        finger = _np(env.agent.robot.get_qpos())[:, -2]
        return {"tcp": _np(env.agent.tcp.pose.p), "cube": _np(env.cube.pose.p), "goal": goal, "home": home,
                "finger": finger}

    def clean_action(self, s: dict[str, np.ndarray]) -> np.ndarray:
        a = np.zeros((self.n, 4))
        for i in range(self.n):
            self.home, self.finger = s["home"][i], s["finger"][i]
            a[i] = self._step_one(i, s["tcp"][i], s["cube"][i], s["goal"][i])
        return a

    def resume(self, s: dict[str, np.ndarray], ids: Any, envs: list) -> None:
        """A restored scene: holding the cube -> LIFT/CARRY (keeping the offset); the cube resting on the goal
        and not held -> RETREAT (HOME when already lifted off); otherwise start over."""
        super().resume(s, ids, envs)
        for i in ids:
            on_goal = np.linalg.norm((s["cube"][i] - s["goal"][i])[:2]) < 0.02 and s["cube"][i][2] < 0.025
            if on_goal and self.phase[i] not in (self.LIFT, self.CARRY):
                self.phase[i] = self.HOME if s["tcp"][i][2] > s["cube"][i][2] + self.retreat_height - 0.01 \
                    else self.RETREAT

    def _step_one(self, i: int, tcp: np.ndarray, cube: np.ndarray, goal: np.ndarray) -> np.ndarray:
        ph, target = self._grasp(i, self.phase[i], tcp, cube, (self.LIFT, self.CARRY, self.LOWER))
        if ph == self.LIFT:
            target = np.array([tcp[0], tcp[1], self.carry_height + self.offset[i, 2]])
            if tcp[2] > self.carry_height + self.offset[i, 2] - 0.01:
                ph = self.CARRY
        if ph == self.CARRY:
            target = np.array([goal[0], goal[1], self.carry_height]) + self.offset[i]
            if np.linalg.norm((goal - cube)[:2]) < self.place_tol:
                ph = self.LOWER
        if ph == self.LOWER:
            target = goal + self.offset[i]
            if cube[2] < goal[2] + 0.003:
                ph, self.counter[i], self.anchor[i] = self.RELEASE, 0, tcp
        if ph == self.RELEASE:
            target = self.anchor[i]
            self.counter[i] += 1
            if self.counter[i] > self.release_steps or (self.counter[i] > 1 and self.finger >= self.open_width):
                ph = self.RETREAT
        if ph == self.RETREAT:
            target = np.array([tcp[0], tcp[1], cube[2] + self.retreat_height])
            if tcp[2] > cube[2] + self.retreat_height - 0.01:
                ph = self.HOME
        if ph == self.HOME:
            target = self.home
        self.since[i] = self.since[i] + 1 if ph == self.phase[i] else 0
        self.phase[i] = ph
        out = np.empty(4)
        # the P-controller slows every move down as it nears its target; the ramp speeds it up as gently, so the
        # episode played backwards (offrl data reverse) still approaches its targets slowly
        out[:3] = self._move(tcp, target, min(self.max_step[ph], self.ramp * (self.since[i] + 1)))
        out[3] = 1.0 if ph in (self.HOVER, self.DESCEND, self.RELEASE, self.RETREAT, self.HOME) else -1.0
        return out


# ------------------------------------------------------------------------------------------ registry

#: expert name -> class
EXPERTS: dict[str, type[ScriptedExpert]] = {"pickcube": PickCubeExpert, "pickplace": PickPlaceExpert}

#: ManiSkill env id -> name of the expert that solves it
TASK_EXPERTS: dict[str, str] = {"PickCube-v1": "pickcube", "offrl/PickPlaceA-v1": "pickplace",
                                 "offrl/PickPlaceB-v1": "pickplace"}


def expert_for_env(env_id: str) -> str:
    """The expert registered for ``env_id``; unknown ids raise OffrlError listing the supported ones."""
    if env_id not in TASK_EXPERTS:
        raise OffrlError(f"no scripted expert for env '{env_id}' (experts exist for: {', '.join(sorted(TASK_EXPERTS))})")
    return TASK_EXPERTS[env_id]


def expert_class(name: str) -> type[ScriptedExpert]:
    """The expert class called ``name``; unknown names raise OffrlError."""
    if name not in EXPERTS:
        raise OffrlError(f"unknown expert '{name}' (known: {', '.join(sorted(EXPERTS))})")
    return EXPERTS[name]


def check_control_mode(name: str, control_mode: str) -> None:
    """Refuse a controller the expert was not written for."""
    cls = expert_class(name)
    if control_mode != cls.control_mode:
        raise OffrlError(f"expert '{name}' acts in control_mode {cls.control_mode}, but env.control_mode is {control_mode}")


class ExpertPolicy:
    """An expert as an offrl policy on a BatchedSim: ``policy(obs [N, d], sim) -> (actions [N, a], logprob [N])``.

    Envs whose ``sim.elapsed_steps`` is 0 (just reset, or auto-reset after the previous step) restart
    their state machine. ``logprob`` is zero: the expert is not a distribution.
    """

    def __init__(self, expert: ScriptedExpert):
        self.expert = expert

    def gather(self, sim: Any) -> dict[str, np.ndarray]:
        """Privileged state of all ``sim.num_envs`` envs, concatenated over ``sim.raw_envs``."""
        parts = [self.expert.privileged(env) for env in sim.raw_envs]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def on_restore(self, sim: Any, env_ids: Any) -> None:
        """Called after ``sim.set_state`` (MC re-rollouts): resume the state machines of ``env_ids``."""
        self.expert.resume(self.gather(sim), env_ids, sim.raw_envs)

    def __call__(self, obs: np.ndarray, sim: Any) -> tuple[np.ndarray, np.ndarray]:
        fresh = np.asarray(sim.elapsed_steps) == 0
        if fresh.any():
            self.expert.reset(fresh)
        a = self.expert.act(self.gather(sim))
        return a, np.zeros(a.shape[0], np.float32)


def make_expert(name: str, sim: Any, action_noise: float = 0.0, seed: int = 0, **kwargs: Any) -> Callable:
    """The expert ``name`` (``"auto"``: the one registered for ``sim.env_id``) as a policy for ``sim``."""
    if name == "auto":
        name = expert_for_env(getattr(sim, "env_id", ""))
    cls = expert_class(name)
    control_mode = getattr(sim, "env_kwargs", {}).get("control_mode")
    if control_mode is not None:
        check_control_mode(name, control_mode)
    return ExpertPolicy(cls(sim.num_envs, action_noise=action_noise, seed=seed, **kwargs))
