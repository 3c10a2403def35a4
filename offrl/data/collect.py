"""Scripted-expert demonstration collection over SimHost actors (``offrl collect``).

Episode attempt ``i`` resets its env with seed ``first_seed + i``; the scripted expert (see
:mod:`offrl.envs.experts`) acts from the privileged poses, and every step records what later stages
need: observations, actions, rewards under every reward mode, terminated/truncated/success flags and
the env state (ManiSkill's ``get_state_dict``) before and after each action.

Determinism. Attempts are grouped in fixed chunks of ``collect.chunk_size`` consecutive indices, one
chunk per remote call, and each chunk starts from a freshly built scene (``reset(options={"reconfigure":
True})``). PhysX keeps hidden state (contact caches) from one episode into the next, so without this the
same seed can play out differently depending on which episodes an actor ran before (measured: 6 of 40
seeds diverged). With it, each attempt depends only on its seed and its chunk, and the kept episodes are
the first ``collect.episodes`` successful attempts in index order: the file is identical whatever the
number of actors or the order in which chunks finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from offrl.data.format import REWARD_MODES, REWARD_PREFIX, Episode, write_trajectories
from offrl.errors import OffrlError

#: what a collected dataset's ``actions`` hold (collect.action_labels)
ACTION_LABELS = ("executed", "expert")

# ------------------------------------------------------------------------------- randomization ranges

#: the task's own ranges (documentation and the config's defaults): [xmin, xmax, ymin, ymax], [zmin, zmax]
TASK_RANGES: dict[str, dict[str, list[float]]] = {
    "PickCube-v1": {"cube_xy": [-0.1, 0.1, -0.1, 0.1], "goal_xy": [-0.1, 0.1, -0.1, 0.1], "goal_z": [0.02, 0.32]},
}


def _place_pickcube(env: Any, ranges: dict, rng: np.random.Generator) -> None:
    """Re-place PickCube-v1's cube (xy, keeping its random yaw) and goal inside ``ranges`` after a reset."""
    import torch
    from mani_skill.utils.structs.pose import Pose

    if ranges.get("cube_xy"):
        x0, x1, y0, y1 = ranges["cube_xy"]
        p = env.cube.pose.p.clone()
        p[:, 0] = float(rng.uniform(x0, x1))
        p[:, 1] = float(rng.uniform(y0, y1))
        env.cube.set_pose(Pose.create_from_pq(p, env.cube.pose.q.clone()))
    if ranges.get("goal_xy") or ranges.get("goal_z"):
        g = env.goal_site.pose.p.clone()
        if ranges.get("goal_xy"):
            x0, x1, y0, y1 = ranges["goal_xy"]
            g[:, 0] = float(rng.uniform(x0, x1))
            g[:, 1] = float(rng.uniform(y0, y1))
        if ranges.get("goal_z"):
            z0, z1 = ranges["goal_z"]
            g[:, 2] = float(rng.uniform(z0, z1))
        env.goal_site.set_pose(Pose.create_from_pq(g, torch.tensor([[1.0, 0.0, 0.0, 0.0]])))


#: env id -> function(env, ranges, rng) that re-places the objects after ``env.reset``
RANDOMIZERS: dict[str, Callable[[Any, dict, np.random.Generator], None]] = {"PickCube-v1": _place_pickcube}


def custom_ranges(collect_cfg: Any) -> dict[str, list[float]]:
    """The ranges the config overrides (empty: the task's own randomization, replayable from the seed)."""
    return {k: list(v) for k, v in (("cube_xy", collect_cfg.cube_xy_range), ("goal_xy", collect_cfg.goal_xy_range),
                                    ("goal_z", collect_cfg.goal_z_range)) if v is not None}


# ------------------------------------------------------------------------------------- one episode

def _np_tree(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _np_tree(v) for k, v in x.items()}
    return x.detach().cpu().numpy()[0] if hasattr(x, "detach") else np.asarray(x)[0]


def state_at(tree: Any, t: int) -> Any:
    """Step ``t`` of a recorded env-state tree (leaves ``[T, ...]``) as a batch of one for ``set_state_dict``
    (float32 torch leaves ``[1, ...]``)."""
    import torch

    if isinstance(tree, dict):
        return {k: state_at(v, t) for k, v in tree.items()}
    return torch.as_tensor(np.asarray(tree[t : t + 1], np.float32))


def _stack_trees(trees: list) -> dict:
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack_trees([t[k] for t in trees]) for k in first}
    return np.stack(trees).astype(np.float32)


def obs_layout(env: Any) -> list:
    """``[[name, size], ...]`` of the flattened state observation (the order ManiSkill flattens in)."""
    raw = env.get_obs(env.get_info(), unflattened=True)
    out: list = []

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                out.append([f"{prefix}{k}", int(np.prod(tuple(v.shape[1:]))) if len(v.shape) > 1 else 1])

    walk(raw, "")
    return out


