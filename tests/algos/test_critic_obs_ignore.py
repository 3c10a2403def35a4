"""critic.obs_ignore: observation parts the critics (V, Q, target Q) do not see, from pretraining to finetuning
(real PickCube-v1 layout, real pretraining)."""

import json

import pytest
import torch

from offrl.algos.critics import Critics


def _moved(obs: torch.Tensor, cols: slice, by: float) -> torch.Tensor:
    out = obs.clone()
    out[:, cols] += by
    return out


def test_hidden_entries_move_no_value_and_the_weights_load_into_a_plain_critic():
    torch.manual_seed(0)
    c = Critics(6, 2, hidden=(32,), obs_ignore=[1, 2])
    c.update_normalizers(torch.randn(200, 6))
    obs, act = torch.randn(5, 6), torch.randn(5, 2)
    hidden, seen = _moved(obs, slice(1, 3), 10.0), _moved(obs, slice(0, 1), 1.0)
    assert c.v.obs_ignore == c.q.obs_ignore == c.q_target.obs_ignore == [1, 2]
    assert torch.equal(c.v(obs), c.v(hidden)) and torch.equal(c.q(obs, act), c.q(hidden, act))
    assert torch.equal(c.advantage(obs, act), c.advantage(hidden, act))
    assert not torch.allclose(c.v(obs), c.v(seen)) and not torch.allclose(c.q(obs, act), c.q(seen, act))
    # the mask is architecture, not state: the weights load into a critic that sees everything, and back
    plain = Critics(6, 2, hidden=(32,))
    plain.load_state_dict(c.state_dict())
    assert not torch.equal(plain.v(obs), plain.v(hidden))
    again = Critics(6, 2, hidden=(32,), obs_ignore=[1, 2])
    again.load_state_dict(plain.state_dict())
    assert torch.equal(again.q(hidden, act), c.q(obs, act))
    with pytest.raises(ValueError, match="obs_ignore"):
        Critics(6, 2, obs_ignore=[6])


def test_pretrained_critics_hide_the_entries_and_finetuning_rebuilds_them_so(tmp_path, expert_dataset, ray_cluster):
    from offrl.config import load_config
    from offrl.platform.checkpoint import latest_checkpoint
    from offrl.platform.finetune import _load_start
    from offrl.platform.pretrain import run_pretrain_job

    cfg = load_config(None, [f"pretrain.dataset={expert_dataset}", "pretrain.algo=bc+iql", f"run.root={tmp_path}",
                             "run.experiment=coi", "run.trial=noquat", "run.progress=false", "run.tensorboard=false",
                             "pretrain.epochs=1", "pretrain.steps_per_epoch=5", "pretrain.eval_episodes=1",
                             "env.num_envs=1", "cluster.num_hosts=1", "policy.hidden=[32]", "critic.hidden=[32]",
                             "critic.obs_ignore=[\"22:26\", extra/is_grasped]"])
    run = run_pretrain_job(cfg, log=lambda *a: None)
    ckpt = latest_checkpoint(run / "checkpoints")
    state = json.loads((ckpt / "training_state" / "state.json").read_text())
    assert state["critic_obs_ignore"] == [18, 22, 23, 24, 25]
    assert "obs_ignore" not in state["actor_arch"]  # the actor keeps its own view
    ft = load_config(None, [f"finetune.checkpoint={run}", "finetune.advantage=iql", "finetune.update=awr"])
    _, _, actor, value, critics, _ = _load_start(ft, log=lambda *a: None)
    assert critics.v.obs_ignore == critics.q_target.obs_ignore == [18, 22, 23, 24, 25]
    obs, act = torch.randn(4, 42), torch.rand(4, 4) * 2 - 1
    hidden = _moved(obs, slice(22, 26), 5.0)
    hidden[:, 18] += 1.0
    assert torch.equal(critics.advantage(obs, act), critics.advantage(hidden, act))
    assert not torch.equal(actor.dist(obs).mean, actor.dist(hidden).mean)
    gae = load_config(None, [f"finetune.checkpoint={run}", "finetune.advantage=gae", "finetune.update=ppo"])
    _, _, _, value, _, _ = _load_start(gae, log=lambda *a: None)
    assert value.obs_ignore == [18, 22, 23, 24, 25] and torch.equal(value(obs), value(hidden))


def test_a_bad_entry_names_the_key_and_writes_nothing(tmp_path, expert_dataset):
    from conftest import run_cli

    r = run_cli("pretrain", "tune_configs/rollout.yaml", f"pretrain.dataset={expert_dataset}", "pretrain.algo=bc+iql",
                f"run.root={tmp_path}", "run.trial=bad", "critic.obs_ignore=[agent/speed]", "cluster.num_hosts=1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "critic.obs_ignore" in r.stderr and "agent/speed" in r.stderr
    assert not list(tmp_path.rglob("bad"))
