"""Data-parallel pretraining speed: gradient steps/s with 1 and 2 Ray Train workers at the same global batch.

Both runs train BC (an MLP 256x256, or another ``policy.kind`` given as an override) on the same dataset for
the same number of gradient steps with the same global batch: 1 worker x ``--batch`` rows, and 2 workers x
``--batch / 2`` rows (``pretrain.workers=2``). Speed is gradient steps per second of the training loop
(``train/grad_steps`` over the summed ``time/iteration_seconds`` of metrics.csv, so start-up, validation and
evaluation are not counted), measured alternately in the same run, so the ratio is what to read on a shared
machine. The core count of the machine is printed with it.

    python bench/train_parallel.py [--dataset datasets/PickCube-v1_expert.h5] [--steps 2000] [--batch 256]
                                   [--repeats 2] [--root runs/train_parallel] [key=value ...]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _speed(run: Path) -> float:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return float(rows[-1]["train/grad_steps"]) / sum(float(r["time/iteration_seconds"]) for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--dataset", default="datasets/PickCube-v1_expert.h5",
                    help="dataset to train on (made by `offrl collect` when it is the default and missing)")
    ap.add_argument("--steps", type=int, default=2000, help="gradient steps per run (in epochs of 200)")
    ap.add_argument("--batch", type=int, default=256, help="global batch (even: each of 2 workers takes half)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repetitions of the pair")
    ap.add_argument("--root", default="runs/train_parallel", help="where the runs go")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    if args.batch < 2 or args.batch % 2:
        ap.error("--batch must be an even number >= 2")
    os.chdir(os.path.join(os.path.dirname(__file__), ".."))
    from offrl.config import load_config
    from offrl.platform.cluster import init_ray
    from offrl.platform.pretrain import run_pretrain_job

    cores = os.cpu_count()
    init_ray(load_config(None, []).cluster)
    if not Path(args.dataset).exists():
        if args.dataset != ap.get_default("dataset"):
            ap.error(f"dataset not found: {args.dataset}")
        from offrl.data.collect import collect

        cfg = load_config("tune_configs/collect_pickcube.yaml", ["collect.episodes=100", f"collect.output={args.dataset}"])
        collect(cfg, progress=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    epochs = max(1, args.steps // 200)
    speeds: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeats):
        for workers in (1, 2):
            over = [f"pretrain.dataset={args.dataset}", "pretrain.algo=bc", f"pretrain.epochs={epochs}",
                    "pretrain.steps_per_epoch=200", f"pretrain.batch_size={args.batch // workers}",
                    f"pretrain.workers={workers}", f"pretrain.worker_cpus={1.0 if workers == 1 else 0.5}",
                    "pretrain.eval_episodes=1", "pretrain.checkpoint_every=1000", "pretrain.val_fraction=0",
                    f"run.root={args.root}", f"run.experiment={stamp}", f"run.trial=w{workers}_r{r}",
                    "run.progress=false", "run.tensorboard=false", "env.num_envs=1", "cluster.num_hosts=1",
                    *args.overrides]
            run = run_pretrain_job(load_config(None, over), log=lambda *a, **k: None)
            speeds[workers].append(_speed(run))
            print(f"[train_parallel] {workers} worker(s), repeat {r}: {speeds[workers][-1]:.1f} gradient steps/s",
                  flush=True)
    one, two = (sorted(v)[len(v) // 2] for v in (speeds[1], speeds[2]))
    print(f"\nmachine: {cores} cores; BC ({' '.join(args.overrides) or 'Gaussian MLP 256x256'}), global batch "
          f"{args.batch}, {epochs * 200} gradient steps per run, median of {args.repeats}")
    print("| workers | gradient steps/s | ratio to 1 worker |")
    print("|---:|---:|---:|")
    print(f"| 1 (batch {args.batch}) | {one:.1f} | 1.00 |")
    print(f"| 2 (batch {args.batch // 2} each) | {two:.1f} | {two / one:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
