"""RLlib peers of offrl's learners: export a dataset for RLlib's offline API, train RLlib's BC and CQL on it
(new API stack, ``ray[rllib]`` 2.60), and turn the trained RLModule into an offrl actor checkpoint.

The same demonstrations, the same number of gradient steps, offrl's own evaluator on the same seeds::

    exp = export_dataset(OfflineDataset.load("datasets/demos.h5"), "runs/x/export", reward="rewards")
    module, info = train_rllib(exp, RLlibPeerConfig(algo="cql", steps=8000))
    ckpt = save_rllib_checkpoint(module, exp, "runs/x/cql/checkpoints", 8000, config=to_dict(cfg), extra=info)
    # offrl eval runs/x/cql

**Export format** (a folder). ``data/part-00000.parquet`` holds one row per transition under RLlib's default
column names (:class:`ray.rllib.core.columns.Columns`), which RLlib's ``OfflinePreLearner`` reads without an
``input_read_schema``: ``eps_id`` (str), ``t`` (int64), ``obs`` and ``new_obs`` ([obs_dim] float32),
``actions`` ([act_dim] float32, scaled from the env's action bounds to [-1, 1]), ``rewards`` (float32),
``terminateds`` and ``truncateds`` (bool). RLlib turns each row into a one-step ``SingleAgentEpisode``
``[obs, new_obs]`` carrying the row's own flags, so the termination convention survives per transition:
CQL's target is ``r + gamma * (1 - terminated) * Q'(s', a')`` and a row cut by the time limit (truncated)
bootstraps from ``new_obs``. Rewards are the dataset's chosen reward (see
:meth:`~offrl.data.dataset.OfflineDataset.transitions`) plus offrl's terminal success bonus, exactly what
offrl's critics read; ``reward=None`` writes zeros (BC reads no reward) and CQL refuses such an export.
``offrl_rllib.json`` beside it records sizes, the env action bounds, the reward and bonus and the source.

**Row order.** RLlib 2.60 streams the parquet rows without shuffling them, and CQL's training step does not pass
``iter_batches_kwargs`` (a local shuffle buffer) to its Learner, so every RLlib epoch would repeat the same
minibatches. The export therefore writes ``repeats`` seeded permutations of the transitions one after another
(trimmed to a multiple of the batch size, so every minibatch is full): RLlib's BC and CQL both read the same
stream of shuffled minibatches.

**Conversion.** RLlib's default torch modules with ``fcnet_hiddens=[256, 256]`` and
``fcnet_activation="relu"`` compute the policy as encoder (Linear-ReLU-Linear-ReLU) + pi head (Linear to
``2 * act_dim``: mean, then log std). That is :class:`~offrl.algos.networks.GaussianActor`'s ``net`` with the
mean rows of the last layer: :func:`to_gaussian_actor` copies the weights, so the actor's deterministic action
equals RLlib's (:func:`rllib_actions`, checked by :func:`save_rllib_checkpoint` before writing). BC's diagonal
Gaussian maps to ``squash="clip"`` (RLlib clips the mean into the bounds); CQL's squashed Gaussian maps to
``squash="tanh"`` (the tanh-squashed mean, the action of the policy CQL trains). RLlib's own
``explore=False`` path for a squashed Gaussian (``TorchSquashedGaussian.to_deterministic``) returns the
*unsquashed* mean, which its action normalization then clips into the bounds: ``squash="clip"`` on a CQL
module reproduces that instead. The normalizer stays unfitted (identity; RLlib trains on raw observations).
The state-dependent log std has no counterpart in GaussianActor's state-independent one (set to the head's
log-std bias): only deterministic acting is exact.

**RLlib 2.60 quirks handled here** (each found by running it): ``CQLConfig()``'s default ``lr`` fails its own
validation (``lr=None`` is passed); CQL builds a local EnvRunner even offline (:class:`SpacesOnlyEnv`);
with a local Learner, CQL fails on ``dataset_num_iters_per_learner=1`` (``KeyError: 0`` in
``Learner._create_iterator_if_necessary``), so 2..10 updates run per training iteration; CQL's target networks
are updated once per iteration (``tau`` is compounded to match the per-step rate); the ``bc_iters`` counter
restarts every iteration (only ``bc_iters=0`` is accepted); ray.data's default of two pre-learner actors
deadlocks a 2-CPU cluster (one actor on half a CPU is requested).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import gymnasium as gym
import numpy as np

from offrl.errors import OffrlError

EXPORT_META = "offrl_rllib.json"
DATA_DIR = "data"
EXPORT_VERSION = 1
RLLIB_ALGOS = ("bc", "cql")
_ACTIVATIONS = ("relu", "tanh", "elu")


# ------------------------------------------------------------------------------------------ export

@dataclass(frozen=True)
class RLlibExport:
    """An exported dataset folder (see the module docstring) and its metadata."""

    path: Path
    meta: dict

    @classmethod
    def load(cls, path: str | Path) -> "RLlibExport":
        """Open an export folder; OffrlError when it is not one."""
        p = Path(path)
        f = p / EXPORT_META
        if not f.is_file():
            raise OffrlError(f"{p}: not an RLlib export (no {EXPORT_META}; write one with export_dataset)")
        try:
            meta = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise OffrlError(f"{f}: unreadable ({str(e).splitlines()[0]})") from None
        if not (p / DATA_DIR).is_dir():
            raise OffrlError(f"{p}: incomplete RLlib export (no {DATA_DIR}/ folder)")
        return cls(p, meta)

    @property
    def data_dir(self) -> Path:
        return self.path / DATA_DIR

    @property
    def obs_dim(self) -> int:
        return int(self.meta["obs_dim"])

    @property
    def act_dim(self) -> int:
        return int(self.meta["act_dim"])

    @property
    def action_low(self) -> list[float]:
        return [float(x) for x in self.meta["action_low"]]

    @property
    def action_high(self) -> list[float]:
        return [float(x) for x in self.meta["action_high"]]

    @property
    def reward(self) -> Optional[str]:
        """The dataset reward the ``rewards`` column holds (None: zeros, BC only)."""
        return self.meta.get("reward")

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])


def _bounds(act_dim: int, low: Optional[Sequence[float]],
            high: Optional[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    lo = np.full(act_dim, -1.0) if low is None else np.asarray(low, np.float64).reshape(-1)
    hi = np.full(act_dim, 1.0) if high is None else np.asarray(high, np.float64).reshape(-1)
    if lo.shape != (act_dim,) or hi.shape != (act_dim,):
        raise OffrlError(f"action bounds have {lo.size}/{hi.size} values, the data has {act_dim} action dims")
    if not np.all(np.isfinite(lo) & np.isfinite(hi)) or np.any(hi <= lo):
        raise OffrlError(f"action bounds must be finite with low < high, got low={lo.tolist()} high={hi.tolist()}")
    return lo, hi


def export_dataset(ds: Any, out: str | Path, *, reward: Optional[str] = "rewards", success_bonus: float = 0.0,
                   action_low: Optional[Sequence[float]] = None, action_high: Optional[Sequence[float]] = None,
                   repeats: int = 1, batch_size: Optional[int] = None, seed: int = 0,
                   overwrite: bool = False) -> RLlibExport:
    """Write ``ds`` (an :class:`~offrl.data.dataset.OfflineDataset`) as parquet rows RLlib's offline API reads.

    ``reward``: the dataset reward for the ``rewards`` column (None: zeros; BC only); ``success_bonus`` is
    added on terminal success steps as offrl's critics do. ``action_low/high``: the env's action bounds
    (default [-1, 1], ManiSkill's normalized controllers); actions are stored scaled to [-1, 1]
    (``2 (a - low) / (high - low) - 1``) and must lie within the bounds. ``repeats`` seeded permutations of the
    transitions follow one another, trimmed to a multiple of ``batch_size`` when given. Written atomically.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    if repeats < 1:
        raise OffrlError(f"repeats must be >= 1, got {repeats}")
    if batch_size is not None and batch_size < 1:
        raise OffrlError(f"batch_size must be >= 1, got {batch_size}")
    if out.exists() and not overwrite:
        raise OffrlError(f"{out} exists already (overwrite=True replaces it)")
    lo, hi = _bounds(ds.act_dim, action_low, action_high)
    t = ds.transitions(reward, success_bonus=success_bonus if reward is not None else 0.0)
    act = t["action"].numpy().astype(np.float64)
    tol = 1e-5 * (hi - lo)
    bad = np.argwhere((act < lo - tol) | (act > hi + tol))
    if len(bad):
        i, j = (int(x) for x in bad[0])
        raise OffrlError(f"{ds.name}: action {i} dim {j} = {act[i, j]:.4g} lies outside the action bounds "
                         f"[{lo[j]:.4g}, {hi[j]:.4g}] (pass the env's action_low/action_high)")
    n = act.shape[0]
    norm = np.clip(2.0 * (act - lo) / (hi - lo) - 1.0, -1.0, 1.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n) for _ in range(repeats)])
    if batch_size is not None:
        keep = len(order) // batch_size * batch_size
        if keep == 0:
            raise OffrlError(f"{ds.name}: {len(order)} transitions x {repeats} repeats is less than one batch "
                             f"of {batch_size}")
        order = order[:keep]
    rewards = np.zeros(n, np.float32) if reward is None else t["reward"].numpy().astype(np.float32)
    episode = t["episode"].numpy()

    def vectors(x: np.ndarray) -> Any:
        x = np.ascontiguousarray(x[order], dtype=np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])

    table = pa.table({
        "eps_id": pa.array([str(int(e)) for e in episode[order]], pa.string()),
        "t": pa.array(t["step"].numpy()[order], pa.int64()),
        "obs": vectors(t["obs"].numpy()),
        "actions": vectors(norm),
        "rewards": pa.array(rewards[order], pa.float32()),
        "new_obs": vectors(t["next_obs"].numpy()),
        "terminateds": pa.array(t["terminated"].numpy()[order], pa.bool_()),
        "truncateds": pa.array(t["truncated"].numpy()[order], pa.bool_()),
    })
    meta = {
        "format_version": EXPORT_VERSION, "source": ds.name, "env_id": ds.env_id, "control_mode": ds.control_mode,
        "obs_dim": ds.obs_dim, "act_dim": ds.act_dim, "action_low": lo.tolist(), "action_high": hi.tolist(),
        "reward": reward, "reward_mode": ds.reward_mode if reward in ("rewards", None) else reward,
        "success_bonus": float(success_bonus) if reward is not None else 0.0, "episodes": len(ds),
        "transitions": int(n), "repeats": int(repeats), "batch_size": batch_size, "seed": int(seed),
        "rows": int(len(order)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        (tmp / DATA_DIR).mkdir()
        pq.write_table(table, tmp / DATA_DIR / "part-00000.parquet")
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RLlibExport(out, meta)


def read_export(path: str | Path) -> list[dict[str, np.ndarray]]:
    """The episodes of an export, rebuilt from its rows (first copy of each step; episodes in id order).

    Each: ``obs`` [T+1, d], ``actions`` [T, a] in env units, ``rewards``, ``terminated``, ``truncated`` [T].
    """
    import pyarrow.parquet as pq

    exp = RLlibExport.load(path)
    tab = pq.read_table(exp.data_dir)
    col = {k: tab.column(k).to_numpy() for k in ("t", "rewards", "terminateds", "truncateds")}
    eps = np.array([int(x) for x in tab.column("eps_id").to_pylist()])
    vec = {k: np.stack(tab.column(k).to_numpy(zero_copy_only=False)).astype(np.float32)
           for k in ("obs", "new_obs", "actions")}
    lo, hi = np.asarray(exp.action_low), np.asarray(exp.action_high)
    out = []
    for e in np.unique(eps):
        rows = np.flatnonzero(eps == e)
        _, first = np.unique(col["t"][rows], return_index=True)  # sorted by t, first copy of each
        r = rows[first]
        out.append({"obs": np.concatenate([vec["obs"][r], vec["new_obs"][r[-1:]]]),
                    "actions": (lo + (vec["actions"][r] + 1.0) * 0.5 * (hi - lo)).astype(np.float32),
                    "rewards": col["rewards"][r], "terminated": col["terminateds"][r],
                    "truncated": col["truncateds"][r]})
    return out


# -------------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class RLlibPeerConfig:
    """How RLlib's BC or CQL trains on an export (RLlib's defaults unless offrl's bench matches them)."""

    algo: str = "bc"                       #: bc (ray.rllib BCConfig) | cql (ray.rllib CQLConfig)
    steps: int = 8000                      #: gradient steps (Learner minibatch updates)
    batch_size: int = 256                  #: train_batch_size_per_learner
    hidden: tuple[int, ...] = (256, 256)   #: fcnet_hiddens of every network (offrl's actor MLP)
    activation: str = "relu"               #: fcnet_activation (relu | tanh | elu)
    seed: int = 0                          #: config.debugging(seed=...)
    lr: float = 1e-3                       #: BC's Adam learning rate (offrl's MLP BC in bench/imitation.py)
    gamma: float = 0.8                     #: CQL discount (offrl's pretrain.gamma)
    actor_lr: float = 1e-4                 #: CQL actor learning rate (RLlib's default)
    critic_lr: float = 1e-3                #: CQL critic learning rate (RLlib's default)
    alpha_lr: float = 1e-3                 #: CQL entropy-temperature learning rate (RLlib's default)
    tau: float = 0.005                     #: CQL target Polyak rate per gradient step (RLlib's default)
    min_q_weight: float = 5.0              #: CQL conservative-penalty weight (RLlib's default)
    num_actions: int = 10                  #: CQL sampled actions per state in the penalty (RLlib's default)
    twin_q: bool = True                    #: CQL twin Q networks (RLlib's default)
    bc_iters: int = 0                      #: CQL behaviour-cloning warm start; only 0 works in ray 2.60
    free_log_std: bool = False             #: BC: a state-independent log std (RLlib's free_log_std) instead of
    #: RLlib's default state-dependent one (whose NLL fit leaves the mean under-fitted on these demos)

    def check(self) -> None:
        """Raise OffrlError naming the first bad field."""
        if self.algo not in RLLIB_ALGOS:
            raise OffrlError(f"rllib algo must be one of {', '.join(RLLIB_ALGOS)}, got {self.algo!r}")
        if self.steps < 1:
            raise OffrlError(f"steps must be >= 1 gradient step, got {self.steps}")
        if self.iters_per_update is None:
            raise OffrlError(f"steps={self.steps}: RLlib runs a fixed number of updates (2 to 10) per training "
                             f"iteration, so steps needs a divisor in 2..10 (e.g. {self.steps + self.steps % 2})")
        if self.batch_size < 1:
            raise OffrlError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise OffrlError(f"hidden must be positive layer sizes, got {list(self.hidden)}")
        if self.activation not in _ACTIVATIONS:
            raise OffrlError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {self.activation!r}")
        for name in ("lr", "actor_lr", "critic_lr", "alpha_lr"):
            if not getattr(self, name) > 0:
                raise OffrlError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.gamma <= 1.0:
            raise OffrlError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise OffrlError(f"tau must be in (0, 1], got {self.tau}")
        if self.free_log_std and self.algo != "bc":
            raise OffrlError(f"free_log_std is for bc; RLlib's {self.algo} policy is a squashed Gaussian with a "
                             "state-dependent log std")
        if self.bc_iters != 0:
            raise OffrlError(f"bc_iters={self.bc_iters}: RLlib 2.60's CQL counts its BC warm start per "
                             "Learner.update call (the counter restarts every training iteration), so a warm "
                             "start never ends or alternates with CQL; use bc_iters=0")

    @property
    def iters_per_update(self) -> Optional[int]:
        """Minibatch updates per RLlib training iteration (``dataset_num_iters_per_learner``): the largest
        divisor of ``steps`` in 2..10. RLlib 2.60's CQL cannot run 1 with a local Learner."""
        return next((k for k in range(10, 1, -1) if self.steps % k == 0), None)

    @property
    def target_tau(self) -> float:
        """RLlib updates CQL's targets once per training iteration, after ``k`` gradient steps; this rate
        tracks as fast as ``tau`` per step would: ``1 - (1 - tau)^k``."""
        return 1.0 - (1.0 - self.tau) ** int(self.iters_per_update or 1)


def _spaces(exp: RLlibExport) -> tuple[Any, Any]:
    obs = gym.spaces.Box(-np.inf, np.inf, (exp.obs_dim,), np.float32)
    act = gym.spaces.Box(-1.0, 1.0, (exp.act_dim,), np.float32)
    return obs, act


class SpacesOnlyEnv(gym.Env):
    """The observation and action spaces of an export, and nothing else.

    RLlib 2.60's CQL (built on SAC) creates a local EnvRunner even for offline training and needs an env to
    build it; this env carries the spaces and is never stepped (no env runner samples, nothing evaluates in
    RLlib). ``env_config``: ``{"obs_dim": int, "act_dim": int}``.
    """

    def __init__(self, config: Optional[dict] = None):
        config = dict(config or {})
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (int(config["obs_dim"]),), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (int(config["act_dim"]),), np.float32)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        return np.zeros(self.observation_space.shape, np.float32), {}

    def step(self, action: Any):
        raise RuntimeError("SpacesOnlyEnv is a placeholder for RLlib's offline CQL and cannot be stepped")


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.rllib", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_rllib_config(exp: RLlibExport, cfg: RLlibPeerConfig) -> Any:
    """The RLlib AlgorithmConfig (BCConfig or CQLConfig) training ``cfg`` on ``exp``: explicit spaces, no
    remote env runners, one Learner in this process, no evaluation inside RLlib."""
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    obs, act = _spaces(exp)
    model = DefaultModelConfig(fcnet_hiddens=[int(h) for h in cfg.hidden], fcnet_activation=cfg.activation,
                               free_log_std=bool(cfg.free_log_std))
    offline = dict(input_=[str(exp.data_dir.resolve())], dataset_num_iters_per_learner=cfg.iters_per_update,
                   # one pre-learner actor on half a CPU: ray.data's read tasks need the rest on a small machine
                   map_batches_kwargs={"concurrency": 1, "num_cpus": 0.5})
    if cfg.algo == "bc":
        from ray.rllib.algorithms.bc import BCConfig

        c = BCConfig().environment(observation_space=obs, action_space=act)
        c = c.training(train_batch_size_per_learner=cfg.batch_size, lr=cfg.lr)
    else:
        from ray.rllib.algorithms.cql import CQLConfig

        c = CQLConfig().environment(SpacesOnlyEnv, env_config={"obs_dim": exp.obs_dim, "act_dim": exp.act_dim},
                                    observation_space=obs, action_space=act)
        # lr=None: CQLConfig's default lr=3e-4 fails its own new-stack validation (it wants per-part rates)
        c = c.training(train_batch_size_per_learner=cfg.batch_size, lr=None, gamma=cfg.gamma,
                       actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr, alpha_lr=cfg.alpha_lr, tau=cfg.target_tau,
                       bc_iters=cfg.bc_iters, min_q_weight=cfg.min_q_weight, num_actions=cfg.num_actions,
                       twin_q=cfg.twin_q)
    return (c.env_runners(num_env_runners=0)
            .learners(num_learners=0, num_gpus_per_learner=0)
            .rl_module(model_config=model)
            .offline_data(**offline)
            .reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=0,
                       min_train_timesteps_per_iteration=0)
            .debugging(seed=cfg.seed))


