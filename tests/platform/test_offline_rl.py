"""CQL / BRAC pretraining and the workflow curves on a real collected dataset, real Ray and real ManiSkill."""

import csv

import pytest
from safetensors.torch import load_file

from offrl import metrics as M
from offrl.config import load_config
from offrl.platform.pretrain import run_pretrain_job
from conftest import run_cli


def _cfg(tmp_path, dataset, algo, *extra):
    return load_config(None, [f"pretrain.dataset={dataset}", f"pretrain.algo={algo}", f"run.root={tmp_path}",
                              "run.experiment=orl", "run.progress=false", "run.tensorboard=false",
                              "pretrain.epochs=3", "pretrain.steps_per_epoch=10", "pretrain.batch_size=64",
                              "pretrain.eval_episodes=2", "pretrain.checkpoint_every=1", "env.num_envs=1",
                              "cluster.num_hosts=1", "policy.hidden=[32,32]", "critic.hidden=[32,32]",
                              "pretrain.cql_samples=2", "pretrain.behavior_steps=20", "pretrain.reward=success",
                              *extra])


def _rows(run):
    return list(csv.DictReader(open(run / "metrics.csv")))


WORKFLOW = [M.WF_DATASET_Q_TRAIN, M.WF_DATASET_Q_VAL, M.WF_POLICY_Q, M.WF_TD_ERROR_TRAIN, M.WF_TD_ERROR_VAL,
            M.WF_ACTION_MSE]


@pytest.mark.parametrize("algo, extra, special", [
    ("cql", ("critic.vib_size=4", "critic.dropout=0.1"), M.WF_CQL_REGULARIZER),
    ("brac", ("critic.dr3_weight=0.01", "critic.residual=true"), M.WF_BRAC_DIVERGENCE),
    ("bc+iql", ("critic.weight_decay=1e-4",), None),
])
def test_conservative_algos_log_the_workflow_curves_and_checkpoint_every_part(tmp_path, expert_dataset, algo, extra,
                                                                              special, ray_cluster):
    run = run_pretrain_job(_cfg(tmp_path, expert_dataset, algo, *extra), log=lambda *a: None)
    rows = _rows(run)
    assert len(rows) == 3
    for name in WORKFLOW + ([special] if special else []):
        assert all(r[name] != "" for r in rows), name
    assert float(rows[-1][M.WF_TD_ERROR_TRAIN]) >= 0 and float(rows[-1][M.WF_ACTION_MSE]) >= 0
    parts = {k.split(".")[0] for k in load_file(str(run / "checkpoints" / "3" / "model.safetensors"))}
    expected = {"actor", "critics"} | ({"temperatures"} if algo in ("cql", "brac") else set())
    assert parts == expected | ({"behavior"} if algo == "brac" else set())
    assert (run / "eval.json").exists()


def test_cql_and_brac_resume_exactly(tmp_path, expert_dataset, ray_cluster):
    for algo in ("cql", "brac"):
        straight = run_pretrain_job(_cfg(tmp_path, expert_dataset, algo, f"run.trial={algo}_straight"),
                                    log=lambda *a: None)
        run_pretrain_job(_cfg(tmp_path, expert_dataset, algo, f"run.trial={algo}_cut", "pretrain.epochs=2"),
                         log=lambda *a: None)
        cut = run_pretrain_job(_cfg(tmp_path, expert_dataset, algo, f"run.trial={algo}_cut"), resume=True,
                               log=lambda *a: None)
        a = load_file(str(straight / "checkpoints" / "3" / "model.safetensors"))
        b = load_file(str(cut / "checkpoints" / "3" / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), (algo, k)
        ra, rb = _rows(straight), _rows(cut)
        assert [r[M.WF_DATASET_Q_TRAIN] for r in ra] == [r[M.WF_DATASET_Q_TRAIN] for r in rb]


def test_brac_reads_its_behaviour_policy_from_a_bc_checkpoint(tmp_path, expert_dataset, ray_cluster):
    bc = run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc", "run.trial=bc"), log=lambda *a: None)
    lines = []
    run = run_pretrain_job(_cfg(tmp_path, expert_dataset, "brac", "run.trial=brac",
                                f"pretrain.behavior_checkpoint={bc / 'checkpoints' / '3'}"), log=lines.append)
    assert any("behaviour policy: the actor of" in str(x) for x in lines)
    a = load_file(str(bc / "checkpoints" / "3" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "3" / "model.safetensors"))
    for k in a:
        if k.startswith("actor."):
            assert (a[k] == b["behavior." + k[len("actor."):]]).all(), k


def test_finetune_starts_from_a_cql_checkpoint(tmp_path, expert_dataset, ray_cluster):
    run = run_pretrain_job(_cfg(tmp_path, expert_dataset, "cql", "run.trial=cql", "critic.vib_size=4"),
                           log=lambda *a: None)
    r = run_cli("finetune", f"finetune.checkpoint={run / 'checkpoints' / '3'}", "finetune.advantage=iql",
                "finetune.update=awr", "finetune.iterations=1", "finetune.steps_per_iter=8", "env.num_envs=2",
                "cluster.num_hosts=1", "eval.episodes=2", f"run.root={tmp_path}", "run.experiment=ft",
                "run.progress=false", "run.tensorboard=false", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cql_and_brac_bad_inputs_are_one_line(tmp_path, expert_dataset):
    r = run_cli("pretrain", f"pretrain.dataset={expert_dataset}", "pretrain.algo=cql", "critic.vibb=3",
                f"run.root={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "critic.vibb" in r.stderr
    r = run_cli("pretrain", f"pretrain.dataset={expert_dataset}", "pretrain.algo=brac",
                f"pretrain.behavior_checkpoint={tmp_path / 'nowhere'}", f"run.root={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nowhere" in r.stderr
    r = run_cli("pretrain", f"pretrain.dataset={expert_dataset}", "pretrain.algo=cql",
                f"pretrain.critic_dataset={expert_dataset}", f"run.root={tmp_path}")
    assert r.returncode == 2 and "critic_dataset" in r.stderr
    assert not any(tmp_path.iterdir())
