"""Experiment configuration: one frozen dataclass per component, composed into :class:`ExperimentConfig`.

Configs are loaded from YAML, overridden from the command line with ``key.sub=value`` and validated
with errors that name the key path (:class:`offrl.errors.ConfigError`). Every field documents itself
through ``metadata["help"]``; ``offrl config keys`` prints them all.

Later stages (data, pretraining, finetuning, sweeps) add their own component dataclasses here.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from offrl.errors import ConfigError, OffrlError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _sub(cls: type) -> Any:
    return field(default_factory=cls, metadata={"help": (cls.__doc__ or "").strip().splitlines()[0]})


class _Checked:
    """Mixin: ``check()`` raises ConfigError(field, message) on bad values; the loader adds the path."""

    def check(self) -> None:  # pragma: no cover - overridden
        pass


@dataclass(frozen=True)
class EnvConfig(_Checked):
    """Simulator: which task and how it is built (ManiSkill CPU or GPU backend)."""

    id: str = _f("PickCube-v1", "ManiSkill task id, e.g. PickCube-v1.")
    backend: Literal["cpu", "gpu"] = _f(
        "cpu", "cpu: K single-env physx_cpu instances in one process; gpu: one physx_cuda env with num_envs.")
    num_envs: int = _f(4, "Envs per SimHost actor (K CPU instances, or N parallel GPU envs such as 512).")
    control_mode: str = _f("pd_ee_delta_pos", "ManiSkill controller, e.g. pd_ee_delta_pos or pd_joint_delta_pos.")
    obs_mode: str = _f("state", "ManiSkill observation mode (state observations are flattened vectors).")
    reward_mode: Literal["sparse", "dense", "normalized_dense", "none"] = _f(
        "normalized_dense", "ManiSkill reward mode.")
    max_episode_steps: int = _f(50, "Time limit tracked by offrl (ManiSkill's counter is not in saved states).")
    sim_config: dict = _f({}, "Extra sim_config passed to gym.make (advanced).")
    kwargs: dict = _f({}, "The task's own gym.make keywords, e.g. {distance_threshold: 0.02} for offrl/PickPlaceA-v1.")

    def check(self) -> None:
        if self.num_envs < 1:
            raise ConfigError("num_envs", f"must be >= 1, got {self.num_envs}")
        if self.max_episode_steps < 1:
            raise ConfigError("max_episode_steps", f"must be >= 1, got {self.max_episode_steps}")


@dataclass(frozen=True)
class ClusterConfig(_Checked):
    """Ray cluster and SimHost pool: where simulators run and how many."""

    address: Optional[str] = _f(None, "Ray address to join ('auto' for a running cluster); null starts a local one.")
    num_cpus: Optional[int] = _f(None, "CPUs for a local cluster (null: all cores).")
    num_hosts: int = _f(0, "SimHost actors; 0 sizes the pool to the cluster's free CPUs (or GPUs for backend gpu).")
    cpus_per_host: float = _f(1.0, "CPUs reserved by each SimHost actor.")
    gpus_per_host: float = _f(0.0, "GPUs reserved by each SimHost actor (backend gpu defaults to 1 when 0).")
    max_restarts: int = _f(3, "Times a killed SimHost is restarted (its interrupted call is redone).")
    torch_threads: int = _f(1, "torch threads inside each SimHost (1 avoids oversubscribing cores).")
    placement: Literal["spread", "default"] = _f(
        "spread", "Where SimHosts go on a multi-node cluster: spread puts them on as many nodes as possible "
                  "(Ray's SPREAD strategy); default leaves it to Ray's scheduler, which fills one node first.")

    def check(self) -> None:
        if self.num_hosts < 0:
            raise ConfigError("num_hosts", f"must be >= 0, got {self.num_hosts}")
        if self.cpus_per_host < 0 or self.gpus_per_host < 0:
            raise ConfigError("cpus_per_host", "resource amounts must be >= 0")
        if self.max_restarts < 0:
            raise ConfigError("max_restarts", f"must be >= 0, got {self.max_restarts}")
        if self.torch_threads < 1:
            raise ConfigError("torch_threads", f"must be >= 1, got {self.torch_threads}")


POLICY_KINDS = ("mlp", "mlp_chunk", "diffusion")


def _check_finite(obj: Any, *names: str) -> None:
    """Refuse non-finite floats among ``names`` (the loader already refuses them for every float key;
    this is for values built in code)."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(name, f"must be a finite number, got {v}")


