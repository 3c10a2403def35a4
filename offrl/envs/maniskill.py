"""ManiSkill backends of :class:`offrl.envs.base.BatchedSim`.

* :class:`ManiSkillCPUSim`: ``K`` single-env ``physx_cpu`` instances in one process (ManiSkill refuses
  ``num_envs > 1`` on the CPU backend).
* :class:`ManiSkillGPUSim`: one ``physx_cuda`` env with ``num_envs = N`` (e.g. 512), partial resets by
  ``env_idx``. Needs CUDA; tested behind the ``gpu`` marker.

Both track episode steps and time limits themselves: ManiSkill's elapsed-step counter is not part of
its saved state, so a restored snapshot would otherwise inherit the wrong counter.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from offrl.errors import OffrlError

# ManiSkill logs a warning on every CPU env creation about the missing CUDA render device.
logging.getLogger("mani_skill").setLevel(logging.ERROR)


def _import_maniskill():
    warnings.filterwarnings("ignore", module="mani_skill")
    warnings.filterwarnings("ignore", category=UserWarning, module="gymnasium")
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    import offrl.envs.tasks  # noqa: F401  (registers offrl's own tasks)

    logging.getLogger("mani_skill").setLevel(logging.ERROR)
    return gym


def list_tasks() -> list[str]:
    """ManiSkill task ids known to gymnasium's registry."""
    gym = _import_maniskill()
    from mani_skill.utils.registration import REGISTERED_ENVS

    return sorted(REGISTERED_ENVS) if REGISTERED_ENVS else sorted(gym.registry)


def _to_np(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, dict):
        return {k: _to_np(v) for k, v in x.items()}
    return np.asarray(x)


def _stack_states(states: list[dict]) -> dict:
    """Concatenate per-env state dicts (each with batch dim 1) along the batch dim."""
    out = {}
    for k, v in states[0].items():
        if isinstance(v, dict):
            out[k] = _stack_states([s[k] for s in states])
        else:
            out[k] = np.concatenate([s[k] for s in states], axis=0)
    return out


def _index_state(state: dict, i: Any) -> dict:
    return {k: (_index_state(v, i) if isinstance(v, dict) else v[i]) for k, v in state.items()}


_NO_VULKAN = "SAPIEN found no usable Vulkan device"


