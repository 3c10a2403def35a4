"""Online finetuning: all 12 (advantage x update) combinations on CPU PickCube-v1 from a pretrained checkpoint."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch
import yaml

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
                              "finetune.eval_every=2", "finetune.eval_episodes=2", "finetune.mc_samples=2",
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
    # the learner's share of each round, inside the round's own time
    assert all(0 < float(r["time/update_seconds"]) < float(r["time/iteration_seconds"]) for r in rows[1:])
    if upd == "ppo":
        assert last["losses/clipfrac"] != ""
    if adv == "gae":
        assert last["losses/value_loss"] != ""
    if adv == "mc":
        assert float(last["time/rerollout_sps"]) > 0
        assert float(last["charts/advantage_samples"]) == 8  # 25% of 32
        assert float(last["charts/mc_reliability"]) <= 1 and float(last["charts/mc_noise_std"]) >= 0
    summary = json.loads((run / "finetune_summary.json").read_text())
    assert summary["advantage"] == adv and summary["update"] == upd and summary["env_steps"] == 64
    assert (run / "checkpoints" / "64" / "model.safetensors").exists()
    # checkpoints/best keeps the first policy with the highest eval/success_rate
    (best,) = list((run / "checkpoints" / "best").iterdir())
    rates = {int(r["step"]): float(r["eval/success_rate"]) for r in rows if r["eval/success_rate"] != ""}
    assert int(best.name) == min(s for s, v in rates.items() if v == max(rates.values()))


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
               "finetune.beta=1e-9", "finetune.max_weight=3e38", "finetune.iterations=3")  # ~ float32 max
    with pytest.raises(OffrlError, match="loss became"):
        run_finetune_job(cfg, log=lambda *a: None)
    runs = list((tmp_path / "iql_awr").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "0" / "model.safetensors").exists()


PATHS = [("iql", "awr", ["finetune.replay=true"]),
         ("sarsa", "push_away", ["finetune.replay=true", "finetune.bc_coef=0.1", "finetune.bc_dataset=start"]),
         ("gae", "ppo", ["finetune.bc_coef=0.5"]),
         ("gae", "sac", ["finetune.replay=true", "finetune.sac_ensemble=3", "finetune.value_warmup_iters=1",
                         "finetune.bc_coef=0.1", "finetune.bc_q_filter=true", "finetune.sac_critic_bins=21"]),
         ("gae", "sac", ["finetune.replay=true", "finetune.sac_ensemble=3", "env.reward_mode=sparse",
                         "finetune.her_relabel=2", "finetune.n_step=3"])]


@pytest.mark.parametrize("adv, upd, extra", PATHS, ids=[f"{a}-{u}-{'replay' if 'finetune.replay=true' in e else 'bc'}"
                                                        + ("-her" if "finetune.her_relabel=2" in e else "")
                                                        for a, u, e in PATHS])
def test_replay_and_bc_paths_run(tmp_path, bc_iql_checkpoint, adv, upd, extra, ray_cluster):
    """The off-policy path (replay + offline mix, critics trained on it) and the DAPG term on the on-policy path."""
    logs = []
    run = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, adv, upd, "finetune.updates_per_round=5",
                                "finetune.batch_size=32", *extra), log=logs.append)
    assert any("DAPG term data" in line for line in logs) == ("finetune.bc_dataset=start" in extra)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows] == ["0", "32", "64"]
    last = rows[-1]
    if "finetune.replay=true" in extra:
        her = 2 if "finetune.her_relabel=2" in extra else 0  # hindsight copies join each round's 32 transitions
        assert [float(r["charts/replay_size"]) for r in rows[1:]] == [32 * (1 + her), 64 * (1 + her)]
        assert all((0 <= float(r["charts/her_reached"]) <= 1) if her else r.get("charts/her_reached", "") == ""
                   for r in rows[1:])
        assert float(last["charts/offline_fraction"]) == 0.5 and last["losses/policy_loss"] != ""
        assert float(last["charts/grad_steps"]) == 5 and last["losses/critic_loss"] != ""
        assert float(last["charts/advantage_samples"]) == 5 * 32
        assert 0 < float(last["losses/round_kl"]) < 1  # the round moved the policy, by a bounded step
    if upd == "sac":
        assert rows[1]["charts/sac_alpha"] == ""  # round 1: the fresh Q ensemble learns alone
        assert float(last["charts/sac_alpha"]) > 0 and last["charts/q_mean"] != ""
    if any(e.startswith("finetune.bc_coef") for e in extra):
        assert np.isfinite(float(last["losses/bc_loss"]))
    if "finetune.n_step=3" in extra:  # each round: 32 online n-step rows ([T=8, N=4] flat), then 64 HER copies
        from offrl.platform.checkpoint import load_state_tensors

        k = load_state_tensors(run / "checkpoints" / "64", "replay")["nsteps"].reshape(2, 96)
        assert (k[:, 32:] == 1).all()                                    # relabelled copies stay one-step
        assert (k[:, 28:32] == 1).all() and (k[:, 24:28] <= 2).all()       # the round's end cuts the last steps
        assert k[:, :32].max() == 3 and set(k.unique().tolist()) <= {1.0, 2.0, 3.0}
    if "finetune.bc_q_filter=true" in extra:  # the Q filter's kept share of the demo rows
        assert 0 <= float(last["charts/bc_kept"]) <= 1 and rows[1]["charts/bc_kept"] == ""
    assert json.loads((run / "finetune_summary.json").read_text())["replay"] == ("finetune.replay=true" in extra)


def test_dapg_term_data_can_differ_from_the_offline_mix(bc_iql_checkpoint, expert_dataset, tmp_path):
    """finetune.bc_dataset: 'start' is the start actor's own data, a file is that file, the offline mix keeps
    finetune.offline_dataset; a missing file is refused with the key named."""
    from offrl.data.dataset import OfflineDataset
    from offrl.platform.finetune import _load_start, load_offline

    few = OfflineDataset.load(expert_dataset).subset(range(3)).save(tmp_path / "few.h5")

    def rows(bc_dataset, key, log=lambda *a: None):
        cfg = _cfg(tmp_path, bc_iql_checkpoint, "iql", "awr", "finetune.replay=true", "finetune.bc_coef=0.1",
                   f"finetune.offline_dataset={few}", f"finetune.bc_dataset={bc_dataset}")
        cfg, _, actor, _, _, start = _load_start(cfg, lambda *a: None)
        return load_offline(cfg, start, actor, 0.0, need_rewards=key == "offline_dataset", log=log, key=key)

    mix = rows("start", "offline_dataset")
    logs = []
    bc = rows("start", "bc_dataset", logs.append)
    assert "DAPG term data: 20 episodes" in logs[0]
    every = OfflineDataset.load(expert_dataset)
    assert bc["obs"].shape[0] == every.num_steps > mix["obs"].shape[0] == every.subset(range(3)).num_steps
    assert torch.equal(rows(few, "bc_dataset")["actions"], mix["actions"])
    with pytest.raises(OffrlError, match="set finetune.bc_dataset"):
        rows(tmp_path / "absent.h5", "bc_dataset")


def test_offline_rows_are_n_step_within_each_demo_episode(bc_iql_checkpoint, tmp_path):
    """finetune.n_step=3 on the offline data: each row sums up to 3 rewards of its own episode, bootstraps from
    the obs 3 steps on (fewer at the episode's end), and the rows' count and order stay those of n = 1."""
    from offrl.platform.finetune import _load_start, load_offline

    got = {}
    for n in (1, 3):
        cfg = _cfg(tmp_path, bc_iql_checkpoint, "gae", "sac", "finetune.replay=true", "env.reward_mode=sparse",
                   f"finetune.n_step={n}", "finetune.gamma=0.5")
        cfg, _, actor, _, _, start = _load_start(cfg, lambda *a: None)
        got[n] = load_offline(cfg, start, actor, 0.0, need_rewards=True, log=lambda *a: None)
    one, three = got[1], got[3]
    assert torch.equal(one["obs"], three["obs"]) and "nsteps" not in one
    k = three["nsteps"]
    assert set(k.unique().tolist()) == {1.0, 2.0, 3.0}
    ends = torch.nonzero(one["terminated"]).flatten()                  # the demos end at their success
    assert (k[ends] == 1).all() and (three["rewards"][ends] == 1).all()
    full = torch.nonzero(k == 3).flatten()
    assert torch.equal(three["next_obs"][full], one["next_obs"][full + 2])
    r = one["rewards"]
    assert torch.allclose(three["rewards"][full], r[full] + 0.5 * r[full + 1] + 0.25 * r[full + 2])
    assert torch.equal(three["terminated"][full], one["terminated"][full + 2])


@pytest.mark.parametrize("adv, upd, per_round, kept", [("mc", "push_away", 8, 2), ("iql", "awr", 32, 2),
                                                       ("gae", "ppo", 32, 1)])
def test_kept_rounds_join_each_rounds_batch(tmp_path, bc_iql_checkpoint, adv, upd, per_round, kept, ray_cluster):
    """finetune.keep_rounds=2: from the second round on, AWR and push-away learn from both rounds' samples (MC:
    its re-rolled pairs); PPO, whose ratio needs the round's own policy, ignores the key."""
    run = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, adv, upd, "finetune.keep_rounds=2",
                                "finetune.iterations=3", "finetune.eval_every=3"), log=lambda *a: None)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [float(r["charts/advantage_samples"]) for r in rows[1:]] == [per_round, kept * per_round, kept * per_round]
    assert all(np.isfinite(float(r["losses/approx_kl"])) for r in rows[2:])  # GAE: round 1 trains V only


