"""What the BC policy sees: PickCube-v1 BC on the clean scripted demos with the full observation, with a floor
under the normaliser's std, and with the tool's and the cube's orientation quaternions hidden.

The scripted expert never turns the gripper and the cube stays upright in its demos, so the four entries of
each quaternion hardly vary there (std 0.0004-0.02). The policy's normaliser divides by that std: a cube that
tilts a few degrees in an off-centre grasp becomes an input several units from anything the demos showed.
This trains the same Gaussian MLP (``tune_configs/finetune_start.yaml``, actor only) three ways, for each
demo count and seed, and prints success (100 evaluation episodes, best-validation checkpoint) with IQM and a
bootstrap CI over the seeds:

* ``full``: every entry, normalised by the data's std (the default);
* ``floor``: ``policy.obs_min_std=0.01`` (the sequence policies' floor);
* ``no_orientation``: ``policy.obs_ignore=["22:26","32:36"]`` (``extra/tcp_pose`` and ``extra/obj_pose``'s
  quaternions, held at zero).

    python bench/obs_view.py [--root runs/obs_view] [--demos 100 50] [--seeds 0 1 2] [--variants ...]
                             [-- key=value ...]     # overrides for every run

Needs ``runs/finetune_start/data/clean.h5`` (``bench/finetune_start.py`` builds it). Finished runs are read
back, not retrained; about 1.5 minutes a run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = {"full": [], "floor": ["policy.obs_min_std=0.01"],
            "no_orientation": ['policy.obs_ignore=["22:26","32:36"]']}


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--root", default="runs/obs_view", help="run.root of the BC runs")
    ap.add_argument("--data", default="runs/finetune_start/data/clean.h5", help="the clean demos")
    ap.add_argument("--demos", type=int, nargs="+", default=[100, 50], help="pretrain.num_episodes values")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = ap.parse_args()
    if not Path(args.data).exists():
        ap.error(f"{args.data} not found: run bench/finetune_start.py first (or pass --data)")
    if any(n < 1 for n in args.demos):
        ap.error("--demos must be >= 1")

    import numpy as np

    from offrl.stats.aggregate import bootstrap_ci, iqm, probability_of_improvement_ci

    results: dict[tuple[int, str], list[float]] = {}
    for n in args.demos:
        for v in args.variants:
            for s in args.seeds:
                run = Path(args.root) / "obs_view" / f"bc_n{n}_{v}_s{s}"
                if not (run / "pretrain_done.json").exists():
                    cmd = [sys.executable, "-m", "offrl", "pretrain", "tune_configs/finetune_start.yaml",
                           "pretrain.algo=bc", "pretrain.critic_dataset=", f"pretrain.dataset={args.data}",
                           f"pretrain.num_episodes={n}", f"seed={s}", *args.overrides, *VARIANTS[v], f"run.root={args.root}",
                           "run.experiment=obs_view", f"run.trial={run.name}", "run.progress=false"]
                    print("$", " ".join(cmd), flush=True)
                    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:  # its error line is above
                        print(f"obs_view: the run {run.name} failed; nothing after it was trained", file=sys.stderr)
                        return 2
                ev = json.loads((run / "eval.json").read_text())
                results.setdefault((n, v), []).append(float(ev["success_once"]["mean"]))
    lines = ["| demos | observation | success, seeds " + ", ".join(map(str, args.seeds)) + " | IQM [95% CI] | "
             "P(> full) |", "|---:|---|---|---|---|"]
    for (n, v), xs in results.items():
        x = np.array(xs)
        ci = bootstrap_ci(x, iqm)
        base = results.get((n, "full"))
        p = "" if base is None or v == "full" else "{:.2f} [{:.2f}, {:.2f}]".format(
            *probability_of_improvement_ci(x, np.array(base)))
        lines.append(f"| {n} | {v} | {', '.join(f'{a:.2f}' for a in xs)} | {ci.point:.2f} [{ci.lo:.2f}, {ci.hi:.2f}] "
                     f"| {p} |")
    table = "\n".join(lines)
    print(table)
    (Path(args.root) / "obs_view.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
