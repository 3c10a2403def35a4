"""Finetuning grid: success before and after finetuning for advantage x update combinations.

Runs ``offrl finetune`` (``tune_configs/finetune.yaml`` unless ``--config``) once per combination and
seed, sequentially on the local Ray cluster, at an equal env-step budget, from the same pretrained
checkpoint; then prints a markdown table read back from each run's ``finetune_summary.json`` and writes
it to ``<root>/finetune_grid.md``. Every figure is recomputed from the run directories.

    python bench/finetune_grid.py [key=value ...] [--advantages gae mc iql sarsa] [--updates ppo awr push_away]
                                  [--seeds 0] [--root runs/finetune_grid]

Overrides go first (or after ``--``): the list options take every word that follows them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path


def _table(rows: list[dict]) -> str:
    lines = ["| advantage | update | seed | success before | success after | 95% CI after | env steps | re-rollout steps |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for s in rows:
        lo, hi = s["success_after_ci95"]
        lines.append(f"| {s['advantage']} | {s['update']} | {s['seed']} | {s['success_before']:.2f} | "
                     f"{s['success_after']:.2f} | [{lo:.2f}, {hi:.2f}] | {s['env_steps']} | {s['rerollout_steps']} |")
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from offrl.config import load_config
    from offrl.platform.cluster import init_ray
    from offrl.platform.finetune import run_finetune_job

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tune_configs/finetune.yaml", help="finetuning config")
    ap.add_argument("--advantages", nargs="+", default=["gae", "mc", "iql", "sarsa"])
    ap.add_argument("--updates", nargs="+", default=["ppo", "awr", "push_away"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--root", default="runs/finetune_grid", help="where the runs go")
    ap.add_argument("--from-dir", default=None,
                    help="only tabulate the finetune_summary.json of runs found under this folder "
                         "(e.g. a sweep's experiment dir); runs nothing")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run (give them before the list "
                                                 "options, or after --)")
    args = ap.parse_args()

    if args.from_dir:
        rows = []
        for f in sorted(Path(args.from_dir).rglob("finetune_summary.json")):
            import yaml

            cfg = yaml.safe_load((f.parent / "config.yaml").read_text())
            rows.append(json.loads(f.read_text()) | {"seed": cfg["seed"], "run": str(f.parent)})
        rows.sort(key=lambda r: (r["advantage"], r["update"], r["seed"]))
        print(_table(rows))
        return 0

    root = Path(args.root)
    init_ray(load_config(args.config, args.overrides).cluster)
    rows = []
    for adv, upd, seed in itertools.product(args.advantages, args.updates, args.seeds):
        trial = f"{adv}_{upd}_seed{seed}"
        run = root / "finetune" / trial
        if not (run / "finetune_summary.json").exists():
            cfg = load_config(args.config, [*args.overrides, f"finetune.advantage={adv}", f"finetune.update={upd}",
                                            f"seed={seed}", f"run.root={root}", "run.experiment=finetune",
                                            f"run.trial={trial}", "run.progress=false"])
            if run.exists():
                import shutil

                shutil.rmtree(run)
            run_finetune_job(cfg)
        s = json.loads((run / "finetune_summary.json").read_text())
        rows.append(s | {"seed": seed, "run": str(run)})
    table = _table(rows)
    print(table)
    root.mkdir(parents=True, exist_ok=True)
    (root / "finetune_grid.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
