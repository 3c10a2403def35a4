"""Critics and their offline losses (pure torch; no Ray, no simulator, no I/O).

Batch shapes: ``obs [B, d]``, ``actions [B, a]``, ``rewards/terminated [B]``. All losses return
``(loss, metrics)`` where metrics are python floats.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from offrl.algos.networks import RunningNorm, _ACTIVATIONS


class VIB(nn.Module):
    """Variational information bottleneck (Alemi et al. 2017) as a critic layer: ``x -> (mu, log var) -> z``.

    ``z = mu + exp(log var / 2) * eps`` while training, ``z = mu`` in eval mode; the layer also returns
    ``KL(N(mu, diag(var)) || N(0, I)) = 0.5 * sum_k (mu_k^2 + var_k - 1 - log var_k)``, ``[B]``.
    """

    def __init__(self, in_dim: int, size: int):
        super().__init__()
        self.size = size
        self.enc = nn.Linear(in_dim, 2 * size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.enc(x).chunk(2, -1)
        log_var = log_var.clamp(-10.0, 10.0)
        kl = vib_kl(mu, log_var)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu) if self.training else mu
        return z, kl


def vib_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(0, I)) summed over the last dim."""
    return 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)


class Residual(nn.Module):
    """``h -> h + act(W h + b)`` (a residual hidden layer of constant width)."""

    def __init__(self, width: int, activation: str):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.act = _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.lin(x))


class CriticMLP(nn.Sequential):
    """A critic network with the workflow's optional corrections (``critic.*`` keys):

    * ``dropout`` p: ``nn.Dropout(p)`` after every hidden activation (Srivastava et al. 2014);
    * ``residual``: hidden layers after the first are ``h + act(W h + b)`` (needs equal widths);
    * ``vib_size`` k > 0: the last hidden layer feeds a :class:`VIB` of size k, the output reads ``z``.

    Without corrections the layers (and checkpoint keys) are those of a plain :func:`mlp`.
    :meth:`forward_aux` returns ``(output [B, out], features [B, f], kl [B])``: the features are the input of
    the output layer (DR3's ``phi``), ``kl`` is the bottleneck's KL (zeros without one).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, residual: bool = False, vib_size: int = 0):
        act = _ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        d = in_dim
        for i, h in enumerate(hidden):
            if residual and i > 0:
                if h != d:
                    raise ValueError(f"critic.residual needs equal hidden widths, got {list(hidden)}")
                layers.append(Residual(h, activation))
            else:
                layers += [nn.Linear(d, h), act()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if vib_size > 0:
            layers.append(VIB(d, vib_size))
            d = vib_size
        layers.append(nn.Linear(d, out_dim))
        super().__init__(*layers)

    def forward_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kl = torch.zeros(x.shape[:-1], dtype=x.dtype)
        layers = list(self)
        for m in layers[:-1]:
            if isinstance(m, VIB):
                x, kl = m(x)
            else:
                x = m(x)
        return layers[-1](x), x, kl

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_aux(x)[0]


Distributional = Optional[tuple[int, float, float]]  # (bins, v_min, v_max) of a categorical value, or None


def value_support(bins: int, v_min: float, v_max: float) -> torch.Tensor:
    """The ``bins`` returns a categorical value puts mass on: evenly spaced from ``v_min`` to ``v_max``."""
    if bins < 2:
        raise ValueError(f"a categorical value needs bins >= 2, got {bins}")
    return torch.linspace(float(v_min), float(v_max), int(bins))


def categorical_projection(atoms: torch.Tensor, probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Project a distribution with mass ``probs`` ``[B, K]`` at arbitrary returns ``atoms`` ``[B, K]`` onto the
    fixed evenly spaced ``support`` ``[M]`` (C51's projection, Bellemare et al. 2017, Algorithm 1).

    Every atom is clipped into ``[support[0], support[-1]]``; its mass is split between the two support
    points around it in proportion to closeness (all of it to a support point it hits exactly). The mean
    is kept whenever no atom was clipped. Returns ``[B, M]`` probabilities. A scalar return ``G`` is the
    case ``K = 1`` (``atoms = G[:, None]``, ``probs = 1``); C51's Bellman target is ``atoms = r + gamma z``.
    """
    M = support.shape[0]
    v_min, v_max = float(support[0]), float(support[-1])
    dz = (v_max - v_min) / (M - 1)
    b = (atoms.clamp(v_min, v_max) - v_min) / dz          # fractional index into the support
    lo = b.floor().long().clamp(0, M - 1)
    hi = b.ceil().long().clamp(0, M - 1)
    w_hi = b - lo.to(b.dtype)                               # 0 when the atom sits on a support point
    out = torch.zeros(atoms.shape[0], M, dtype=probs.dtype)
    out.scatter_add_(1, lo, probs * (1.0 - w_hi))
    out.scatter_add_(1, hi, probs * w_hi)
    return out