_LOSS_KEYS = ("policy_loss", "total_loss", "qf_loss", "cql_loss", "alpha_value", "qf_mean", "td_error_mean")


def train_rllib(exp: RLlibExport | str | Path, cfg: RLlibPeerConfig,
                log: Callable[..., Any] = print) -> tuple[Any, dict]:
    """Train RLlib's BC or CQL on an export for exactly ``cfg.steps`` gradient steps; returns the trained
    torch RLModule (eval mode) and an info dict (steps, seconds, last losses, ray version, settings).

    Starts a local Ray cluster (offrl's :func:`~offrl.platform.cluster.init_ray`) unless Ray is running.
    """
    import ray

    from offrl.platform.cluster import init_ray

    exp = exp if isinstance(exp, RLlibExport) else RLlibExport.load(exp)
    cfg.check()
    if cfg.algo == "cql" and exp.reward is None:
        raise OffrlError(f"{exp.path}: exported without rewards (reward=None); RLlib CQL needs rewards: export "
                         "with reward='rewards' (the dataset's) or reward='success' (0/1 from success flags)")
    if exp.rows < cfg.batch_size:
        raise OffrlError(f"{exp.path}: {exp.rows} rows, fewer than one batch of {cfg.batch_size}")
    init_ray()
    _quiet_ray_data()
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.utils.metrics import ALL_MODULES, DATASET_NUM_ITERS_TRAINED_LIFETIME, LEARNER_RESULTS

    k = int(cfg.iters_per_update)
    algo = build_rllib_config(exp, cfg).build_algo()
    t0 = time.time()
    result: dict = {}
    try:
        iters = cfg.steps // k
        every = max(1, iters // 10)
        for i in range(1, iters + 1):
            result = algo.train()
            if i % every == 0 or i == iters:
                m = result.get(LEARNER_RESULTS, {}).get(DEFAULT_MODULE_ID, {})
                losses = ", ".join(f"{key} {float(m[key]):.4g}" for key in _LOSS_KEYS if key in m)
                log(f"[rllib {cfg.algo}] step {i * k}/{cfg.steps} ({time.time() - t0:.0f}s): {losses}")
        done = int(result[LEARNER_RESULTS][ALL_MODULES][DATASET_NUM_ITERS_TRAINED_LIFETIME])
        if done != cfg.steps:
            raise RuntimeError(f"RLlib reports {done} gradient steps, expected {cfg.steps}")
        weights = algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
        module = algo.config.get_rl_module_spec().build()
        module.set_state(weights)
        module.eval()
        last = result[LEARNER_RESULTS].get(DEFAULT_MODULE_ID, {})
    finally:
        algo.stop()
    info = {"rllib_algo": cfg.algo, "gradient_steps": done, "train_seconds": time.time() - t0,
            "iters_per_update": k, "target_tau": cfg.target_tau if cfg.algo == "cql" else None,
            "last_losses": {key: float(last[key]) for key in _LOSS_KEYS if key in last},
            "ray_version": ray.__version__, "rllib_config": {**asdict(cfg), "hidden": list(cfg.hidden)},
            "export": {k2: exp.meta[k2] for k2 in ("source", "reward", "success_bonus", "episodes", "transitions",
                                                   "repeats", "rows", "seed")}}
    return module, info


# ------------------------------------------------------------------------------------ conversion

def _policy_parts(module: Any) -> tuple[Any, Any]:
    """(encoder, pi head) of RLlib's default BC / SAC-family torch modules."""
    for enc, head in (("pi_encoder", "pi"), ("_encoder", "_pi_head"), ("encoder", "pi")):
        if hasattr(module, enc) and hasattr(module, head):
            return getattr(module, enc), getattr(module, head)
    raise OffrlError(f"{type(module).__name__}: not a default RLlib BC/SAC/CQL torch module (no encoder + pi head)")


def _is_squashed(module: Any) -> bool:
    from ray.rllib.core.distribution.torch.torch_distribution import TorchSquashedGaussian

    cls = module.get_inference_action_dist_cls()
    return isinstance(cls, type) and issubclass(cls, TorchSquashedGaussian)


def to_gaussian_actor(module: Any, action_low: Sequence[float], action_high: Sequence[float],
                      squash: str = "auto") -> tuple[Any, dict]:
    """An offrl :class:`~offrl.algos.networks.GaussianActor` acting like ``module``, and its ``actor_arch``.

    ``squash``: ``auto`` picks ``tanh`` for a squashed-Gaussian (CQL/SAC) module and ``clip`` otherwise;
    ``clip`` on a squashed module reproduces RLlib's own ``explore=False`` action (see module docstring).
    """
    import torch
    from torch import nn

    from offrl.algos.networks import GaussianActor

    squashed = _is_squashed(module)
    if squash == "auto":
        squash = "tanh" if squashed else "clip"
    if squash not in ("tanh", "clip"):
        raise OffrlError(f"squash must be auto, tanh or clip, got {squash!r}")
    if squash == "tanh" and not squashed:
        raise OffrlError(f"{type(module).__name__} acts with an unsquashed Gaussian; convert it with squash='clip'")
    acts = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.ELU: "elu"}
    layers: list[Any] = []
    for part in _policy_parts(module):
        for m in part.modules():
            if next(m.children(), None) is not None or isinstance(m, nn.Identity):
                continue
            if not isinstance(m, (nn.Linear, *acts)):
                raise OffrlError(f"cannot convert {type(module).__name__}: layer {type(m).__name__} has no "
                                 "GaussianActor counterpart (use plain fcnet layers without layer norm)")
            layers.append(m)
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    kinds = {acts[type(m)] for m in layers if not isinstance(m, nn.Linear)}
    pattern_ok = all(isinstance(m, nn.Linear) == (i % 2 == 0) for i, m in enumerate(layers)) and len(layers) % 2 == 1
    if not pattern_ok or len(kinds) > 1 or len(linears) < 2:
        raise OffrlError(f"cannot convert {type(module).__name__}: expected Linear-act-...-Linear with one "
                         f"activation, got {[type(m).__name__ for m in layers]}")
    obs_dim, act_dim = linears[0].in_features, int(np.prod(module.action_space.shape))
    free = getattr(_policy_parts(module)[1], "log_std", None)  # free_log_std: a parameter of the pi head
    if linears[-1].out_features != (act_dim if free is not None else 2 * act_dim):
        raise OffrlError(f"cannot convert {type(module).__name__}: its pi head outputs {linears[-1].out_features} "
                         f"values, expected the mean and log std ({2 * act_dim}) or, with free_log_std, the "
                         f"mean ({act_dim})")
    arch = dict(obs_dim=int(obs_dim), act_dim=act_dim, hidden=[int(m.out_features) for m in linears[:-1]],
                activation=kinds.pop(), log_std_init=0.0, squash=squash,
                action_low=[float(x) for x in action_low], action_high=[float(x) for x in action_high],
                min_log_std=None)
    actor = GaussianActor(**arch)
    targets = [m for m in actor.net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for src, dst in zip(linears[:-1], targets[:-1]):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        head = linears[-1]
        targets[-1].weight.copy_(head.weight[:act_dim])
        targets[-1].bias.copy_(head.bias[:act_dim])
        # the log std: the free parameter, or the state-dependent head's bias (its weights are dropped: the
        # converted actor's std is state-independent; deterministic actions, what is evaluated, are exact)
        ls = free.detach() if free is not None else head.bias[act_dim:]
        actor.log_std.copy_(ls.clamp(-20.0, 2.0))  # RLlib's log-std clip range
    actor.eval()
    return actor, arch


def rllib_actions(module: Any, obs: np.ndarray, action_low: Sequence[float], action_high: Sequence[float],
                  squash: str = "auto") -> np.ndarray:
    """RLlib's own deterministic env action for ``obs`` ``[B, d]`` (the reference the conversion must match).

    ``forward_inference``; then RLlib's ``GetActions`` connector with ``explore=False`` (what its EnvRunners
    do: the inference distribution's ``to_deterministic()``) or, for a squashed Gaussian with ``squash``
    auto/tanh, the distribution's own squashing of its mean (``TorchSquashedGaussian._squash(loc)``); then
    RLlib's ``unsquash_action`` from [-1, 1] into the env bounds (``normalize_actions=True``, its default).
    """
    import torch
    from ray.rllib.connectors.module_to_env import GetActions
    from ray.rllib.core.columns import Columns
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode
    from ray.rllib.utils.spaces.space_utils import unsquash_action

    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: torch.as_tensor(np.asarray(obs, np.float32))})
        if _is_squashed(module) and squash in ("auto", "tanh"):
            dist = module.get_inference_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
            a = dist._squash(dist.loc)  # noqa: SLF001  (RLlib's own squashing of the mean)
        else:
            batch = GetActions()(rl_module=module, batch={Columns.ACTION_DIST_INPUTS: out[Columns.ACTION_DIST_INPUTS]},
                                 episodes=[SingleAgentEpisode()], explore=False, shared_data={})
            a = batch[Columns.ACTIONS]
    space = gym.spaces.Box(np.asarray(action_low, np.float32), np.asarray(action_high, np.float32))
    return np.asarray(unsquash_action(a.numpy(), space), np.float32)


