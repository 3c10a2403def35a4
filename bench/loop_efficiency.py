"""Finetuning loop efficiency: main-rollout env-steps/s of whole finetuning rounds against the bare simulator.

A finetuning run's rounds (rollout on the SimHost actors, advantages, learner update; evaluations and
checkpoints excluded) are timed from its ``metrics.csv`` (``time/iteration_seconds``). The baseline is
the bare simulator on the same cores in the same run: ``cluster.num_hosts`` plain processes, each with
the same number of CPU envs, rolling out a Gaussian MLP of the same size with no learning (see
``bench/sim_throughput.py``), measured before and after the finetuning runs (their mean is the
denominator). Reported for the on-policy path (GAE x PPO), the replay path (IQL x AWR, replay +
offline mix), the replay path with one learner thread (``finetune.learner_threads=1``) and the replay
path with ``finetune.overlap`` (the next round's rollout runs during this round's gradient steps; one
learner thread by default). Target >= 0.8. ``--hosts`` sets the SimHosts (and the bare processes); fewer
SimHosts than cores leaves the learner cores of its own.

Without ``--checkpoint`` a small start point is built first (10 scripted demos, a short BC + IQL run).

    python bench/loop_efficiency.py [--checkpoint RUN_DIR] [--rounds 8] [--hosts N] [--root runs/loop_efficiency]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from offrl import metrics as M  # noqa: E402


def _round_sps(run: Path) -> tuple[float, dict[str, float]]:
    """Env steps of all rounds / the rounds' own seconds (rollout + advantages + update; no evaluation), and
    the mean round's split into rollout, advantage and update seconds."""
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get(M.ITERATION_SECONDS)]
    total = sum(float(r[M.ITERATION_SECONDS]) for r in rows)
    steps = float(rows[-1][M.ENV_STEPS])
    roll = sum(steps / len(rows) / float(r[M.ENV_SPS]) for r in rows) / len(rows)
    upd = sum(float(r[M.UPDATE_SECONDS]) for r in rows) / len(rows)
    split = {"round": total / len(rows), "rollout": roll, "update": upd, "advantages": total / len(rows) - roll - upd}
    if rows[0].get(M.ROLLOUT_WAIT_SECONDS):  # overlapped: the rollout runs (mostly) during the previous update
        split["wait"] = sum(float(r[M.ROLLOUT_WAIT_SECONDS]) for r in rows) / len(rows)
        split["advantages"] = split["round"] - split["wait"] - upd
    return steps / total, split


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    sys.path.insert(0, os.path.dirname(__file__))
    from offrl.config import load_config
    from offrl.platform.cluster import init_ray
    from offrl.platform.finetune import run_finetune_job
    from sim_throughput import Bare

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="", help="finetuning start point (a bc+iql run); empty: build a small one")
    ap.add_argument("--config", default="tune_configs/finetune_sparse.yaml", help="finetuning config")
    ap.add_argument("--rounds", type=int, default=8, help="finetuning rounds per path")
    ap.add_argument("--hosts", type=int, default=0,
                    help="SimHosts of every path and processes of the bare simulator (0: the config's "
                         "cluster.num_hosts, or one per core)")
    ap.add_argument("--root", default="runs/loop_efficiency", help="where the runs go (replaced on every run)")
    args = ap.parse_args()
    if args.rounds < 2 or args.hosts < 0:
        print(f"error: --rounds must be >= 2 and --hosts >= 0, got {args.rounds} and {args.hosts}", file=sys.stderr)
        return 2

    import shutil

    root = Path(args.root)
    if root.exists():
        shutil.rmtree(root)
    ckpt = args.checkpoint
    hosts_over = [f"cluster.num_hosts={args.hosts}"] if args.hosts else []
    base = load_config(args.config, [f"run.root={root}", "run.progress=false", "run.tensorboard=false", *hosts_over])
    init_ray(base.cluster)
    if not ckpt:
        from offrl.data.collect import collect
        from offrl.platform.pretrain import run_pretrain_job

        data = root / "demos.h5"
        collect(load_config("tune_configs/collect_pickcube.yaml", ["collect.episodes=10", f"collect.output={data}",
                                                                   "run.progress=false"]), progress=False)
        ckpt = str(run_pretrain_job(load_config("tune_configs/finetune_start.yaml", [
            f"pretrain.dataset={data}", "pretrain.critic_dataset=", "pretrain.epochs=2", "pretrain.steps_per_epoch=50",
            "pretrain.eval_episodes=2", f"run.root={root}", "run.trial=start", "run.progress=false"]),
            log=lambda *a: None))
    hosts = base.cluster.num_hosts or os.cpu_count() or 1
    envs, T = base.env.num_envs, base.finetune.steps_per_iter
    bare = Bare(hosts, envs, T * args.rounds // 2, 2)
    try:
        before = bare.round()
        replay = ["finetune.advantage=iql", "finetune.update=awr", "finetune.replay=true"]
        paths = {"on-policy (gae x ppo)": ["finetune.advantage=gae", "finetune.update=ppo"],
                 "replay (iql x awr, offline mix)": replay,
                 "replay1 (the same, 1 learner thread)": [*replay, "finetune.learner_threads=1"],
                 "overlap (the same, overlapped)": [*replay, "finetune.overlap=true"]}
        loop = {}
        for name, over in paths.items():
            trial = name.split(" ")[0]
            cfg = load_config(args.config, [*over, f"finetune.checkpoint={ckpt}", f"finetune.iterations={args.rounds}",
                                            f"finetune.eval_every={args.rounds}", "finetune.eval_episodes=4",
                                            f"run.root={root}", "run.experiment=loop", f"run.trial={trial}",
                                            "run.progress=false", "run.tensorboard=false", *hosts_over])
            loop[name] = _round_sps(run_finetune_job(cfg, log=lambda *a: None))
        after = bare.round()
    finally:
        bare.close()
    sim = (before + after) / 2
    print(f"PickCube-v1, {hosts} SimHosts x {envs} envs on {os.cpu_count()} cores, {T} steps a round, "
          f"{args.rounds} rounds per path")
    print(f"bare simulator : {sim:8.1f} env-steps/s (before {before:.1f}, after {after:.1f})")
    for name, (sps, split) in loop.items():
        print(f"{name:38s}: {sps:8.1f} env-steps/s  ratio loop/bare {sps / sim:.3f}  (target >= 0.8)")
        if "wait" in split:
            print(f"{'':38s}  a round: {split['round']:.2f} s = waiting for the rollout {split['wait']:.2f} + "
                  f"advantages {split['advantages']:.2f} + update {split['update']:.2f} (the rollout itself, "
                  f"started a round ahead: {split['rollout']:.2f})")
        else:
            print(f"{'':38s}  a round: {split['round']:.2f} s = rollout {split['rollout']:.2f} + advantages "
                  f"{split['advantages']:.2f} + update {split['update']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
