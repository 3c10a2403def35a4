"""The terminal success bonus (offrl.algos.rewards): values, where it lands, and what it changes."""

import numpy as np
import pytest
import torch

from offrl.algos.advantages import gae
from offrl.algos.rewards import add_success_bonus, auto_success_bonus


def test_auto_bonus_values():
    # normalized_dense, gamma 0.8, H 50: (1 - 0.8^50) / 0.2
    assert auto_success_bonus(None, "normalized_dense", 0.8, 50) == pytest.approx((1 - 0.8 ** 50) / 0.2)
    assert auto_success_bonus(None, "normalized_dense", 0.5, 2) == pytest.approx(1.5)  # 1 + 0.5
    assert auto_success_bonus(None, "normalized_dense", 1.0, 50) == 50.0  # undiscounted: H steps of reward 1
    for mode in ("sparse", "dense", None):
        assert auto_success_bonus(None, mode, 0.8, 50) == 0.0
    assert auto_success_bonus(2.5, "sparse", 0.8, 50) == 2.5  # an explicit value always wins
    assert auto_success_bonus(0.0, "normalized_dense", 0.8, 50) == 0.0


def test_bonus_lands_only_on_successful_terminations():
    r = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], np.float32)
    term = np.array([[False, False], [True, False], [False, True]])
    succ = np.array([[True, False], [True, False], [True, False]])  # success without termination: no bonus
    out = add_success_bonus(r, term, succ, 5.0)
    np.testing.assert_allclose(out, [[0.1, 0.2], [5.3, 0.4], [0.5, 0.6]], rtol=1e-6)
    assert out.dtype == np.float32 and r[1, 0] == np.float32(0.3)  # input untouched
    t = add_success_bonus(torch.from_numpy(r), torch.from_numpy(term), torch.from_numpy(succ), 5.0)
    torch.testing.assert_close(t, torch.from_numpy(out))
    assert add_success_bonus(r, term, succ, 0.0) is r


def test_bonus_makes_finishing_beat_hovering():
    """The failure mode the bonus fixes, by hand (gamma 0.8, normalized dense reward, V = 0 everywhere).

    Finishing: reward 0.9 then the success step (reward 1, terminated). Hovering: reward 0.95 forever
    (here 3 steps, truncated, bootstrapped from V = 0). Without the bonus hovering has the larger return
    from step 0; with the auto bonus finishing does.
    """
    g = 0.8
    finish = torch.tensor([[0.9], [1.0], [0.0]])
    hover = torch.tensor([[0.95], [0.95], [0.95]])
    term = torch.tensor([[False], [True], [False]])
    never = torch.zeros(3, 1, dtype=torch.bool)
    trunc = torch.tensor([[False], [False], [True]])
    zeros = torch.zeros(3, 1)
    succ = term.clone()

    def g0(rew, te, tr):
        _, ret = gae(rew, zeros, zeros, te, tr, g, 1.0)
        return float(ret[0, 0])

    assert g0(finish, term, never) < g0(hover, never, trunc)  # 0.9 + 0.8 = 1.70 < 0.95 * 2.44 = 2.318
    bonus = auto_success_bonus(None, "normalized_dense", g, 50)
    assert g0(add_success_bonus(finish, term, succ, bonus), term, never) > g0(hover, never, trunc)