def conversion_error(module: Any, actor: Any, obs: np.ndarray, squash: str = "auto") -> float:
    """Largest absolute difference between RLlib's and the converted actor's deterministic actions on ``obs``."""
    import torch

    ref = rllib_actions(module, obs, actor.action_low.tolist(), actor.action_high.tolist(), squash)
    mine, _ = actor.act(torch.as_tensor(np.asarray(obs, np.float32)), deterministic=True)
    return float(np.abs(mine.numpy() - ref).max())


def save_rllib_checkpoint(module: Any, exp: RLlibExport, ckpt_root: str | Path, step: int, *, config: dict,
                          extra: Optional[dict] = None, squash: str = "auto", check_obs: Optional[np.ndarray] = None,
                          atol: float = 1e-5) -> Path:
    """Convert ``module`` (:func:`to_gaussian_actor`), check it acts like RLlib on ``check_obs`` (default: 256
    Gaussian observations) and write an offrl checkpoint ``<ckpt_root>/<step>/`` that ``offrl eval`` reads.

    ``config``: the offrl experiment config (a dict; its env and eval sections set the evaluation protocol).
    """
    from offrl.platform.checkpoint import save_checkpoint

    actor, arch = to_gaussian_actor(module, exp.action_low, exp.action_high, squash)
    obs = check_obs if check_obs is not None else \
        np.random.default_rng(0).normal(0.0, 2.0, (256, exp.obs_dim)).astype(np.float32)
    err = conversion_error(module, actor, obs, squash)
    if not err <= atol:
        raise RuntimeError(f"converted actor differs from the RLlib module by {err:.3g} (> {atol:g})")
    state = {**(extra or {}), "actor_arch": arch, "algo": f"rllib_{(extra or {}).get('rllib_algo', 'policy')}",
             "conversion_max_abs_error": err}
    return save_checkpoint(ckpt_root, step, {"actor": actor}, config=config, extra_state=state)
