"""Offline pretraining and evaluation jobs on a real collected dataset, real Ray and real ManiSkill."""

import csv
import json

import pytest
import yaml
import torch
from safetensors.torch import load_file

from offrl.config import load_config
from offrl.platform.pretrain import run_pretrain_job
from conftest import run_cli


def _cfg(tmp_path, dataset, algo, *extra):
    return load_config(None, [f"pretrain.dataset={dataset}", f"pretrain.algo={algo}", f"run.root={tmp_path}",
                              "run.experiment=pt", "run.progress=false", "run.tensorboard=false",
                              "pretrain.epochs=5", "pretrain.steps_per_epoch=25", "pretrain.batch_size=64",
                              "pretrain.eval_episodes=2", "pretrain.checkpoint_every=1", "env.num_envs=1",
                              "cluster.num_hosts=1", "policy.hidden=[64,64]", "critic.hidden=[64,64]",
                              "pretrain.actor_lr=1e-3", "pretrain.critic_lr=1e-3", *extra])


def _rows(run):
    return list(csv.DictReader(open(run / "metrics.csv")))


@pytest.mark.parametrize("algo, loss_key", [
    ("bc", "train/actor_loss"),
    ("critic_mc", "train/v_loss"),
    ("iql", "train/q_loss"),
    ("sarsa", "train/v_loss"),
    ("bc+iql", "val/actor_loss"),
])
def test_each_algorithm_trains_and_its_loss_decreases(tmp_path, expert_dataset, algo, loss_key, ray_cluster):
    run = run_pretrain_job(_cfg(tmp_path, expert_dataset, algo), log=lambda *a: None)
    rows = _rows(run)
    assert len(rows) == 5
    first, last = float(rows[0][loss_key]), float(rows[-1][loss_key])
    assert last < first, (algo, first, last)
    assert (run / "checkpoints" / "5" / "model.safetensors").exists()
    assert list((run / "checkpoints" / "best").iterdir())
    parts = {k.split(".")[0] for k in load_file(str(run / "checkpoints" / "5" / "model.safetensors"))}
    assert parts == {"bc": {"actor"}, "critic_mc": {"critics"}}.get(algo, {"actor", "critics"})
    if "critic" in algo or "iql" in algo or "sarsa" in algo:
        assert "val/td_error" in rows[-1] and rows[-1]["val/q_mean"] != ""
    if algo != "critic_mc":  # a policy was trained: it was evaluated in simulation
        ev = json.loads((run / "eval.json").read_text())
        assert ev["episodes"] == 2 and 0.0 <= ev["success_at_end"]["mean"] <= 1.0
        assert rows[-1]["eval/success_rate"] != ""


def test_distributional_mc_critics_train_by_cross_entropy(tmp_path, expert_dataset, ray_cluster):
    """critic_mc with critic.distributional: V and Q are categoricals over 21 returns; the cross-entropy falls
    and the saved critics rebuild from the run's config with their means inside the support."""
    from offrl.algos.critics import build_critics
    from offrl.config import from_dict
    from offrl.platform.checkpoint import load_checkpoint

    run = run_pretrain_job(_cfg(tmp_path, expert_dataset, "critic_mc",
                                "critic.distributional={bins: 21, v_min: 0.0, v_max: 10.0}"), log=lambda *a: None)
    rows = _rows(run)
    assert float(rows[-1]["train/v_loss"]) < float(rows[0]["train/v_loss"])
    ck = run / "checkpoints" / "5"
    saved = from_dict(json.loads((ck / "config.json").read_text()))
    critics = build_critics(saved.critic, 42, 4)
    load_checkpoint(ck, {"critics": critics}, parts=["critics"], restore_rng=False)
    assert critics.v.net[-1].out_features == 21
    obs = torch.randn(16, 42)
    v = critics.v(obs)
    assert v.shape == (16,) and bool(((v >= 0) & (v <= 10)).all())


