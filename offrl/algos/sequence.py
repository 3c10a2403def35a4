"""Action-sequence policies (pure torch): an action-chunking MLP and Diffusion Policy, with their data windows.

Both map an observation history ``obs_seq [B, To, obs_dim]`` to an action sequence ``[B, Tp, act_dim]``
(Chi et al., RSS 2023; Zhao et al., RSS 2023 for chunking). The window of a sample whose current step is
``t`` covers observations ``t - To + 1 .. t`` and actions ``t - To + 1 .. t - To + Tp``; a policy runs the
``Ta`` actions from index ``To - 1`` on (the first one is the action for step ``t``) and then replans
(receding horizon). At an episode's start the first observation (and action) is repeated. Past its end the
last action is repeated (``end_padding="last"``, Chi et al.'s padding), or the arm of a delta controller is
held still: zero on every action dimension but the last (the gripper), which repeats (``"hold"``, ManiSkill's
Diffusion Policy baseline).

Normalisation, both saved with the model as buffers of its ``normalizer`` submodule:
* observations: ``(o - mean) / std`` (std floored at 1e-2, so constant columns stay finite);
* actions: scaled to [-1, 1] from the dataset's per-dimension min/max (``2 (a - min) / (max - min) - 1``);
  a constant dimension maps to 0.

Shapes are batch-major ``[B, T, dim]`` throughout this module.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from offrl.algos.networks import mlp

SEQUENCE_KINDS = ("mlp_chunk", "diffusion")


END_PADDINGS = ("last", "hold")


def make_windows(episodes: Sequence[tuple[np.ndarray, np.ndarray]], obs_horizon: int,
                 pred_horizon: int, end_padding: str = "last") -> dict[str, torch.Tensor]:
    """Training windows from ``(obs [T+1, d], actions [T, a])`` episodes: one per action step.

    Returns ``obs_seq [N, To, d]`` and ``act_seq [N, Tp, a]`` float32, plus ``episode [N]`` and ``step [N]``
    (the current step ``t`` of each window). Indices before 0 repeat the first row. Actions past ``T - 1``
    repeat the last action (``end_padding="last"``) or are ``[0, ..., 0, a_{T-1}[-1]]`` (``"hold"``: the
    arm of a delta controller stays still, the gripper keeps its last command).
    """
    if end_padding not in END_PADDINGS:
        raise ValueError(f"unknown end_padding {end_padding!r} ({' or '.join(END_PADDINGS)})")
    To, Tp = int(obs_horizon), int(pred_horizon)
    obs_w, act_w, ep_w, st_w = [], [], [], []
    for e, (obs, act) in enumerate(episodes):
        T = act.shape[0]
        if T < 1:
            continue
        t = np.arange(T)
        oi = np.clip(t[:, None] + np.arange(-To + 1, 1)[None, :], 0, T - 1)       # [T, To]
        raw = t[:, None] + np.arange(-To + 1, Tp - To + 1)[None, :]                   # [T, Tp]
        seq = act[np.clip(raw, 0, T - 1)]
        if end_padding == "hold":
            seq[raw > T - 1, :-1] = 0.0
        obs_w.append(obs[oi])
        act_w.append(seq)
        ep_w.append(np.full(T, e, np.int64))
        st_w.append(t)
    if not obs_w:
        raise ValueError("no episode has any action step")
    return {"obs_seq": torch.as_tensor(np.concatenate(obs_w), dtype=torch.float32),
            "act_seq": torch.as_tensor(np.concatenate(act_w), dtype=torch.float32),
            "episode": torch.as_tensor(np.concatenate(ep_w)), "step": torch.as_tensor(np.concatenate(st_w))}


class SequenceNormalizer(nn.Module):
    """Observation mean/std and action min/max as buffers (saved in ``normalizer.safetensors``)."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("act_min", -torch.ones(act_dim))
        self.register_buffer("act_max", torch.ones(act_dim))

    @torch.no_grad()
    def fit(self, obs: torch.Tensor, actions: torch.Tensor) -> None:
        """Statistics from observation rows ``[..., obs_dim]`` and action rows ``[..., act_dim]``."""
        o = obs.reshape(-1, obs.shape[-1]).double()
        a = actions.reshape(-1, actions.shape[-1]).double()
        self.obs_mean.copy_(o.mean(0).float())
        self.obs_std.copy_(o.std(0, unbiased=False).clamp_min(1e-2).float())
        self.act_min.copy_(a.min(0).values.float())
        self.act_max.copy_(a.max(0).values.float())

    def obs(self, o: torch.Tensor) -> torch.Tensor:
        return (o - self.obs_mean) / self.obs_std

    def _span(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(max - min with constant dimensions set to 1, mask of the non-constant dimensions)."""
        span = self.act_max - self.act_min
        varies = span > 1e-6
        return torch.where(varies, span, torch.ones_like(span)), varies

    def act(self, a: torch.Tensor) -> torch.Tensor:
        """Env actions -> [-1, 1]."""
        span, varies = self._span()
        u = 2.0 * (a - self.act_min) / span - 1.0
        return torch.where(varies, u, torch.zeros_like(u))

    def unact(self, u: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> env actions (a constant dimension returns its value)."""
        span, varies = self._span()
        a = self.act_min + (u.clamp(-1.0, 1.0) + 1.0) * 0.5 * span
        return torch.where(varies, a, self.act_min.expand_as(a))


class SequencePolicyNet(nn.Module):
    """Shared part of the sequence policies: horizons, normalizer, action bounds."""

    kind = "sequence"

    def __init__(self, obs_dim: int, act_dim: int, obs_horizon: int, pred_horizon: int, action_horizon: int,
                 action_low: Optional[Sequence[float]] = None, action_high: Optional[Sequence[float]] = None):
        super().__init__()
        if not 1 <= action_horizon <= pred_horizon - obs_horizon + 1:
            raise ValueError(f"need 1 <= action_horizon <= pred_horizon - obs_horizon + 1, got Ta={action_horizon}, "
                             f"Tp={pred_horizon}, To={obs_horizon}")
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.obs_horizon, self.pred_horizon, self.action_horizon = int(obs_horizon), int(pred_horizon), int(action_horizon)
        self.normalizer = SequenceNormalizer(obs_dim, act_dim)
        low = torch.as_tensor(action_low if action_low is not None else [-1.0] * act_dim, dtype=torch.float32)
        high = torch.as_tensor(action_high if action_high is not None else [1.0] * act_dim, dtype=torch.float32)
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)

    def _cond(self, obs_seq: torch.Tensor) -> torch.Tensor:
        if obs_seq.dim() != 3 or obs_seq.shape[1:] != (self.obs_horizon, self.obs_dim):
            raise ValueError(f"obs_seq must be [B, {self.obs_horizon}, {self.obs_dim}], got {tuple(obs_seq.shape)}")
        return self.normalizer.obs(obs_seq).flatten(1)

    def _check_act(self, act_seq: torch.Tensor) -> None:
        if act_seq.dim() != 3 or act_seq.shape[1:] != (self.pred_horizon, self.act_dim):
            raise ValueError(f"act_seq must be [B, {self.pred_horizon}, {self.act_dim}], got {tuple(act_seq.shape)}")

    def to_env(self, u: torch.Tensor) -> torch.Tensor:
        """Normalised actions -> env actions inside the action bounds."""
        return torch.maximum(torch.minimum(self.normalizer.unact(u), self.action_high), self.action_low)

    def executed(self, seq: torch.Tensor) -> torch.Tensor:
        """The ``Ta`` actions a policy runs from a predicted sequence ``[B, Tp, a] -> [B, Ta, a]``."""
        s = self.obs_horizon - 1
        return seq[:, s:s + self.action_horizon]