def categorical_value_loss(logits: torch.Tensor, returns: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predicted categoricals ``logits`` ``[..., B, M]`` against the projection of the
    scalar ``returns`` ``[B]`` onto ``support`` (mean over everything but the bins)."""
    target = categorical_projection(returns.reshape(-1, 1), torch.ones_like(returns).reshape(-1, 1), support)
    return -(target * torch.log_softmax(logits, -1)).sum(-1).mean()


class _ObsView:
    """The observation as a value network sees it: normalised, with the ``obs_ignore`` entries held at zero
    (a constant input; ``critic.obs_ignore``, the same spelling as ``policy.obs_ignore``)."""

    def _init_view(self, obs_dim: int, obs_ignore: Sequence[int]) -> None:
        self.normalizer = RunningNorm(obs_dim)
        self.obs_ignore = sorted({int(i) for i in obs_ignore})
        if any(not 0 <= i < obs_dim for i in self.obs_ignore):
            raise ValueError(f"obs_ignore indices must lie in [0, {obs_dim}), got {self.obs_ignore}")
        keep = torch.ones(obs_dim)
        keep[self.obs_ignore] = 0.0
        self.register_buffer("obs_keep", keep, persistent=False)  # not state: rebuilt from the architecture

    def view(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.normalizer(obs)
        return x * self.obs_keep.to(x.dtype) if self.obs_ignore else x


class _ValueOutputs:
    """A scalar output, or the logits of a categorical over a support whose mean is the value."""

    def _init_outputs(self, distributional: Distributional) -> int:
        """Set ``distributional`` (and the ``support`` buffer); returns the output width."""
        self.distributional = tuple(distributional) if distributional else None
        if not self.distributional:
            return 1
        self.register_buffer("support", value_support(*self.distributional), persistent=False)
        return int(self.distributional[0])

    def _value(self, out: torch.Tensor) -> torch.Tensor:
        if self.distributional:
            return (torch.softmax(out, -1) * self.support).sum(-1)
        return out.squeeze(-1)


class VNet(_ObsView, _ValueOutputs, nn.Module):
    """State value V(s): a :class:`CriticMLP` on normalized observations, output ``[B]``.

    ``distributional=(bins, v_min, v_max)``: the network outputs the logits of a categorical over ``bins``
    returns (:func:`value_support`) and ``forward`` returns its mean, so every user of V reads the mean;
    :meth:`logits` is what :func:`categorical_value_loss` trains.
    """

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "relu",
                 distributional: Distributional = None, obs_ignore: Sequence[int] = (), **corrections):
        super().__init__()
        self._init_view(obs_dim, obs_ignore)
        self.net = CriticMLP(obs_dim, self._init_outputs(distributional), hidden, activation, **corrections)

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """The categorical's logits ``[B, bins]`` (distributional V only)."""
        return self.net(self.view(obs))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self._value(self.net(self.view(obs)))

    def forward_aux(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(V ``[B]``, features ``[B, f]``, KL ``[B]``)."""
        out, feat, kl = self.net.forward_aux(self.view(obs))
        return self._value(out), feat, kl


class QNet(_ObsView, _ValueOutputs, nn.Module):
    """Action value Q(s, a), optionally twin (two heads; ``forward`` returns both ``[2, B]`` or ``[1, B]``)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "relu",
                 twin: bool = True, distributional: Distributional = None, obs_ignore: Sequence[int] = (),
                 **corrections):
        super().__init__()
        self._init_view(obs_dim, obs_ignore)
        out = self._init_outputs(distributional)
        self.heads = nn.ModuleList([CriticMLP(obs_dim + act_dim, out, hidden, activation, **corrections)
                                    for _ in range(2 if twin else 1)])

    def logits(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Every head's categorical logits ``[H, B, bins]`` (distributional Q only)."""
        x = torch.cat([self.view(obs), actions], -1)
        return torch.stack([h(x) for h in self.heads])

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.view(obs), actions], -1)
        return torch.stack([self._value(h(x)) for h in self.heads])

    def forward_aux(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q ``[H, B]``, features ``[H, B, f]``, KL ``[H, B]``)."""
        x = torch.cat([self.view(obs), actions], -1)
        outs = [h.forward_aux(x) for h in self.heads]
        return (torch.stack([self._value(o) for o, _, _ in outs]), torch.stack([f for _, f, _ in outs]),
                torch.stack([k for _, _, k in outs]))

    def min(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min over heads (clipped double Q), ``[B]``."""
        return self.forward(obs, actions).min(0).values