@pytest.mark.parametrize("upd", ["awr", "ppo"])
def test_mc_learns_from_v_first_actions(tmp_path, bc_iql_checkpoint, upd, ray_cluster):
    """finetune.mc_v_actions: each re-rolled state adds its mc_samples V draws to the batch, so a round learns
    from 8 x (1 + 2) = 24 advantages instead of 8, at the same re-rollout cost."""
    run = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, "mc", upd, "finetune.mc_v_actions=true"),
                           log=lambda *a: None)
    rows = list(csv.DictReader(open(run / "metrics.csv")))[1:]
    plain = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, "mc", upd, "run.trial=plain"), log=lambda *a: None)
    base = list(csv.DictReader(open(plain / "metrics.csv")))[1:]
    assert [float(r["charts/advantage_samples"]) for r in rows] == [24.0, 24.0]
    # round 1: the same rollout and the same re-rollouts (cost, and Q of the rollout's own pairs) as without
    for key in ("time/rerollout_steps", "charts/mc_q_mean", "charts/mc_v_mean"):
        assert rows[0][key] == base[0][key], key
    assert all(np.isfinite(float(r["losses/approx_kl"])) and np.isfinite(float(r["losses/policy_loss"]))
               for r in rows)


RECAP = [("gae", ["finetune.recap_cfg_weight=1.0", "critic.distributional={bins: 21, v_min: 0.0, v_max: 10.0}"]),
         ("mc", ["finetune.recap_threshold=0.0"]),
         ("iql", ["finetune.replay=true", "finetune.updates_per_round=5", "finetune.batch_size=32",
                  "finetune.recap_cfg_weight=2.0"]),
         ("sarsa", ["finetune.recap_percentile=50"])]


