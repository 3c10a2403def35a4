"""Imitation benchmark on PickCube-v1: MLP BC vs MLP + action chunking vs Diffusion Policy.

Rows are datasets (ManiSkill motion-planning demos in pd_ee_delta_pos with 10 / 25 / 100 episodes, the same
100 demos in pd_joint_delta_pos, offrl's scripted demos with 10 / 25 / 100 episodes, and 100 scripted DART demos:
noise 0.2, expert labels), columns are policies.
Every cell trains with the same budget (gradient steps x batch size) and is scored by ``success_once`` on
100 evaluation episodes with fixed seeds, ``max_episode_steps=100`` and terminations ignored (ManiSkill's
learning-from-demos protocol), with 95% Wilson intervals; with several seeds a cell shows the mean over
seeds and the interval of the pooled episodes. Finished cells are read back from their eval.json, so an
interrupted benchmark continues where it stopped. Then, when Diffusion Policy is among the policies (or with
``--cost-only``), on the same machine in the same run, the cost of Diffusion Policy against the MLP: training
seconds per 1,000 gradient steps, milliseconds per replanning step for a batch of 8 envs, and evaluation
env-steps/s.

    python bench/imitation.py [--cells mp_ee100 scripted100] [--policies mlp mlp_chunk diffusion]
                              [--seeds 0 1 2] [--steps 8000] [--root runs/imitation] [--cost-only] [--report-only]

Needs ``scripts/maniskill_demos.sh PickCube-v1 100 datasets/mp`` first (the motion-planning demos); the
scripted demos (plain, and DART: the expert's noise-free labels on states visited with action noise 0.2) are
collected here when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from offrl.platform.evaluate import wilson_interval as wilson  # noqa: E402

MP_EE = "datasets/mp/PickCube-v1_mp100.pd_ee_delta_pos.h5"
MP_JOINT = "datasets/mp/PickCube-v1_mp100.pd_joint_delta_pos.h5"
SCRIPTED = "datasets/PickCube-v1_scripted100.h5"
DART = "datasets/PickCube-v1_dart0.2_100.h5"
# the offrl datasets this benchmark collects itself when missing: path -> collect overrides
COLLECTED = {SCRIPTED: [], DART: ["collect.action_noise=0.2", "collect.action_labels=expert"]}

# cell -> (row label, dataset, episodes used)
CELLS = {
    "mp_ee10": ("motion planning, pd_ee_delta_pos, 10 demos", MP_EE, 10),
    "mp_ee25": ("motion planning, pd_ee_delta_pos, 25 demos", MP_EE, 25),
    "mp_ee100": ("motion planning, pd_ee_delta_pos, 100 demos", MP_EE, 100),
    "mp_joint100": ("motion planning, pd_joint_delta_pos, 100 demos", MP_JOINT, 100),
    "scripted10": ("offrl scripted, pd_ee_delta_pos, 10 demos", SCRIPTED, 10),
    "scripted25": ("offrl scripted, pd_ee_delta_pos, 25 demos", SCRIPTED, 25),
    "scripted100": ("offrl scripted, pd_ee_delta_pos, 100 demos", SCRIPTED, 100),
    "dart100": ("offrl scripted, DART (noise 0.2, expert labels), 100 demos", DART, 100),
}
# policy -> overrides on tune_configs/pretrain_diffusion.yaml (the shared budget and protocol)
POLICIES = {
    "mlp": ["policy.kind=mlp", "policy.hidden=[256,256]", "policy.log_std_init=-1.0", "pretrain.actor_lr=1e-3",
            "pretrain.grad_clip=1.0"],
    "mlp_chunk": ["policy.kind=mlp_chunk", "policy.hidden=[256,256]", "pretrain.actor_lr=1e-3"],
    "diffusion": ["policy.kind=diffusion"],
}
NAMES = {"mlp": "MLP BC", "mlp_chunk": "MLP + chunking", "diffusion": "Diffusion Policy"}
CONFIG = "tune_configs/pretrain_diffusion.yaml"


def run_cell(cell: str, policy: str, seed: int, args, log) -> dict:
    from offrl.config import load_config
    from offrl.platform.pretrain import run_pretrain_job

    label, data, n = CELLS[cell]
    trial = f"{cell}_{policy}_seed{seed}"
    run = Path(args.root) / "runs" / trial
    if not (run / "eval.json").exists():
        if args.report_only:
            raise FileNotFoundError(f"not run yet ({run})")
        epochs = max(1, args.steps // 200)
        cfg = load_config(CONFIG, [*POLICIES[policy], f"pretrain.dataset={data}", f"pretrain.num_episodes={n}",
                                   f"pretrain.epochs={epochs}", "pretrain.steps_per_epoch=200",
                                   f"pretrain.eval_episodes={args.episodes}", f"seed={seed}",
                                   f"run.root={args.root}", "run.experiment=runs", f"run.trial={trial}",
                                   "run.progress=false", *args.overrides])
        if run.exists():  # an interrupted cell: continue it from its last checkpoint
            run_pretrain_job(cfg, resume=True, log=log)
        else:
            run_pretrain_job(cfg, log=log)
    ev = json.loads((run / "eval.json").read_text())
    k = sum(bool(e["success_once"]) for e in ev["per_episode"])
    return {"k": k, "n": ev["episodes"], "evaluated": ev.get("evaluated", ""), "run": str(run)}


def pooled(rs: list[dict]) -> str:
    """A table cell for several seeds' runs ``[{k, n}, ...]``: the pooled success rate with its 95% Wilson
    interval, then the per-seed rates when there is more than one seed."""
    k, n = sum(r["k"] for r in rs), sum(r["n"] for r in rs)
    lo, hi = wilson(k, n)
    per = ", ".join(f"{r['k'] / r['n']:.2f}" for r in rs)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]" + (f" ({per})" if len(rs) > 1 else "")


def cost(args) -> list[str]:
    """Training, inference and evaluation cost of Diffusion Policy against the MLP, measured side by side."""
    import numpy as np
    import torch

    from offrl.algos.networks import numpy_state_dict
    from offrl.config import load_config
    from offrl.envs.maniskill import ManiSkillCPUSim
    from offrl.platform.pretrain import build_learner
    from offrl.platform.rollout import build_policy

    torch.set_num_threads(2)
    sim = ManiSkillCPUSim(num_envs=8, max_episode_steps=100)
    low, high = sim.action_low, sim.action_high
    learners, specs = {}, {}
    for policy in ("mlp", "diffusion"):
        cfg = load_config(CONFIG, [*POLICIES[policy], *args.overrides])
        learner, arch = build_learner(cfg, sim.obs_dim, sim.act_dim, low, high, total_steps=1000)
        learners[policy] = (learner, cfg)
        specs[policy] = {"kind": arch.get("kind", "mlp"), "arch": arch, "weights": numpy_state_dict(learner.actor),
                         "deterministic": True}
    g = torch.Generator().manual_seed(0)
    train_s = {p: [] for p in learners}
    for _ in range(3):  # alternate the two, so load on the machine hits both alike
        for p, (learner, cfg) in learners.items():
            bs = cfg.pretrain.batch_size
            if cfg.policy.is_sequence:
                batch = {"obs_seq": torch.randn(bs, cfg.policy.obs_horizon, sim.obs_dim, generator=g),
                         "act_seq": torch.rand(bs, cfg.policy.pred_horizon, sim.act_dim, generator=g) * 2 - 1}
            else:
                batch = {"obs": torch.randn(bs, sim.obs_dim, generator=g),
                         "actions": torch.rand(bs, sim.act_dim, generator=g) * 2 - 1}
            t = time.perf_counter()
            for _ in range(20):
                learner.update(batch)
            train_s[p].append((time.perf_counter() - t) / 20 * 1000)
    dp = learners["diffusion"][0].actor
    obs8 = torch.randn(8, dp.obs_horizon, sim.obs_dim)
    dp.predict(obs8)
    inf = []
    for _ in range(20):
        t = time.perf_counter()
        dp.predict(obs8, torch.Generator().manual_seed(0))
        inf.append((time.perf_counter() - t) * 1000)
    sps = {p: [] for p in specs}
    for r in range(3):
        for p, spec in specs.items():
            pol = build_policy(spec, sim, seed=r)
            obs = sim.reset(seed=100 + r)
            t = time.perf_counter()
            for _ in range(100):
                obs, *_ = sim.step(pol(obs, sim)[0])
            sps[p].append(100 * sim.num_envs / (time.perf_counter() - t))
    sim.close()
    med = {k: float(np.median(v)) for k, v in train_s.items()}
    msps = {k: float(np.median(v)) for k, v in sps.items()}
    dcfg = learners["diffusion"][1]
    return [
        "| cost on this machine (2 CPU cores), measured side by side | MLP BC | Diffusion Policy | ratio |",
        "|---|---:|---:|---:|",
        f"| training s / 1,000 gradient steps (batch {dcfg.pretrain.batch_size}) | {med['mlp']:.1f} | "
        f"{med['diffusion']:.1f} | {med['diffusion'] / med['mlp']:.0f}x |",
        f"| inference ms / replanning step, 8 envs ({dcfg.diffusion.inference_steps} DDIM steps) | - | "
        f"{float(np.median(inf)):.1f} | - |",
        f"| evaluation env-steps/s, 8 envs, Ta={dcfg.policy.action_horizon} | {msps['mlp']:.0f} | "
        f"{msps['diffusion']:.0f} | {msps['diffusion'] / msps['mlp']:.2f} |",
    ]


def plot(results: dict, args, path: Path) -> None:
    """Grouped bars: success_once per data row and policy, with the 95% Wilson interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in args.cells if any((c, p) in results for p in args.policies)]
    if not cells:
        return
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(cells), 3.6))
    w = 0.8 / len(args.policies)
    for j, p in enumerate(args.policies):
        xs, ys, lo, hi = [], [], [], []
        for i, c in enumerate(cells):
            rs = results.get((c, p))
            if not rs:
                continue
            k, n = sum(r["k"] for r in rs), sum(r["n"] for r in rs)
            a, b = wilson(k, n)
            xs.append(i + (j - (len(args.policies) - 1) / 2) * w)
            ys.append(k / n)
            lo.append(k / n - a)
            hi.append(b - k / n)
        ax.bar(xs, ys, w, yerr=[lo, hi], capsize=3, label=NAMES[p])
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([CELLS[c][0].replace(", ", "\n") for c in cells], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success_once (95% Wilson CI)")
    ax.set_title(f"PickCube-v1 imitation, {args.steps} gradient steps, {args.episodes} eval episodes", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from offrl.config import load_config
    from offrl.data.collect import collect
    from offrl.platform.cluster import init_ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS), help="table rows to run")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES), help="table columns")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds per cell")
    ap.add_argument("--steps", type=int, default=8000, help="gradient steps per run (batch 256), every policy alike")
    ap.add_argument("--episodes", type=int, default=100, help="evaluation episodes per run")
    ap.add_argument("--root", default="runs/imitation", help="where runs and the report go")
    ap.add_argument("--cost-only", action="store_true", help="only measure the cost table")
    ap.add_argument("--report-only", action="store_true",
                    help="train and measure nothing: tabulate the finished cells ('-' for others)")
    ap.add_argument("--quiet", action="store_true", help="less output from each run")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (e.g. diffusion.widths=[64,128])")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if args.quiet else print
    lines: list[str] = []
    if not args.cost_only:
        needed = {CELLS[c][1] for c in args.cells}
        for path in needed - set(COLLECTED):
            if not Path(path).exists():
                print(f"missing {path}: run scripts/maniskill_demos.sh PickCube-v1 100 datasets/mp first")
                return 2
        if not args.report_only:
            init_ray(load_config(CONFIG).cluster)
        for path, extra in COLLECTED.items():
            if path in needed and not Path(path).exists() and not args.report_only:
                collect(load_config("tune_configs/collect_pickcube.yaml",
                                    ["collect.episodes=100", f"collect.output={path}", "seed=0", *extra]))
        results: dict = {}
        for cell in args.cells:
            for policy in args.policies:
                for seed in args.seeds:
                    t = time.time()
                    try:
                        r = run_cell(cell, policy, seed, args, log)
                    except FileNotFoundError as e:
                        print(f"[imitation] {cell} {policy} seed {seed}: {e}")
                        continue
                    except Exception as e:  # report the cell as failed, go on with the others
                        print(f"[imitation] {cell} {policy} seed {seed}: FAILED: {e}")
                        continue
                    results.setdefault((cell, policy), []).append(r)
                    print(f"[imitation] {cell} {policy} seed {seed}: success_once {r['k']}/{r['n']} "
                          f"({r['evaluated']}; {time.time() - t:.0f}s)", flush=True)
        head = "| data | " + " | ".join(NAMES[p] for p in args.policies) + " |"
        lines += [f"success_once on PickCube-v1, {args.episodes} episodes per run, max_episode_steps=100, "
                  f"terminations ignored; {args.steps} gradient steps x batch 256 per run; seeds {args.seeds}; "
                  "mean over seeds [95% Wilson interval of the pooled episodes] (per-seed values)", "",
                  head, "|---|" + "---:|" * len(args.policies)]
        for cell in args.cells:
            row = [CELLS[cell][0]]
            for p in args.policies:
                rs = results.get((cell, p), [])
                if not rs:
                    row.append("-")
                    continue
                row.append(pooled(rs))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        plot(results, args, root / "imitation.png")
        lines.append(f"plot: {root / 'imitation.png'}")
        lines.append("")
    if args.cost_only or (not args.report_only and "diffusion" in args.policies):
        lines += cost(args)  # Diffusion Policy against the MLP: only when Diffusion Policy is in the run
    text = "\n".join(lines)
    print(text)
    (root / ("cost.md" if args.cost_only else "imitation.md")).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
