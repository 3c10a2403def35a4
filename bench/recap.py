"""AWR vs push-away AWR vs RECAP (without and with guidance): the reference study's question, answered.

"Does explicitly pushing away bad actions outperform soft down-weighting (AWR)?" asks it of push-away
AWR; RECAP (Physical Intelligence's pi*0.6) is the third answer: keep every action's likelihood, and let
an advantage indicator the policy is conditioned on tell good from bad.

For each advantage estimator of ``--advantages`` (default: IQL, the best one of the finetuning grid, and MC,
the estimator of the study's push-away runs), runs ``bench/finetune_grid.py`` in its offline mode in the
sparse-reward setting of ``tune_configs/finetune_sparse.yaml`` (50,400 env steps, 100 evaluation episodes,
the same start checkpoint) for AWR, push-away AWR and RECAP at every guidance weight of ``--recap-weights``,
for every seed; finished runs are kept. Then ``offrl stats compare --pairwise`` per estimator: IQM, mean
and median of the final success with bootstrap CIs, P(> start), and P(row > column) for every pair of
rules. The tables go to ``<root>/recap.md``.

    python bench/recap.py [--advantages iql mc] [--seeds 0 1 2] [--recap-weights 0 1] [--root runs/recap_cmp]

The start checkpoint must exist (``python bench/finetune_start.py`` builds it, about 5 minutes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--advantages", nargs="+", default=["iql", "mc"], help="advantage estimators to compare under")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recap-weights", type=float, nargs="+", default=[0.0, 1.0],
                    help="finetune.recap_cfg_weight values of the RECAP cells (0: the positive condition, no guidance)")
    ap.add_argument("--root", default="runs/recap_cmp", help="where the runs and recap.md go")
    ap.add_argument("--config", default="tune_configs/finetune_sparse.yaml")
    ap.add_argument("--tables-only", action="store_true", help="run nothing; tabulate the runs already there")
    args = ap.parse_args()

    root = Path(args.root)
    py = sys.executable
    if not args.tables_only:
        subprocess.run([py, "bench/finetune_grid.py", "--config", args.config, "--root", str(root),
                        "--advantages", *args.advantages, "--updates", "awr", "push_away", "recap",
                        "--recap-weights", *map(str, args.recap_weights), "--modes", "offline",
                        "--seeds", *map(str, args.seeds)], check=True)
    out = [f"# AWR vs push-away AWR vs RECAP ({args.config}, seeds {' '.join(map(str, args.seeds))})", ""]
    grid = subprocess.run([py, "bench/finetune_grid.py", "--from-dir", str(root)], check=True, capture_output=True,
                          text=True).stdout
    out += ["## Every run", "", grid.strip(), ""]
    for adv in args.advantages:
        runs = sorted(str(p.parent) for p in (root / "finetune").glob(f"{adv}_*_offline_seed*/finetune_summary.json")
                      if int(p.parent.name.rsplit("seed", 1)[1]) in args.seeds)
        if not runs:
            continue
        res = subprocess.run([py, "-m", "offrl", "stats", "compare", *runs, "--by", "finetune.update",
                              "finetune.recap_cfg_weight", "--baseline", "start", "--pairwise",
                              "--out", str(root / "stats" / adv)], check=True, capture_output=True, text=True)
        table = res.stdout.split("\nwrote ")[0].strip()
        out += [f"## {adv}", "", table.replace("### eval/success_rate", f"### {adv}: eval/success_rate"), ""]
    text = "\n".join(out) + "\n"
    (root / "recap.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