@pytest.mark.parametrize("adv, extra", RECAP, ids=[a for a, _ in RECAP])
def test_recap_runs_with_every_estimator(tmp_path, bc_iql_checkpoint, adv, extra, ray_cluster):
    """finetune.update=recap with GAE (distributional value net, guidance), MC (fixed threshold), IQL (replay
    path, guidance) and SARSA (on-policy, offline rows labelled by the critics)."""
    run = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, adv, "recap", *extra), log=lambda *a: None)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows] == ["0", "32", "64"]
    last = rows[-1]
    for key in ("losses/policy_loss", "charts/recap_positive_fraction", "charts/recap_threshold",
                "charts/recap_dropped_fraction", "eval/success_rate"):
        assert last[key] != "" and np.isfinite(float(last[key])), key
    assert 0 < float(last["charts/recap_positive_fraction"]) < 1
    if adv == "mc":
        assert float(last["charts/recap_threshold"]) == 0.0
    if adv == "gae":
        assert np.isfinite(float(last["losses/value_loss"]))
    arch = json.loads((run / "checkpoints" / "64" / "training_state" / "state.json").read_text())["actor_arch"]
    w = next((float(e.split("=")[1]) for e in extra if e.startswith("finetune.recap_cfg_weight")), 0.0)
    assert arch["indicator"] is True and arch["guidance"] == w
    # the finetuned checkpoint is an ordinary policy for offrl eval: the arch rebuilds the guided actor
    from offrl.algos.networks import build_actor
    from offrl.platform.checkpoint import load_checkpoint

    actor = build_actor(arch)
    load_checkpoint(run / "checkpoints" / "64", {"actor": actor}, parts=["actor"], restore_rng=False)
    assert actor.guidance == w and float(actor.indicator.weight.detach().abs().sum()) > 0  # the embedding trained


