"""How many predicted actions a sequence policy should execute before it replans (Ta), on PickCube-v1.

Motion-planning demonstrations move in smooth segments that start and stop at rest (approach, descend, close,
lift, carry). At rest the next demonstrated action is nearly zero and the state says little about how long the
pause lasts, so a policy that replans every step can settle into a pause it never leaves; an open-loop chunk
carries the whole acceleration profile. This benchmark measures that: each policy is trained once per seed
(the executed horizon does not change training), then its evaluated checkpoint is evaluated with several
``Ta`` values (``offrl eval ... policy.action_horizon=Ta``), on ``success_once`` over 100 fixed evaluation
seeds (2,000,000,000 on, apart from the seeds bench/imitation.py reports), ``max_episode_steps=100``,
terminations ignored, with 95% Wilson intervals of the pooled episodes.

    python bench/action_horizon.py [--policies mlp_chunk diffusion] [--horizons 1 2 4 8 12 15]
                                   [--seeds 0 1 2] [--cell mp_ee100] [--steps 8000] [--root runs/action_horizon]

Each (policy, seed) is one ``offrl pretrain`` run under ``ROOT/runs/`` (bench/imitation.py's cell), and each Ta
one ``eval_ta<Ta>.json`` beside its eval.json; finished ones are read back, so an interrupted benchmark
continues. Needs
``scripts/maniskill_demos.sh PickCube-v1 100 datasets/mp`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from imitation import CELLS, NAMES, pooled, run_cell  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--policies", nargs="+", default=["mlp_chunk"], choices=["mlp_chunk", "diffusion"],
                    help="sequence policies to compare (columns)")
    ap.add_argument("--horizons", type=int, nargs="+", default=[1, 2, 4, 8, 12, 15],
                    help="executed action horizons Ta (rows); each needs Ta <= Tp - To + 1 = 15")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--cell", default="mp_ee100", choices=list(CELLS), help="dataset (a row of bench/imitation.py)")
    ap.add_argument("--steps", type=int, default=8000, help="gradient steps per run (batch 256)")
    ap.add_argument("--episodes", type=int, default=100, help="evaluation episodes per run")
    ap.add_argument("--eval-seed", type=int, default=2_000_000_000,
                    help="first evaluation seed: apart from offrl eval's default (1,000,000,000) on purpose, so a Ta "
                         "chosen here is not chosen on the seeds bench/imitation.py reports")
    ap.add_argument("--root", default="runs/action_horizon", help="where runs and the report go")
    ap.add_argument("--report-only", action="store_true", help="train nothing: tabulate the finished runs")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    if any(h < 1 for h in args.horizons):
        ap.error("--horizons must be >= 1")
    os.chdir(os.path.join(os.path.dirname(__file__), ".."))
    from offrl.platform.cluster import init_ray

    if not args.report_only:
        init_ray(None)
    from offrl.platform.pretrain import run_eval_job

    results: dict[tuple[str, int], list[dict]] = {}
    for policy in args.policies:
        for seed in args.seeds:
            sub = argparse.Namespace(steps=args.steps, episodes=args.episodes, root=args.root,
                                     report_only=args.report_only, overrides=list(args.overrides))
            t = time.time()
            try:
                trained = run_cell(args.cell, policy, seed, sub, log=lambda *a, **k: None)
            except FileNotFoundError:
                continue
            ckpt = json.loads((Path(trained["run"]) / "eval.json").read_text())["checkpoint"]
            for ta in args.horizons:
                out = Path(trained["run"]) / f"eval_ta{ta}.json"
                if not out.exists():
                    if args.report_only:
                        continue
                    run_eval_job(ckpt, episodes=args.episodes, seed=args.eval_seed,
                                 overrides=[f"policy.action_horizon={ta}"],
                                 out=str(out), log=lambda *a, **k: None)
                ev = json.loads(out.read_text())
                k = sum(bool(e["success_once"]) for e in ev["per_episode"])
                results.setdefault((policy, ta), []).append({"k": k, "n": ev["episodes"]})
                print(f"[action_horizon] {policy} seed {seed} Ta={ta}: success_once {k}/{ev['episodes']} "
                      f"({time.time() - t:.0f}s)", flush=True)
    label = CELLS[args.cell][0]
    lines = [f"success_once on PickCube-v1 ({label}), {args.episodes} episodes per run from seed {args.eval_seed}, "
             f"max_episode_steps=100, terminations ignored; {args.steps} gradient steps x batch 256; seeds {args.seeds}; pooled over seeds "
             f"[95% Wilson interval] (per-seed values)", "",
             "| Ta (executed actions per replanning) | " + " | ".join(NAMES[p] for p in args.policies) + " |",
             "|---:|" + "---:|" * len(args.policies)]
    for ta in args.horizons:
        cells = []
        for p in args.policies:
            rs = results.get((p, ta))
            if not rs:
                cells.append("-")
                continue
            cells.append(pooled(rs))
        lines.append(f"| {ta} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    Path(args.root).mkdir(parents=True, exist_ok=True)
    (Path(args.root) / "action_horizon.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