CORRECTION_ARCH = ("dropout", "residual", "vib_size")


class Critics(nn.Module):
    """V(s), Q(s, a) (twin by default) and a Polyak-averaged target copy of Q.

    ``corrections``: the architecture keys of :class:`CriticMLP` (``dropout``, ``residual``, ``vib_size``). The
    target copy is kept in eval mode (no dropout noise, the bottleneck's mean) whatever mode the rest is in.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "relu",
                 twin: bool = True, distributional: Distributional = None, obs_ignore: Sequence[int] = (),
                 **corrections):
        super().__init__()
        self.v = VNet(obs_dim, hidden, activation, distributional, obs_ignore, **corrections)
        self.q = QNet(obs_dim, act_dim, hidden, activation, twin, distributional, obs_ignore, **corrections)
        self.q_target = copy.deepcopy(self.q)
        for p in self.q_target.parameters():
            p.requires_grad_(False)
        self.q_target.eval()

    def train(self, mode: bool = True) -> "Critics":
        super().train(mode)
        self.q_target.eval()
        return self

    def update_normalizers(self, obs: torch.Tensor) -> None:
        for m in (self.v.normalizer, self.q.normalizer, self.q_target.normalizer):
            m.update(obs)

    @torch.no_grad()
    def polyak(self, tau: float) -> None:
        """target <- (1 - tau) * target + tau * online."""
        for pt, p in zip(self.q_target.parameters(), self.q.parameters()):
            pt.mul_(1 - tau).add_(p, alpha=tau)

    @torch.no_grad()
    def advantage(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """A(s, a) = min_i Q_target,i(s, a) - V(s), ``[B]``."""
        return self.q_target.min(obs, actions) - self.v(obs)


def build_critics(critic_cfg, obs_dim: int, act_dim: int, obs_ignore: Sequence[int] = ()) -> Critics:
    """The :class:`Critics` a ``critic`` config section describes (pretraining and finetuning build the same);
    ``obs_ignore``: the indices ``critic.obs_ignore`` resolves to (a run records them as ``critic_obs_ignore``)."""
    return Critics(obs_dim, act_dim, list(critic_cfg.hidden), critic_cfg.activation, critic_cfg.twin_q,
                   distributional=distributional_spec(critic_cfg), obs_ignore=obs_ignore,
                   dropout=critic_cfg.dropout, residual=critic_cfg.residual, vib_size=critic_cfg.vib_size)


def distributional_spec(critic_cfg) -> Distributional:
    """``(bins, v_min, v_max)`` of a ``critic`` config section's ``distributional`` key, or None."""
    d = getattr(critic_cfg, "distributional", None)
    return None if d is None else (int(d.bins), float(d.v_min), float(d.v_max))


def weight_penalty(modules: Sequence[nn.Module], l2: float, l1: float) -> torch.Tensor:
    """``l2 * sum ||W||_2^2 + l1 * sum |W|_1`` over the weight matrices of every Linear layer in ``modules``
    (biases and normalizers excluded)."""
    total = torch.zeros(())
    if not (l2 or l1):
        return total
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, nn.Linear):
                if l2:
                    total = total + l2 * m.weight.pow(2).sum()
                if l1:
                    total = total + l1 * m.weight.abs().sum()
    return total


