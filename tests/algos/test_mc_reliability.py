"""The MC estimator's per-round reliability (charts/mc_reliability): how much of its advantages is signal."""

import numpy as np
import pytest
import torch

from offrl.algos.advantages import mc_reliability, mc_rerollout_advantage


def _returns(a, M, noise_std, g):
    """M returns after the action (true advantage ``a`` above V) and M from the state, each with noise."""
    B = a.shape[0]
    q = a[:, None] + noise_std * torch.randn(B, M, generator=g, dtype=torch.float64)
    v = noise_std * torch.randn(B, M, generator=g, dtype=torch.float64)
    return q, v


@pytest.mark.parametrize("signal,noise,M", [(1.0, 2.0, 4), (1.0, 1.0, 2), (0.0, 1.0, 2), (1.0, 0.0, 3)])
def test_reliability_is_the_signal_share_of_the_advantage_variance(signal, noise, M):
    """Advantage variance = signal^2 + 2 noise^2 / M; the estimate recovers signal^2 over it from the
    within-pair spread alone, and matches how the same pairs' advantages from fresh re-rollouts correlate."""
    g = torch.Generator().manual_seed(0)
    a = signal * torch.randn(20000, generator=g, dtype=torch.float64)
    q, v = _returns(a, M, noise, g)
    rel, noise_std = mc_reliability(q, v)
    want = signal ** 2 / (signal ** 2 + 2 * noise ** 2 / M)
    assert abs(rel - want) < 0.03
    assert abs(noise_std - (2 * noise ** 2 / M) ** 0.5) < 0.03
    if 0 < want < 1:
        a1, _, _ = mc_rerollout_advantage(q, v)
        a2, _, _ = mc_rerollout_advantage(*_returns(a, M, noise, g))
        assert abs(float(np.corrcoef(a1.numpy(), a2.numpy())[0, 1]) - rel) < 0.03
    with pytest.raises(ValueError, match="M >= 2"):
        mc_reliability(q[:, :1], v[:, :1])
