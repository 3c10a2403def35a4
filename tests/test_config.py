import pytest
import yaml

from offrl.config import (ExperimentConfig, apply_overrides, from_dict, iter_keys, load_config, save_config,
                          to_dict)
from offrl.errors import ConfigError, OffrlError


def test_defaults_are_valid_and_frozen():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.env.id == "PickCube-v1"
    with pytest.raises(Exception):
        cfg.env.num_envs = 3  # frozen


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("env:\n  num_envs: 3\npolicy:\n  hidden: [8, 8]\n")
    cfg = load_config(p, ["env.num_envs=5", "cluster.cpus_per_host=2", "run.trial=abc", "env.sim_config={a: 1}"])
    assert cfg.env.num_envs == 5
    assert cfg.policy.hidden == (8, 8)
    assert cfg.cluster.cpus_per_host == 2.0 and isinstance(cfg.cluster.cpus_per_host, float)
    assert cfg.run.trial == "abc"
    assert cfg.env.sim_config == {"a": 1}


@pytest.mark.parametrize("override, path, words", [
    ("env.nme=x", "env.nme", "unknown key"),
    ("bogus=1", "bogus", "unknown key"),
    ("env.num_envs=abc", "env.num_envs", "expected an integer"),
    ("env.num_envs=1.5", "env.num_envs", "expected an integer"),
    ("env.num_envs=0", "env.num_envs", "must be >= 1"),
    ("env.backend=tpu", "env.backend", "one of 'cpu', 'gpu'"),
    ("run.tensorboard=maybe", "run.tensorboard", "true or false"),
    ("policy.hidden=[4,x]", "policy.hidden[1]", "expected an integer"),
    ("env=3", "env", "mapping"),
    ("run.experiment=a/b", "run.experiment", "plain folder name"),
    ("finetune.success_bonus=nan", "finetune.success_bonus", "finite number or null"),
    ("pretrain.success_bonus=inf", "pretrain.success_bonus", "finite number or null"),
    ("policy.action_horizon=17", "policy.action_horizon", "exceeds pred_horizon"),
    ("policy.action_horizon=16", "policy.action_horizon", "Tp - To + 1"),
    ("policy.obs_horizon=0", "policy.obs_horizon", "must be >= 1"),
    ("policy.kind=transformer", "policy.kind", "one of 'mlp', 'mlp_chunk', 'diffusion'"),
    ("diffusion.scheduler=euler", "diffusion.scheduler", "one of 'ddim', 'ddpm'"),
    ("policy.end_padding=zero", "policy.end_padding", "one of 'last', 'hold'"),
    ("diffusion.inference_steps=200", "diffusion.inference_steps", "train_steps=100"),
    ("diffusion.groups=3", "diffusion.groups", "divide every width"),
    ("diffusion.ema_decay=nan", "diffusion.ema_decay", "finite number"),
    ("pretrain.actor_lr=nan", "pretrain.actor_lr", "finite number"),
    ("policy.min_log_std=-inf", "policy.min_log_std", "finite number"),
    ("policy.obs_ignore=agent/qvel", "policy.obs_ignore", "expected a list of strings"),
    ("policy.hidden=3", "policy.hidden", "expected a list of integers"),
    ("eval.ignore_terminations=maybe", "eval.ignore_terminations", "true or false"),
    ("finetune.offline_ratio=1.5", "finetune.offline_ratio", "in [0, 1]"),
    ("finetune.offline_ratio=-0.1", "finetune.offline_ratio", "in [0, 1]"),
    ("finetune.offline_ratio=nan", "finetune.offline_ratio", "finite number"),
    ("finetune.bc_coef=-1", "finetune.bc_coef", "must be >= 0"),
    ("finetune.bc_coef=inf", "finetune.bc_coef", "finite number"),
    ("finetune.bc_decay=0", "finetune.bc_decay", "in (0, 1]"),
    ("finetune.bc_decay=1.5", "finetune.bc_decay", "in (0, 1]"),
    ("finetune.bc_decay=nan", "finetune.bc_decay", "finite number"),
    ("finetune.bc_q_filter=true", "finetune.bc_q_filter", "needs update sac and bc_coef > 0"),
    ("finetune.bc_q_filter=maybe", "finetune.bc_q_filter", "true or false"),
    ("finetune.bc_dataset=start", "finetune.bc_dataset", "needs bc_coef > 0"),
    ("finetune.sac_actor_every=0", "finetune.sac_actor_every", ">= 1"),
    ("finetune.n_step=0", "finetune.n_step", ">= 1"),
    ("finetune.sac_value_range=[0,nan]", "finetune.sac_value_range[1]", "finite number"),
    ("finetune.n_step=2.5", "finetune.n_step", "integer"),
    ("finetune.n_step=3", "finetune.n_step", "update sac only"),
    ("finetune.sac_actor_every=1.5", "finetune.sac_actor_every", "integer"),
    ("finetune.updates_per_round=0", "finetune.updates_per_round", "must be >= 1"),
    ("finetune.batch_size=-4", "finetune.batch_size", "must be >= 1"),
    ("finetune.replay_size=0", "finetune.replay_size", "must be >= 1"),
    ("finetune.mc_horizon=0", "finetune.mc_horizon", "or null"),
    ("finetune.replay=maybe", "finetune.replay", "true or false"),
    ("finetune.mc_common_noise=maybe", "finetune.mc_common_noise", "true or false"),
    ("finetune.mc_v_actions=maybe", "finetune.mc_v_actions", "true or false"),
    ("finetune.overlap=maybe", "finetune.overlap", "true or false"),
    ("finetune.overlap=true", "finetune.overlap", "set finetune.replay=true"),
    ("finetune.learner_threads=-1", "finetune.learner_threads", "must be >= 0"),
    ("finetune.learner_threads=1.5", "finetune.learner_threads", "expected an integer"),
])
def test_errors_name_the_key_path(override, path, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.path == path
    assert f"'{path}'" in str(e.value) and words in str(e.value)
    assert "\n" not in str(e.value)


def test_common_rerollout_noise_needs_a_gaussian_policy():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["finetune.mc_common_noise=true", "finetune.rerollout_policy=expert"])
    assert e.value.path == "finetune.mc_common_noise" and "not the scripted expert" in str(e.value)
    assert load_config(None, ["finetune.mc_common_noise=true"]).finetune.mc_common_noise is True