def run_episode(env: Any, expert: Any, seed: int, max_steps: int, ranges: Optional[dict] = None,
                fresh_scene: bool = False, action_labels: str = "executed",
                start_state: Optional[dict] = None) -> Episode:
    """One expert episode on an unwrapped single-env ManiSkill env, recorded in ManiSkill's layout.

    Stops at termination (success) or after ``max_steps`` actions (then ``truncated[-1]`` is True).
    Rewards: ``rewards`` under the env's reward mode, and ``rewards_<mode>`` for every mode the task
    supports, all computed from the same step. ``start_state`` (one recorded state, from :func:`state_at`)
    starts the episode there instead of at the seed's reset. ``action_labels="expert"`` records, as ``actions``, the
    expert's noise-free action for each visited state while the env runs the noisy one (DART, Laskey et al.
    2017); the executed actions are then kept in the extra ``executed_actions``.
    """
    if action_labels not in ACTION_LABELS:
        raise OffrlError(f"unknown action_labels {action_labels!r} ({' or '.join(ACTION_LABELS)})")
    import torch

    opts = {"reconfigure": True} if fresh_scene else None
    obs, _ = env.reset(seed=int(seed), options=opts)
    if ranges:
        randomize = RANDOMIZERS.get(env.spec.id if env.spec else "")
        if randomize is None:
            raise OffrlError(f"no randomization ranges are implemented for {env.spec.id if env.spec else env}")
        randomize(env, ranges, np.random.default_rng([int(seed), 0x5EED]))
        obs = env.get_obs()
    if start_state is not None:  # a recorded state (see state_at) instead of the seed's start
        env.set_state_dict(start_state)
        obs = env.get_obs()
    expert.reset()
    expert.seed([int(seed), 0xAC7])
    modes = [m for m in REWARD_MODES if m in getattr(env, "SUPPORTED_REWARD_MODES", REWARD_MODES)]
    obs_l = [obs.detach().cpu().numpy()[0]]
    states = [_np_tree(env.get_state_dict())]
    acts, labels, flags = [], [], {"terminated": [], "truncated": [], "success": [], "fail": []}
    rewards: dict[str, list] = {"rewards": [], **{REWARD_PREFIX + m: [] for m in modes}}
    for t in range(int(max_steps)):
        a, label = expert.act_and_label(expert.privileged(env))
        labels.append(label[0])
        act = torch.from_numpy(a)
        obs, rew, term, _, info = env.step(act)
        obs_l.append(obs.detach().cpu().numpy()[0])
        states.append(_np_tree(env.get_state_dict()))
        acts.append(a[0])
        rewards["rewards"].append(float(rew.reshape(-1)[0]))
        for m in modes:
            r = rew if m == env.reward_mode else getattr(env, f"compute_{m}_reward")(obs=obs, action=act, info=info)
            rewards[REWARD_PREFIX + m].append(float(torch.as_tensor(r).reshape(-1)[0]))
        done = bool(term.reshape(-1)[0])
        flags["terminated"].append(done)
        flags["truncated"].append(not done and t + 1 >= max_steps)
        flags["success"].append(bool(info["success"].reshape(-1)[0]) if "success" in info else False)
        if "fail" in info:
            flags["fail"].append(bool(info["fail"].reshape(-1)[0]))
        if done:
            break
    extras = {"fail": np.array(flags["fail"], bool)} if flags["fail"] else {}
    actions = np.stack(acts).astype(np.float32)
    if action_labels == "expert":
        extras["executed_actions"] = actions
        actions = np.stack(labels).astype(np.float32)
    return Episode(
        obs=np.stack(obs_l).astype(np.float32), actions=actions,
        terminated=np.array(flags["terminated"], bool), truncated=np.array(flags["truncated"], bool),
        success=np.array(flags["success"], bool),
        rewards={k: np.array(v, np.float32) for k, v in rewards.items()},
        env_states=_stack_trees(states), extras=extras,
        info={"episode_seed": int(seed), "reset_kwargs": {"seed": int(seed)}, "control_mode": env.control_mode},
    )


def collect_chunk(env: Any, attempts: list[tuple[int, int]], expert: str, action_noise: float, max_steps: int,
                  ranges: Optional[dict], keep_failures: bool, action_labels: str = "executed") -> list[dict]:
    """Run the attempts ``[(index, seed), ...]`` in order, the first one in a freshly built scene.

    Returns one record per attempt: index, seed, success, length, return (of ``rewards``) and, for the
    episodes that are kept, the :class:`Episode`.
    """
    from offrl.envs.experts import expert_class

    ex = expert_class(expert)(1, action_noise=action_noise)
    out = []
    for j, (index, seed) in enumerate(attempts):
        ep = run_episode(env, ex, seed, max_steps, ranges, fresh_scene=(j == 0), action_labels=action_labels)
        ok = bool(ep.succeeded)
        out.append({"index": int(index), "seed": int(seed), "success": ok, "length": ep.length,
                    "return": float(ep.rewards["rewards"].sum()), "episode": ep if (ok or keep_failures) else None})
    return out


