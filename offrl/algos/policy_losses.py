"""Policy update rules as losses with one batch contract (pure torch).

Every loss takes flat ``[B]`` tensors: ``logp`` (log pi_theta(a|s), differentiable), ``old_logp``
(log-prob under the policy that collected the data, no gradient) and ``adv`` (advantages), and returns
``(loss, metrics)``.
"""

from __future__ import annotations

import torch


def _same_shape(**xs: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in xs.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"inputs must share one [B] shape, got {shapes}")


def normalize(adv: torch.Tensor, eps: float = 1e-8, center: bool = True) -> torch.Tensor:
    """(A - mean) / (std + eps); a single element is returned centred (unchanged when not centring).

    ``center=False`` only scales: A / (std + eps) keeps every advantage's sign, so an advantage of exactly 0
    (an MC pair whose re-rollouts all failed) stays 0 instead of turning negative when most of a batch is 0.
    """
    if adv.numel() < 2:
        return adv - adv.mean() if center else adv
    return ((adv - adv.mean()) if center else adv) / (adv.std() + eps)


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), to minimise.

    r = exp(logp - old_logp);  L = -mean( min(r A, clip(r, 1 - eps, 1 + eps) A) )
    Metrics: approx_kl = mean((r - 1) - log r) (the low-variance k3 estimator), clipfrac = mean(|r - 1| > eps).
    """
    _same_shape(logp=logp, old_logp=old_logp, adv=adv)
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    surr = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    loss = -surr.mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clipfrac = ((ratio - 1).abs() > clip).float().mean()
    return loss, {"policy_loss": float(loss.detach()), "approx_kl": float(approx_kl), "clipfrac": float(clipfrac)}


def awr_weights(adv: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """w = min(exp(A / beta), max_weight) (Peng et al. 2019, AWR)."""
    return torch.exp(adv / beta).clamp(max=max_weight)


def awr_loss(logp: torch.Tensor, adv: torch.Tensor, beta: float = 1.0, max_weight: float = 20.0,
             normalize_adv: bool = False) -> tuple[torch.Tensor, dict]:
    """Advantage-weighted regression: L = -mean( min(exp(A / beta), W) * log pi(a|s) )."""
    _same_shape(logp=logp, adv=adv)
    a = normalize(adv) if normalize_adv else adv
    w = awr_weights(a.detach(), beta, max_weight)
    loss = -(w * logp).mean()
    return loss, {"policy_loss": float(loss.detach()), "weight_mean": float(w.mean()),
                  "weight_max": float(w.max()) if w.numel() else 0.0}


def push_away_awr_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, beta: float = 1.0,
                       max_weight: float = 20.0, alpha: float = 1.0, max_push: float = 1.0,
                       normalize_adv: bool = False) -> tuple[torch.Tensor, dict]:
    """Push-away AWR: AWR on positive advantages, a bounded likelihood push-down on negative ones.

    With w(A) = min(exp(|A| / beta), W):

        L = (1/B) * [ sum_{A >= 0} -w(A) log pi(a|s)
                      + sum_{A < 0}  alpha * w(A) * max( log pi(a|s) - log pi_old(a|s), -delta ) ]

    The negative term lowers the log-likelihood of actions that did worse than expected, but only
    until it has fallen by ``delta = max_push`` nats below the data-collecting policy: past that the
    ``max`` is flat and its gradient is zero. Raw "-(-log pi)" terms are unbounded below (the loss can
    be driven to -inf by sending pi(a|s) -> 0, blowing up the policy's variance); this hinge keeps the
    loss >= -alpha * W * delta per sample.

    This is not Physical Intelligence's RECAP (pi*0.6), which conditions the policy on an advantage
    indicator and samples with classifier-free guidance; here only the loss weights change.
    """
    _same_shape(logp=logp, old_logp=old_logp, adv=adv)
    a = normalize(adv) if normalize_adv else adv
    a = a.detach()
    w = awr_weights(a.abs(), beta, max_weight)
    pos = a >= 0
    pull = torch.where(pos, -w * logp, torch.zeros_like(logp))
    push = torch.where(~pos, alpha * w * torch.clamp(logp - old_logp, min=-max_push), torch.zeros_like(logp))
    loss = (pull + push).mean()
    return loss, {"policy_loss": float(loss.detach()), "weight_mean": float(w.mean()) if w.numel() else 0.0,
                  "push_frac": float((~pos).float().mean()) if w.numel() else 0.0,
                  "pushed_to_floor": float(((logp - old_logp) <= -max_push)[~pos].float().mean()) if (~pos).any() else 0.0}


def value_loss(values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor | None = None,
               clip: float | None = None) -> torch.Tensor:
    """0.5 * mean((V - R)^2), optionally PPO-style clipped around ``old_values``."""
    _same_shape(values=values, returns=returns)
    if old_values is None or clip is None:
        return 0.5 * (values - returns).pow(2).mean()
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns).pow(2), (v_clipped - returns).pow(2)).mean()


def recap_indicator(adv: torch.Tensor, percentile: float = 70.0,
                    threshold: float | None = None) -> tuple[torch.Tensor, float]:
    """RECAP's binarized advantage (pi*0.6): ``I = positive`` where ``A > threshold``, else ``negative``.

    The threshold is ``threshold`` when given, otherwise the ``percentile``-th percentile of ``adv``
    (linear interpolation, as ``numpy.percentile``): percentile 70 labels about the best 30% positive.
    Returns (indicator values ``[B]`` as ``long``, the threshold used).
    """
    from offrl.algos.networks import INDICATOR_NEGATIVE, INDICATOR_POSITIVE

    a = adv.detach().reshape(-1).float()
    if threshold is None:
        if a.numel() == 0:
            return torch.zeros(0, dtype=torch.long), 0.0
        threshold = float(torch.quantile(a, percentile / 100.0))
    ind = torch.where(a > threshold, INDICATOR_POSITIVE, INDICATOR_NEGATIVE).long()
    return ind, float(threshold)


def drop_indicator(ind: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each indicator replaced by ``none`` with probability ``p`` (independently): what lets one network
    be both the conditioned and the unconditioned policy that guidance contrasts."""
    from offrl.algos.networks import INDICATOR_NONE

    if p <= 0:
        return ind
    drop = torch.rand(ind.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(ind, INDICATOR_NONE), ind)


def recap_loss(logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """RECAP's policy loss: plain maximum likelihood, ``-mean log pi(a | s, I)``, over good and bad actions
    alike (the indicator, not a weight, tells them apart, so no action's likelihood is ever pushed down)."""
    loss = -logp.mean()
    return loss, {"policy_loss": float(loss.detach())}