def dr3_term(feat: torch.Tensor, next_feat: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DR3 (Kumar et al. 2021): ``mean_b sum_i phi_i(s, a) . phi_i(s', a')`` for features ``[H, B, f]``; rows
    with ``mask == 0`` (terminal transitions, which bootstrap from nothing) are left out."""
    dots = (feat * next_feat).sum(-1).sum(0)  # [B]
    if mask is None:
        return dots.mean()
    m = mask.to(dots.dtype)
    return (dots * m).sum() / m.sum().clamp(min=1.0)


def correction_loss(critics: Critics, cfg, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor,
                    next_actions: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                    train_v: bool) -> tuple[torch.Tensor, dict]:
    """The loss-side corrections of a critic update (``cfg``: the ``critic`` config section):

    ``L_corr = vib_weight * mean_b [ sum_i KL_i(s, a) (+ KL_V(s) when V trains) ]
             + dr3_weight * mean_b sum_i phi_i(s, a) . phi_i(s', a')
             + weight_decay * sum ||W||^2 + l1 * sum |W|``

    ``a'`` is the action the algorithm bootstraps with (the dataset's next action for IQL/SARSA/MC, a policy
    sample for CQL/BRAC); ``mask`` drops terminal rows from DR3. Returns (loss, metrics).
    """
    loss = torch.zeros(())
    m: dict[str, float] = {}
    if cfg.vib_size > 0 and cfg.vib_weight > 0:
        _, _, kl = critics.q.forward_aux(obs, actions)
        kl_total = kl.sum(0).mean()
        if train_v:
            kl_total = kl_total + critics.v.forward_aux(obs)[2].mean()
        loss = loss + cfg.vib_weight * kl_total
        m["vib_kl"] = float(kl_total.detach())
    if cfg.dr3_weight > 0:
        if next_actions is None:
            raise ValueError("critic.dr3_weight needs the next actions the targets use")
        _, feat, _ = critics.q.forward_aux(obs, actions)
        _, nfeat, _ = critics.q.forward_aux(next_obs, next_actions)
        d = dr3_term(feat, nfeat, mask)
        loss = loss + cfg.dr3_weight * d
        m["dr3"] = float(d.detach())
    if cfg.weight_decay or cfg.l1:
        mods = [critics.q] + ([critics.v] if train_v else [])
        loss = loss + weight_penalty(mods, cfg.weight_decay, cfg.l1)
    return loss, m


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """Asymmetric L2 (Kostrikov et al. 2021, IQL eq. 2): mean |tau - 1(diff < 0)| * diff^2.

    ``tau = 0.5`` gives half the mean squared error (SARSA-style mean regression); ``tau > 0.5`` leans
    towards the upper expectile of ``diff``'s distribution.
    """
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return (weight * diff.pow(2)).mean()


def td_target(rewards: torch.Tensor, next_v: torch.Tensor, terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * V(s').

    Truncation is not termination: a time-limit cut still bootstraps from V(s') (``next_obs`` of a
    truncated step is the episode's final observation), a terminal state does not.
    """
    return rewards + gamma * (1.0 - terminated.float()) * next_v


def iql_value_loss(critics: Critics, obs: torch.Tensor, actions: torch.Tensor, tau: float) -> tuple[torch.Tensor, dict]:
    """L_V = E[ L2_tau( min_i Q_target,i(s, a) - V(s) ) ]  (IQL eq. 5)."""
    with torch.no_grad():
        q = critics.q_target.min(obs, actions)
    v = critics.v(obs)
    loss = expectile_loss(q - v, tau)
    return loss, {"v_loss": float(loss.detach()), "v_mean": float(v.detach().mean())}


def iql_q_loss(critics: Critics, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
               next_obs: torch.Tensor, terminated: torch.Tensor, gamma: float) -> tuple[torch.Tensor, dict]:
    """L_Q = sum_i E[ (r + gamma (1 - term) V(s') - Q_i(s, a))^2 ]  (IQL eq. 6)."""
    with torch.no_grad():
        y = td_target(rewards, critics.v(next_obs), terminated, gamma)
    qs = critics.q(obs, actions)
    loss = (qs - y.unsqueeze(0)).pow(2).mean(1).sum()
    return loss, {"q_loss": float(loss.detach()), "q_mean": float(qs.detach().mean())}


def mc_critic_loss(critics: Critics, obs: torch.Tensor, actions: torch.Tensor,
                   returns: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Regress V(s) and every Q head on the discounted Monte-Carlo return G_t of the dataset; distributional
    critics take the cross-entropy to the return's projection on their support instead (summed over heads)."""
    v = critics.v(obs)
    qs = critics.q(obs, actions)
    if critics.v.distributional:
        sup = critics.v.support
        v_loss = categorical_value_loss(critics.v.logits(obs), returns, sup)
        q_loss = sum(categorical_value_loss(lg, returns, sup) for lg in critics.q.logits(obs, actions))
    else:
        v_loss = (v - returns).pow(2).mean()
        q_loss = (qs - returns.unsqueeze(0)).pow(2).mean(1).sum()
    return v_loss + q_loss, {"v_loss": float(v_loss.detach()), "q_loss": float(q_loss.detach()),
                             "v_mean": float(v.detach().mean()), "q_mean": float(qs.detach().mean())}


def awr_weights(adv: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """Policy-extraction weights exp(beta * A), clipped at ``max_weight`` (IQL eq. 7; AWR)."""
    return torch.exp(beta * adv).clamp(max=max_weight)
