"""Imitation on real ManiSkill and real Ray: reward-free BC, sequence policies in SimHosts, their state
resets, Diffusion Policy pretraining with exact resume, and the evaluation protocol."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli
from offrl.config import load_config
from offrl.platform.pretrain import run_pretrain_job

TINY_DP = ["policy.kind=diffusion", "diffusion.widths=[16,32]", "diffusion.step_embed_dim=8", "diffusion.groups=4",
           "diffusion.kernel_size=3", "policy.pred_horizon=8", "policy.action_horizon=4",
           "diffusion.lr_warmup_steps=2"]


@pytest.fixture(scope="module")
def reward_free_dataset(expert_dataset, tmp_path_factory):
    """5 expert episodes re-recorded by ManiSkill's replay_trajectory without --record-rewards (as its demo
    files come): success flags, no rewards."""
    from offrl.data.dataset import OfflineDataset

    d = tmp_path_factory.mktemp("norew")
    src = OfflineDataset.load(expert_dataset).subset(range(5)).save(d / "demo.h5")
    r = subprocess.run([sys.executable, "-m", "mani_skill.trajectory.replay_trajectory", "--traj-path", str(src),
                        "-o", "state", "--use-env-states", "--save-traj"], cwd=str(d), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = d / "demo.state.pd_ee_delta_pos.physx_cpu.h5"
    ds = OfflineDataset.load(out)
    assert ds.reward_keys == [] and ds.success is not None
    return out


def _cfg(tmp_path, dataset, *extra):
    return load_config(None, [f"pretrain.dataset={dataset}", f"run.root={tmp_path}", "run.experiment=im",
                              "run.progress=false", "run.tensorboard=false", "pretrain.epochs=2",
                              "pretrain.steps_per_epoch=5", "pretrain.batch_size=32", "pretrain.eval_episodes=2",
                              "pretrain.checkpoint_every=1", "env.num_envs=2", "cluster.num_hosts=1",
                              "policy.hidden=[32,32]", "critic.hidden=[32,32]", *extra])


def test_bc_trains_on_a_dataset_without_rewards(tmp_path, reward_free_dataset, ray_cluster):
    run = run_pretrain_job(_cfg(tmp_path, reward_free_dataset, "pretrain.algo=bc", "run.trial=bc"),
                           log=lambda *a: None)
    assert json.loads((run / "eval.json").read_text())["episodes"] == 2
    # critics need a reward: the error names the fix; the success flags are one
    from offrl.errors import OffrlError

    with pytest.raises(OffrlError, match="pretrain.reward=success") as e:
        run_pretrain_job(_cfg(tmp_path, reward_free_dataset, "pretrain.algo=bc+iql", "run.trial=iql"),
                         log=lambda *a: None)
    assert "--record-rewards" in str(e.value) and "\n" not in str(e.value)
    run = run_pretrain_job(_cfg(tmp_path, reward_free_dataset, "pretrain.algo=bc+iql", "pretrain.reward=success",
                                "run.trial=iql_success"), log=lambda *a: None)
    assert (run / "checkpoints" / "2" / "model.safetensors").exists()


@pytest.mark.parametrize("kind", ["mlp", "mlp_chunk"])
def test_mlp_evaluates_the_best_validation_checkpoint_and_says_so(tmp_path, expert_dataset, ray_cluster, kind):
    run = run_pretrain_job(_cfg(tmp_path, expert_dataset, "pretrain.algo=bc", f"policy.kind={kind}",
                                "run.trial=" + kind, "pretrain.epochs=3"), log=lambda *a: None)
    ev = json.loads((run / "eval.json").read_text())
    best = next((run / "checkpoints" / "best").iterdir())
    assert ev["evaluated"].startswith(f"best (epoch {best.name}") and ev["checkpoint"] == str(best)
    last = run_pretrain_job(_cfg(tmp_path, expert_dataset, "pretrain.algo=bc", f"policy.kind={kind}",
                                 "run.trial=" + kind + "_last", "pretrain.epochs=3", "pretrain.select=last"),
                            log=lambda *a: None)
    assert json.loads((last / "eval.json").read_text())["evaluated"] == "last (epoch 3)"


def test_diffusion_pretrain_resumes_exactly_and_evaluates(tmp_path, expert_dataset, ray_cluster):
    straight = run_pretrain_job(_cfg(tmp_path, expert_dataset, *TINY_DP, "run.trial=straight",
                                     "pretrain.epochs=3"), log=lambda *a: None)

    class Interrupted(Exception):
        pass

    def stop_after_first_epoch(epoch, row, saved):
        if epoch == 1:
            raise Interrupted  # as if killed right after the epoch-1 checkpoint

    with pytest.raises(Interrupted):  # the same config (the cosine schedule spans all 3 epochs), cut short
        run_pretrain_job(_cfg(tmp_path, expert_dataset, *TINY_DP, "run.trial=cut", "pretrain.epochs=3"),
                         log=lambda *a: None, reporter=stop_after_first_epoch)
    cut = run_pretrain_job(_cfg(tmp_path, expert_dataset, *TINY_DP, "run.trial=cut", "pretrain.epochs=3"),
                           resume=True, log=lambda *a: None)
    a = load_file(str(straight / "checkpoints" / "3" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "3" / "model.safetensors"))
    assert {k.split(".")[0] for k in a} == {"actor", "actor_train"}  # the EMA is the actor
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    norm = load_file(str(straight / "checkpoints" / "3" / "normalizer.safetensors"))
    assert {"actor.normalizer.act_min", "actor.normalizer.act_max", "actor.normalizer.obs_mean"} <= set(norm)
    ev = json.loads((straight / "eval.json").read_text())
    assert ev["evaluated"] == "last (epoch 3)" and ev["episodes"] == 2
    # offrl eval loads it unchanged and says which protocol it used; the sampler and the executed horizon
    # may be switched at eval
    r = run_cli("eval", str(straight), "--episodes", "2", "cluster.num_cpus=1", "cluster.num_hosts=1",
                "eval.ignore_terminations=true", "env.max_episode_steps=20", "diffusion.scheduler=ddpm",
                "diffusion.inference_steps=20", "policy.action_horizon=2", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "terminations ignored" in r.stdout and "max_episode_steps=20" in r.stdout
    assert "sampling with ddpm x 20 steps (trained with ddim x" in r.stdout
    assert "executing 2 actions per replanning (trained with Ta=4)" in r.stdout
    ev = json.loads((straight / "eval.json").read_text())
    assert ev["policy"] == "diffusion" and [e["length"] for e in ev["per_episode"]] == [20, 20]
    assert ev["sampler"] == {"scheduler": "ddpm", "inference_steps": 20}
    assert ev["acting"] == {"action_horizon": 2}
    # a horizon the checkpoint's Tp and To cannot hold: one line naming the key, before Ray starts
    r = run_cli("eval", str(straight), "policy.action_horizon=8", timeout=120)
    assert r.returncode == 2 and "policy.action_horizon" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a diffusion policy cannot start PPO/AWR finetuning: one clear error
    r = run_cli("finetune", "tune_configs/finetune.yaml", f"finetune.checkpoint={straight}",
                f"run.root={tmp_path}", timeout=120)
    assert r.returncode == 2 and "policy.kind=mlp" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _sequence_spec(kind="mlp_chunk", To=2, Tp=6, Ta=3, seed=0):
    from offrl.algos.networks import build_actor, numpy_state_dict

    torch.manual_seed(seed)
    arch = {"kind": kind, "obs_dim": 42, "act_dim": 4, "obs_horizon": To, "pred_horizon": Tp, "action_horizon": Ta}
    if kind == "mlp_chunk":
        arch["hidden"] = [16]
    else:
        arch.update(widths=[8, 16], step_embed_dim=8, groups=4, kernel_size=3)
    return {"kind": kind, "arch": arch, "weights": numpy_state_dict(build_actor(arch))}


def test_sequence_policy_state_resets_on_auto_reset_and_restore():
    from offrl.envs.maniskill import ManiSkillCPUSim
    from offrl.platform.rollout import build_policy

    sim = ManiSkillCPUSim(num_envs=2, max_episode_steps=5)
    try:
        obs = sim.reset(seed=3)
        pol = build_policy(_sequence_spec(Ta=3), sim, seed=0)
        seen = []
        for t in range(5):
            pol(obs, sim)
            seen.append(obs.copy())
            if t == 0:  # a fresh episode: the history is the first observation repeated
                np.testing.assert_array_equal(pol.hist, np.repeat(obs[:, None], 2, axis=1))
            else:
                np.testing.assert_array_equal(pol.hist[:, 0], seen[-2])
                np.testing.assert_array_equal(pol.hist[:, 1], obs)
            obs, _, _, trunc, _ = sim.step(np.zeros((2, 4), np.float32))
        assert trunc.all() and pol.replans == 2  # steps 0 and 3 (Ta = 3)
        # auto-reset after step 5: both envs start afresh at the next call, replanning at once
        assert (sim.elapsed_steps == 0).all()
        left_before = pol.left.copy()
        assert (left_before == 1).all()  # without the reset the queue would still hold one action
        pol(obs, sim)
        assert pol.replans == 3 and (pol.left == 2).all()
        np.testing.assert_array_equal(pol.hist, np.repeat(obs[:, None], 2, axis=1))
        # a restore: env 1 goes back to a saved mid-episode state; only it starts afresh
        state = sim.get_state([0])
        move = np.full((2, 4), 0.5, np.float32)  # so consecutive observations differ
        obs_a, *_ = sim.step(move)
        pol(obs_a, sim)
        sim.step(move)
        restored = sim.set_state(state, [1])
        pol.on_restore(sim, [1])
        obs = sim._obs.copy()
        np.testing.assert_array_equal(obs[1], restored[0])
        before = pol.replans
        pol(obs, sim)
        assert pol.replans == before + 1 and pol.left[1] == 2 and pol.left[0] == 0  # only env 1 replanned
        np.testing.assert_array_equal(pol.hist[1], np.repeat(obs[1:2], 2, axis=0))
        np.testing.assert_array_equal(pol.hist[0], np.stack([obs_a[0], obs[0]]))  # env 0 kept its history
    finally:
        sim.close()


def test_rerollouts_reset_a_sequence_policy_after_each_restore():
    from offrl.envs.maniskill import ManiSkillCPUSim
    from offrl.platform.rerollout import rerollout_on_sim
    from offrl.platform.rollout import build_policy

    sim = ManiSkillCPUSim(num_envs=2, max_episode_steps=20)
    try:
        sim.reset(seed=1)
        for _ in range(3):
            sim.step(np.zeros((2, 4), np.float32))
        states = sim.get_state()
        pol = build_policy(_sequence_spec(Ta=3), sim, seed=0)
        calls = []
        orig = pol.on_restore
        pol.on_restore = lambda s, ids: (calls.append(list(ids)), orig(s, ids))
        q, steps = rerollout_on_sim(sim, pol, states, None, samples=2, horizon=4, gamma=0.9)
        assert q.shape == (2, 2) and steps == 2 * 2 * 4
        assert calls == [[0, 1], [0, 1]]  # 4 jobs on 2 envs: two restores, each followed by a reset
        # the same re-rollouts again give the same returns (restores are bit-identical, the policy state is reset)
        pol2 = build_policy(_sequence_spec(Ta=3), sim, seed=0)
        q2, _ = rerollout_on_sim(sim, pol2, states, None, samples=2, horizon=4, gamma=0.9)
        np.testing.assert_allclose(q, q2)
    finally:
        sim.close()


def test_evaluation_with_one_and_two_actors_gives_identical_per_seed_results(ray_cluster):
    from offrl.platform.evaluate import evaluate
    from offrl.platform.simhost import SimHostPool

    cfg = load_config(None, ["env.num_envs=2", "env.max_episode_steps=12"])
    spec = _sequence_spec(kind="diffusion", To=2, Tp=8, Ta=4)
    rows = {}
    for hosts in (1, 2):
        pool = SimHostPool(cfg.env, load_config(None, [f"cluster.num_hosts={hosts}"]).cluster)
        try:
            s = evaluate(pool, spec, 4, seed=500, ignore_terminations=True)
        finally:
            pool.shutdown()
        rows[hosts] = s["per_episode"]
    assert [e["seed"] for e in rows[1]] == [500, 501, 502, 503]
    assert rows[1] == rows[2]
    assert all(e["length"] == 12 for e in rows[1])  # terminations ignored: the full horizon


def test_ignore_terminations_runs_the_full_horizon():
    from offrl.envs.maniskill import ManiSkillCPUSim
    from offrl.envs.experts import make_expert

    sim = ManiSkillCPUSim(num_envs=1, max_episode_steps=60)
    try:
        for ignore, expect_len in ((False, None), (True, 60)):
            sim.ignore_terminations = ignore
            obs = sim.reset(seed=0)
            expert = make_expert("pickcube", sim)
            succ_once, length = False, 0
            for _ in range(60):
                obs, _, term, trunc, info = sim.step(expert(obs, sim)[0])
                length += 1
                succ_once |= bool(info["success"][0])
                if info["done"][0]:
                    break
            assert succ_once
            if expect_len is None:
                assert term[0] and length < 60  # success ends the episode
            else:
                assert not term[0] and trunc[0] and length == expect_len
    finally:
        sim.close()


def test_pretrain_diffusion_config_runs_as_written(tmp_path, expert_dataset):
    """tune_configs/pretrain_diffusion.yaml with only the data, budget and output changed."""
    r = run_cli("pretrain", "tune_configs/pretrain_diffusion.yaml", f"pretrain.dataset={expert_dataset}",
                "pretrain.epochs=1", "pretrain.steps_per_epoch=2", "pretrain.eval_episodes=1", "env.num_envs=1",
                "cluster.num_cpus=1", "cluster.num_hosts=1", f"run.root={tmp_path}", "run.trial=t",
                "run.progress=false", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads((tmp_path / "pretrain_diffusion" / "t" / "eval.json").read_text())
    assert ev["policy"] == "diffusion"
    assert "terminations ignored" in ev["protocol"]


@pytest.mark.parametrize("override, words", [
    ("policy.action_horizon=17", "exceeds pred_horizon"),
    ("policy.obs_horizon=0", "must be >= 1"),
    ("diffusion.scheduler=euler", "one of 'ddim', 'ddpm'"),
    ("diffusion.ema_decay=.nan", "finite"),
    ("pretrain.algo=bc+iql", "pretrain.algo=bc only"),
])
def test_cli_refuses_bad_sequence_settings_in_one_line(tmp_path, expert_dataset, override, words):
    r = run_cli("pretrain", "tune_configs/pretrain_diffusion.yaml", f"pretrain.dataset={expert_dataset}",
                f"run.root={tmp_path}", override, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "pretrain_diffusion").exists()  # nothing half-written
