"""Advantage estimators as pure tensor functions (no Ray, no simulator, no I/O).

Shapes are time-major: ``[T, N]`` for T steps of N parallel envs. Conventions for every function:

* ``rewards[t]``, ``terminated[t]``, ``truncated[t]`` belong to the transition (s_t, a_t) -> s_{t+1}.
* ``next_values[t] = V(s_{t+1})`` where s_{t+1} is the *final* observation of the episode when step t
  ended it (auto-reset envs report it separately), so a truncated step bootstraps from the right state.
* Termination stops bootstrapping (the episode's value beyond it is 0); truncation (time limit or the
  end of the rollout segment) bootstraps from ``next_values``; both stop the recursion across the
  episode boundary, because ``s_{t+1}`` of the next row belongs to a new episode.
"""

from __future__ import annotations

import torch


def _check(name: str, x: torch.Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} ([T, N] like rewards)")


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
        truncated: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016), ``[T, N]`` in, ``(advantages, returns)`` out.

    delta_t = r_t + gamma * (1 - term_t) * V(s_{t+1}) - V(s_t)
    A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1},   done_t = term_t or trunc_t
    returns = A + V  (the lambda-return, the value target)

    The last row has no successor inside the segment: it bootstraps through ``next_values[T-1]``
    (mark it ``truncated`` or not: the recursion stops there anyway).
    """
    shape = rewards.shape
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [T, N], got shape {tuple(shape)}")
    for n, x in (("values", values), ("next_values", next_values), ("terminated", terminated),
                 ("truncated", truncated)):
        _check(n, x, shape)
    term = terminated.to(rewards.dtype)
    cont = 1.0 - torch.maximum(term, truncated.to(rewards.dtype))
    delta = rewards + gamma * (1.0 - term) * next_values - values
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in range(shape[0] - 1, -1, -1):
        last = delta[t] + gamma * lam * cont[t] * last
        adv[t] = last
    return adv, adv + values


def discounted_returns(rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
                       next_values: torch.Tensor, gamma: float) -> torch.Tensor:
    """Monte-Carlo return-to-go ``[T, N]``: G_t = r_t + gamma * G_{t+1} within an episode.

    At termination the tail is 0; at truncation (and after the last row) the tail is
    ``next_values[t]`` (pass zeros for a pure, unbootstrapped Monte-Carlo return).
    """
    shape = rewards.shape
    for n, x in (("terminated", terminated), ("truncated", truncated), ("next_values", next_values)):
        _check(n, x, shape)
    term = terminated.to(rewards.dtype)
    trunc = truncated.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    nxt = next_values[-1] * (1.0 - term[-1])
    for t in range(shape[0] - 1, -1, -1):
        # tail of step t: 0 if terminated, V(s_{t+1}) if truncated/last row, else G_{t+1}
        if t == shape[0] - 1:
            tail = nxt
        else:
            tail = (1.0 - term[t]) * (trunc[t] * next_values[t] + (1.0 - trunc[t]) * out[t + 1])
        out[t] = rewards[t] + gamma * tail
    return out


def td0_advantage(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
                  terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """One-step TD error r_t + gamma (1 - term_t) V(s_{t+1}) - V(s_t) (GAE with lambda = 0)."""
    return rewards + gamma * (1.0 - terminated.to(rewards.dtype)) * next_values - values


def mc_rerollout_advantage(q_returns: torch.Tensor, v_returns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Monte-Carlo advantage from re-rollouts: ``[B, M]`` discounted returns in, ``(A, Q, V)`` ``[B]`` out.

    Q(s, a) = mean of the M returns after taking ``a`` in ``s`` then following the re-rollout policy;
    V(s)    = mean of the M returns from ``s`` following the re-rollout policy from its first action;
    A       = Q - V.
    """
    if q_returns.dim() != 2 or v_returns.dim() != 2 or q_returns.shape[0] != v_returns.shape[0]:
        raise ValueError(f"q_returns and v_returns must be [B, M] with the same B, got "
                         f"{tuple(q_returns.shape)} and {tuple(v_returns.shape)}")
    q = q_returns.mean(1)
    v = v_returns.mean(1)
    return q - v, q, v


def mc_v_action_advantage(q_returns: torch.Tensor, v_returns: torch.Tensor) -> torch.Tensor:
    """Advantages of the first actions of V's re-rollouts: ``[B, M]`` returns in, ``[B, M]`` out.

    Each of V's ``M`` re-rollouts from ``s`` starts with an action the policy drew, so it is one sample of
    Q(s, a'_m) for an on-policy action of its own. Its advantage is its return minus the mean of the
    state's other ``2M - 1`` re-rollouts (Q's ``M`` and V's other ``M - 1``), a leave-one-out baseline
    that does not depend on ``a'_m``, so the estimate stays unbiased (the RLOO / vine estimator). With
    :func:`mc_rerollout_advantage` for the rollout's own action, one state then yields ``M + 1``
    advantages from the same ``2M`` re-rollouts instead of one.
    """
    if q_returns.dim() != 2 or q_returns.shape != v_returns.shape:
        raise ValueError(f"need [B, M] returns of one shape, got {tuple(q_returns.shape)} and "
                         f"{tuple(v_returns.shape)}")
    M = q_returns.shape[1]
    total = q_returns.sum(1, keepdim=True) + v_returns.sum(1, keepdim=True)
    return v_returns - (total - v_returns) / (2 * M - 1)


def mc_reliability(q_returns: torch.Tensor, v_returns: torch.Tensor) -> tuple[float, float]:
    """How much of the spread of MC advantages over a batch of pairs is signal: ``(reliability, noise std)``.

    Each pair's advantage ``A_i = mean_m q_im - mean_m v_im`` carries sampling noise of variance
    ``var_m(q_im - v_im) / M`` (unbiased for independent samples, and for samples paired by common noise);
    its mean over the pairs is the noise variance ``N``. The advantages' variance over the pairs is
    ``T = signal + N``, so ``1 - N / T`` estimates the share that is signal: the squared correlation of
    ``A`` with the advantages an infinite number of re-rollouts would give, the James-Stein shrinkage
    factor towards the batch mean. It is not clipped at 0: below 0 the noise alone accounts for more than
    the spread (no signal detected), and averaging over rounds stays unbiased by a clip. Needs ``M >= 2``;
    0 when ``T`` is 0.
    """
    B, M = q_returns.shape
    if M < 2 or v_returns.shape != q_returns.shape:
        raise ValueError(f"need [B, M >= 2] returns of one shape, got {tuple(q_returns.shape)} and "
                         f"{tuple(v_returns.shape)}")
    d = (q_returns - v_returns).double()
    noise = float((d.var(1, unbiased=True) / M).mean())
    total = float(d.mean(1).var(unbiased=True)) if B > 1 else 0.0
    rel = 0.0 if total <= 0 else 1.0 - noise / total
    return rel, noise ** 0.5


def critic_advantage(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A = Q(s, a) - V(s) from pretrained critics (IQL: expectile tau; SARSA: tau = 0.5)."""
    if q.shape != v.shape:
        raise ValueError(f"q and v shapes differ: {tuple(q.shape)} vs {tuple(v.shape)}")
    return q - v