def _host_chunk(host: Any, job: dict) -> list[dict]:
    """SimHost.apply target: collect a chunk on the host's first raw env."""
    return collect_chunk(host.sim.raw_envs[0], **job)


def _host_layout(host: Any) -> list:
    return obs_layout(host.sim.raw_envs[0])


# ------------------------------------------------------------------------------------ orchestration

@dataclass
class CollectReport:
    """What a collection did."""

    path: Optional[Path]
    requested: int
    kept: int
    attempted: int          #: attempts up to the last kept one (deterministic)
    successes: int          #: successful episodes among ``attempted``
    discarded_extra: int    #: attempts that ran in parallel past the needed ones and were dropped
    num_hosts: int
    seconds: float          #: collection time (actors already running)
    startup_seconds: float  #: starting Ray and the actors

    @property
    def episodes_per_s(self) -> float:
        """Attempted episodes per second of collection time (all attempts that ran)."""
        return (self.attempted + self.discarded_extra) / max(self.seconds, 1e-9)

    def lines(self) -> list[str]:
        rate = self.successes / max(self.attempted, 1)
        out = [f"attempted {self.attempted} episodes, {self.successes} successful ({100 * rate:.1f}%), "
               f"kept {self.kept} of {self.requested} requested",
               f"{self.num_hosts} SimHost actor(s): {self.episodes_per_s:.2f} episodes/s "
               f"({self.attempted + self.discarded_extra} episodes in {self.seconds:.1f} s; start-up {self.startup_seconds:.1f} s)"]
        if self.path is not None:
            out.append(f"wrote {self.path} and {self.path.with_suffix('.json').name}")
        return out


def _check(cfg: Any) -> tuple[str, dict, int, int, Path]:
    from offrl.envs.experts import check_control_mode, expert_for_env

    c = cfg.collect
    if cfg.env.backend != "cpu":
        raise OffrlError("offrl collect runs on env.backend=cpu (one ManiSkill env per SimHost actor)")
    if not cfg.env.obs_mode.startswith("state"):
        raise OffrlError(f"offrl collect records state observations; env.obs_mode is {cfg.env.obs_mode}")
    name = expert_for_env(cfg.env.id) if c.expert == "auto" else c.expert
    check_control_mode(name, cfg.env.control_mode)
    ranges = custom_ranges(c)
    if ranges and cfg.env.id not in RANDOMIZERS:
        raise OffrlError(f"collect.*_range overrides are implemented for {', '.join(RANDOMIZERS)}, not {cfg.env.id}")
    max_steps = c.max_steps or cfg.env.max_episode_steps
    max_attempts = c.max_attempts or (c.episodes if c.keep_failures else 3 * c.episodes + 10)
    out = Path(c.output)
    if out.suffix != ".h5":
        raise OffrlError(f"collect.output must end in .h5 (ManiSkill's format), got {out}")
    if (out.exists() or out.with_suffix(".json").exists()) and not c.overwrite:
        raise OffrlError(f"{out} already exists; choose another collect.output or set collect.overwrite=true")
    return name, ranges, max_steps, max_attempts, out


def _wait_for_cpus(cpus: float, timeout: float = 10.0) -> None:
    """Wait until killed actors have given their CPUs back (Ray frees them asynchronously), so that a pool
    sized to the free CPUs right after this one (num_hosts=0) finds room."""
    import ray

    end = time.time() + timeout
    while time.time() < end and ray.available_resources().get("CPU", 0.0) < cpus:
        time.sleep(0.05)


