"""Action-sequence policies (pure torch): windows, normalisation, the U-Net, DDIM sampling, EMA, resume."""

import numpy as np
import pytest
import torch

from offrl.algos.sequence import (ChunkedMLP, DiffusionPolicy, SequenceBCLearner, SequenceNormalizer,
                                  build_sequence_net, make_windows)
from offrl.algos.unet1d import ConditionalUnet1D


def test_windows_pad_the_start_with_the_first_row_and_the_end_with_the_last_action():
    # one episode, T = 3 actions, obs rows 0..3 (obs value = its index, action value = 10 + index)
    obs = np.arange(4, dtype=np.float32)[:, None]
    act = (10 + np.arange(3, dtype=np.float32))[:, None]
    w = make_windows([(obs, act)], obs_horizon=2, pred_horizon=4)
    assert w["obs_seq"].shape == (3, 2, 1) and w["act_seq"].shape == (3, 4, 1)
    # t = 0: obs [0, 0] (first repeated), actions t-1..t+2 = [10, 10, 11, 12]
    assert w["obs_seq"][0, :, 0].tolist() == [0, 0]
    assert w["act_seq"][0, :, 0].tolist() == [10, 10, 11, 12]
    # t = 2 (last action step): obs [1, 2], actions 1..4 -> [11, 12, 12, 12] (last action repeated)
    assert w["obs_seq"][2, :, 0].tolist() == [1, 2]
    assert w["act_seq"][2, :, 0].tolist() == [11, 12, 12, 12]
    assert w["step"].tolist() == [0, 1, 2] and w["episode"].tolist() == [0, 0, 0]


def test_hold_padding_keeps_the_arm_still_and_the_gripper_command_past_the_end():
    # T = 3 actions of [dx, gripper]: dx = 1, 2, 3 and gripper = -1 (closed) throughout
    obs = np.zeros((4, 1), np.float32)
    act = np.array([[1.0, -1.0], [2.0, -1.0], [3.0, -1.0]], np.float32)
    w = make_windows([(obs, act)], obs_horizon=2, pred_horizon=4, end_padding="hold")
    # t = 2: actions 1..4 -> a_1, a_2, then two padded steps: arm delta 0, gripper -1 (the last command)
    assert w["act_seq"][2].tolist() == [[2.0, -1.0], [3.0, -1.0], [0.0, -1.0], [0.0, -1.0]]
    # t = 0 is not padded at the end: [a_0 (start padding), a_0, a_1, a_2]
    assert w["act_seq"][0].tolist() == [[1.0, -1.0], [1.0, -1.0], [2.0, -1.0], [3.0, -1.0]]
    last = make_windows([(obs, act)], obs_horizon=2, pred_horizon=4, end_padding="last")
    assert last["act_seq"][2].tolist() == [[2.0, -1.0], [3.0, -1.0], [3.0, -1.0], [3.0, -1.0]]
    with pytest.raises(ValueError, match="end_padding"):
        make_windows([(obs, act)], 2, 4, end_padding="zero")


def test_executed_actions_start_at_the_current_step():
    net = ChunkedMLP(1, 1, obs_horizon=2, pred_horizon=4, action_horizon=2)
    seq = torch.arange(4.0).view(1, 4, 1)
    # index To - 1 = 1 is the action for the current step t
    assert net.executed(seq)[0, :, 0].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="action_horizon"):
        ChunkedMLP(1, 1, obs_horizon=2, pred_horizon=4, action_horizon=4)


def test_action_normaliser_maps_min_max_to_unit_interval_and_back():
    n = SequenceNormalizer(2, 3)
    acts = torch.tensor([[0.0, -2.0, 5.0], [1.0, 2.0, 5.0], [0.5, 0.0, 5.0]])  # last dim is constant
    n.fit(torch.randn(10, 2), acts)
    u = n.act(acts)
    torch.testing.assert_close(u[:, 0], torch.tensor([-1.0, 1.0, 0.0]))
    torch.testing.assert_close(u[:, 1], torch.tensor([-1.0, 1.0, 0.0]))
    assert bool((u[:, 2] == 0).all())  # a constant dimension maps to 0 ...
    torch.testing.assert_close(n.unact(u), acts)  # ... and back to its value
    assert bool(torch.isfinite(n.obs(torch.zeros(1, 2))).all())


@pytest.mark.parametrize("widths", [(16,), (16, 32), (16, 32, 64)])
def test_unet_keeps_the_sequence_shape_and_uses_the_condition(widths):
    torch.manual_seed(0)
    net = ConditionalUnet1D(act_dim=3, cond_dim=5, widths=widths, step_embed_dim=8, kernel_size=3, groups=4)
    x, k = torch.randn(4, 16, 3), torch.randint(0, 100, (4,))
    c1, c2 = torch.randn(4, 5), torch.randn(4, 5)
    y = net(x, k, c1)
    assert y.shape == x.shape
    assert not torch.allclose(y, net(x, k, c2))  # FiLM conditioning reaches the output
    assert not torch.allclose(y, net(x, (k + 50) % 100, c1))  # so does the diffusion step
    if len(widths) > 1:
        with pytest.raises(ValueError, match="divisible"):
            net(torch.randn(2, 15, 3), k[:2], c1[:2])


def _dp(**kw):
    return DiffusionPolicy(obs_dim=3, act_dim=2, obs_horizon=2, pred_horizon=8, action_horizon=4, widths=(16, 32),
                           step_embed_dim=8, kernel_size=3, groups=4, action_low=[-1.0, -0.5],
                           action_high=[1.0, 0.5], **kw)