def check_env_id(env_id: str) -> None:
    """Raise OffrlError naming ``env_id`` when ManiSkill does not know it (cheap: no simulator is built)."""
    gym = _import_maniskill()
    if env_id not in gym.registry:
        known = [t for t in gym.registry if "-v" in t and not t.startswith(("CartPole", "Acrobot"))]
        close = [t for t in known if t.lower().startswith(env_id.lower()[:4])][:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise OffrlError(f"unknown env id '{env_id}'{hint}")


def make_maniskill_env(env_id: str, *, num_envs: int, sim_backend: str, control_mode: str, obs_mode: str,
                       reward_mode: str, sim_config: Optional[dict] = None, extra: Optional[dict] = None):
    """``gym.make`` a ManiSkill task and return its unwrapped env; unknown ids raise OffrlError."""
    gym = _import_maniskill()
    check_env_id(env_id)
    if not obs_mode.startswith("state"):  # refused before building: camera modes would start a renderer
        raise OffrlError(f"obs_mode '{obs_mode}' is not supported: offrl needs flat state vectors (obs_mode=state)")
    kwargs: dict[str, Any] = dict(num_envs=num_envs, obs_mode=obs_mode, control_mode=control_mode,
                                  reward_mode=reward_mode, sim_backend=sim_backend, render_mode=None)
    if obs_mode.startswith("state"):
        kwargs["render_backend"] = "none"  # no camera needed: skips the render device (SAPIEN still needs Vulkan)
    if sim_config:
        kwargs["sim_config"] = sim_config
    kwargs.update(extra or {})
    try:
        env = gym.make(env_id, **kwargs)
    except (AssertionError, ValueError, KeyError, NotImplementedError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OffrlError(f"cannot build {env_id} (control_mode={control_mode}, obs_mode={obs_mode}, "
                         f"reward_mode={reward_mode}, sim_backend={sim_backend}): {msg}") from None
    except RuntimeError as e:
        if "rendering device" in str(e) or "Vulkan" in str(e) or "vk::" in str(e):
            raise OffrlError(f"{_NO_VULKAN}; run scripts/setup_system.sh "
                             "(Mesa >= 24.3 lavapipe on CPU machines)") from None
        raise
    except OffrlError:
        raise
    except Exception as e:  # ManiSkill checks sim_config with dacite (strict); a task refuses unknown keywords
        if not (sim_config or extra) or not (isinstance(e, TypeError) or type(e).__module__.split(".")[0] == "dacite"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = f"env.sim_config {sim_config!r}" if sim_config else f"env.kwargs {extra!r}"
        if sim_config and extra:
            what = f"env.sim_config {sim_config!r} or env.kwargs {extra!r}"
        raise OffrlError(f"cannot build {env_id}: {what} was refused: {msg}") from None
    u = env.unwrapped
    space = u.single_observation_space
    if not (hasattr(space, "shape") and space.shape is not None and len(space.shape) == 1):
        env.close()
        raise OffrlError(f"obs_mode '{obs_mode}' gives non-vector observations; offrl needs obs_mode=state")
    return u


class _TimeLimit:
    """Per-env step counters, episode seeds and the time limit (shared by both backends)."""

    def __init__(self, num_envs: int, max_episode_steps: int):
        self.max_episode_steps = int(max_episode_steps)
        self.elapsed = np.zeros(num_envs, dtype=np.int64)
        self.rng = np.random.default_rng(0)

    def next_seeds(self, n: int) -> list[int]:
        return [int(s) for s in self.rng.integers(0, 2**31 - 1, size=n)]


def _init_common(sim: Any, u: Any, max_episode_steps: int, env_kwargs: dict) -> None:
    """Spaces, time limit and observation buffer shared by both backends (``u``: an unwrapped env)."""
    sim.obs_dim = int(u.single_observation_space.shape[0])
    sim.act_dim = int(u.single_action_space.shape[0])
    sim.action_low = np.asarray(u.single_action_space.low, dtype=np.float32)
    sim.action_high = np.asarray(u.single_action_space.high, dtype=np.float32)
    sim._tl = _TimeLimit(sim.num_envs, max_episode_steps)
    sim.max_episode_steps = sim._tl.max_episode_steps
    sim.env_kwargs = env_kwargs
    sim._obs = np.zeros((sim.num_envs, sim.obs_dim), dtype=np.float32)
    # True: success does not end an episode (it runs to the time limit), as ManiSkill's
    # ignore_terminations does for learning-from-demos evaluation
    sim.ignore_terminations = False


class ManiSkillCPUSim:
    """``K`` single-env ``physx_cpu`` ManiSkill instances stepped one after another in this process."""

    backend = "cpu"

    def __init__(self, env_id: str = "PickCube-v1", num_envs: int = 1, control_mode: str = "pd_ee_delta_pos",
                 obs_mode: str = "state", reward_mode: str = "normalized_dense", max_episode_steps: int = 50,
                 sim_config: Optional[dict] = None, autoreset: bool = True, task_kwargs: Optional[dict] = None):
        self.env_id = env_id
        self.num_envs = int(num_envs)
        self.autoreset = autoreset
        self.envs = [make_maniskill_env(env_id, num_envs=1, sim_backend="physx_cpu", control_mode=control_mode,
                                        obs_mode=obs_mode, reward_mode=reward_mode, sim_config=sim_config,
                                        extra=task_kwargs)
                     for _ in range(self.num_envs)]
        _init_common(self, self.envs[0], max_episode_steps, dict(control_mode=control_mode, obs_mode=obs_mode,
                                                                 reward_mode=reward_mode, sim_backend="physx_cpu",
                                                                 **(task_kwargs or {})))

    # -- helpers
    def _reset_one(self, i: int, seed: int) -> np.ndarray:
        obs, _ = self.envs[i].reset(seed=seed)
        self._tl.elapsed[i] = 0
        self._obs[i] = _to_np(obs)[0]
        return self._obs[i]

    def _step_one(self, i: int, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        """Step env ``i`` with ``action [1, a]``: (obs, reward, terminated, success)."""
        o, r, te, _tr, info = self.envs[i].step(action)
        succ = bool(_to_np(info["success"]).reshape(-1)[0]) if "success" in info else False
        return _to_np(o)[0], float(_to_np(r).reshape(-1)[0]), bool(_to_np(te).reshape(-1)[0]), succ

    @property
    def elapsed_steps(self) -> np.ndarray:
        return self._tl.elapsed.copy()

    @property
    def raw_envs(self) -> list:
        """The unwrapped ManiSkill envs (for privileged scripted experts)."""
        return self.envs

    def reset(self, seed: Optional[int] = None) -> np.ndarray:
        base = int(seed) if seed is not None else int(self._tl.rng.integers(0, 2**31 - 1))
        self._tl.rng = np.random.default_rng(base + 10_007)
        for i in range(self.num_envs):
            self._reset_one(i, base + i)
        return self._obs.copy()

    def step(self, actions: np.ndarray):
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (self.num_envs, self.act_dim):
            raise ValueError(f"actions must have shape {(self.num_envs, self.act_dim)}, got {actions.shape}")
        n = self.num_envs
        rew = np.zeros(n, np.float32)
        term = np.zeros(n, bool)
        succ = np.zeros(n, bool)
        obs = np.empty((n, self.obs_dim), np.float32)
        for i in range(n):
            obs[i], rew[i], term[i], succ[i] = self._step_one(i, actions[i : i + 1])
        if self.ignore_terminations:
            term[:] = False
        self._tl.elapsed += 1
        elapsed = self._tl.elapsed.copy()
        trunc = (elapsed >= self._tl.max_episode_steps) & ~term
        done = term | trunc
        final_obs = obs.copy()
        self._obs[:] = obs
        if self.autoreset and done.any():
            seeds = self._tl.next_seeds(int(done.sum()))
            for i, s in zip(np.flatnonzero(done), seeds):
                obs[i] = self._reset_one(int(i), s)
        info = {"success": succ, "final_obs": final_obs, "done": done, "elapsed_steps": elapsed}
        return obs, rew, term, trunc, info

    def step_active(self, actions: np.ndarray, active: np.ndarray):
        """Step only the envs where ``active`` is true, and reset none (re-rollouts: an env whose job has
        ended costs nothing until the next job is restored into it).

        Same returns as :meth:`step`. Inactive envs keep their state, step counter and observation; their
        reward, terminated, truncated, success and done are false/0. An active env that finishes is left
        at its final state (no auto-reset, no episode seed drawn): ``obs`` is its final observation.
        Stepping envs one after another, the CPU backend pays only for the active ones.
        """
        actions = np.asarray(actions, dtype=np.float32)
        active = np.asarray(active, dtype=bool)
        n = self.num_envs
        if actions.shape != (n, self.act_dim) or active.shape != (n,):
            raise ValueError(f"actions must have shape {(n, self.act_dim)} and active {(n,)}, "
                             f"got {actions.shape} and {active.shape}")
        rew = np.zeros(n, np.float32)
        term = np.zeros(n, bool)
        succ = np.zeros(n, bool)
        for i in np.flatnonzero(active):
            self._obs[i], rew[i], term[i], succ[i] = self._step_one(int(i), actions[i : i + 1])
        if self.ignore_terminations:
            term[:] = False
        self._tl.elapsed[active] += 1
        elapsed = self._tl.elapsed.copy()
        trunc = active & (elapsed >= self._tl.max_episode_steps) & ~term
        done = term | trunc
        obs = self._obs.copy()
        return obs, rew, term, trunc, {"success": succ, "final_obs": obs.copy(), "done": done,
                                       "elapsed_steps": elapsed}

    def get_state(self, env_ids: Optional[Sequence[int]] = None) -> dict:
        ids = range(self.num_envs) if env_ids is None else env_ids
        sim = _stack_states([_to_np(self.envs[i].get_state_dict()) for i in ids])
        return {"sim": sim, "elapsed_steps": self._tl.elapsed[list(ids)].copy(),
                "obs": self._obs[list(ids)].copy()}

    def set_state(self, state: dict, env_ids: Optional[Sequence[int]] = None) -> np.ndarray:
        import torch

        ids = list(range(self.num_envs) if env_ids is None else env_ids)
        for j, i in enumerate(ids):
            one = _index_state(state["sim"], slice(j, j + 1))
            self.envs[i].set_state_dict(_to_torch(one, torch))
            self._tl.elapsed[i] = int(state["elapsed_steps"][j])
            self._obs[i] = _to_np(self.envs[i].get_obs())[0]
        return self._obs[ids].copy()

    def close(self) -> None:
        for e in self.envs:
            e.close()
        self.envs = []


def _to_torch(state: dict, torch: Any, device: Any = None) -> dict:
    return {k: (_to_torch(v, torch, device) if isinstance(v, dict) else torch.as_tensor(v, device=device))
            for k, v in state.items()}


class ManiSkillGPUSim:
    """One ``physx_cuda`` ManiSkill env with ``num_envs`` parallel sub-scenes (e.g. 512)."""

    backend = "gpu"

    def __init__(self, env_id: str = "PickCube-v1", num_envs: int = 512, control_mode: str = "pd_ee_delta_pos",
                 obs_mode: str = "state", reward_mode: str = "normalized_dense", max_episode_steps: int = 50,
                 sim_config: Optional[dict] = None, autoreset: bool = True, task_kwargs: Optional[dict] = None):
        import torch

        if not torch.cuda.is_available():
            raise OffrlError("env.backend=gpu needs a CUDA GPU (ManiSkill physx_cuda); none is visible here")
        self.torch = torch
        self.env_id = env_id
        self.num_envs = int(num_envs)
        self.autoreset = autoreset
        self.env = make_maniskill_env(env_id, num_envs=self.num_envs, sim_backend="physx_cuda",
                                      control_mode=control_mode, obs_mode=obs_mode, reward_mode=reward_mode,
                                      sim_config=sim_config, extra=task_kwargs)
        self.device = self.env.device
        _init_common(self, self.env, max_episode_steps, dict(control_mode=control_mode, obs_mode=obs_mode,
                                                             reward_mode=reward_mode, sim_backend="physx_cuda",
                                                             **(task_kwargs or {})))

    @property
    def elapsed_steps(self) -> np.ndarray:
        return self._tl.elapsed.copy()

    @property
    def raw_envs(self) -> list:
        return [self.env]

    def reset(self, seed: Optional[int] = None) -> np.ndarray:
        base = int(seed) if seed is not None else int(self._tl.rng.integers(0, 2**31 - 1))
        self._tl.rng = np.random.default_rng(base + 10_007)
        obs, _ = self.env.reset(seed=[base + i for i in range(self.num_envs)])
        self._tl.elapsed[:] = 0
        self._obs[:] = _to_np(obs)
        return self._obs.copy()

    def step(self, actions: np.ndarray):
        torch = self.torch
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (self.num_envs, self.act_dim):
            raise ValueError(f"actions must have shape {(self.num_envs, self.act_dim)}, got {actions.shape}")
        o, r, te, _tr, info = self.env.step(torch.as_tensor(actions, device=self.device))
        obs = _to_np(o).astype(np.float32)
        rew = _to_np(r).astype(np.float32).reshape(-1)
        term = _to_np(te).astype(bool).reshape(-1)
        succ = _to_np(info["success"]).astype(bool).reshape(-1) if "success" in info else np.zeros_like(term)
        if self.ignore_terminations:
            term[:] = False
        self._tl.elapsed += 1
        elapsed = self._tl.elapsed.copy()
        trunc = (elapsed >= self._tl.max_episode_steps) & ~term
        done = term | trunc
        final_obs = obs.copy()
        self._obs[:] = obs
        if self.autoreset and done.any():
            idx = np.flatnonzero(done)
            seeds = self._tl.next_seeds(len(idx))
            o2, _ = self.env.reset(seed=seeds, options={"env_idx": torch.as_tensor(idx, device=self.device)})
            o2 = _to_np(o2)
            obs[idx] = o2[idx] if o2.shape[0] == self.num_envs else o2
            self._tl.elapsed[idx] = 0
            self._obs[:] = obs
        info = {"success": succ, "final_obs": final_obs, "done": done, "elapsed_steps": elapsed}
        return obs, rew, term, trunc, info

    def get_state(self, env_ids: Optional[Sequence[int]] = None) -> dict:
        full = _to_np(self.env.get_state_dict())
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids)
        return {"sim": _index_state(full, ids), "elapsed_steps": self._tl.elapsed[ids].copy(),
                "obs": self._obs[ids].copy()}

    def set_state(self, state: dict, env_ids: Optional[Sequence[int]] = None) -> np.ndarray:
        torch = self.torch
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids)
        full = _to_np(self.env.get_state_dict())

        def put(dst: dict, src: dict) -> None:
            for k, v in src.items():
                if isinstance(v, dict):
                    put(dst[k], v)
                else:
                    dst[k][ids] = v

        put(full, state["sim"])
        self.env.set_state_dict(_to_torch(full, torch, self.device))
        self._tl.elapsed[ids] = state["elapsed_steps"]
        self._obs[:] = _to_np(self.env.get_obs())
        return self._obs[ids].copy()

    def close(self) -> None:
        self.env.close()


_PROBED: dict[tuple, dict] = {}


def probe_env(env_cfg: Any) -> Optional[dict]:
    """Build the task of an :class:`offrl.config.EnvConfig` once in this process (one ``physx_cpu`` env,
    about half a second) and return its spaces: ``obs_dim``, ``act_dim``, ``action_low``, ``action_high``.

    Called by drivers before any SimHost actor exists, so that a bad ``env.id``, ``env.control_mode``,
    ``env.obs_mode`` or ``env.sim_config`` is one OffrlError line here rather than an actor-creation
    traceback from Ray. The CPU backend stands in for the GPU one: tasks, controllers and observation
    modes are the same on both. Results are cached per setting. Returns None when this process cannot
    build simulators at all (no Vulkan device, e.g. a head node without one): the actors then decide.
    """
    key = (env_cfg.id, env_cfg.control_mode, env_cfg.obs_mode, env_cfg.reward_mode,
           repr(sorted(dict(env_cfg.sim_config).items())), repr(sorted(dict(env_cfg.kwargs).items())))
    if key not in _PROBED:
        try:
            u = make_maniskill_env(env_cfg.id, num_envs=1, sim_backend="physx_cpu",
                                   control_mode=env_cfg.control_mode, obs_mode=env_cfg.obs_mode,
                                   reward_mode=env_cfg.reward_mode, sim_config=dict(env_cfg.sim_config) or None,
                                   extra=dict(env_cfg.kwargs) or None)
        except OffrlError as e:
            if str(e).startswith(_NO_VULKAN):
                return None
            if env_cfg.backend != "cpu":  # the probe stands in for the GPU backend: say so
                raise OffrlError(f"{e} (checked on physx_cpu before starting the {env_cfg.backend} "
                                 "backend: the task, controller and observation mode are the same)") from None
            raise
        try:
            fields = obs_fields(u)
            _PROBED[key] = {"obs_dim": int(u.single_observation_space.shape[0]), "obs_fields": fields,
                            "act_dim": int(u.single_action_space.shape[0]),
                            "action_low": np.asarray(u.single_action_space.low, np.float32).tolist(),
                            "action_high": np.asarray(u.single_action_space.high, np.float32).tolist()}
        finally:
            u.close()
    return dict(_PROBED[key])


def obs_fields(u: Any) -> Optional[list]:
    """The named parts of a task's flat state observation, ``[[name, start, end], ...]`` in order (for
    PickCube-v1: ``agent/qpos`` 0-9, ``agent/qvel`` 9-18, ``extra/is_grasped`` 18-19, ...), read from the
    task's own state dict the way ManiSkill flattens it. None when the parts do not add up to the
    observation's size (a task with its own flattening): slices by index still work then."""
    try:
        u.reset(seed=0)
        d = u._get_obs_state_dict(u.get_info())
    except Exception:  # a task without the state-dict observation: no names
        return None
    out: list = []
    pos = 0

    def walk(node: Any, prefix: str) -> None:
        nonlocal pos
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
                continue
            shape = tuple(getattr(v, "shape", ()))
            size = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            out.append([f"{prefix}{k}", pos, pos + size])
            pos += size

    walk(d, "")
    return out if pos == int(u.single_observation_space.shape[0]) else None


def resolve_obs_ignore(entries: Sequence[str], obs_dim: int, fields: Optional[list],
                       key: str = "policy.obs_ignore") -> list[int]:
    """Observation indices named by ``policy.obs_ignore`` (or ``key``, e.g. ``critic.obs_ignore``) entries: a
    field name of :func:`obs_fields` (``agent/qvel``) or an index range ``start:end`` (end exclusive). Raises
    ConfigError naming the key."""
    from offrl.errors import ConfigError

    by_name = {f[0]: (f[1], f[2]) for f in fields or []}
    idx: set[int] = set()
    for e in entries:
        e = str(e).strip()
        if e in by_name:
            a, b = by_name[e]
        elif ":" in e:
            try:
                a, b = (int(x) for x in e.split(":", 1))
            except ValueError:
                raise ConfigError(key, f"{e!r} is not a range start:end of integers") from None
            if not 0 <= a < b <= obs_dim:
                raise ConfigError(key, f"range {e!r} must satisfy 0 <= start < end <= {obs_dim} "
                                       "(the observation's size)")
        else:
            known = ", ".join(by_name) if by_name else "none known for this task; use start:end"
            raise ConfigError(key, f"unknown observation field {e!r} (fields: {known})")
        idx.update(range(a, b))
    if len(idx) >= obs_dim:
        raise ConfigError(key, f"hides all {obs_dim} observation entries; nothing would be left to see")
    return sorted(idx)


def make_sim(env_cfg: Any, autoreset: bool = True):
    """Build the BatchedSim an :class:`offrl.config.EnvConfig` describes."""
    cls = ManiSkillGPUSim if env_cfg.backend == "gpu" else ManiSkillCPUSim
    return cls(env_id=env_cfg.id, num_envs=env_cfg.num_envs, control_mode=env_cfg.control_mode,
               obs_mode=env_cfg.obs_mode, reward_mode=env_cfg.reward_mode,
               max_episode_steps=env_cfg.max_episode_steps, sim_config=dict(env_cfg.sim_config) or None,
               autoreset=autoreset, task_kwargs=dict(env_cfg.kwargs) or None)


# Silence SAPIEN's render-device chatter in subprocesses too.
os.environ.setdefault("SAPIEN_NO_DISPLAY", "1")
