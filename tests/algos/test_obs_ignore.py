"""policy.obs_ignore: observation parts a Gaussian policy does not see (real PickCube-v1 layout, real pretraining)."""

import pytest
import torch

from offrl.algos.networks import GaussianActor, build_actor
from offrl.errors import ConfigError


def test_ignored_entries_do_not_change_the_policy_and_the_weights_keep_their_shape():
    torch.manual_seed(0)
    actor = GaussianActor(6, 2, hidden=(32,), obs_ignore=[1, 2])
    actor.normalizer.update(torch.randn(100, 6))
    obs = torch.randn(5, 6)
    other = obs.clone()
    other[:, 1:3] = torch.randn(5, 2) * 10
    assert torch.equal(actor.dist(obs).mean, actor.dist(other).mean)
    assert torch.equal(actor.log_prob(obs, torch.zeros(5, 2)), actor.log_prob(other, torch.zeros(5, 2)))
    seen = obs.clone()
    seen[:, 0] += 1.0
    assert not torch.allclose(actor.dist(obs).mean, actor.dist(seen).mean)
    # the mask is rebuilt from the architecture, not stored: the weights load into a plain actor and back
    plain = GaussianActor(6, 2, hidden=(32,))
    plain.load_state_dict(actor.state_dict())
    again = build_actor({"obs_dim": 6, "act_dim": 2, "hidden": [32], "obs_ignore": [1, 2]})
    again.load_state_dict(plain.state_dict())
    assert torch.equal(again.dist(other).mean, actor.dist(obs).mean)
    with pytest.raises(ValueError, match="obs_ignore"):
        GaussianActor(6, 2, obs_ignore=[6])


def test_field_names_come_from_the_task_and_bad_entries_name_the_key():
    from offrl.config import load_config
    from offrl.envs.maniskill import probe_env, resolve_obs_ignore

    spec = probe_env(load_config(None, []).env)  # PickCube-v1, state observations
    fields = {name: (a, b) for name, a, b in spec["obs_fields"]}
    assert fields["agent/qpos"] == (0, 9) and fields["agent/qvel"] == (9, 18)
    assert fields["extra/obj_to_goal_pos"] == (spec["obs_dim"] - 3, spec["obs_dim"])
    assert resolve_obs_ignore(["agent/qvel"], 42, spec["obs_fields"]) == list(range(9, 18))
    assert resolve_obs_ignore(["0:2", "extra/is_grasped"], 42, spec["obs_fields"]) == [0, 1, 18]
    for entries, words in ((["agent/speed"], "unknown observation field 'agent/speed'"),
                           (["5:3"], "0 <= start < end <= 42"), (["0:99"], "0 <= start < end <= 42"),
                           (["a:b"], "not a range"), (["0:42"], "hides all 42")):
        with pytest.raises(ConfigError) as e:
            resolve_obs_ignore(entries, 42, spec["obs_fields"])
        assert e.value.path == "policy.obs_ignore" and words in str(e.value) and "\n" not in str(e.value)


def test_pretrained_policy_ignores_the_joint_velocities(tmp_path, expert_dataset, ray_cluster):
    import json

    from offrl.config import load_config
    from offrl.platform.checkpoint import load_checkpoint
    from offrl.platform.pretrain import run_pretrain_job
    from conftest import run_cli

    cfg = load_config(None, [f"pretrain.dataset={expert_dataset}", "pretrain.algo=bc", f"run.root={tmp_path}",
                             "run.experiment=oi", "run.trial=noqvel", "run.progress=false", "run.tensorboard=false",
                             "pretrain.epochs=2", "pretrain.steps_per_epoch=10", "pretrain.eval_episodes=1",
                             "env.num_envs=1", "cluster.num_hosts=1", "policy.hidden=[64,64]",
                             "policy.obs_ignore=[agent/qvel]"])
    run = run_pretrain_job(cfg, log=lambda *a: None)
    arch = json.loads((run / "checkpoints" / "2" / "training_state" / "state.json").read_text())["actor_arch"]
    assert arch["obs_ignore"] == list(range(9, 18)) and arch["obs_min_std"] is None
    actor = build_actor(arch)
    load_checkpoint(run / "checkpoints" / "2", {"actor": actor}, parts=["actor"], restore_rng=False)
    obs = torch.randn(4, 42)
    moved = obs.clone()
    moved[:, 9:18] += 3.0
    assert torch.equal(actor.dist(obs).mean, actor.dist(moved).mean)
    r = run_cli("pretrain", "tune_configs/rollout.yaml", f"pretrain.dataset={expert_dataset}", "pretrain.algo=bc",
                f"run.root={tmp_path}", "run.trial=bad", "policy.obs_ignore=[agent/speed]", "cluster.num_hosts=1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "policy.obs_ignore" in r.stderr and "agent/speed" in r.stderr
    assert not list(tmp_path.rglob("bad"))  # nothing half-written