@dataclass(frozen=True)
class PolicyConfig(_Checked):
    """Policy: a Gaussian MLP (mlp), an action-chunking MLP (mlp_chunk) or a Diffusion Policy (diffusion)."""

    kind: Literal["mlp", "mlp_chunk", "diffusion"] = _f(
        "mlp", "mlp: Gaussian MLP, one action per observation (finetunable); mlp_chunk: MLP predicting "
               "pred_horizon actions from obs_horizon observations; diffusion: Diffusion Policy (Chi et al. 2023).")
    hidden: tuple[int, ...] = _f((256, 256), "Hidden layer widths (mlp, mlp_chunk).")
    activation: Literal["tanh", "relu", "elu", "gelu"] = _f("relu", "Hidden activation (mlp, mlp_chunk).")
    log_std_init: float = _f(-0.5, "Initial log standard deviation of the Gaussian (mlp).")
    min_log_std: float = _f(-3.0, "Floor of the Gaussian's log std (mlp): keeps maximum-likelihood BC from "
                                  "collapsing the std onto the training actions.")
    squash: Literal["clip", "tanh"] = _f("clip", "How sampled actions are mapped into the action bounds (mlp).")
    obs_min_std: Optional[float] = _f(
        None, "Floor of the observation normaliser's std (mlp; null: none). An entry that hardly varies in the "
              "training data (the tool's and the cube's orientation quaternions in PickCube-v1's demos: std "
              "0.0004-0.02) is otherwise divided by its tiny std, so a deviation the data never showed becomes "
              "an input of several units. 0.01 (the sequence policies' floor) lifted BC on 100 PickCube demos "
              "from 0.43 to 0.55 over 3 seeds; hiding those entries (obs_ignore) lifted it to 0.76.")
    obs_ignore: tuple[str, ...] = _f(
        (), "Observation parts the policy does not see (mlp; the critics have their own critic.obs_ignore): field names of the "
            "task's state observation (e.g. agent/qvel, the joint velocities) or index ranges start:end. The "
            "parts are held at zero after normalisation, so checkpoints keep the full observation size.")
    obs_horizon: int = _f(2, "To: observations the policy conditions on (mlp_chunk, diffusion).")
    pred_horizon: int = _f(16, "Tp: actions predicted per replanning (mlp_chunk, diffusion).")
    action_horizon: int = _f(8, "Ta: predicted actions executed open-loop before replanning, from the current "
                                "step on (mlp_chunk, diffusion); needs Ta <= Tp - To + 1.")
    end_padding: Literal["last", "hold"] = _f(
        "last", "Training windows past an episode's end (mlp_chunk, diffusion): last repeats the last action "
                "(Chi et al.); hold keeps the arm of a delta controller still (zero on every action dimension "
                "but the last, the gripper, which repeats), as ManiSkill's Diffusion Policy baseline does.")

    def check(self) -> None:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError("hidden", f"needs positive widths, got {list(self.hidden)}")
        if self.obs_min_std is not None and not (math.isfinite(self.obs_min_std) and self.obs_min_std > 0):
            raise ConfigError("obs_min_std", f"must be a positive finite number or null, got {self.obs_min_std}")
        if self.obs_ignore and self.kind != "mlp":
            raise ConfigError("obs_ignore", f"is for policy.kind mlp only, not {self.kind}")
        for name in ("obs_horizon", "pred_horizon", "action_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.action_horizon > self.pred_horizon:
            raise ConfigError("action_horizon", f"Ta={self.action_horizon} exceeds pred_horizon Tp={self.pred_horizon}")
        if self.action_horizon > self.pred_horizon - self.obs_horizon + 1:
            raise ConfigError("action_horizon", f"Ta={self.action_horizon} must be <= Tp - To + 1 = "
                                                f"{self.pred_horizon - self.obs_horizon + 1} (the sequence starts "
                                                f"To - 1 = {self.obs_horizon - 1} steps in the past)")

    @property
    def is_sequence(self) -> bool:
        return self.kind in ("mlp_chunk", "diffusion")


@dataclass(frozen=True)
class DiffusionConfig(_Checked):
    """Diffusion Policy network and noise schedule (policy.kind=diffusion)."""

    widths: tuple[int, ...] = _f((64, 128, 256), "Channel widths of the U-Net levels (Chi et al.'s reference "
                                                  "uses [256, 512, 1024] on GPUs; each level halves the sequence).")
    step_embed_dim: int = _f(64, "Size of the diffusion-step embedding (even).")
    kernel_size: int = _f(5, "Temporal convolution kernel size (odd).")
    groups: int = _f(8, "GroupNorm groups (must divide every width).")
    train_steps: int = _f(100, "DDPM noise steps K in training.")
    inference_steps: int = _f(10, "Denoising steps when sampling (DDIM; DDPM needs train_steps).")
    scheduler: Literal["ddim", "ddpm"] = _f("ddim", "Sampling scheduler (diffusers' DDIMScheduler or DDPMScheduler).")
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = _f(
        "squaredcos_cap_v2", "Noise schedule (squaredcos_cap_v2 is the cosine schedule of Nichol & Dhariwal).")
    prediction_type: Literal["epsilon", "sample"] = _f("epsilon", "What the network predicts: the noise or x0.")
    ema: bool = _f(True, "Keep an EMA of the weights; the EMA is what is evaluated and saved as the actor.")
    ema_decay: float = _f(0.9999, "Maximum EMA decay.")
    ema_power: float = _f(0.75, "EMA warm-up: decay = 1 - (1 + step)^-power, capped at ema_decay.")
    weight_decay: float = _f(1e-6, "AdamW weight decay of sequence policies.")
    lr_warmup_steps: int = _f(500, "Linear learning-rate warm-up steps before the cosine decay (sequence policies).")

    def check(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError("widths", f"needs positive widths, got {list(self.widths)}")
        if self.groups < 1 or any(w % self.groups for w in self.widths):
            raise ConfigError("groups", f"must be >= 1 and divide every width {list(self.widths)}, got {self.groups}")
        if self.step_embed_dim < 2 or self.step_embed_dim % 2:
            raise ConfigError("step_embed_dim", f"must be an even number >= 2, got {self.step_embed_dim}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError("kernel_size", f"must be an odd number >= 1, got {self.kernel_size}")
        if self.train_steps < 1:
            raise ConfigError("train_steps", f"must be >= 1, got {self.train_steps}")
        if not 1 <= self.inference_steps <= self.train_steps:
            raise ConfigError("inference_steps", f"must be in [1, train_steps={self.train_steps}], got {self.inference_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.ema_power <= 0:
            raise ConfigError("ema_power", f"must be > 0, got {self.ema_power}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.lr_warmup_steps < 0:
            raise ConfigError("lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")


@dataclass(frozen=True)
class RolloutConfig(_Checked):
    """Rollout job: roll the policy out on every SimHost and log episode statistics."""

    iterations: int = _f(3, "Rollout rounds (each round: every SimHost runs steps_per_iter steps).")
    steps_per_iter: int = _f(100, "Env steps per env per round, run inside the actor in one call.")
    deterministic: bool = _f(False, "Use the Gaussian mean instead of sampling.")
    policy: Literal["mlp", "random"] = _f("mlp", "mlp: the (randomly initialised) Gaussian MLP; random: uniform actions.")

    def check(self) -> None:
        if self.iterations < 1:
            raise ConfigError("iterations", f"must be >= 1, got {self.iterations}")
        if self.steps_per_iter < 1:
            raise ConfigError("steps_per_iter", f"must be >= 1, got {self.steps_per_iter}")


@dataclass(frozen=True)
class CollectConfig(_Checked):
    """Scripted-expert demonstration collection (offrl collect)."""

    output: str = _f("datasets/PickCube-v1_expert.h5", "Dataset file to write (HDF5 + JSON sidecar beside it).")
    episodes: int = _f(100, "Episodes to keep (successful ones unless keep_failures).")
    expert: str = _f("auto", "Scripted expert name; auto picks the one registered for env.id.")
    action_noise: float = _f(0.0, "Std of Gaussian noise added to expert actions (suboptimal data).")
    keep_failures: bool = _f(False, "Also keep failed episodes (labelled success=false).")
    action_labels: Literal["executed", "expert"] = _f(
        "executed", "What the dataset's actions are: the executed (noisy) ones, or the expert's noise-free action "
                    "for each visited state while the env runs the noisy one (DART, Laskey et al. 2017: imitation "
                    "data that shows corrections; the executed actions go to executed_actions). Expert labels do "
                    "not lead to the recorded next states, so critics should not be trained on them.")
    max_attempts: int = _f(0, "Give up after this many episodes; 0 means 3x episodes + 10 (episodes with keep_failures).")
    first_seed: Optional[int] = _f(
        None, "Episode attempt i resets with seed first_seed + i; null: 1000000 * seed (the master seed).")
    max_steps: int = _f(0, "Actions per episode before truncation; 0 means env.max_episode_steps.")
    cube_xy_range: Optional[tuple[float, ...]] = _f(
        None, "Cube centre [xmin, xmax, ymin, ymax] in metres; null: the task's own ([-0.1, 0.1, -0.1, 0.1] "
              "for PickCube-v1). Custom ranges replay with --use-first-env-state.")
    goal_xy_range: Optional[tuple[float, ...]] = _f(
        None, "Goal [xmin, xmax, ymin, ymax] in metres; null: the task's own ([-0.1, 0.1, -0.1, 0.1]).")
    goal_z_range: Optional[tuple[float, ...]] = _f(
        None, "Goal height [zmin, zmax] in metres above the table; null: the task's own ([0.02, 0.32]).")
    chunk_size: int = _f(
        10, "Consecutive attempts per actor call; each call starts from a freshly built scene, which makes the "
            "data independent of the number of actors (for a given chunk_size).")
    overwrite: bool = _f(False, "Replace an existing output dataset.")

    def check(self) -> None:
        if self.episodes < 1:
            raise ConfigError("episodes", f"must be >= 1, got {self.episodes}")
        if self.action_noise < 0:
            raise ConfigError("action_noise", f"must be >= 0, got {self.action_noise}")
        if self.max_attempts < 0:
            raise ConfigError("max_attempts", f"must be >= 0, got {self.max_attempts}")
        if self.max_steps < 0:
            raise ConfigError("max_steps", f"must be >= 0, got {self.max_steps}")
        if self.chunk_size < 1:
            raise ConfigError("chunk_size", f"must be >= 1, got {self.chunk_size}")
        if self.first_seed is not None and self.first_seed < 0:
            raise ConfigError("first_seed", f"must be >= 0, got {self.first_seed}")
        for name, n in (("cube_xy_range", 4), ("goal_xy_range", 4), ("goal_z_range", 2)):
            r = getattr(self, name)
            if r is None:
                continue
            if len(r) != n:
                raise ConfigError(name, f"needs {n} numbers, got {list(r)}")
            if any(lo > hi for lo, hi in zip(r[::2], r[1::2])):
                raise ConfigError(name, f"each min must be <= its max, got {list(r)}")


PRETRAIN_ALGOS = ("bc", "critic_mc", "iql", "sarsa", "bc+critic_mc", "bc+iql", "bc+sarsa", "cql", "brac")


@dataclass(frozen=True)
class DistributionalConfig(_Checked):
    """A categorical value: probabilities over bins returns evenly spaced from v_min to v_max (C51)."""

    bins: int = _f(51, "Number of returns (atoms) the categorical puts mass on; >= 2.")
    v_min: float = _f(0.0, "Lowest return of the support (returns below are clipped onto it).")
    v_max: float = _f(1.0, "Highest return of the support (returns above are clipped onto it).")

    def check(self) -> None:
        if self.bins < 2:
            raise ConfigError("bins", f"must be >= 2, got {self.bins}")
        if not self.v_min < self.v_max:
            raise ConfigError("v_max", f"must be above v_min={self.v_min}, got {self.v_max}")


@dataclass(frozen=True)
class CriticConfig(_Checked):
    """Critic networks: V(s) and Q(s, a) MLPs on state observations."""

    hidden: tuple[int, ...] = _f((256, 256), "Hidden layer widths of V and Q.")
    activation: Literal["tanh", "relu", "elu", "gelu"] = _f("relu", "Hidden activation.")
    twin_q: bool = _f(True, "Two Q heads, min over them (clipped double Q).")
    # the offline RL workflow's corrections (Kumar et al. 2021): regularisation against overfitting, capacity
    # against underfitting; see offrl.algos.critics.correction_loss for the formulas
    vib_size: int = _f(0, "Variational information bottleneck: size k of z before the output layer (0: none). "
                          "Against overfitting.")
    vib_weight: float = _f(0.01, "Weight of the bottleneck's KL(N(mu, var) || N(0, I)) in the critic loss.")
    dr3_weight: float = _f(0.0, "DR3: weight of mean_b sum_i phi_i(s, a) . phi_i(s', a') (features before the "
                                "output layer) in the critic loss. Against underfitting (feature co-adaptation).")
    dropout: float = _f(0.0, "Dropout probability after every hidden layer of the critics. Against overfitting.")
    weight_decay: float = _f(0.0, "L2: weight_decay * sum ||W||^2 over the critics' weight matrices, added to the loss.")
    l1: float = _f(0.0, "L1: l1 * sum |W| over the critics' weight matrices, added to the loss.")
    residual: bool = _f(False, "Residual hidden layers h + act(W h + b) after the first (equal widths). Capacity "
                               "against underfitting.")
    obs_ignore: tuple[str, ...] = _f(
        (), "Observation parts V and Q do not see (pretraining's critics; finetuning rebuilds them so, and GAE's "
            "value net warm-started from their V): the spelling of policy.obs_ignore (field names or index "
            "ranges start:end), held at zero after normalisation. The run records the indices as "
            "critic_obs_ignore in its training state.")
    distributional: Optional[DistributionalConfig] = _f(
        None, "A categorical value distribution {bins, v_min, v_max} for the MC critics (pretrain algo critic_mc) "
              "and GAE's value net: trained by cross-entropy to the return's C51 projection on the support; its "
              "mean is the value used for advantages. null: a scalar value regressed by squared error.")

    def check(self) -> None:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError("hidden", f"needs positive widths, got {list(self.hidden)}")
        if self.vib_size < 0:
            raise ConfigError("vib_size", f"must be >= 0, got {self.vib_size}")
        for name in ("vib_weight", "dr3_weight", "weight_decay", "l1"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(name, f"must be a finite number >= 0, got {v}")
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.residual and len(set(self.hidden)) > 1:
            raise ConfigError("residual", f"needs equal hidden widths, got {list(self.hidden)}")

    @property
    def corrected(self) -> bool:
        """Whether any correction is on."""
        return bool(self.vib_size or self.dr3_weight or self.dropout or self.weight_decay or self.l1 or self.residual)


def _check_bonus(bonus: Optional[float]) -> None:
    if bonus is not None and not math.isfinite(bonus):
        raise ConfigError("success_bonus", f"must be a finite number or null, got {bonus}")


@dataclass(frozen=True)
class PretrainConfig(_Checked):
    """Offline pretraining (offrl pretrain): behaviour cloning and critic pretraining."""

    dataset: str = _f("datasets/PickCube-v1_expert.h5", "ManiSkill-format dataset to train on.")
    algo: str = _f("bc", "bc | critic_mc | iql | sarsa | bc+critic_mc | bc+iql | bc+sarsa | cql | brac "
                         "(iql/sarsa alone also extract a policy by advantage weighting; cql and brac train a "
                         "SAC-style actor against twin Q critics).")
    num_episodes: Optional[int] = _f(None, "Use only the first N episodes of the dataset (null: all).")
    critic_dataset: str = _f("", "Dataset the critics train on when it differs from the actor's (e.g. clean + noisy "
                                 "+ failed episodes merged with offrl data merge); empty: pretrain.dataset. Same task, "
                                 "controller and observation layout as pretrain.dataset; split for validation apart.")
    reward: Literal["dataset", "sparse", "dense", "normalized_dense", "success"] = _f(
        "dataset", "Reward the critics learn: the dataset's main reward, a stored reward mode, or success "
                   "(the sparse 0/1 reward from the per-step success flags). BC alone reads no reward.")
    epochs: int = _f(50, "Training epochs (metrics, validation and checkpoints are per epoch).")
    steps_per_epoch: int = _f(0, "Gradient steps per epoch; 0 means one pass over the training transitions. "
                                 "Fix it to compare datasets of different sizes at equal compute.")
    batch_size: int = _f(256, "Minibatch size.")
    actor_lr: float = _f(3e-4, "Adam learning rate of the actor.")
    critic_lr: float = _f(3e-4, "Adam learning rate of the critics.")
    bc_loss: Literal["mle", "mse"] = _f("mle", "BC loss: Gaussian log-likelihood or MSE of the mean.")
    gamma: float = _f(0.8, "Discount (ManiSkill episodes are short; 0.8 is common).")
    success_bonus: Optional[float] = _f(
        None, "Reward added to the step that ends an episode with success (critic targets and MC returns). "
              "null: (1 - gamma^H) / (1 - gamma) for normalized_dense rewards (H: the episode time limit), "
              "so finishing is never worth less than hovering near the goal; 0 for other rewards.")
    expectile: float = _f(0.7, "IQL expectile tau for V (sarsa always uses 0.5).")
    beta: float = _f(3.0, "Policy extraction weight exp(beta * A) (iql / sarsa actor).")
    max_weight: float = _f(100.0, "Clip of exp(beta * A).")
    target_tau: float = _f(0.005, "Polyak rate of the target Q network.")
    cql_alpha: float = _f(5.0, "CQL's weight on the conservative term (min_q_weight, alpha in Kumar et al. 2020).")
    cql_samples: int = _f(10, "Actions per state for CQL's logsumexp: this many uniform, policy at s, and policy at s'.")
    cql_lagrange: bool = _f(False, "Tune CQL's weight by dual gradient descent so the gap stays near cql_target_gap.")
    cql_target_gap: float = _f(5.0, "Target of the conservative gap with cql_lagrange (tau in Kumar et al. 2020).")
    brac_beta: float = _f(1.0, "BRAC's weight on the divergence from the behaviour policy (--beta in the workflow).")
    brac_penalty: Literal["value", "policy"] = _f(
        "value", "BRAC's penalty: value (BRAC-v: -beta * D(s') in the Q target and beta * D(s) in the actor loss) "
                 "or policy (BRAC-p: the actor loss only).")
    behavior_checkpoint: str = _f("", "BRAC's behaviour policy: a BC checkpoint (mlp policy, same task); empty: BC "
                                      "trained first in the same run for behavior_steps steps.")
    behavior_steps: int = _f(2000, "Gradient steps of the in-run BC behaviour policy (brac without behavior_checkpoint).")
    bc_warmup_steps: int = _f(0, "cql / brac: the actor maximises the data log-likelihood instead of Q for the "
                                 "first N gradient steps (CQL's policy warm-up).")
    entropy_alpha: float = _f(0.1, "cql / brac: initial temperature of the actor's entropy term (tuned towards "
                                   "target_entropy).")
    target_entropy: Optional[float] = _f(None, "cql / brac: entropy target of the temperature; null: -act_dim.")
    grad_clip: float = _f(1.0, "Max gradient norm (0 disables).")
    val_fraction: float = _f(0.1, "Fraction of episodes held out for validation (split by episode).")
    eval_every: int = _f(0, "Evaluate in simulation every K epochs (0: only after training).")
    eval_episodes: int = _f(20, "Episodes per evaluation during and after training.")
    checkpoint_every: int = _f(10, "Checkpoint every K epochs (and at the end).")
    keep_checkpoints: int = _f(3, "Periodic checkpoints to keep (the best one is kept apart).")
    select: Literal["auto", "best", "last"] = _f(
        "auto", "Which policy the final evaluation scores: best (lowest validation loss), last, or auto "
                "(best for mlp / mlp_chunk; last for diffusion, whose noise-prediction loss ranks checkpoints poorly).")
    workers: int = _f(1, "Data-parallel training workers: N > 1 runs the training loop in a Ray Train TorchTrainer "
                         "(gloo on CPU, NCCL on GPU); each worker takes batch_size rows of every step, so the global "
                         "batch is workers x batch_size. 1 trains in this process.")
    worker_cpus: float = _f(1.0, "CPUs reserved by each data-parallel worker (pretrain.workers > 1).")
    worker_gpu: bool = _f(False, "Give each data-parallel worker a GPU (NCCL); needs GPUs in the Ray cluster.")
    worker_failures: int = _f(3, "Times Ray Train restarts the worker group after a worker dies; it continues from "
                                 "the run's latest checkpoint (pretrain.workers > 1).")

    def check(self) -> None:
        if self.algo not in PRETRAIN_ALGOS:
            raise ConfigError("algo", f"expected one of {', '.join(PRETRAIN_ALGOS)}, got {self.algo!r}")
        for name in ("epochs", "batch_size", "eval_episodes", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch < 0:
            raise ConfigError("steps_per_epoch", f"must be >= 0, got {self.steps_per_epoch}")
        if self.workers < 1:
            raise ConfigError("workers", f"must be >= 1, got {self.workers}")
        if self.worker_cpus <= 0:
            raise ConfigError("worker_cpus", f"must be > 0, got {self.worker_cpus}")
        if self.worker_failures < 0:
            raise ConfigError("worker_failures", f"must be >= 0, got {self.worker_failures}")
        if self.num_episodes is not None and self.num_episodes < 1:
            raise ConfigError("num_episodes", f"must be >= 1 or null, got {self.num_episodes}")
        if self.critic_dataset and self.conservative:
            raise ConfigError("critic_dataset", f"pretrain.algo={self.algo} trains its actor and critics on each other, "
                                                "on one dataset; leave critic_dataset empty")
        if self.algo == "brac" and not self.behavior_checkpoint and self.behavior_steps < 1:
            raise ConfigError("behavior_steps", "brac without behavior_checkpoint trains its behaviour policy first: "
                                                f"needs >= 1 step, got {self.behavior_steps}")
        if self.critic_dataset and not self.critic_mode:
            raise ConfigError("critic_dataset", f"pretrain.algo={self.algo} trains no critics; use a critic algo "
                                                "(e.g. bc+iql) or leave critic_dataset empty")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError("gamma", f"must be in (0, 1], got {self.gamma}")
        _check_bonus(self.success_bonus)
        if not 0.0 < self.expectile < 1.0:
            raise ConfigError("expectile", f"must be in (0, 1), got {self.expectile}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.eval_every < 0:
            raise ConfigError("eval_every", f"must be >= 0, got {self.eval_every}")
        for name in ("actor_lr", "critic_lr", "max_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if not math.isfinite(self.cql_target_gap):
            raise ConfigError("cql_target_gap", f"must be a finite number, got {self.cql_target_gap}")
        for name in ("cql_alpha", "brac_beta", "entropy_alpha"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (name == "entropy_alpha" and v == 0):
                raise ConfigError(name, f"must be a finite number {'> 0' if name == 'entropy_alpha' else '>= 0'}, got {v}")
        for name in ("cql_samples",):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("behavior_steps", "bc_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.target_entropy is not None and not math.isfinite(self.target_entropy):
            raise ConfigError("target_entropy", f"must be a finite number or null, got {self.target_entropy}")
        if self.behavior_checkpoint and self.algo != "brac":
            raise ConfigError("behavior_checkpoint", f"is BRAC's behaviour policy; pretrain.algo={self.algo} reads "
                                                     "none (use algo=brac or leave it empty)")

    @property
    def trains_actor(self) -> bool:
        return self.algo in ("bc", "iql", "sarsa", "cql", "brac") or self.algo.startswith("bc+")

    @property
    def conservative(self) -> bool:
        """cql or brac: a SAC-style actor and twin Q trained on each other (offrl.algos.conservative)."""
        return self.algo in ("cql", "brac")

    @property
    def critic_mode(self) -> Optional[str]:
        """None, "mc", "expectile" or the conservative algo ("cql" / "brac")."""
        if self.conservative:
            return self.algo
        if "critic_mc" in self.algo:
            return "mc"
        if "iql" in self.algo or "sarsa" in self.algo:
            return "expectile"
        return None

    @property
    def actor_mode(self) -> Optional[str]:
        """None, "bc", "awr" (advantage-weighted extraction for iql / sarsa alone), "cql" or "brac"."""
        if self.conservative:
            return self.algo
        if self.algo.startswith("bc"):
            return "bc"
        return "awr" if self.algo in ("iql", "sarsa") else None

    @property
    def tau(self) -> float:
        """Expectile of V's regression (cql / brac fit V to the mean of Q on dataset actions: 0.5)."""
        return 0.5 if "sarsa" in self.algo or self.conservative else self.expectile


@dataclass(frozen=True)
class EvalConfig(_Checked):
    """Evaluation in simulation (offrl eval and evaluation during training)."""

    episodes: int = _f(50, "Episodes to evaluate (offrl eval).")
    seed: int = _f(1_000_000_000, "First evaluation seed; episode j uses seed + j (apart from collection seeds).")
    deterministic: bool = _f(True, "Act with the policy mean (mlp); sequence policies are deterministic given the seed.")
    ignore_terminations: bool = _f(
        False, "Run every episode to env.max_episode_steps even after success (ManiSkill's learning-from-demos "
               "protocol); success_once is the headline metric either way.")

    def check(self) -> None:
        if self.episodes < 1:
            raise ConfigError("episodes", f"must be >= 1, got {self.episodes}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0 (simulator seeds are unsigned), got {self.seed}")


ADVANTAGES = ("gae", "mc", "iql", "sarsa")
UPDATES = ("ppo", "awr", "push_away", "recap")


@dataclass(frozen=True)
class FinetuneConfig(_Checked):
    """Online finetuning (offrl finetune): one loop, advantage estimator x update rule as config values."""

    checkpoint: str = _f("", "Pretrained checkpoint (folder or run directory) with the actor; IQL/SARSA read "
                             "its critics too.")
    advantage: Literal["gae", "mc", "iql", "sarsa"] = _f("gae", "Advantage estimator.")
    update: Literal["ppo", "awr", "push_away", "recap", "sac"] = _f(
        "ppo", "Policy update rule; recap: Physical Intelligence's RECAP (pi*0.6), maximum likelihood on all data for "
               "a policy conditioned on the binarized advantage, acting with the positive condition (see the "
               "recap_* keys); sac is the off-policy reference row (RLPD-style soft actor-critic with its own "
               "Q ensemble; needs replay: true; finetune.advantage is not used by it).")
    iterations: int = _f(10, "Rollout -> advantage -> update rounds.")
    steps_per_iter: int = _f(50, "Env steps per env per round (on every SimHost).")
    gamma: float = _f(0.8, "Discount.")
    gae_lambda: float = _f(0.9, "GAE lambda.")
    success_bonus: Optional[float] = _f(
        None, "Reward added to the step that ends an episode with success (all estimators, re-rollouts "
              "included). null: (1 - gamma^H) / (1 - gamma) for normalized_dense rewards (H: env.max_episode_steps), "
              "so finishing is never worth less than hovering near the goal; 0 for other rewards.")
    epochs: int = _f(4, "Update epochs over each round's data.")
    minibatches: int = _f(4, "Minibatches per epoch.")
    actor_lr: float = _f(1e-4, "Adam learning rate of the actor.")
    critic_lr: float = _f(3e-4, "Adam learning rate of the value net (GAE) or the IQL/SARSA critics.")
    grad_clip: float = _f(0.5, "Max gradient norm.")
    clip: float = _f(0.2, "PPO ratio clip.")
    target_kl: Optional[float] = _f(0.1, "On-policy PPO, AWR and push-away: stop the round's epochs once approx_kl "
                                              "(to the round's behaviour policy) exceeds this; sac: stop the round's "
                                              "actor (and temperature) steps once KL(pi at the round's start || pi) "
                                              "on the round's first minibatch exceeds it, the critics keep "
                                              "training (null: never).")
    ent_coef: float = _f(0.0, "PPO entropy bonus coefficient.")
    vf_coef: float = _f(0.5, "PPO value loss coefficient (GAE value net).")
    beta: float = _f(1.0, "AWR temperature: weights exp(A / beta).")
    max_weight: float = _f(20.0, "AWR weight clip.")
    normalize_advantage: bool = _f(True, "Normalise advantages per minibatch (PPO) / per round (AWR, push-away; "
                                         "per minibatch on the replay path).")
    center_advantage: bool = _f(True, "AWR and push-away with normalize_advantage: subtract the mean before "
                                      "dividing by the std. false: divide only, so each advantage keeps its sign "
                                      "(with MC's many exact zeros, centring turns them negative and push-away "
                                      "pushes down most of the policy's own actions). PPO always centres.")
    keep_rounds: int = _f(1, "On-policy AWR and push-away: learn from the samples of the last K rounds, as Peng et "
                             "al. (2019) run AWR (a buffer of recent samples). Every round the estimator recomputes "
                             "the advantages of all kept rounds with its current value net or critics (GAE, with "
                             "fresh lambda-returns for the value net; IQL; SARSA; MC keeps each pair's re-rolled "
                             "advantage), target_kl measures the step from the policy at the round's start, and "
                             "push-away's floor stays relative to each sample's own behaviour policy. 1: each "
                             "round's own samples only. No effect on PPO and RECAP (their ratio and labels need "
                             "the round's own policy) or on the replay path (it keeps every transition), so one "
                             "sweep can set it for every rule.")
    push_alpha: float = _f(1.0, "Push-away AWR: weight of the push-down term on negative advantages.")
    push_max: float = _f(1.0, "Push-away AWR: max nats a pushed action's log-likelihood may fall below the "
                              "data-collecting policy's (the bound of the push term).")
    recap_percentile: float = _f(70.0, "recap: I = positive where A exceeds this percentile of the round's "
                                       "advantages (on the replay path: of each minibatch's); in (0, 100).")
    recap_threshold: Optional[float] = _f(None, "recap: a fixed advantage threshold instead of the percentile "
                                                "(null: use recap_percentile).")
    recap_drop: float = _f(0.3, "recap: probability that a sample's indicator is replaced by 'none' in training "
                                "(what guidance contrasts with); in [0, 1).")
    recap_cfg_weight: float = _f(0.0, "recap: classifier-free guidance weight w >= 0 of the acting policy: "
                                      "mu = mu_none + (1 + w) (mu_pos - mu_none); 0: plain positive conditioning.")
    value_warmup_iters: int = _f(1, "GAE and sac: first rounds train only the value net / the Q ensemble (the actor waits).")
    critic_online: bool = _f(True, "IQL/SARSA: keep training the pretrained critics on online data.")
    expectile: float = _f(0.7, "IQL expectile for online critic training (SARSA uses 0.5).")
    mc_samples: int = _f(2, "MC: re-rollouts per (state, action) and per state.")
    mc_horizon: Optional[int] = _f(None, "MC: re-rollout horizon cap in steps; null: the remaining steps of the "
                                         "episode's time limit (unbiased; a cap neglects the gamma^horizon tail).")
    mc_common_noise: bool = _f(False, "MC: sample m of Q(s, a) and sample m of V(s) draw the same policy noise "
                                      "at every step (common random numbers, TRPO's vine estimator), so their "
                                      "difference is the action's effect, not two continuations' luck. "
                                      "Needs a Gaussian MLP re-rollout policy.")
    mc_v_actions: bool = _f(False, "MC: also learn from the first action of each of V's re-rollouts, an on-policy "
                                   "draw whose return is known; its advantage is that return minus the mean of the "
                                   "state's other re-rollouts (leave-one-out, unbiased). A state then gives "
                                   "mc_samples + 1 advantages from the same re-rollouts instead of 1. Needs the "
                                   "current policy as a Gaussian MLP (rerollout_policy: current).")
    mc_fraction: float = _f(0.25, "MC: fraction of each round's states re-rolled (the rest are not used).")
    rerollout_policy: Literal["current", "checkpoint", "expert"] = _f(
        "current", "MC: policy followed in re-rollouts: the current policy, a fixed checkpoint, or the scripted expert.")
    rerollout_checkpoint: str = _f("", "MC: checkpoint of the fixed re-rollout policy (rerollout_policy=checkpoint).")
    init_log_std: Optional[float] = _f(None, "Reset the actor's log std at the start (null: keep the pretrained one).")
    replay: bool = _f(False, "Off-policy path (IQL/SARSA x AWR/push-away): keep every online transition in a replay "
                             "buffer; each round takes updates_per_round gradient steps on minibatches mixing it "
                             "with the offline data, the critics keep learning on the same mix and advantages are "
                             "recomputed on every minibatch (IQL's online finetuning, AWAC). false: the on-policy "
                             "path (each round's own samples, epochs x minibatches).")
    offline_ratio: float = _f(0.5, "replay: fraction of each minibatch drawn from the offline data (0.5: RLPD's "
                                   "symmetric sampling; 0: replay only).")
    updates_per_round: int = _f(100, "replay: gradient steps per round (the update-to-data ratio is "
                                     "updates_per_round * batch_size / env steps per round).")
    batch_size: int = _f(256, "replay: minibatch size.")
    replay_size: int = _f(1_000_000, "replay: capacity of the replay buffer (oldest transitions dropped first).")
    overlap: bool = _f(False, "replay: start the next round's rollout before this round's gradient steps, so the "
                              "SimHosts simulate while the learner updates (an asynchronous actor-learner loop). "
                              "Each such round is collected by the policy one update older (rollout/policy_lag 1); "
                              "evaluation rounds and the round after them run in sequence, so checkpoints and "
                              "--resume stay exact. false: rollout, then update.")
    learner_threads: int = _f(0, "torch threads of the learner (the finetuning driver process); 0: 1 with overlap, "
                                 "whose update runs while the SimHosts keep the cores busy, torch's default (one a "
                                 "core) otherwise.")
    her_relabel: int = _f(0, "replay: hindsight relabelling (HER's 'future' strategy, Andrychowicz et al. 2017): each "
                             "online transition also enters the replay this many times with the goal moved to where "
                             "the object is at a later step of the same episode, and the sparse reward recomputed "
                             "(offrl.envs.goals); 0: off. Needs env.reward_mode sparse and a task with a goal in its "
                             "observation (PickCube-v1).")
    her_min_move: float = _f(0.0, "her_relabel: drop the relabelled copies whose goal is closer than this (m) to "
                                  "where the object is at the transition's start (goals reached by holding "
                                  "still); 0 keeps every copy (HER).")
    her_move_from: Literal["transition", "episode"] = _f(
        "transition", "her_min_move measures from where the object is at the transition's start (transition), "
                      "or at its episode's start (episode: only goals reached without ever moving the object are "
                      "dropped; an object carried to a spot and held still there keeps that spot as a goal).")
    bc_coef: float = _f(0.0, "Behaviour-cloning term on offline minibatches added to every actor loss: "
                             "bc_coef * -log pi(a_demo | s_demo) (DAPG, Rajeswaran et al. 2018); 0: off.")
    bc_decay: float = _f(1.0, "Per-round decay of the DAPG term: round k (from 0) weighs it bc_coef * bc_decay**k "
                              "(DAPG's own schedule, Rajeswaran et al. 2018, decays it by 0.95 an iteration), so the "
                              "demos hold the first rounds and give way later. 1: a constant weight.")
    rule_coef: float = _f(1.0, "Weight of the update rule's own loss (PPO, AWR, push-away, RECAP; not sac) in the "
                               "actor loss. 0 leaves only the bc_coef and ref_kl_coef terms: the demos-only control "
                               "that tells a rule's gain from what the DAPG term alone does with the same rounds.")
    ref_kl_coef: float = _f(0.0, "Anchor to the start policy: ref_kl_coef * KL(start policy || policy) on each "
                                 "minibatch's states, added to every actor loss of PPO, AWR, push-away and RECAP "
                                 "(on-policy and replay paths; not sac). Needs no offline data: without a signal the "
                                 "rounds' steps then revert towards the start instead of adding up to a walk "
                                 "(bench/noise_round.py). 0: off.")
    bc_mean_only: bool = _f(False, "The DAPG term moves the policy's mean only: its log-likelihood takes the "
                                   "std as a constant, so the std is left to the rule's own terms. With sac "
                                   "the full log-likelihood shrinks the std below the target entropy and the "
                                   "temperature climbs (measured at 800 updates a round: alpha 0.001 -> 2.2); "
                                   "mean-only keeps alpha near 0.002, though success did not rise (README).")
    bc_q_filter: bool = _f(False, "sac: the Q filter of Nair et al. (2018) on the DAPG term: a demo row counts "
                                  "only where the Q ensemble rates its action above the policy's mean action, "
                                  "so the demos stop pinning the actor where the critics found better (logged "
                                  "as bc_kept, the share of rows kept). Needs bc_coef > 0.")
    offline_dataset: str = _f("", "Offline data for replay / bc_coef: a file, or empty (the same as 'start'): "
                                  "the start checkpoint's pretrain.dataset and pretrain.num_episodes.")
    bc_dataset: str = _f("", "Data of the DAPG term (bc_coef) when it should differ from the offline mix's. "
                             "Empty: the offline data (offline_dataset). 'start': what the start's actor was "
                             "trained on (its pretrain.dataset and pretrain.num_episodes). Or a file. Lets the "
                             "replay mix draw on clean + noisy + failed episodes while the term clones the demos "
                             "only. Needs bc_coef > 0.")
    sac_ensemble: int = _f(10, "sac: Q networks in the ensemble (RLPD: 10).")
    sac_subset: int = _f(2, "sac: target heads whose minimum forms the TD target (RLPD/REDQ: 2).")
    sac_layer_norm: bool = _f(True, "sac: LayerNorm after every hidden layer of the Q networks (RLPD).")
    sac_init_alpha: float = _f(0.001, "sac: initial entropy temperature (RLPD starts at 1.0 from scratch). A "
                                      "pretrained actor with a sparse 0/1 reward needs far less: at 0.1 the "
                                      "entropy term (-0.23 a step) outweighed the reward in Q (Q mean -0.70).")
    sac_target_entropy: Optional[float] = _f(None, "sac: target entropy of the temperature tuning (null: "
                                                   "-act_dim / 2, RLPD's choice).")
    sac_backup_entropy: bool = _f(True, "sac: subtract alpha log pi(a'|s') in the TD target (SAC). false: the "
                                        "target is reward + discounted min Q only, as RLPD's ManiSkill configs "
                                        "run it (backup_entropy: False).")
    sac_critic_obs: Literal["full", "actor"] = _f(
        "actor", "sac: what the Q ensemble sees. actor: the observation as the actor sees it (its policy.obs_ignore "
                 "entries held at zero, its policy.obs_min_std floor; for an actor that hides nothing and has no "
                 "floor, the same as full); full: every entry, normalised by the start actor's statistics. From "
                 "PickCube starts that hide the orientations, actor ended higher on every seed compared.")
    sac_tau: float = _f(0.005, "sac: Polyak rate of the target Q networks.")
    sac_actor_every: int = _f(1, "sac: the actor and temperature step on every K-th of the round's "
                                 "updates_per_round gradient steps, the critics on every one (RLPD's update-to-data "
                                 "ratio: several critic steps per actor step). K=4 with updates_per_round=800 keeps "
                                 "the actor's 200 steps a round and gives the critics four times as many.")
    sac_critic_bins: int = _f(0, "sac: 0 regresses each Q head on its TD target (mean squared error); K > 0 makes "
                                 "each head a classifier over K bins spanning sac_value_range, trained by "
                                 "cross-entropy on the target smeared by a Gaussian (HL-Gauss, Farebrother et al. "
                                 "2024), Q the expected bin centre.")
    sac_value_range: tuple[float, ...] = _f((-2.0, 2.0), "sac_critic_bins: the [low, high] span of the bins; TD "
                                                           "targets outside it are clipped to it.")
    sac_hl_sigma: float = _f(0.75, "sac_critic_bins: the Gaussian's std in bin widths (0.75: the paper's choice).")
    n_step: int = _f(1, "sac: n-step TD targets. Online rows (within a round) and offline rows (within an episode) "
                        "sum n rewards discounted and bootstrap gamma^n later, fewer steps where the episode or "
                        "the round ends first; relabelled (her_relabel) copies stay one-step. Uncorrected for the "
                        "behaviour policy, as Rainbow and DrQ-v2 run it; 1 is plain SAC.")
    sac_bound_coef: float = _f(1.0, "sac: weight of the penalty ||mu - clip(mu)||^2 that keeps the actor's mean "
                                    "near the action bounds (clip squashing; 0 disables).")
    eval_every: int = _f(5, "Deterministic evaluation every K rounds (and before the first and after the last).")
    eval_episodes: int = _f(20, "Episodes per evaluation.")

    def check(self) -> None:
        for name in ("iterations", "steps_per_iter", "epochs", "minibatches", "mc_samples", "eval_every",
                     "eval_episodes", "updates_per_round", "batch_size", "replay_size", "sac_ensemble",
                     "sac_actor_every", "n_step"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("gamma", "gae_lambda", "expectile"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(name, f"must be in [0, 1], got {v}")
        if not 0.0 < self.mc_fraction <= 1.0:
            raise ConfigError("mc_fraction", f"must be in (0, 1], got {self.mc_fraction}")
        for name in ("actor_lr", "critic_lr", "beta", "max_weight", "clip", "push_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        _check_bonus(self.success_bonus)
        if self.value_warmup_iters < 0:
            raise ConfigError("value_warmup_iters", f"must be >= 0, got {self.value_warmup_iters}")
        if self.rerollout_policy == "checkpoint" and not self.rerollout_checkpoint:
            raise ConfigError("rerollout_checkpoint", "needed when rerollout_policy is checkpoint")
        if self.mc_horizon is not None and self.mc_horizon < 1:
            raise ConfigError("mc_horizon", f"must be >= 1 or null (the rest of the episode), got {self.mc_horizon}")
        if self.advantage == "mc" and self.rerollout_policy == "current" and self.mc_samples < 2:
            raise ConfigError("mc_samples", "re-rolling with the current (stochastic) policy needs mc_samples >= 2, "
                                            f"got {self.mc_samples}")
        if self.mc_common_noise and self.rerollout_policy == "expert":
            raise ConfigError("mc_common_noise", "needs a Gaussian MLP re-rollout policy (current or checkpoint), "
                                                 "not the scripted expert")
        if self.mc_v_actions and self.rerollout_policy != "current":
            raise ConfigError("mc_v_actions", "needs rerollout_policy: current (V's first actions must be draws of "
                                              f"the policy being trained), got {self.rerollout_policy!r}")
        if not 0.0 <= self.offline_ratio <= 1.0:
            raise ConfigError("offline_ratio", f"must be in [0, 1], got {self.offline_ratio}")
        if self.bc_coef < 0:
            raise ConfigError("bc_coef", f"must be >= 0, got {self.bc_coef}")
        if not (math.isfinite(self.bc_decay) and 0.0 < self.bc_decay <= 1.0):
            raise ConfigError("bc_decay", f"must be in (0, 1], got {self.bc_decay}")
        if not (math.isfinite(self.ref_kl_coef) and self.ref_kl_coef >= 0):
            raise ConfigError("ref_kl_coef", f"must be a finite number >= 0, got {self.ref_kl_coef}")
        if not (math.isfinite(self.rule_coef) and self.rule_coef >= 0):
            raise ConfigError("rule_coef", f"must be a finite number >= 0, got {self.rule_coef}")
        if self.bc_q_filter and (self.update != "sac" or self.bc_coef <= 0):
            raise ConfigError("bc_q_filter", f"needs update sac and bc_coef > 0 (got update {self.update}, "
                                             f"bc_coef {self.bc_coef})")
        if self.bc_dataset and self.bc_coef <= 0:
            raise ConfigError("bc_dataset", f"needs bc_coef > 0 (got {self.bc_coef}): it is the DAPG term's data")
        if self.rule_coef != 1.0 and self.update == "sac":
            raise ConfigError("rule_coef", "is not used by sac (its actor loss is SAC's own)")
        if self.ref_kl_coef > 0 and self.update == "sac":
            raise ConfigError("ref_kl_coef", "is not used by sac (its actor is held by bc_coef and target_kl)")
        if not (math.isfinite(self.recap_percentile) and 0.0 < self.recap_percentile < 100.0):
            raise ConfigError("recap_percentile", f"must be in (0, 100), got {self.recap_percentile}")
        if self.recap_threshold is not None and not math.isfinite(self.recap_threshold):
            raise ConfigError("recap_threshold", f"must be a finite number or null, got {self.recap_threshold}")
        if not (math.isfinite(self.recap_drop) and 0.0 <= self.recap_drop < 1.0):
            raise ConfigError("recap_drop", f"must be in [0, 1), got {self.recap_drop}")
        if not (math.isfinite(self.recap_cfg_weight) and self.recap_cfg_weight >= 0):
            raise ConfigError("recap_cfg_weight", f"must be a finite number >= 0, got {self.recap_cfg_weight}")
        if self.update == "recap" and self.recap_cfg_weight > 0 and self.recap_drop == 0:
            raise ConfigError("recap_drop", "guidance (recap_cfg_weight > 0) needs the unconditioned policy, which "
                                            "only recap_drop > 0 trains")
        if self.update == "recap" and not self.replay and self.offline_ratio >= 1.0:
            raise ConfigError("offline_ratio", "recap on the on-policy path adds offline rows at this share of each "
                                               "minibatch, so it must be < 1")
        if self.keep_rounds < 1:
            raise ConfigError("keep_rounds", f"must be >= 1, got {self.keep_rounds}")
        if self.her_relabel < 0:
            raise ConfigError("her_relabel", f"must be >= 0, got {self.her_relabel}")
        if self.her_min_move < 0:
            raise ConfigError("her_min_move", f"must be >= 0, got {self.her_min_move}")
        if self.learner_threads < 0:
            raise ConfigError("learner_threads", f"must be >= 0, got {self.learner_threads}")
        if self.overlap and not self.replay:
            raise ConfigError("overlap", "collects each round with the policy one update older, which only the "
                                         "off-policy replay path learns from correctly: set finetune.replay=true")
        if self.her_relabel > 0 and not self.replay:
            raise ConfigError("her_relabel", "relabelled transitions go into the replay buffer: set finetune.replay=true")
        if self.n_step > 1 and self.update != "sac":
            raise ConfigError("n_step", f"n-step targets are implemented for update sac only, got {self.update}")
        if self.update == "sac":
            if not self.replay:
                raise ConfigError("update", "sac trains off-policy: set finetune.replay=true")
            if not 1 <= self.sac_subset <= self.sac_ensemble:
                raise ConfigError("sac_subset", f"must be in [1, sac_ensemble={self.sac_ensemble}], got {self.sac_subset}")
            if self.sac_init_alpha <= 0:
                raise ConfigError("sac_init_alpha", f"must be > 0, got {self.sac_init_alpha}")
            if not 0 < self.sac_tau <= 1:
                raise ConfigError("sac_tau", f"must be in (0, 1], got {self.sac_tau}")
            if self.sac_bound_coef < 0:
                raise ConfigError("sac_bound_coef", f"must be >= 0, got {self.sac_bound_coef}")
            if self.sac_critic_bins < 0 or self.sac_critic_bins == 1:
                raise ConfigError("sac_critic_bins", f"must be 0 (regression) or >= 2, got {self.sac_critic_bins}")
            if len(self.sac_value_range) != 2:
                raise ConfigError("sac_value_range", f"needs [low, high], got {list(self.sac_value_range)}")
            lo, hi = self.sac_value_range
            if not lo < hi:
                raise ConfigError("sac_value_range", f"needs low < high, got [{lo}, {hi}]")
            if self.sac_hl_sigma <= 0:
                raise ConfigError("sac_hl_sigma", f"must be > 0, got {self.sac_hl_sigma}")
        elif self.replay and self.advantage not in ("iql", "sarsa"):
            raise ConfigError("replay", f"the replay path trains critics off-policy, so it needs advantage iql or "
                                        f"sarsa, got {self.advantage} (GAE and MC are on-policy: use bc_coef)")
        if self.replay and self.update not in ("awr", "push_away", "recap", "sac"):
            raise ConfigError("replay", f"the replay path needs update awr, push_away, recap or sac, got {self.update} "
                                        "(PPO is on-policy: use bc_coef)")


@dataclass(frozen=True)
class IterateConfig(_Checked):
    """The reverse-to-forward loop (offrl iterate): alternating test -> merge successes -> finetune A and B."""

    policy_a: str = _f("", "Starting checkpoint (or run directory) of the task-A policy (offrl/PickPlaceA-v1).")
    policy_b: str = _f("", "Starting checkpoint (or run directory) of the task-B policy (offrl/PickPlaceB-v1).")
    data_a: str = _f("", "Task A's original training data (e.g. time-reversed B demos); successes are merged into it.")
    data_b: str = _f("", "Task B's original training data; successful B rollouts are merged into it.")
    root: str = _f("runs/iterate", "Folder of the loop: iter_<i>/ per iteration, iterate.json/md/png.")
    max_iterations: int = _f(4, "Alternating tests (iterations 0..max_iterations-1); the last one only tests.")
    chains: int = _f(20, "Chains of each alternating test.")
    max_cycles: int = _f(10, "A->B cycles after which a chain stops.")
    horizon: int = _f(0, "Control steps per attempt; 0: policy A's env.max_episode_steps.")
    steps_per_iter: int = _f(2000, "Gradient steps of each finetuning of A and of B per iteration.")
    steps_per_epoch: int = _f(200, "Gradient steps per finetuning epoch (its checkpoint and log interval).")
    eval_episodes: int = _f(20, "Own-task evaluation episodes after each finetuning (the run's eval.json).")
    expert_b: bool = _f(
        False, "After each test, run task B's scripted expert from the start state of every B attempt that "
               "failed and merge its successful episodes into B's data too (B is the easy task, the one with an "
               "expert: demonstrations from the states the chains produce, which B's resets never show).")

    def check(self) -> None:
        for key in ("max_iterations", "chains", "max_cycles", "steps_per_iter", "steps_per_epoch", "eval_episodes"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.horizon < 0:
            raise ConfigError("horizon", f"must be >= 0, got {self.horizon}")


@dataclass(frozen=True)
class RunConfig(_Checked):
    """Run directory: runs/<experiment>/<trial>/ with config, meta, metrics, TensorBoard, checkpoints."""

    root: str = _f("runs", "Parent folder of all experiments.")
    experiment: str = _f("default", "Experiment name (folder under root).")
    trial: Optional[str] = _f(None, "Trial name (folder under the experiment); null: a timestamp.")
    tensorboard: bool = _f(True, "Write TensorBoard event files.")
    progress: bool = _f(True, "Show progress bars.")

    def check(self) -> None:
        for name in ("experiment", "trial"):
            v = getattr(self, name)
            if v is not None and (not v or "/" in v or v in (".", "..")):
                raise ConfigError(name, f"must be a plain folder name, got {v!r}")


@dataclass(frozen=True)
class ExperimentConfig(_Checked):
    """A whole experiment."""

    seed: int = _f(0, "Master seed: env resets, network init and sampling derive from it.")
    env: EnvConfig = _sub(EnvConfig)
    cluster: ClusterConfig = _sub(ClusterConfig)
    policy: PolicyConfig = _sub(PolicyConfig)
    diffusion: DiffusionConfig = _sub(DiffusionConfig)
    rollout: RolloutConfig = _sub(RolloutConfig)
    collect: CollectConfig = _sub(CollectConfig)
    critic: CriticConfig = _sub(CriticConfig)
    pretrain: PretrainConfig = _sub(PretrainConfig)
    eval: EvalConfig = _sub(EvalConfig)
    finetune: FinetuneConfig = _sub(FinetuneConfig)
    iterate: IterateConfig = _sub(IterateConfig)
    run: RunConfig = _sub(RunConfig)

    def check(self) -> None:
        if self.finetune.her_relabel > 0 and self.env.reward_mode != "sparse":
            raise ConfigError("finetune.her_relabel", "recomputes the task's success as the reward, so it needs "
                                                      f"env.reward_mode sparse, got {self.env.reward_mode}")
        if self.critic.distributional is not None and self.pretrain.critic_mode not in (None, "mc"):
            raise ConfigError("critic.distributional", f"is for Monte-Carlo-return critics (critic_mc) and GAE's "
                                                       f"value net; pretrain.algo {self.pretrain.algo} trains "
                                                       "bootstrapped critics")
        if self.policy.kind == "diffusion":
            halvings = 2 ** (len(self.diffusion.widths) - 1)
            if self.policy.pred_horizon % halvings:
                raise ConfigError("policy.pred_horizon", f"must be divisible by {halvings} for a "
                                                         f"{len(self.diffusion.widths)}-level U-Net "
                                                         f"(diffusion.widths), got {self.policy.pred_horizon}")


# ------------------------------------------------------------------------------------------ loading

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
_PLURALS = {int: "integers", float: "numbers", bool: "true/false values", str: "strings", dict: "mappings"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " or null"
    if origin is tuple:
        return "a list of " + _PLURALS.get(typing.get_args(tp)[0], _describe(typing.get_args(tp)[0]) + "s")
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _is_nan(value: Any) -> bool:
    """A float NaN, or a string that reads as one (YAML reads ``nan`` as a string, ``.nan`` as a float)."""
    value = _as_float(value)
    return isinstance(value, float) and value != value


def _as_float(value: Any) -> Any:
    """``value`` as a float when it is a number or a string that reads as one (YAML 1.1 reads ``1e-3``,
    ``nan`` and ``inf`` as strings, ``.nan`` and ``.inf`` as floats); otherwise unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _non_finite(value: Any) -> bool:
    """A float NaN or +/-Inf, or a string that reads as one."""
    value = _as_float(value)
    return isinstance(value, float) and not math.isfinite(value)


class _NonFinite(ConfigError):
    """A NaN or +/-Inf given for a float key (the one check every float key of every section goes through)."""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if float in args and _non_finite(value):
            raise _NonFinite(path, f"must be a finite number or null, got {_as_float(value)}")
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except _NonFinite:
                raise  # e.g. an inf inside an Optional list of floats: name the element
            except ConfigError:
                if dataclasses.is_dataclass(a) and isinstance(value, dict):
                    raise  # an optional section given as a mapping: its own key's error, e.g. x.bins
                pass
        raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected {_describe(tp)}, got {value!r}")
        elem = typing.get_args(tp)[0]
        return tuple(_coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        value = _as_float(value)  # YAML 1.1 reads 1e-3 (no dot), nan and inf as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # every float key, Optional[float] and tuple elements included
            raise _NonFinite(path, f"must be a finite number, got {value}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            path = f"{prefix}.{key}" if prefix else str(key)
            close = [n for n in sorted(names) if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(sorted(names))})"
            raise ConfigError(path, f"unknown key{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            path = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], path)
    obj = cls(**kwargs)
    try:
        obj.check()
    except ConfigError as e:
        path = f"{prefix}.{e.path}" if prefix else e.path
        raise ConfigError(path, str(e).split("': ", 1)[1]) from None
    return obj


def from_dict(data: dict, cls: type = ExperimentConfig) -> Any:
    """Build and validate a config from a nested dict."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"the top level must be a mapping, got {type(data).__name__}")
    return _build(cls, data)


def to_dict(cfg: Any) -> dict:
    """A plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value); the value is read as YAML (``4``, ``true``, ``[64, 64]``)."""
    if "=" not in text:
        raise ConfigError("", f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError("", f"override {text!r} has an empty key")
    try:
        value = _load_yaml(raw, prefix=key) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides to a nested dict (a deep copy is returned)."""
    import copy

    data = copy.deepcopy(data) if data else {}
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section; cannot set a sub-key")
            node = nxt
        node[parts[-1]] = value
    return data


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is a ConfigError naming its path
    (plain PyYAML keeps the last value silently)."""

    key_prefix = ""  # the dotted path of the parsed text (an override's key)
    source_name = ""  # the file, for the message

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._paths: dict[int, str] = {}
        self._name_paths(node, self.key_prefix, set())
        return self.construct_document(node)

    def _name_paths(self, node: Any, path: str, seen: set) -> None:
        if id(node) in seen:  # an alias: named where it was anchored
            return
        seen.add(id(node))
        self._paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else "?"
                self._name_paths(v, f"{path}.{key}" if path else key, seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._name_paths(v, f"{path}[{i}]", seen)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        first: dict[str, int] = {}
        for k, _ in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                continue
            line = k.start_mark.line + 1
            if k.value in first:
                parent = self._paths.get(id(node), self.key_prefix)
                where = f" in {self.source_name}" if self.source_name else ""
                raise ConfigError(f"{parent}.{k.value}" if parent else k.value,
                                  f"is given twice{where} (lines {first[k.value]} and {line}); keep one")
            first[k.value] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, prefix: str = "", source: str = "") -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (see :class:`_StrictLoader`)."""
    loader = _StrictLoader(text)
    loader.key_prefix, loader.source_name = prefix, source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with clear errors for a missing, unreadable or malformed file.

    A key given twice is refused (ConfigError naming it); an empty file (or one of comments only) means
    every key takes its default, and says so in one note line on stderr.
    """
    p = Path(path)
    if not p.exists():
        raise OffrlError(f"config file not found: {p}")
    if p.is_dir():
        raise OffrlError(f"config path is a folder, not a YAML file: {p}")
    try:
        data = _load_yaml(p.read_text(), source=str(p))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise OffrlError(f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OffrlError(f"cannot read config file {p}: {e}") from None
    if data is None:
        sys.stderr.write(f"[offrl] note: {p} is empty: every key takes its default\n")
        return {}
    if not isinstance(data, dict):
        raise OffrlError(f"{p}: the top level must be a mapping of config sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = ExperimentConfig) -> Any:
    """Load a YAML config (or defaults when ``path`` is None), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(data, cls)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def iter_keys(cls: type = ExperimentConfig, prefix: str = ""):
    """Yield (key path, type description, default, help) for every leaf key: the documentation of the config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, path)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        yield path, _describe(tp), default, f.metadata.get("help", "")


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that accepts dotted keys: replace(cfg, **{"env.num_envs": 2})."""
    nested: dict[str, dict] = {}
    flat = {}
    for k, v in changes.items():
        if "." in k:
            head, rest = k.split(".", 1)
            nested.setdefault(head, {})[rest] = v
        else:
            flat[k] = v
    for head, sub in nested.items():
        flat[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)