def test_learning_from_v_first_actions_needs_the_current_policy():
    for policy in ("expert", "checkpoint"):
        with pytest.raises(ConfigError) as e:
            load_config(None, ["finetune.mc_v_actions=true", f"finetune.rerollout_policy={policy}",
                               "finetune.rerollout_checkpoint=somewhere"])
        assert e.value.path == "finetune.mc_v_actions" and f"got '{policy}'" in str(e.value)
    assert load_config(None, ["finetune.mc_v_actions=true"]).finetune.mc_v_actions is True


def test_obs_ignore_is_for_the_gaussian_mlp_only():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["policy.kind=mlp_chunk", "policy.obs_ignore=[agent/qvel]"])
    assert e.value.path == "policy.obs_ignore" and "mlp only" in str(e.value)
    assert load_config(None, ["policy.obs_ignore=[agent/qvel, '0:2']"]).policy.obs_ignore == ("agent/qvel", "0:2")


def test_diffusion_needs_a_pred_horizon_the_unet_can_halve():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["policy.kind=diffusion", "policy.pred_horizon=10", "policy.action_horizon=4"])
    assert e.value.path == "policy.pred_horizon" and "divisible by 4" in str(e.value)
    load_config(None, ["policy.kind=mlp_chunk", "policy.pred_horizon=10", "policy.action_horizon=4"])


def test_override_into_value_is_refused():
    with pytest.raises(ConfigError, match="env.id"):
        apply_overrides({}, ["env.id=x", "env.id.sub=1"])


def test_file_errors(tmp_path):
    with pytest.raises(OffrlError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("env: [unclosed\n")
    with pytest.raises(OffrlError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(OffrlError, match="mapping"):
        load_config(lst)


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(None, ["env.num_envs=7", "policy.hidden=[16]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["policy"]["hidden"] == [16]
    assert from_dict(to_dict(cfg)) == cfg


def test_every_key_is_documented():
    keys = list(iter_keys())
    assert len(keys) > 20
    for key, tp, default, help_ in keys:
        assert help_, f"config key {key} has no help text"


@pytest.mark.parametrize("overrides, path, words", [
    (["finetune.replay=true"], "finetune.replay", "needs advantage iql or sarsa"),
    (["finetune.replay=true", "finetune.advantage=iql", "finetune.update=ppo"], "finetune.replay", "awr, push_away, recap or sac"),
    (["finetune.advantage=mc", "finetune.mc_samples=1"], "finetune.mc_samples", "mc_samples >= 2"),
    (["finetune.update=sac"], "finetune.update", "set finetune.replay=true"),
    (["finetune.update=sac", "finetune.replay=true", "finetune.sac_subset=11"], "finetune.sac_subset", "[1, sac_ensemble=10]"),
    (["finetune.update=sac", "finetune.replay=true", "finetune.sac_init_alpha=0"], "finetune.sac_init_alpha", "> 0"),
    (["finetune.update=sac", "finetune.replay=true", "finetune.sac_critic_bins=1"], "finetune.sac_critic_bins", ">= 2"),
    (["finetune.update=sac", "finetune.replay=true", "finetune.sac_critic_bins=-3"], "finetune.sac_critic_bins", ">= 2"),
    (["finetune.update=sac", "finetune.replay=true", "finetune.sac_value_range=[1,1]"], "finetune.sac_value_range",
     "low < high"),
    (["finetune.update=sac", "finetune.replay=true", "finetune.sac_value_range=[0]"], "finetune.sac_value_range",
     "[low, high]"),
    (["finetune.update=sac", "finetune.replay=true", "finetune.sac_hl_sigma=0"], "finetune.sac_hl_sigma", "> 0"),
])
def test_finetune_combinations_that_cannot_work_are_refused(overrides, path, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.path == path and words in str(e.value)
    # a deterministic re-rollout policy needs one sample only
    load_config(None, ["finetune.advantage=mc", "finetune.mc_samples=1", "finetune.rerollout_policy=expert"])


def test_every_shipped_config_loads():
    from pathlib import Path

    from offrl.config import read_yaml
    from offrl.platform.sweep import _spec_from_dict, parse_axes

    paths = sorted((Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:  # every value valid (input files are made by the commands in each file's header)
        data = read_yaml(path)
        raw = data.pop("sweep", None)
        from_dict(data)
        if raw is not None:
            parse_axes(raw.pop("axes", None))
            _spec_from_dict(raw)