def test_resume_continues_exactly(tmp_path, expert_dataset, ray_cluster):
    straight = run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc+iql", "run.trial=straight",
                                     "pretrain.epochs=4"), log=lambda *a: None)
    run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc+iql", "run.trial=cut", "pretrain.epochs=2"),
                     log=lambda *a: None)
    lines = []
    cut = run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc+iql", "run.trial=cut", "pretrain.epochs=4"),
                           resume=True, log=lines.append)
    assert yaml.safe_load((cut / "config.yaml").read_text())["pretrain"]["epochs"] == 4
    assert "[offrl] --resume with changed keys (config.yaml updated): pretrain.epochs 2 -> 4" in lines
    a = load_file(str(straight / "checkpoints" / "4" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "4" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = _rows(straight), _rows(cut)
    assert [r["step"] for r in rb] == ["1", "2", "3", "4"]
    assert ra[-1]["train/q_loss"] == rb[-1]["train/q_loss"]


def test_init_from_loads_the_actor_only(tmp_path, expert_dataset, ray_cluster):
    bc = run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc", "run.trial=bc", "pretrain.epochs=1"),
                          log=lambda *a: None)
    # zero learning rate: whatever was loaded is what gets saved
    run = run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc+iql", "run.trial=init", "pretrain.epochs=1",
                                "pretrain.actor_lr=1e-12"), init_from=str(bc), init_parts=["actor"],
                           log=lambda *a: None)
    a = load_file(str(bc / "checkpoints" / "1" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "1" / "model.safetensors"))
    w = "actor.net.0.weight"
    assert torch.allclose(a[w], b[w], atol=1e-6)


def test_init_from_an_ema_sequence_policy_trains_on_from_it(tmp_path, expert_dataset, ray_cluster):
    """The loaded policy sits in the EMA copy; training must carry on from it, not from this run's random
    initialisation (which the EMA would copy back over it at the first step)."""
    seq = ("policy.kind=mlp_chunk", "pretrain.epochs=1", "pretrain.eval_episodes=1")
    src = run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc", "run.trial=src", *seq), log=lambda *a: None)
    run = run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc", "run.trial=init", *seq, "seed=7",
                                "pretrain.actor_lr=1e-12"), init_from=str(src), init_parts=["actor"],
                           log=lambda *a: None)
    a = load_file(str(src / "checkpoints" / "1" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "1" / "model.safetensors"))
    for k in (k for k in a if k.startswith("actor.")):  # the evaluated policy, normaliser included
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    for k in (k for k in b if k.startswith("actor_train.")):  # training went on from the loaded weights
        assert torch.allclose(b[k], a["actor." + k[len("actor_train."):]], atol=1e-6), k
    first = float(_rows(run)[0]["train/actor_loss"])
    assert abs(first - float(_rows(src)[-1]["train/actor_loss"])) < 0.5 * float(_rows(src)[0]["train/actor_loss"])


