"""BC baseline: success rate of behaviour cloning from 10, 25 and 100 scripted PickCube-v1 demos.

Collects ``--demos-max`` scripted-expert demos once (seeded), then for each demo count trains BC with
``tune_configs/pretrain_bc.yaml`` on the first N episodes (equal gradient steps for every N) and
evaluates the final policy for ``--episodes`` episodes with fixed evaluation seeds. Prints a markdown
table and writes it to ``<root>/bc_baseline.md``; every number is read back from the runs' eval.json.

    python bench/bc_baseline.py [--demos 10 25 100] [--episodes 100] [--root runs/bc_baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from offrl.config import load_config
    from offrl.data.collect import collect
    from offrl.platform.cluster import init_ray
    from offrl.platform.pretrain import run_pretrain_job

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demos", type=int, nargs="+", default=[10, 25, 100], help="demo counts to train on")
    ap.add_argument("--episodes", type=int, default=100, help="evaluation episodes per policy")
    ap.add_argument("--seed", type=int, default=0, help="master seed (collection, training)")
    ap.add_argument("--root", default="runs/bc_baseline", help="where datasets and runs go")
    ap.add_argument("--config", default="tune_configs/pretrain_bc.yaml", help="pretraining config")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for pretraining")
    args = ap.parse_args()

    root = Path(args.root)
    data = root / f"pickcube_{max(args.demos)}_seed{args.seed}.h5"
    init_ray(load_config(args.config).cluster)
    if not data.exists():
        cfg = load_config(args.config, [f"collect.episodes={max(args.demos)}", f"collect.output={data}",
                                        f"seed={args.seed}"])
        t = time.time()
        collect(cfg)
        print(f"collected {max(args.demos)} demos in {time.time() - t:.1f}s -> {data}")
    rows = []
    for n in args.demos:
        cfg = load_config(args.config, [f"pretrain.dataset={data}", f"pretrain.num_episodes={n}",
                                        f"pretrain.eval_episodes={args.episodes}", f"seed={args.seed}",
                                        f"run.root={root}", f"run.trial=demos{n}_seed{args.seed}",
                                        *args.overrides])
        run = run_pretrain_job(cfg)
        ev = json.loads((run / "eval.json").read_text())
        s = ev["success_at_end"]
        rows.append((n, s["mean"], s["ci95"], ev["episodes"], cfg.pretrain.epochs * cfg.pretrain.steps_per_epoch, run))
    lines = ["| demos | BC success rate | 95% CI (Wilson) | eval episodes | gradient steps | run |",
             "|---:|---:|---|---:|---:|---|"]
    for n, m, ci, eps, steps, run in rows:
        lines.append(f"| {n} | {m:.2f} | [{ci[0]:.2f}, {ci[1]:.2f}] | {eps} | {steps} | `{run}` |")
    table = "\n".join(lines)
    print(table)
    (root / "bc_baseline.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
