"""offrl's offline learners (BC, IQL, CQL, BRAC) beside RLlib's BC and CQL, on the same demos and budget.

Every offrl row trains on ``datasets/PickCube-v1_scripted100.h5`` (its training split of
``pretrain.val_fraction``) for 8,000 gradient steps of 256, the budget of ``bench/rllib_peers.py`` and
``bench/imitation.py``, and is scored with the same protocol: the final policy (no checkpoint chosen by
evaluation), 100 episodes from seed 1,000,000,000 on, ``max_episode_steps=100``, terminations ignored,
``success_once`` with 95% Wilson intervals. CQL and BRAC use the hyperparameters of
``tune_configs/pretrain_cql.yaml``; BRAC's behaviour policy is BC trained first in the same run
(``pretrain.behavior_steps``, not counted in the budget). The RLlib rows are read from ``bench/rllib_peers.py``'s
output when it has run. Finished runs are read back, so an interrupted bench continues.

    python bench/offline_peers.py [--learners bc iql cql brac] [--seeds 0] [--steps 8000]
                                  [--root runs/offline_peers] [--rllib-root runs/rllib_peers] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from offrl.platform.evaluate import wilson_interval as wilson  # noqa: E402

DATA = "datasets/PickCube-v1_scripted100.h5"
CONFIG = "tune_configs/pretrain_diffusion.yaml"  # the imitation benchmark's budget and protocol
_MLP = ["policy.kind=mlp", "policy.hidden=[256,256]", "critic.hidden=[256,256]", "pretrain.select=last"]
_CONSERVATIVE = ["policy.log_std_init=-2.5", "pretrain.actor_lr=3e-4", "pretrain.critic_lr=3e-4",
                 "pretrain.cql_alpha=1.0", "pretrain.cql_samples=4", "pretrain.bc_warmup_steps=500",
                 "pretrain.reward=dataset", "pretrain.gamma=0.8", "pretrain.grad_clip=1.0"]
LEARNERS = {
    "bc": ("offrl BC (MLP)", ["pretrain.algo=bc", "policy.log_std_init=-1.0", "pretrain.actor_lr=1e-3",
                              "pretrain.grad_clip=1.0"]),
    "iql": ("offrl IQL (expectile 0.7, AWR extraction)",
            ["pretrain.algo=iql", "policy.log_std_init=-1.0", "pretrain.actor_lr=1e-3", "pretrain.critic_lr=3e-4",
             "pretrain.reward=dataset", "pretrain.gamma=0.8", "pretrain.grad_clip=1.0"]),
    "cql": ("offrl CQL (alpha 1)", ["pretrain.algo=cql", *_CONSERVATIVE]),
    "brac": ("offrl BRAC-v (beta 1, KL)", ["pretrain.algo=brac", *_CONSERVATIVE]),
}
RLLIB = {"bc": "RLlib BC", "bc_free": "RLlib BC, free_log_std (a state-independent std)",
         "cql": "RLlib CQL (tanh-squashed mean)", "cql_a1": "RLlib CQL, min_q_weight 1 (tanh-squashed mean)",
         "cql_rllib_det": "RLlib CQL (RLlib's explore=False action)"}


def run_one(learner: str, seed: int, args, log) -> Path:
    from offrl.config import load_config
    from offrl.platform.pretrain import run_pretrain_job

    trial = f"{learner}_seed{seed}"
    run = Path(args.root) / "runs" / trial
    if (run / "eval.json").exists():
        return run
    cfg = load_config(CONFIG, [*_MLP, *LEARNERS[learner][1], f"pretrain.dataset={DATA}",
                               f"pretrain.epochs={max(1, args.steps // 200)}", "pretrain.steps_per_epoch=200",
                               f"pretrain.eval_episodes={args.episodes}", f"seed={seed}", f"run.root={args.root}",
                               "run.experiment=runs", f"run.trial={trial}", "run.progress=false"])
    return run_pretrain_job(cfg, resume=run.exists(), log=log)


def read(run: Path) -> dict:
    ev = json.loads((run / "eval.json").read_text())
    return {"k": sum(bool(e["success_once"]) for e in ev["per_episode"]), "n": ev["episodes"]}


def cell(rs: list[dict]) -> str:
    k, n = sum(r["k"] for r in rs), sum(r["n"] for r in rs)
    lo, hi = wilson(k, n)
    per = ", ".join(f"{r['k'] / r['n']:.2f}" for r in rs)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}] | {len(rs)} | {per}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS), help="offrl rows")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds")
    ap.add_argument("--steps", type=int, default=8000, help="gradient steps of 256 per run")
    ap.add_argument("--episodes", type=int, default=100, help="evaluation episodes per run")
    ap.add_argument("--root", default="runs/offline_peers", help="where offrl's runs go")
    ap.add_argument("--rllib-root", default="runs/rllib_peers", help="bench/rllib_peers.py's --out")
    ap.add_argument("--report-only", action="store_true", help="print the table from finished runs")
    args = ap.parse_args()
    if not args.report_only:
        if not Path(DATA).exists():
            from offrl.config import load_config
            from offrl.data.collect import collect

            collect(load_config("tune_configs/collect_pickcube.yaml", ["collect.episodes=100", f"collect.output={DATA}",
                                                                        "seed=0", "run.progress=false"]))
        for seed in args.seeds:
            for learner in args.learners:
                run_one(learner, seed, args, print)
    lines = [f"success_once on {Path(DATA).name}, {args.steps} gradient steps of 256, final policy, "
             f"{args.episodes} episodes per run (seeds 1e9..), max_episode_steps=100, terminations ignored",
             "", "| learner | success_once [95% CI, pooled] | seeds | per seed |", "|---|---|---:|---|"]
    for learner in args.learners:
        rs = [read(Path(args.root) / "runs" / f"{learner}_seed{s}") for s in args.seeds
              if (Path(args.root) / "runs" / f"{learner}_seed{s}" / "eval.json").exists()]
        if rs:
            lines.append(f"| {LEARNERS[learner][0]} | {cell(rs)} |")
    for key, name in RLLIB.items():
        rs = [read(Path(args.rllib_root) / "runs" / f"{key}_seed{s}") for s in args.seeds
              if (Path(args.rllib_root) / "runs" / f"{key}_seed{s}" / "eval.json").exists()]
        if rs:
            lines.append(f"| {name} | {cell(rs)} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
