"""Networks and observation normalization (pure torch; no Ray, no simulator).

Shapes: observations ``[B, obs_dim]``, actions ``[B, act_dim]``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """A plain MLP: Linear-act-...-Linear."""
    act = _ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), act()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class RunningNorm(nn.Module):
    """Observation normalizer: running mean/variance (Chan et al. parallel update), stored as buffers.

    ``normalize(x) = clip((x - mean) / max(sqrt(var + eps), min_std), -clip, clip)``. The statistics are
    saved with the checkpoint (``normalizer.safetensors``) so a policy always sees the inputs it was trained
    on. ``min_std`` (None: no floor) keeps an entry that hardly varies in the data, e.g. a quaternion
    component of an upright cube (std 0.005 in PickCube-v1's demos), from being scaled into a large input
    by a deviation the data never showed.
    """

    def __init__(self, dim: int, eps: float = 1e-8, clip: float = 10.0, min_std: Optional[float] = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0.0, dtype=torch.float64))
        self.eps = eps
        self.clip = clip
        self.min_std = None if min_std is None else float(min_std)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``[B, dim]`` into the running statistics."""
        x = x.detach().to(torch.float64).reshape(-1, self.mean.shape[0])
        b = x.shape[0]
        if b == 0:
            return
        bm, bv = x.mean(0), x.var(0, unbiased=False)
        tot = self.count + b
        delta = bm - self.mean
        self.mean += delta * b / tot
        # M2 = var*count; merged M2 = M2_a + M2_b + delta^2 * n_a n_b / n
        self.var.copy_((self.var * self.count + bv * b + delta.pow(2) * self.count * b / tot) / tot)
        self.count.copy_(tot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count.item() == 0:
            return x
        std = torch.sqrt(self.var.to(x.dtype) + self.eps)
        if self.min_std is not None:
            std = std.clamp_min(self.min_std)
        y = (x - self.mean.to(x.dtype)) / std
        return y.clamp(-self.clip, self.clip)


# values of the advantage indicator a RECAP policy is conditioned on (GaussianActor(indicator=True))
INDICATOR_NONE, INDICATOR_POSITIVE, INDICATOR_NEGATIVE = 0, 1, 2


class GaussianActor(nn.Module):
    """Gaussian MLP policy ``a ~ N(mu(s), diag(exp(log_std)))`` with a state-independent log std.

    Sampled actions are mapped into the action bounds by clipping (``squash="clip"``, log-prob of the
    unclipped sample, as in PPO implementations) or by ``tanh`` (log-prob with the change-of-variables
    correction ``- sum log(1 - tanh(u)^2)``, as in SAC). ``deterministic`` returns the mean.

    ``indicator=True`` (RECAP, Physical Intelligence's pi*0.6) adds an advantage-indicator input with three
    values (:data:`INDICATOR_NONE`, :data:`INDICATOR_POSITIVE`, :data:`INDICATOR_NEGATIVE`): an embedding of
    it is added to the first hidden layer's pre-activation. The embedding starts at zero, so a policy
    upgraded from an unconditioned one acts exactly as before until it trains. ``dist(obs)`` without a
    condition is the policy used to act: the positive condition, guided with weight ``guidance`` = w,

        mu = mu_none + (1 + w) * (mu_pos - mu_none),   std unchanged.

    With one state-independent std for every condition this is exactly classifier-free guidance on the
    Gaussians, pi_none^(-w) * pi_pos^(1 + w) normalised (the quadratic terms' weights -w and 1 + w sum to
    one, so the variance stays and the mean moves to the line above). Its limits: it extrapolates the mean
    linearly, so a large w can push it outside the action bounds (where clipping takes over) and can leave
    the states the data covered; and a Gaussian has one mode, so guidance cannot pick among several.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "relu",
                 log_std_init: float = -0.5, squash: str = "clip", action_low: Sequence[float] | None = None,
                 action_high: Sequence[float] | None = None, min_log_std: float | None = None,
                 indicator: bool = False, guidance: float = 0.0, obs_ignore: Sequence[int] | None = None,
                 obs_min_std: float | None = None):
        super().__init__()
        self.obs_dim, self.act_dim, self.squash = obs_dim, act_dim, squash
        # observation entries the policy does not see: held at zero after normalisation (a constant input)
        self.obs_ignore = sorted({int(i) for i in obs_ignore or ()})
        if any(not 0 <= i < obs_dim for i in self.obs_ignore):
            raise ValueError(f"obs_ignore indices must lie in [0, {obs_dim}), got {self.obs_ignore}")
        keep = torch.ones(obs_dim)
        keep[self.obs_ignore] = 0.0
        self.register_buffer("obs_keep", keep, persistent=False)
        # floor of the log std (None: none, as in checkpoints written before the floor existed)
        self.min_log_std = None if min_log_std is None else float(min_log_std)
        # floor of the observation normaliser's std (None: none, as in checkpoints written before it existed)
        self.normalizer = RunningNorm(obs_dim, min_std=obs_min_std)
        self.net = mlp(obs_dim, act_dim, hidden, activation)
        self.guidance = float(guidance)
        self.indicator = None
        if indicator:
            self.indicator = nn.Embedding(3, self.net[0].out_features)
            nn.init.zeros_(self.indicator.weight)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))
        low = torch.as_tensor(action_low if action_low is not None else [-1.0] * act_dim, dtype=torch.float32)
        high = torch.as_tensor(action_high if action_high is not None else [1.0] * act_dim, dtype=torch.float32)
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)

    def _scale(self, u: torch.Tensor) -> torch.Tensor:
        """Map a value in [-1, 1] to the action bounds."""
        return self.action_low + (u + 1.0) * 0.5 * (self.action_high - self.action_low)

    def _unscale(self, a: torch.Tensor) -> torch.Tensor:
        return 2.0 * (a - self.action_low) / (self.action_high - self.action_low) - 1.0

    def _mean(self, x: torch.Tensor, cond: int | torch.Tensor) -> torch.Tensor:
        """The mean under one indicator value (an int, or ``[B]`` integers) on normalized inputs ``x``."""
        if not torch.is_tensor(cond):
            cond = torch.full(x.shape[:-1], int(cond), dtype=torch.long)
        return self.net[1:](self.net[0](x) + self.indicator(cond))

    def dist(self, obs: torch.Tensor, cond: torch.Tensor | None = None) -> torch.distributions.Normal:
        """pi(. | s), or for an indicator policy pi(. | s, cond) with ``cond`` ``[B]`` indicator values;
        without ``cond`` an indicator policy is the guided positive one (see the class docstring)."""
        x = self.normalizer(obs)
        if self.obs_ignore:
            x = x * self.obs_keep.to(x.dtype)
        if self.indicator is None:
            if cond is not None:
                raise ValueError("this policy takes no indicator (built without indicator=True)")
            mu = self.net(x)
        elif cond is not None:
            mu = self._mean(x, cond)
        else:
            mu = self._mean(x, INDICATOR_POSITIVE)
            if self.guidance > 0:
                mu_none = self._mean(x, INDICATOR_NONE)
                mu = mu_none + (1.0 + self.guidance) * (mu - mu_none)
        log_std = self.log_std if self.min_log_std is None else self.log_std.clamp(min=self.min_log_std)
        return torch.distributions.Normal(mu, log_std.exp().expand_as(mu), validate_args=False)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor, cond: torch.Tensor | None = None,
                 detach_std: bool = False) -> torch.Tensor:
        """log pi(a|s) (an indicator policy: log pi(a|s, cond)) summed over action dims, ``[B]``.
        ``detach_std``: the std enters as a constant (the gradient reaches the mean only)."""
        d = self.dist(obs, cond)
        if detach_std:
            d = torch.distributions.Normal(d.loc, d.scale.detach(), validate_args=False)
        u = self._unscale(actions)
        if self.squash == "tanh":
            u = u.clamp(-1 + 1e-6, 1 - 1e-6)
            pre = torch.atanh(u)
            return (d.log_prob(pre) - torch.log(1 - u.pow(2) + 1e-6)).sum(-1)
        return d.log_prob(u).sum(-1)

    def entropy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.dist(obs).entropy().sum(-1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (or take the mean of) the policy; returns (actions in bounds ``[B, act_dim]``, log-prob ``[B]``).

        With ``squash="clip"`` the log-prob is that of the unclipped sample: use :meth:`act_raw` when the
        log-prob must be recomputed later (PPO ratios), and recompute it on the raw action.
        """
        a, logp, _ = self.act_raw(obs, deterministic, generator)
        return a, logp

    @torch.no_grad()
    def act_raw(self, obs: torch.Tensor, deterministic: bool = False,
                generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(env action in bounds, log-prob, raw action) where ``log_prob(obs, raw) == log-prob``.
        ``noise [B, act_dim]``: the standard normal draws to use instead of drawing from ``generator``."""
        d = self.dist(obs)
        if deterministic:
            pre = d.mean
        else:
            if noise is None:
                noise = torch.randn(d.mean.shape, generator=generator, dtype=d.mean.dtype)
            pre = d.mean + d.stddev * noise.to(d.mean.dtype)
        if self.squash == "tanh":
            u = torch.tanh(pre)
            logp = (d.log_prob(pre) - torch.log(1 - u.pow(2) + 1e-6)).sum(-1)
            return self._scale(u), logp, self._scale(u)
        logp = d.log_prob(pre).sum(-1)
        return self._scale(pre.clamp(-1.0, 1.0)), logp, self._scale(pre)


def with_indicator(actor: GaussianActor, arch: dict, guidance: float) -> tuple[GaussianActor, dict]:
    """``(actor, arch)`` of the RECAP policy that starts from ``actor``: the same weights plus a zero
    indicator embedding (an actor that already has one keeps it), acting with guidance weight ``guidance``.
    At step 0 it acts exactly as ``actor`` does, whatever the guidance."""
    new_arch = {**arch, "indicator": True, "guidance": float(guidance)}
    return load_all_but_indicator(GaussianActor(**{k: v for k, v in new_arch.items() if k != "kind"}), actor), new_arch


def load_all_but_indicator(new: nn.Module, old: nn.Module) -> nn.Module:
    """Copy ``old``'s weights into ``new``, whose only extra part may be a (zero) ``indicator`` embedding."""
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    if unexpected or any(not k.startswith("indicator.") for k in missing):
        raise ValueError(f"cannot upgrade the policy: missing {missing}, unexpected {unexpected}")
    return new


def build_actor(arch: dict) -> nn.Module:
    """The policy network an architecture dict describes: ``arch["kind"]`` mlp (the default, a
    :class:`GaussianActor`), mlp_chunk or diffusion (:mod:`offrl.algos.sequence`)."""
    kind = arch.get("kind", "mlp")
    if kind == "mlp":
        return GaussianActor(**{k: v for k, v in arch.items() if k != "kind"})
    from offrl.algos.sequence import build_sequence_net

    return build_sequence_net(arch)


def numpy_state_dict(module: nn.Module) -> dict[str, np.ndarray]:
    """Weights as numpy arrays: cheap to ship to Ray actors (numpy is shared, tensors are pickled)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_numpy_state_dict(module: nn.Module, weights: dict[str, np.ndarray]) -> None:
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