def collect(cfg: Any, progress: Optional[bool] = None, write: bool = True,
            pool: Any = None) -> tuple[CollectReport, list[Episode], dict]:
    """Collect ``cfg.collect.episodes`` expert episodes on SimHost actors and write the dataset.

    Starts or joins Ray (``cfg.cluster``), builds a SimHost pool with one env per actor (or uses ``pool``,
    built for ``cfg.env``, and leaves it running), runs fixed chunks of attempts with a progress bar, keeps
    the first successful ones in attempt order and writes them atomically. Returns (report, episodes,
    JSON metadata).
    """
    import ray

    from offrl.config import replace, to_dict
    from offrl.platform.cluster import init_ray
    from offrl.platform.simhost import SimHostPool

    c = cfg.collect
    name, ranges, max_steps, max_attempts, out = _check(cfg)
    progress = cfg.run.progress if progress is None else progress
    first_seed = c.first_seed if c.first_seed is not None else 1_000_000 * cfg.seed
    target = min(c.episodes, max_attempts)
    t0 = time.time()
    own_pool = pool is None
    if own_pool:
        from offrl.envs.maniskill import probe_env

        probe_env(cfg.env)  # a bad task or controller is one line before Ray starts
        init_ray(cfg.cluster)
        cpus_before = ray.available_resources().get("CPU", 0.0)
        pool = SimHostPool(replace(cfg.env, num_envs=1), cfg.cluster, seed=cfg.seed)
    elif replace(pool.env_cfg, num_envs=1, max_episode_steps=1) != replace(cfg.env, num_envs=1, max_episode_steps=1):
        raise OffrlError(f"the given SimHost pool was built for {pool.env_cfg}, not for env {cfg.env}")
    try:
        layout = pool._get([pool.hosts[0].apply.remote(_host_layout)])[0]
        t1 = time.time()
        job = dict(expert=name, action_noise=float(c.action_noise), max_steps=int(max_steps), ranges=ranges or None,
                   keep_failures=bool(c.keep_failures), action_labels=c.action_labels)
        chunk = int(c.chunk_size)
        results: dict[int, dict] = {}
        inflight: dict[Any, tuple[Any, int]] = {}
        idle = list(pool.hosts)
        next_idx, kept_done, succ_done = 0, 0, 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=target, desc=f"collect {cfg.env.id}", unit="ep", dynamic_ncols=True)
        while True:
            pending = sum(n for _, n in inflight.values())
            while idle and next_idx < max_attempts and kept_done + pending < target:
                stop = min(next_idx + chunk, max_attempts)
                attempts = [(i, first_seed + i) for i in range(next_idx, stop)]
                host = idle.pop(0)
                inflight[host.apply.remote(_host_chunk, dict(job, attempts=attempts))] = (host, len(attempts))
                next_idx, pending = stop, pending + len(attempts)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            host, _n = inflight.pop(ready[0])
            idle.append(host)
            for rec in pool._get(ready)[0]:
                results[rec["index"]] = rec
                kept_done += rec["episode"] is not None
                succ_done += rec["success"]
            if bar is not None:
                bar.n = min(kept_done, target)
                bar.set_postfix(attempted=len(results), success=f"{succ_done / max(len(results), 1):.0%}")
                bar.refresh()
        if bar is not None:
            bar.close()
        t2 = time.time()
    finally:
        num_hosts = len(pool.hosts)
        if own_pool:
            pool.shutdown()
            _wait_for_cpus(cpus_before)
    selected, attempted, successes = [], 0, 0
    for i in range(next_idx):
        if len(selected) >= target:
            break
        rec = results[i]
        attempted, successes = i + 1, successes + rec["success"]
        if rec["episode"] is not None:
            ep = rec["episode"]
            ep.info["offrl_attempt"] = i
            selected.append(ep)
    report = CollectReport(path=None, requested=c.episodes, kept=len(selected), attempted=attempted,
                           successes=successes, discarded_extra=len(results) - attempted, num_hosts=num_hosts,
                           seconds=t2 - t1, startup_seconds=t1 - t0)
    env_kwargs = dict(obs_mode=cfg.env.obs_mode, control_mode=cfg.env.control_mode,
                      reward_mode=cfg.env.reward_mode, sim_backend="physx_cpu")
    if cfg.env.sim_config:
        env_kwargs["sim_config"] = dict(cfg.env.sim_config)
    env_kwargs.update(dict(cfg.env.kwargs))  # the task's own keywords, as gym.make takes them
    meta = {
        "env_info": {"env_id": cfg.env.id, "env_kwargs": env_kwargs, "max_episode_steps": int(max_steps)},
        "source_type": "offrl-scripted-expert",
        "source_desc": f"offrl collect: expert '{name}', action_noise {c.action_noise}, "
                       f"{'all' if c.keep_failures else 'successful'} episodes"
                       + ("; actions are the expert's noise-free labels of the visited states (DART), the executed "
                          "ones are in executed_actions" if c.action_labels == "expert" else ""),
        "offrl": {
            "obs_layout": layout, "reward_mode": cfg.env.reward_mode, "seed": cfg.seed, "first_seed": first_seed,
            "collect": to_dict(c), "expert": name,
            "randomization": ranges or TASK_RANGES.get(cfg.env.id, "task default"),
            "randomization_replayable_from_seed": not ranges,
            "attempted": attempted, "successes": successes,
        },
    }
    if write and selected:
        report.path = write_trajectories(out, selected, meta, progress=progress)
    return report, selected, meta