def test_recap_starts_where_the_pretrained_policy_is(tmp_path, bc_iql_checkpoint, ray_cluster):
    """The upgraded actor (zero indicator embedding) evaluates exactly like the pretrained one at step 0, with
    guidance on: the same deterministic evaluation on the same seeds gives the same numbers."""
    plain = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, "iql", "awr", "finetune.iterations=1",
                                  "finetune.eval_every=1", "run.trial=awr"), log=lambda *a: None)
    recap = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, "iql", "recap", "finetune.iterations=1",
                                  "finetune.eval_every=1", "finetune.recap_cfg_weight=3", "run.trial=recap"),
                             log=lambda *a: None)
    a, b = (json.loads((r / "finetune_summary.json").read_text()) for r in (plain, recap))
    assert a["success_before"] == b["success_before"] and a["success_before_ci95"] == b["success_before_ci95"]
    ra, rb = (next(csv.DictReader(open(r / "metrics.csv"))) for r in (plain, recap))
    evals = [k for k in ra if k.startswith("eval/")]
    assert evals and {k: ra[k] for k in evals} == {k: rb[k] for k in evals}


def _comparable(run):
    """metrics.csv rows without the wall-clock columns."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") or k in ("time/env_steps", "time/rerollout_steps")}
            for r in csv.DictReader(open(run / "metrics.csv"))]


def _same_weights(a, b):
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


RESUMED = [("iql", "push_away", ["finetune.replay=true", "finetune.updates_per_round=4", "finetune.batch_size=32",
                                  "env.reward_mode=sparse", "finetune.her_relabel=2", "finetune.her_min_move=0.01",
                                  "finetune.her_move_from=episode"]),  # hindsight copies: loop rng
           ("mc", "ppo", ["finetune.bc_coef=0.2", "finetune.bc_decay=0.9"]),  # re-rollouts: the hosts rebuild
           # their sims at the reset; the DAPG weight decays with the round counter
           ("sarsa", "recap", ["finetune.recap_cfg_weight=1.0"]),
           ("gae", "push_away", ["finetune.keep_rounds=3", "finetune.ref_kl_coef=0.5"]),  # cut with 2 kept rounds;
           # round 4 drops round 1; the anchor's start policy comes back from the checkpoint
           ("sarsa", "awr", ["finetune.replay=true", "finetune.overlap=true", "finetune.updates_per_round=4",
                             "finetune.batch_size=32", "env.reward_mode=sparse"])]  # round 3 collected ahead


@pytest.mark.parametrize("adv, upd, extra", RESUMED,
                         ids=["iql-push_away-replay", "mc-ppo-bc", "sarsa-recap", "gae-push_away-kept",
                              "sarsa-awr-overlap"])
def test_resume_continues_exactly(tmp_path, bc_iql_checkpoint, adv, upd, extra, ray_cluster):
    """A run cut after round 2 and resumed to round 4 logs the same metrics and ends with the same weights as
    a run that went straight to round 4 (networks, optimizers, RNGs, re-rollout counter, replay buffer)."""
    straight = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, adv, upd, "run.trial=straight",
                                     "finetune.iterations=4", *extra), log=lambda *a: None)
    run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, adv, upd, "run.trial=cut", *extra), log=lambda *a: None)
    lines = []
    cut = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, adv, upd, "run.trial=cut", "finetune.iterations=4",
                                *extra), log=lines.append, resume=True)
    # config.yaml now says what ran: the resumed run's 4 rounds, not the 2 it was started with
    assert yaml.safe_load((cut / "config.yaml").read_text())["finetune"]["iterations"] == 4
    assert "[offrl] --resume with changed keys (config.yaml updated): finetune.iterations 2 -> 4" in lines
    ra, rb = _comparable(straight), _comparable(cut)
    assert [r["step"] for r in rb] == ["0", "32", "64", "96", "128"]
    assert ra == rb
    if "finetune.bc_decay=0.9" in extra:  # the resumed rounds carry on the schedule: 0.2 * 0.9**round
        assert [float(r["charts/bc_weight"]) for r in rb if r.get("charts/bc_weight")] == \
            pytest.approx([0.2 * 0.9 ** k for k in range(4)])
    if "finetune.ref_kl_coef=0.5" in extra:  # the anchor acted, and its start policy is in the checkpoint
        assert any(float(r.get("losses/ref_kl") or 0) > 0 for r in ra)
        from safetensors.torch import load_file

        saved = load_file(str(cut / "checkpoints" / "128" / "model.safetensors"))
        assert any(k.startswith("ref_actor.") for k in saved)
    _same_weights(straight / "checkpoints" / "128", cut / "checkpoints" / "128")
    assert json.loads((straight / "finetune_summary.json").read_text()) == \
        json.loads((cut / "finetune_summary.json").read_text())
    with pytest.raises(OffrlError, match="needs run.trial"):
        run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, adv, upd, *extra), log=lambda *a: None, resume=True)


def test_overlap_collects_each_round_ahead_with_the_policy_one_update_older(tmp_path, bc_iql_checkpoint,
                                                                            ray_cluster, monkeypatch):
    """finetune.overlap: round k+1's rollout starts before round k's update, so it is collected by the actor
    as it was before that update; the evaluation round starts nothing ahead. Without it every round is
    collected by the actor after the previous update."""
    from safetensors.torch import load_file

    from offrl.platform.simhost import SimHostPool

    launched, threads = [], []
    real = SimHostPool.rollout_async

    def spy(self, spec, *a, **kw):
        launched.append({k: np.array(v) for k, v in spec["weights"].items()})
        threads.append(torch.get_num_threads())
        return real(self, spec, *a, **kw)

    monkeypatch.setattr(SimHostPool, "rollout_async", spy)
    extra = ["finetune.replay=true", "finetune.updates_per_round=4", "finetune.batch_size=32",
             "finetune.iterations=3", "finetune.eval_every=3"]
    runs, before = {}, torch.get_num_threads()
    for overlap in (True, False):
        launched.clear()
        threads.clear()
        run = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, "iql", "awr", f"run.trial=o{int(overlap)}",
                                    f"finetune.overlap={str(overlap).lower()}", *extra), log=lambda *a: None)
        start = {k[len("actor."):]: v.numpy() for k, v in
                 load_file(str(run / "checkpoints" / "0" / "model.safetensors")).items() if k.startswith("actor.")}
        same_as_start = [all(np.array_equal(w[k], start[k]) for k in start) for w in launched]
        runs[overlap] = (run, same_as_start, list(csv.DictReader(open(run / "metrics.csv"))))
        # the learner takes one thread beside the busy SimHosts (learner_threads 0), the default otherwise
        assert set(threads) == {1 if overlap else before} and torch.get_num_threads() == before
    run, same_as_start, rows = runs[True]
    # round 1 and round 2 (started during round 1, before its update) both roll out the start actor
    assert same_as_start == [True, True, False]
    assert [r["rollout/policy_lag"] for r in rows[1:]] == ["0.0", "1.0", "1.0"]
    assert all(0 <= float(r["time/rollout_wait_seconds"]) <= float(r["time/iteration_seconds"]) for r in rows[1:])
    _, same_as_start, plain = runs[False]
    assert same_as_start == [True, False, False] and "rollout/policy_lag" not in plain[0]
    # the first round is the same in both: the same data and the same update
    lagless = [{k: v for k, v in r.items() if k != "rollout/policy_lag"} for r in _comparable(run)]
    assert lagless[:2] == _comparable(runs[False][0])[:2]
    with pytest.raises(OffrlError, match="finetune.overlap.*replay=true"):
        _cfg(tmp_path, bc_iql_checkpoint, "gae", "ppo", "finetune.overlap=true")
    # bench/loop_efficiency.py splits an overlapped round into the wait for its rollout, advantages and update
    import importlib.util
    import subprocess
    import sys

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("loop_efficiency", ROOT / "bench" / "loop_efficiency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sps, split = bench._round_sps(run)
    assert sps > 0 and split["wait"] >= 0 and split["update"] > 0
    assert split["wait"] + split["advantages"] + split["update"] == pytest.approx(split["round"])
    assert "wait" not in bench._round_sps(runs[False][0])[1]
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "loop_efficiency.py"), "--rounds", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--rounds must be >= 2" in bad.stderr and "Traceback" not in bad.stderr


def test_finetune_killed_with_sigkill_then_resumed(tmp_path, bc_iql_checkpoint, process_sessions, ray_cluster):
    """`offrl finetune` (driver and its local Ray cluster) is SIGKILLed after its round-2 checkpoint;
    `offrl finetune --resume` finishes the run with the metrics and weights of an uninterrupted one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    yaml_path = str(ROOT / "tune_configs" / "finetune.yaml")
    over = [f"finetune.checkpoint={bc_iql_checkpoint}", "finetune.advantage=gae", "finetune.update=ppo",
            "finetune.bc_coef=0.2", f"run.root={tmp_path}", "run.experiment=k", "run.progress=false",
            "run.tensorboard=false", "finetune.iterations=6", "finetune.steps_per_iter=8", "finetune.eval_every=2",
            "finetune.eval_episodes=2", "finetune.value_warmup_iters=1", "env.num_envs=2", "cluster.num_hosts=2"]
    straight = run_finetune_job(load_config(yaml_path, over + ["run.trial=straight"]), log=lambda *a: None)
    env = {**os.environ, "RAY_TMPDIR": process_sessions.temp_dir()}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "offrl", "finetune", yaml_path, *over, "run.trial=killed", "cluster.num_cpus=2"]
    log = open(tmp_path / "driver.log", "w")
    driver = process_sessions.popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    killed = tmp_path / "k" / "killed"
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None and not (killed / "checkpoints" / "64").exists():
        time.sleep(0.05)
    assert driver.poll() is None and (killed / "checkpoints" / "64").exists(), \
        (tmp_path / "driver.log").read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    process_sessions.kill()
    assert not (killed / "finetune_summary.json").exists()
    out = process_sessions.run(cmd + ["--resume"], cwd=str(ROOT), env=env, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:]
    assert _comparable(killed) == _comparable(straight)
    _same_weights(straight / "checkpoints" / "192", killed / "checkpoints" / "192")