def test_eval_cli_on_a_bc_policy(tmp_path, expert_dataset, ray_cluster):
    run = run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc", "run.trial=e"), log=lambda *a: None)
    r = run_cli("eval", str(run), "--episodes", "3", "cluster.num_cpus=1", "cluster.num_hosts=1", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads((run / "eval.json").read_text())
    assert ev["episodes"] == 3 and [e["seed"] for e in ev["per_episode"]] == [ev["seed"] + j for j in range(3)]
    for k in ("success_once", "success_at_end", "return", "length"):
        lo, hi = ev[k]["ci95"]
        assert lo <= ev[k]["mean"] <= hi
    assert ev["checkpoint"].endswith("checkpoints/5")


def test_pretrain_cli_errors(tmp_path):
    r = run_cli("pretrain", "tune_configs/rollout.yaml", f"pretrain.dataset={tmp_path}/none.h5")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "none.h5" in r.stderr
    r = run_cli("pretrain", "tune_configs/rollout.yaml", "pretrain.algo=ppo")
    assert r.returncode == 2 and "pretrain.algo" in r.stderr
    r = run_cli("eval", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


def test_critic_targets_carry_the_success_bonus(tmp_path, expert_dataset):
    """normalized_dense data: the auto bonus (1 - 0.8^50) / 0.2 lands on each episode's successful last step."""
    from offrl.data.dataset import OfflineDataset
    from offrl.platform.pretrain import success_bonus, training_tensors

    ds = OfflineDataset.load(expert_dataset)
    assert ds.reward_mode == "normalized_dense"
    auto = success_bonus(_cfg(tmp_path, expert_dataset, "iql"), ds)
    assert auto == pytest.approx((1 - 0.8 ** 50) / 0.2)
    assert success_bonus(_cfg(tmp_path, expert_dataset, "iql", "pretrain.reward=sparse"), ds) == 0.0
    assert success_bonus(_cfg(tmp_path, expert_dataset, "iql", "pretrain.success_bonus=0"), ds) == 0.0
    plain, shaped = training_tensors(ds, 0.8, "rewards"), training_tensors(ds, 0.8, "rewards", auto)
    diff = shaped["rewards"] - plain["rewards"]
    last = ds.transitions()["last"]
    torch.testing.assert_close(diff[last], torch.full((int(last.sum()),), auto))  # every expert episode succeeds
    assert bool((diff[~last] == 0).all())
    # the MC return of the first step sees the bonus discounted over the episode
    first = ds.transitions()["step"] == 0
    torch.testing.assert_close((shaped["mc_return"] - plain["mc_return"])[first],
                               torch.tensor(auto * 0.8 ** (ds.lengths - 1.0), dtype=torch.float32), rtol=1e-4, atol=1e-4)


def test_critic_dataset_trains_the_critics_apart_and_records_provenance(tmp_path, expert_dataset, ray_cluster):
    """pretrain.critic_dataset: the critics learn from clean + noisy + failed episodes while the actor's
    data, order and weights are exactly those of BC on the clean demos alone; state.json says which data
    each part saw."""
    from offrl.config import load_config as lc
    from offrl.data.collect import collect
    from offrl.data.dataset import OfflineDataset

    noisy = tmp_path / "noisy.h5"
    collect(lc(None, ["collect.episodes=6", "collect.action_noise=0.5", "collect.keep_failures=true",
                      f"collect.output={noisy}", "run.progress=false", "env.num_envs=2", "seed=3"]), progress=False)
    merged = tmp_path / "critic_data.h5"
    OfflineDataset.merge([OfflineDataset.load(expert_dataset), OfflineDataset.load(noisy)]).save(merged)
    n_fail = int((~OfflineDataset.load(noisy).success).sum())

    bc = run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc", "run.trial=bc", "pretrain.epochs=2"),
                          log=lambda *a: None)
    lines = []
    run = run_pretrain_job(_cfg(tmp_path, expert_dataset, "bc+iql", "run.trial=split", "pretrain.epochs=2",
                                f"pretrain.critic_dataset={merged}"), log=lines.append)
    assert any("critics on" in ln and "critic_data.h5" in ln for ln in lines), lines
    a = load_file(str(bc / "checkpoints" / "2" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "2" / "model.safetensors"))
    for k in a:  # the actor never saw the critic data, nor did its batch order change
        assert torch.equal(a[k], b[k]), k
    assert any(k.startswith("critics.") for k in b)

    state = json.loads((run / "checkpoints" / "2" / "training_state" / "state.json").read_text())
    prov = state["data"]
    assert prov["actor"]["sources"] == {"pickcube_20.h5": 20} and prov["actor"]["successful_episodes"] == 20
    assert prov["critics"]["sources"] == {"pickcube_20.h5": 20, "noisy.h5": 6}
    assert prov["critics"]["episodes"] == 26 and prov["critics"]["successful_episodes"] == 26 - n_fail
    assert prov["critics"]["train_episodes"] + prov["critics"]["val_episodes"] == 26
    assert prov["actor"]["train_episodes"] + prov["actor"]["val_episodes"] == 20
    rows = _rows(run)
    assert rows[-1]["val/td_error"] != "" and rows[-1]["val/actor_loss"] != ""

    # the critics' normalizer follows their own data, the actor's the clean demos
    na = load_file(str(bc / "checkpoints" / "2" / "normalizer.safetensors"))
    nb = load_file(str(run / "checkpoints" / "2" / "normalizer.safetensors"))
    assert torch.equal(na["actor.normalizer.mean"], nb["actor.normalizer.mean"])
    assert float(nb["actor.normalizer.count"]) < float(nb["critics.v.normalizer.count"])

    # a critic dataset of another task is refused with the reason; bc has no critics to give it to
    with pytest.raises(Exception, match="trains no critics"):
        _cfg(tmp_path, expert_dataset, "bc", f"pretrain.critic_dataset={merged}")