@pytest.mark.parametrize("scheduler, steps", [("ddim", 10), ("ddim", 3), ("ddpm", 20)])
def test_sampling_shapes_and_bounds(scheduler, steps):
    torch.manual_seed(0)
    net = _dp(scheduler=scheduler, inference_steps=steps, train_steps=100 if scheduler == "ddim" else 20)
    acts = torch.rand(50, 8, 2) * 4 - 2  # data wider than the env bounds
    net.normalizer.fit(torch.randn(50, 2, 3), acts)
    seq = net.predict(torch.randn(5, 2, 3), torch.Generator().manual_seed(0))
    assert seq.shape == (5, 8, 2)
    ex = net.executed(seq)
    assert ex.shape == (5, 4, 2)  # [N, Ta, act_dim]
    assert bool((seq[..., 0].abs() <= 1.0).all()) and bool((seq[..., 1].abs() <= 0.5).all())
    # same generator seed -> same actions
    o = torch.randn(5, 2, 3)
    torch.testing.assert_close(net.predict(o, torch.Generator().manual_seed(3)),
                               net.predict(o, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="obs_seq"):
        net.predict(torch.randn(5, 3, 3))


def test_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="scheduler"):
        _dp(scheduler="euler")


def _toy_windows(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 2, 3, generator=g)
    # the action sequence is a deterministic function of the last observation
    act = torch.tanh(obs[:, -1:, :2].expand(n, 8, 2) * torch.linspace(0.5, 1.5, 8)[None, :, None])
    return {"obs_seq": obs, "act_seq": act}


@pytest.mark.parametrize("kind", ["diffusion", "mlp_chunk"])
def test_learner_loss_decreases_and_ema_is_the_evaluated_policy(kind):
    torch.manual_seed(0)
    net = _dp() if kind == "diffusion" else ChunkedMLP(3, 2, 2, 8, 4, hidden=(32, 32))
    L = SequenceBCLearner(net, lr=3e-3, warmup_steps=5, total_steps=150, seed=0)
    data = _toy_windows()
    L.fit_normalizers(data)
    first = L.validate(data)["actor_val_loss"]
    for _ in range(150):
        idx = torch.randint(0, 64, (32,), generator=L.gen)
        L.update({k: v[idx] for k, v in data.items()})
    v = L.validate(data)
    assert v["actor_val_loss"] < 0.5 * first, (first, v)
    assert L.actor is L.ema_net and set(L.modules()) == {"actor", "actor_train"}
    # the EMA lags the raw weights
    raw = torch.nn.utils.parameters_to_vector(L.net.parameters())
    ema = torch.nn.utils.parameters_to_vector(L.ema_net.parameters())
    assert not torch.allclose(raw, ema)
    assert L.extra_state()["ema_step"] == 150


def test_save_resume_continues_exactly(tmp_path):
    from offrl.platform.checkpoint import load_checkpoint, save_checkpoint

    data = _toy_windows()

    def make():
        torch.manual_seed(0)
        L = SequenceBCLearner(_dp(), lr=1e-3, warmup_steps=3, total_steps=20, seed=7)
        L.fit_normalizers(data)
        return L

    def steps(L, n):
        for _ in range(n):
            perm = L.permutation(64)[:16]
            L.update({k: v[perm] for k, v in data.items()})

    straight = make()
    steps(straight, 10)
    cut = make()
    steps(cut, 4)
    save_checkpoint(tmp_path, 4, cut.modules(), optimizers=cut.optimizers(), generators=cut.generators(),
                    extra_state=cut.extra_state())
    resumed = make()
    state = load_checkpoint(tmp_path, resumed.modules(), optimizers=resumed.optimizers(),
                            generators=resumed.generators())
    resumed.load_extra_state(state)
    steps(resumed, 6)
    for name in ("actor", "actor_train"):
        a, b = straight.modules()[name].state_dict(), resumed.modules()[name].state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert resumed.opt.param_groups[0]["lr"] == straight.opt.param_groups[0]["lr"]


def test_build_sequence_net_from_arch():
    net = build_sequence_net({"kind": "mlp_chunk", "obs_dim": 3, "act_dim": 2, "obs_horizon": 1,
                              "pred_horizon": 4, "action_horizon": 4, "hidden": [8]})
    assert isinstance(net, ChunkedMLP) and net.executed(torch.zeros(1, 4, 2)).shape == (1, 4, 2)
    with pytest.raises(ValueError, match="kind"):
        build_sequence_net({"kind": "transformer"})


def test_gaussian_log_std_floor_stops_the_collapse():
    from offrl.algos.bc import BCLearner
    from offrl.algos.networks import GaussianActor

    torch.manual_seed(0)
    obs = torch.randn(256, 4)
    act = torch.tanh(obs[:, :2])  # deterministic expert: MLE drives the std towards 0
    floors = {}
    for floor in (None, -1.5):
        actor = GaussianActor(4, 2, hidden=(32,), log_std_init=-1.0, min_log_std=floor)
        L = BCLearner(actor, lr=3e-3)
        for _ in range(800):
            L.update({"obs": obs, "actions": act})
        floors[floor] = float(actor.dist(obs).stddev.min().detach())
    assert floors[None] < 0.5 * np.exp(-1.5)
    assert floors[-1.5] == pytest.approx(np.exp(-1.5), rel=1e-5)
