"""Online finetuning: all 12 (advantage x update) combinations on CPU PickCube-v1 from a pretrained checkpoint."""

import csv
import itertools
import json

import numpy as np
import pytest

from offrl.config import load_config
from offrl.errors import OffrlError
from offrl.platform.finetune import run_finetune_job
from offrl.platform.pretrain import run_pretrain_job


@pytest.fixture(scope="module")
def bc_iql_checkpoint(tmp_path_factory, expert_dataset, ray_cluster):
    root = tmp_path_factory.mktemp("pre")
    cfg = load_config(None, [f"pretrain.dataset={expert_dataset}", "pretrain.algo=bc+iql", f"run.root={root}",
                             "run.progress=false", "run.tensorboard=false", "pretrain.epochs=2",
                             "pretrain.steps_per_epoch=20", "pretrain.eval_episodes=1", "env.num_envs=1",
                             "cluster.num_hosts=1", "policy.hidden=[64,64]", "critic.hidden=[64,64]"])
    return run_pretrain_job(cfg, log=lambda *a: None)


def _cfg(tmp_path, ckpt, adv, upd, *extra):
    return load_config(None, [f"finetune.checkpoint={ckpt}", f"finetune.advantage={adv}", f"finetune.update={upd}",
                              f"run.root={tmp_path}", f"run.experiment={adv}_{upd}", "run.progress=false",
                              "run.tensorboard=false", "finetune.iterations=2", "finetune.steps_per_iter=8",
                              "finetune.eval_every=2", "finetune.eval_episodes=2", "finetune.mc_samples=1",
                              "finetune.mc_horizon=4", "finetune.mc_fraction=0.25", "finetune.value_warmup_iters=1",
                              "env.num_envs=2", "cluster.num_hosts=2", *extra])


COMBOS = list(itertools.product(["gae", "mc", "iql", "sarsa"], ["ppo", "awr", "push_away"]))


@pytest.mark.parametrize("adv, upd", COMBOS, ids=[f"{a}-{u}" for a, u in COMBOS])
def test_every_combination_runs_and_writes_metrics(tmp_path, bc_iql_checkpoint, adv, upd, ray_cluster):
    run = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, adv, upd), log=lambda *a: None)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows] == ["0", "32", "64"]  # 2 rounds x 8 steps x 4 envs
    last = rows[-1]
    for key in ("eval/success_rate", "eval/success_once", "charts/advantage_mean", "charts/advantage_std",
                "charts/pos_ratio", "losses/policy_loss", "losses/approx_kl", "time/env_sps"):
        assert last[key] != "" and np.isfinite(float(last[key])), key
    if upd == "ppo":
        assert last["losses/clipfrac"] != ""
    if adv == "gae":
        assert last["losses/value_loss"] != ""
    if adv == "mc":
        assert float(last["time/rerollout_sps"]) > 0
        assert float(last["charts/advantage_samples"]) == 8  # 25% of 32
    summary = json.loads((run / "finetune_summary.json").read_text())
    assert summary["advantage"] == adv and summary["update"] == upd and summary["env_steps"] == 64
    assert (run / "checkpoints" / "64" / "model.safetensors").exists()


def test_iql_needs_critics(tmp_path, expert_dataset, ray_cluster):
    bc = run_pretrain_job(load_config(None, [f"pretrain.dataset={expert_dataset}", "pretrain.algo=bc",
                                             f"run.root={tmp_path}", "run.progress=false", "pretrain.epochs=1",
                                             "pretrain.steps_per_epoch=2", "pretrain.eval_episodes=1",
                                             "env.num_envs=1", "cluster.num_hosts=1"]), log=lambda *a: None)
    with pytest.raises(OffrlError, match="needs critics"):
        run_finetune_job(_cfg(tmp_path, bc, "iql", "awr"), log=lambda *a: None)
    with pytest.raises(OffrlError, match="finetune.checkpoint is empty"):
        run_finetune_job(load_config(None, []), log=lambda *a: None)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, bc_iql_checkpoint, ray_cluster):
    # unclipped exp(A / beta) with a tiny temperature overflows to inf within the first update
    cfg = _cfg(tmp_path, bc_iql_checkpoint, "iql", "awr", "finetune.normalize_advantage=false",
               "finetune.beta=1e-9", "finetune.max_weight=.inf", "finetune.iterations=3")
    with pytest.raises(OffrlError, match="loss became"):
        run_finetune_job(cfg, log=lambda *a: None)
    runs = list((tmp_path / "iql_awr").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "0" / "model.safetensors").exists()
