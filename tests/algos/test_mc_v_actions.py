"""Advantages for the first actions of V's re-rollouts (finetune.mc_v_actions): leave-one-out baselines."""

import pytest
import torch

from offrl.algos.advantages import mc_v_action_advantage


def test_known_values():
    """Each V sample minus the mean of the state's other 2M - 1 returns."""
    q = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    v = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    a = mc_v_action_advantage(q, v)
    torch.testing.assert_close(a, torch.tensor([[0.0 - 2.0 / 3, 1.0 - 1.0 / 3], [-1.0, 3.0]]))
    # one sample a side: the baseline is Q's one return
    torch.testing.assert_close(mc_v_action_advantage(torch.tensor([[2.0]]), torch.tensor([[5.0]])),
                               torch.tensor([[3.0]]))
    with pytest.raises(ValueError, match="one shape"):
        mc_v_action_advantage(q, v[:, :1])


def test_unbiased_for_the_drawn_actions_value():
    """Returns = the drawn action's true advantage over V + noise: the estimates average to the true
    advantages (the baseline excludes the sample itself), and correlate with them as their variance predicts:
    for M = 2, var(est) = s^2 + n^2 + (5 s^2 + 3 n^2) / 9 (the baseline is the mean of Q's two returns, both
    after the rollout's action, and V's other sample), cov(est, truth) = s^2."""
    g = torch.Generator().manual_seed(1)
    B, M, s, n = 40000, 2, 1.0, 1.5
    true_q = s * torch.randn(B, M, generator=g, dtype=torch.float64)  # A(s, a'_m) of V's drawn actions
    v = true_q + n * torch.randn(B, M, generator=g, dtype=torch.float64)
    a_rollout = s * torch.randn(B, 1, generator=g, dtype=torch.float64)  # the rollout's own action
    q = a_rollout + n * torch.randn(B, M, generator=g, dtype=torch.float64)
    est = mc_v_action_advantage(q, v)
    assert abs(float((est - true_q).mean())) < 0.02
    r = float(torch.corrcoef(torch.stack([est.reshape(-1), true_q.reshape(-1)]))[0, 1])
    want = s ** 2 / (s ** 2 + n ** 2 + (5 * s ** 2 + 3 * n ** 2) / 9) ** 0.5
    assert abs(r - want) < 0.02