def test_advantage_accuracy_bench_scores_every_estimator(tmp_path, bc_iql_checkpoint, ray_cluster, capsys,
                                                         monkeypatch):
    """bench/advantage_accuracy.py: one round's pairs scored by MC (two halves), the start's critics, GAE, TD
    and a finetuned run's critics, each correlated with the MC reference; bad sizes and paths exit 2."""
    import importlib.util
    import math
    import sys

    from conftest import ROOT

    run = run_finetune_job(_cfg(tmp_path, bc_iql_checkpoint, "iql", "ppo", "run.trial=t"), log=lambda *a: None)
    spec = importlib.util.spec_from_file_location("advantage_accuracy", ROOT / "bench" / "advantage_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    over = ["--", "env.num_envs=2", "cluster.num_hosts=2", "finetune.steps_per_iter=8", "finetune.mc_horizon=6",
            "env.reward_mode=normalized_dense"]
    monkeypatch.setattr(sys, "argv", ["x", "--checkpoint", str(bc_iql_checkpoint), "--pairs", "16", "--samples", "2",
                                      "--critics", str(run), *over])
    assert bench.main() == 0
    out = capsys.readouterr().out
    assert "16 (state, action) pairs" in out and "reliability of the reference" in out
    own = out.split("charts/mc_reliability): ")[1].split(";")[0].split(", ")
    assert len(own) == 2 and all(math.isfinite(float(x)) and float(x) <= 1 for x in own)
    rows = {ln.split("|")[1].strip(): [float(x) for x in ln.split("|")[2:6]] for ln in out.splitlines()
            if ln.startswith("| ") and not ln.startswith("| estimator")}
    assert list(rows) == ["one MC half against the other", "start critics (IQL, round 1)", "gae (lambda 0.9, start V)",
                          "td (lambda 0, start V)", "critics of t (end)"]
    for name, (r, rho, sign, std) in rows.items():
        assert all(math.isfinite(x) for x in (r, rho, sign, std)), name
        assert -1 <= r <= 1 and -1 <= rho <= 1 and 0 <= sign <= 1 and std > 0, name
    assert rows["critics of t (end)"] != rows["start critics (IQL, round 1)"]  # the run's critics were loaded
    monkeypatch.setattr(sys, "argv", ["x", "--checkpoint", str(bc_iql_checkpoint), "--pairs", "4", "--samples", "1",
                                      *over])
    assert bench.main() == 0  # one sample a side: no within-pair reliability to print
    assert "charts/mc_reliability" not in capsys.readouterr().out
    for bad, what in ((["--pairs", "0"], "--pairs must be >= 1"),
                      (["--critics", str(tmp_path / "none")], "no checkpoint in"),
                      (["--checkpoint", str(tmp_path / "none")], "checkpoint not found")):
        args = ["x", "--checkpoint", str(bc_iql_checkpoint), *bad, *over]
        monkeypatch.setattr(sys, "argv", args)
        assert bench.main() == 2
        err = capsys.readouterr().err
        assert what in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
