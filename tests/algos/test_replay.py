"""The replay buffer, the online/offline minibatch mix, and the off-policy (replay) learner path."""

import math

import pytest
import torch

from offrl.algos.critics import Critics
from offrl.algos.finetune import FinetuneLearner
from offrl.algos.networks import GaussianActor
from offrl.algos.replay import FIELDS, ReplayBuffer, mixed_batch, n_step, offline_counts
from offrl.config import FinetuneConfig


def _rows(n, obs_dim=3, act_dim=2, mark=0.0, start=0):
    """Transitions whose obs[:, 0] is the row number (+ start) and obs[:, 1] a source mark."""
    obs = torch.zeros(n, obs_dim)
    obs[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    obs[:, 1] = mark
    return {"obs": obs, "actions": torch.rand(n, act_dim) * 2 - 1, "raw_actions": torch.rand(n, act_dim),
            "logprob": torch.zeros(n), "rewards": torch.rand(n), "next_obs": obs + 1,
            "terminated": torch.zeros(n, dtype=torch.bool)}


def test_buffer_wraps_around_and_round_trips():
    buf = ReplayBuffer(5, 3, 2)
    buf.add(_rows(3))
    buf.add(_rows(4, start=3))        # rows 0..6 added, capacity 5: rows 2..6 kept
    assert len(buf) == 5 and buf.added == 7
    assert sorted(buf.data["obs"][:, 0].tolist()) == [2, 3, 4, 5, 6]
    st = buf.state_dict()
    assert st["rows"]["obs"][:, 0].tolist() == [2, 3, 4, 5, 6]  # insertion order
    other = ReplayBuffer(5, 3, 2)
    other.load_state_dict(st)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = buf.sample(64, g1), other.sample(64, g2)
    assert sorted(set(a["obs"][:, 0].tolist())) == sorted(set(b["obs"][:, 0].tolist()))
    other.add(_rows(2, start=7))      # continues where the saved one stopped
    assert sorted(other.data["obs"][:, 0].tolist()) == [4, 5, 6, 7, 8]
    big = ReplayBuffer(2, 3, 2)
    big.add(_rows(6))                 # a batch larger than the capacity keeps its last rows
    assert sorted(big.data["obs"][:, 0].tolist()) == [4, 5] and big.added == 6
    with pytest.raises(ValueError, match="lacks"):
        buf.add({"obs": torch.zeros(2, 3)})


def test_n_step_rows_stop_at_episode_ends_and_at_the_end_of_the_arrays():
    """Two envs, six steps, n = 3, gamma 0.5. Env 0: an episode that terminates at t=3 (reward 1 there), then
    one truncated at t=5. Env 1: one episode running past the arrays' end, reward 1 at t=2."""
    r = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 0], [0, 0], [0, 0]], dtype=torch.float32)
    term = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    ends = term | torch.tensor([[0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [1, 0]], dtype=torch.bool)
    nxt = torch.stack([torch.arange(6) + 1 + 10 * torch.tensor(i) for i in range(2)], 1).float()[..., None]
    o = n_step(r, term, ends, nxt, 3, 0.5)
    assert o["nsteps"][:, 0].tolist() == [3, 3, 2, 1, 2, 1]          # env 0: episode ends cut the sums
    assert o["rewards"][:, 0].tolist() == [0, 0.25, 0.5, 1, 0, 0]
    assert o["next_obs"][:, 0, 0].tolist() == [3, 4, 4, 4, 6, 6]      # the last summed step's next_obs
    assert o["terminated"][:, 0].tolist() == [False, True, True, True, False, False]
    assert o["nsteps"][:, 1].tolist() == [3, 3, 3, 3, 2, 1]          # env 1: only the arrays' end cuts
    assert o["rewards"][:, 1].tolist() == [0.25, 0.5, 1, 0, 0, 0]
    assert o["next_obs"][:, 1, 0].tolist() == [13, 14, 15, 16, 16, 16]
    assert not o["terminated"][:, 1].any()
    one = n_step(r, term, ends, nxt, 1, 0.5)                          # n = 1 is the input unchanged
    assert torch.equal(one["rewards"], r) and torch.equal(one["next_obs"], nxt) and (one["nsteps"] == 1).all()
    with pytest.raises(ValueError, match="n must be >= 1"):
        n_step(r, term, ends, nxt, 0, 0.5)


def test_nsteps_defaults_to_one_step_rows():
    """Batches without nsteps (HER copies, old checkpoints, offline data at n = 1) hold one-step rows; given
    ones are kept through add, the mix and a checkpoint round trip."""
    buf = ReplayBuffer(10, 3, 2)
    buf.add(_rows(3))
    buf.add({**_rows(2, start=3), "nsteps": torch.tensor([3.0, 2.0])})
    assert buf.data["nsteps"][:5].tolist() == [1, 1, 1, 3, 2]
    st = buf.state_dict()
    old = {"rows": {k: v for k, v in st["rows"].items() if k != "nsteps"}, "added": st["added"]}
    other = ReplayBuffer(10, 3, 2)
    other.load_state_dict(old)                                        # a checkpoint from before nsteps
    assert other.data["nsteps"][:5].tolist() == [1] * 5
    other.load_state_dict(st)
    assert other.data["nsteps"][:5].tolist() == [1, 1, 1, 3, 2]
    b = mixed_batch(buf, _rows(4, mark=2.0), 64, 0.5, torch.Generator().manual_seed(0))
    assert (b["nsteps"][b["offline"]] == 1).all() and set(b["nsteps"][~b["offline"]].tolist()) <= {1.0, 2.0, 3.0}


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_mixed_batch_samples_the_configured_ratio(ratio):
    buf = ReplayBuffer(100, 3, 2)
    buf.add(_rows(50, mark=1.0))
    off = _rows(30, mark=2.0)
    g = torch.Generator().manual_seed(1)
    b = mixed_batch(buf, off, 64, ratio, g)
    n_off = int(round(ratio * 64))
    assert set(b) == set(FIELDS) | {"offline"}
    assert all(v.shape[0] == 64 for v in b.values())
    assert int(b["offline"].sum()) == n_off
    # the flag tells the truth: offline rows carry the offline mark, the rest the replay's
    assert (b["obs"][b["offline"], 1] == 2.0).all() and (b["obs"][~b["offline"], 1] == 1.0).all()
    # over many draws every source row can appear
    seen = set()
    for _ in range(50):
        seen |= set(mixed_batch(buf, off, 64, 0.5, g)["obs"][:, 0].tolist())
    assert seen == set(range(50))  # replay rows 0..49; offline rows 0..29 share those numbers


def test_all_offline_until_the_replay_has_data():
    buf = ReplayBuffer(10, 3, 2)
    assert offline_counts(256, 0.5, 0) == (256, 0)
    b = mixed_batch(buf, _rows(8, mark=2.0), 16, 0.5, torch.Generator().manual_seed(0))
    assert b["offline"].all()
    with pytest.raises(ValueError, match="empty"):
        mixed_batch(buf, None, 16, 0.5)


class _Recording(FinetuneLearner):
    """Records, at every advantage computation, the minibatch and the critics' V weights at that moment."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def critic_advantages(self, obs, actions):
        adv = super().critic_advantages(obs, actions)
        w = self.critics.v.net[0].weight.detach().clone()
        self.calls.append((obs.clone(), actions.clone(), adv.clone(), w))
        return adv


def _replay_learner(cls=FinetuneLearner, **over):
    cfg = FinetuneConfig(advantage="iql", update="awr", replay=True, updates_per_round=3, batch_size=32,
                         offline_ratio=0.5, replay_size=1000, critic_lr=1e-2, **over)
    torch.manual_seed(0)
    actor = GaussianActor(3, 2, hidden=(16,))
    critics = Critics(3, 2, hidden=(16,))
    return cls(actor, cfg, critics=critics, seed=0, offline=_rows(40, mark=2.0))


def test_replay_update_recomputes_advantages_on_every_minibatch_with_the_updated_critics():
    lr = _replay_learner(_Recording)
    lr.replay.add(_rows(64, mark=1.0))
    v0 = lr.critics.v.net[0].weight.detach().clone()
    m = lr.update_replay()
    assert len(lr.calls) == 3  # one advantage computation per gradient step
    obs_sets = [c[0] for c in lr.calls]
    assert not torch.equal(obs_sets[0], obs_sets[1])  # a fresh minibatch each time
    # the critics took their step before the advantages were computed: the V weights seen differ from
    # the start and from one minibatch to the next
    assert not torch.equal(lr.calls[0][3], v0)
    assert not torch.equal(lr.calls[0][3], lr.calls[1][3])
    # after the last computation only the actor stepped: the critics still give the same advantages
    obs, act, adv, _ = lr.calls[-1]
    assert torch.allclose(FinetuneLearner.critic_advantages(lr, obs, act), adv)
    assert m["grad_steps"] == 3 and abs(m["offline_frac"] - 0.5) < 1e-9
    assert {"critic_loss", "policy_loss", "adv_mean", "adv_std", "pos_ratio", "round_kl"} <= set(m)
    assert "approx_kl" not in m  # rows from many past policies and the demos: no step to measure


def test_bc_term_adds_the_demo_negative_log_likelihood():
    lr = _replay_learner(bc_coef=2.0)
    lr.replay.add(_rows(64, mark=1.0))
    m = lr.update_replay()
    assert math.isfinite(m["bc_loss"])
    g = torch.Generator().manual_seed(5)
    lr.gen = g
    nll = lr.bc_loss(40)
    g2 = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 40, (40,), generator=g2)
    off = lr.offline
    expect = -lr.actor.log_prob(off["obs"][idx], off["actions"][idx]).mean()
    assert torch.allclose(nll, expect)
    with pytest.raises(ValueError, match="offline data"):
        FinetuneLearner(GaussianActor(3, 2, hidden=(8,)), FinetuneConfig(bc_coef=1.0), value=None, critics=None)