class ChunkedMLP(SequencePolicyNet):
    """Action chunking with an MLP: ``[To * d] -> [Tp * a]`` regressed with MSE on normalised actions."""

    kind = "mlp_chunk"

    def __init__(self, obs_dim: int, act_dim: int, obs_horizon: int = 2, pred_horizon: int = 16,
                 action_horizon: int = 8, hidden: Sequence[int] = (256, 256), activation: str = "relu",
                 action_low: Optional[Sequence[float]] = None, action_high: Optional[Sequence[float]] = None):
        super().__init__(obs_dim, act_dim, obs_horizon, pred_horizon, action_horizon, action_low, action_high)
        self.net = mlp(obs_horizon * obs_dim, pred_horizon * act_dim, hidden, activation)

    def forward(self, obs_seq: torch.Tensor) -> torch.Tensor:
        return self.net(self._cond(obs_seq)).view(-1, self.pred_horizon, self.act_dim)

    def loss(self, obs_seq: torch.Tensor, act_seq: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
        """Mean squared error over the whole predicted sequence, in normalised action units."""
        self._check_act(act_seq)
        loss = (self(obs_seq) - self.normalizer.act(act_seq)).pow(2).mean()
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def predict(self, obs_seq: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Env actions ``[B, Tp, a]``."""
        return self.to_env(self(obs_seq).clamp(-1.0, 1.0))


def _scheduler_kwargs(train_steps: int, beta_schedule: str, prediction_type: str) -> dict:
    return dict(num_train_timesteps=int(train_steps), beta_schedule=beta_schedule, clip_sample=True,
                prediction_type=prediction_type)


class DiffusionPolicy(SequencePolicyNet):
    """Diffusion Policy (Chi et al. 2023): DDPM training of a noise-prediction U-Net over action sequences,
    DDIM (or DDPM) sampling, both through ``diffusers``' schedulers.

    Training (Ho et al. 2020, "simple" loss):  k ~ U{0..K-1}, eps ~ N(0, I),
    x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps,  L = || eps - eps_theta(x_k, k, obs) ||^2.
    Sampling: x_K ~ N(0, I), then ``inference_steps`` scheduler steps down to x_0 in [-1, 1].

    ``indicator=True`` (RECAP): an embedding of the advantage indicator (none / positive / negative, the
    values of :mod:`offrl.algos.networks`) is added to the observation conditioning; it starts at zero, so an
    upgraded policy samples exactly as before. :meth:`loss` takes the indicators of the batch; sampling uses
    the positive condition with classifier-free guidance of weight ``guidance`` = w on the noise prediction
    (Ho & Salimans 2022): eps = eps_none + (1 + w) (eps_pos - eps_none), w = 0 being plain positive
    conditioning. No command trains a diffusion policy with indicators yet (online finetuning takes the
    Gaussian MLP only); :func:`with_indicator_diffusion` upgrades a trained one.
    """

    kind = "diffusion"

    def __init__(self, obs_dim: int, act_dim: int, obs_horizon: int = 2, pred_horizon: int = 16,
                 action_horizon: int = 8, widths: Sequence[int] = (64, 128, 256), step_embed_dim: int = 64,
                 kernel_size: int = 5, groups: int = 8, train_steps: int = 100, inference_steps: int = 10,
                 scheduler: str = "ddim", beta_schedule: str = "squaredcos_cap_v2",
                 prediction_type: str = "epsilon", action_low: Optional[Sequence[float]] = None,
                 action_high: Optional[Sequence[float]] = None, indicator: bool = False, guidance: float = 0.0):
        super().__init__(obs_dim, act_dim, obs_horizon, pred_horizon, action_horizon, action_low, action_high)
        from diffusers import DDIMScheduler, DDPMScheduler

        from offrl.algos.unet1d import ConditionalUnet1D

        if scheduler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown scheduler {scheduler!r} (ddim or ddpm)")
        self.unet = ConditionalUnet1D(act_dim, obs_horizon * obs_dim, widths, step_embed_dim, kernel_size, groups)
        kw = _scheduler_kwargs(train_steps, beta_schedule, prediction_type)
        self.train_scheduler = DDPMScheduler(**kw)
        self.sample_scheduler = (DDIMScheduler if scheduler == "ddim" else DDPMScheduler)(**kw)
        self.train_steps, self.inference_steps = int(train_steps), int(inference_steps)
        self.prediction_type = prediction_type
        self.guidance = float(guidance)
        self.indicator = None
        if indicator:
            self.indicator = nn.Embedding(3, obs_horizon * obs_dim)
            nn.init.zeros_(self.indicator.weight)

    def _with(self, cond: torch.Tensor, ind: "int | torch.Tensor") -> torch.Tensor:
        """The observation conditioning plus the indicator's embedding (an int, or ``[B]`` values)."""
        if not torch.is_tensor(ind):
            ind = torch.full(cond.shape[:1], int(ind), dtype=torch.long)
        return cond + self.indicator(ind)

    def guided_noise(self, x: torch.Tensor, k: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The noise prediction sampling follows: plain, or for an indicator policy the positive one guided
        away from the unconditioned one, eps_none + (1 + w) (eps_pos - eps_none)."""
        if self.indicator is None:
            return self.unet(x, k, cond)
        from offrl.algos.networks import INDICATOR_NONE, INDICATOR_POSITIVE

        eps = self.unet(x, k, self._with(cond, INDICATOR_POSITIVE))
        if self.guidance > 0:
            eps_none = self.unet(x, k, self._with(cond, INDICATOR_NONE))
            eps = eps_none + (1.0 + self.guidance) * (eps - eps_none)
        return eps

    def loss(self, obs_seq: torch.Tensor, act_seq: torch.Tensor,
             generator: Optional[torch.Generator] = None,
             indicator: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """The DDPM noise-prediction loss on a batch (noise and steps drawn from ``generator``); an indicator
        policy conditions each row on ``indicator`` ``[B]`` (None: the none condition)."""
        self._check_act(act_seq)
        cond = self._cond(obs_seq)
        if self.indicator is not None:
            from offrl.algos.networks import INDICATOR_NONE

            cond = self._with(cond, INDICATOR_NONE if indicator is None else indicator)
        elif indicator is not None:
            raise ValueError("this diffusion policy takes no indicator (built without indicator=True)")
        x0 = self.normalizer.act(act_seq)
        B = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        k = torch.randint(0, self.train_steps, (B,), generator=generator)
        xk = self.train_scheduler.add_noise(x0, noise, k)
        pred = self.unet(xk, k, cond)
        target = noise if self.prediction_type == "epsilon" else x0
        loss = (pred - target).pow(2).mean()
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def predict(self, obs_seq: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample env actions ``[B, Tp, a]`` (one denoising chain for the whole batch)."""
        cond = self._cond(obs_seq)
        B = cond.shape[0]
        x = torch.randn((B, self.pred_horizon, self.act_dim), generator=generator, dtype=cond.dtype)
        sched = self.sample_scheduler
        sched.set_timesteps(self.inference_steps)
        for k in sched.timesteps:
            eps = self.guided_noise(x, k.expand(B), cond)
            x = sched.step(eps, k, x, generator=generator).prev_sample
        return self.to_env(x.clamp(-1.0, 1.0))


def with_indicator_diffusion(net: DiffusionPolicy, arch: Mapping[str, Any],
                             guidance: float) -> tuple[DiffusionPolicy, dict]:
    """``(policy, arch)``: ``net`` plus a zero indicator embedding, sampling with guidance weight ``guidance``;
    at step 0 it samples exactly as ``net`` does (same generator, same actions)."""
    from offrl.algos.networks import load_all_but_indicator

    new_arch = {**arch, "indicator": True, "guidance": float(guidance)}
    return load_all_but_indicator(build_sequence_net(new_arch), net), new_arch


def build_sequence_net(arch: Mapping[str, Any]) -> SequencePolicyNet:
    """A sequence policy from its architecture dict (``arch["kind"]``: mlp_chunk or diffusion)."""
    kw = {k: v for k, v in arch.items() if k != "kind"}
    kind = arch.get("kind")
    if kind == "mlp_chunk":
        return ChunkedMLP(**kw)
    if kind == "diffusion":
        return DiffusionPolicy(**kw)
    raise ValueError(f"unknown sequence policy kind {kind!r}")


class SequenceBCLearner:
    """Behaviour cloning of a sequence policy, with an EMA copy of the weights (diffusers' ``EMAModel``,
    warm-up decay ``1 - (1 + step)^-power`` capped at ``ema_decay``) that is what gets evaluated and saved
    as the ``actor`` part; the raw weights are the ``actor_train`` part (for exact resume).

    Batch contract: ``obs_seq [B, To, d]``, ``act_seq [B, Tp, a]`` (see :func:`make_windows`).
    """

    def __init__(self, net: SequencePolicyNet, lr: float = 1e-4, weight_decay: float = 1e-6, grad_clip: float = 0.0,
                 ema: bool = True, ema_decay: float = 0.9999, ema_power: float = 0.75, warmup_steps: int = 500,
                 total_steps: int = 0, seed: int = 0):
        import copy

        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.net = net
        self.ema_net = copy.deepcopy(net)
        self.ema_net.requires_grad_(False)
        self.use_ema = bool(ema)
        self.ema = (EMAModel(self.ema_net.parameters(), decay=ema_decay, use_ema_warmup=True, power=ema_power)
                    if self.use_ema else None)
        self.opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=weight_decay)
        # cosine decay with linear warm-up, as the Diffusion Policy reference trains
        self.sched = get_scheduler("cosine", self.opt, num_warmup_steps=int(warmup_steps),
                                   num_training_steps=max(int(total_steps), int(warmup_steps) + 1))
        self.grad_clip = grad_clip
        self.gen = torch.Generator().manual_seed(int(seed))
        self.val_seed = int(seed) + 12345
        self.step = 0

    @property
    def actor(self) -> SequencePolicyNet:
        """The policy that is evaluated and saved: the EMA weights (the raw ones without EMA)."""
        return self.ema_net if self.use_ema else self.net

    def fit_normalizers(self, data: Mapping[str, torch.Tensor]) -> None:
        for m in (self.net, self.ema_net):
            m.normalizer.fit(data["obs_seq"], data["act_seq"])

    def permutation(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen)

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        from offrl.algos.optim import guarded_step

        self.net.train()
        loss, m = self.net.loss(batch["obs_seq"], batch["act_seq"], self.gen)
        guarded_step(self.opt, loss, self.net.parameters(), self.grad_clip,
                     f"{self.net.kind} loss became {{loss}} at step {self.step}; lower the learning rate")
        self.sched.step()
        if self.ema is not None:
            self.ema.step(self.net.parameters())
            self.ema.copy_to(self.ema_net.parameters())
        self.step += 1
        return {"actor_loss": m["loss"], "lr": self.opt.param_groups[0]["lr"]}

    @torch.no_grad()
    def validate(self, data: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Held-out loss of the evaluated (EMA) policy; diffusion noise and steps come from a fixed seed, so
        epochs are compared on the same draws."""
        g = torch.Generator().manual_seed(self.val_seed)
        a = self.actor
        a.eval()
        losses, n = 0.0, 0
        for i in range(0, data["obs_seq"].shape[0], 2048):
            o, x = data["obs_seq"][i:i + 2048], data["act_seq"][i:i + 2048]
            loss, _ = a.loss(o, x, g)
            losses += float(loss) * o.shape[0]
            n += o.shape[0]
        out = {"actor_val_loss": losses / max(n, 1)}
        # distance of the executed actions to the data's (what the policy would do on held-out states)
        o, x = data["obs_seq"][:512], data["act_seq"][:512]
        pred = a.predict(o, torch.Generator().manual_seed(self.val_seed))
        out["action_mse"] = float((a.executed(pred) - a.executed(x)).pow(2).mean())
        return out

    def start_from_actor(self, raw_loaded: bool = False) -> None:
        """After the evaluated policy (the ``actor`` part) was loaded from another run: train on from it.

        With EMA the loaded weights sit in the EMA copy, while training updates the raw weights and the EMA
        overwrites its copy from its own shadow weights at every step, so without this both would carry on from
        this run's random initialisation. Copies the loaded policy (weights and normaliser) into the raw weights
        (unless those were loaded too, ``raw_loaded``) and into the EMA's shadow weights, and restarts the EMA
        warm-up."""
        if not self.use_ema:
            return
        if not raw_loaded:
            self.net.load_state_dict(self.ema_net.state_dict())
        self.ema.shadow_params = [p.clone().detach() for p in self.ema_net.parameters()]
        self.ema.optimization_step = 0

    # -- checkpoint plumbing (the OfflineLearner contract)
    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "actor_train": self.net} if self.use_ema else {"actor": self.net}

    def optimizers(self) -> dict[str, Any]:
        return {"actor": self.opt, "lr_schedule": self.sched}

    def generators(self) -> dict[str, torch.Generator]:
        return {"learner": self.gen}

    def extra_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"learner_step": self.step}
        if self.ema is not None:
            out["ema_step"] = int(self.ema.optimization_step)
        return out

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.step = int(state.get("learner_step", 0))
        if self.ema is not None:
            # the EMA's shadow weights are the loaded actor part; carry on from its step count
            self.ema.shadow_params = [p.clone().detach() for p in self.ema_net.parameters()]
            self.ema.optimization_step = int(state.get("ema_step", self.step))
