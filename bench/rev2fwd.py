"""Reverse-to-forward imitation on offrl/PickPlaceA-v1 and offrl/PickPlaceB-v1 (2 CPU cores).

Stages (each skipped when its output exists, so an interrupted benchmark continues where it stopped):

1. **Data.** 100 task-B demos from the scripted expert (``offrl collect``), 100 forward task-A demos from the
   same expert on task A (the ablation's data), and task B's demos time-reversed into task A
   (``offrl data reverse``, with its open-loop replay check).
2. **Policies** (``tune_configs/pretrain_pickplace.yaml``: MLP + action chunking, 8,000 gradient steps of 256,
   the same for every row): A from reversed B data, A from forward A data, and B; each evaluated on its own task
   (100 episodes from fixed seeds; ``success_once``, 95% Wilson interval).
3. **Alternating test** (``offrl alternate``) of the A-from-reversed-data and B policies: chains of A->B->A...
   without resets, until the first failure or ``--max-cycles``.
4. **The loop** (``offrl iterate tune_configs/rev2fwd.yaml``): alternating test, merge successful rollouts,
   finetune both policies; iterations 0..``--iterations``.
5. **Control** for the loop: policy A finetuned for the same rounds and steps on its original data only, so a
   change of A's own-task success over the loop can be told apart from the effect of more finetuning.

Stages 2-4 run once per training seed (``--seeds``); the first seed's test and loop go to ``OUT/alternate`` and
``OUT/iterate``, later seeds' to ``OUT/alternate_seedS`` and ``OUT/iterate_seedS``; with several seeds the report
adds a table of the loop pooled over seeds. ``--expert-b`` runs the loop with ``iterate.expert_b=true`` (task B's
scripted expert demonstrates from the start state of every failed B attempt) into ``OUT/iterate_expertb[_seedS]``.

    python bench/rev2fwd.py [--seeds 0] [--steps 8000] [--chains 50] [--iterations 3] [--out runs/rev2fwd]
                            [--stages data policies alternate iterate] [--env-kwargs YAML] [--expert-b] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from offrl.platform.evaluate import wilson_interval as wilson  # noqa: E402

A, B = "offrl/PickPlaceA-v1", "offrl/PickPlaceB-v1"
CONFIG = "tune_configs/pretrain_pickplace.yaml"
STAGES = ("data", "policies", "alternate", "iterate", "control")


def offrl(*args: str, log=print) -> str:
    """Run ``python -m offrl ARGS``; its output is echoed; a failure stops the benchmark with its message."""
    cmd = [sys.executable, "-m", "offrl", *args]
    log("$ " + " ".join(cmd[2:]))
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = (p.stdout or "") + (p.stderr or "")
    keep = [ln for ln in out.splitlines() if ln.strip() and "%|" not in ln]
    for ln in keep[-12:]:
        log("  " + ln)
    if p.returncode not in (0, 1):
        raise SystemExit(f"offrl {' '.join(args)} failed (exit {p.returncode})")
    return out


def env_kwargs(args) -> list[str]:
    """The task settings (``--env-kwargs``) as a config override for collect and pretrain."""
    return [f"env.kwargs={args.env_kwargs}"] if args.env_kwargs else []


def data_paths(args) -> dict[str, Path]:
    d = Path(args.data)
    n = args.demos
    return {"B": d / f"PickPlaceB-v1_expert{n}.h5", "A_fwd": d / f"PickPlaceA-v1_expert{n}.h5",
            "A_rev": d / f"PickPlaceA-v1_reversed{n}.h5"}


def stage_data(args, log) -> dict:
    paths = data_paths(args)
    info: dict = {}
    for key, env in (("B", B), ("A_fwd", A)):
        if not paths[key].exists():
            out = offrl("collect", "tune_configs/collect_pickplace.yaml", f"env.id={env}",
                        f"collect.episodes={args.demos}", f"collect.output={paths[key]}", "seed=0",
                        *env_kwargs(args), log=log)
            (paths[key].with_suffix(".collect.txt")).write_text(out)
    for key in ("B", "A_fwd"):
        txt = paths[key].with_suffix(".collect.txt")
        line = next((ln for ln in txt.read_text().splitlines() if ln.startswith("attempted")), "") if txt.exists() else ""
        info[f"{key}_collect"] = line
    if not paths["A_rev"].exists():
        offrl("data", "reverse", str(paths["B"]), "-o", str(paths["A_rev"]), log=log)
    meta = json.loads(paths["A_rev"].with_suffix(".json").read_text())["offrl"]["reverse"]
    info["reverse"] = meta
    return info


def run_name(policy: str, seed: int) -> str:
    return f"{policy}_seed{seed}"


def stage_policies(args, log) -> dict:
    paths = data_paths(args)
    rows = {"A_rev": (A, paths["A_rev"]), "A_fwd": (A, paths["A_fwd"]), "B": (B, paths["B"])}
    root = Path(args.out)
    for seed in args.seeds:
        for key, (env, data) in rows.items():
            run = root / "policies" / run_name(key, seed)
            if (run / "eval.json").exists():
                continue
            offrl("pretrain", CONFIG, f"env.id={env}", f"pretrain.dataset={data}", f"seed={seed}",
                  f"pretrain.epochs={max(1, args.steps // 200)}", "pretrain.steps_per_epoch=200" if args.steps >= 200
                  else f"pretrain.steps_per_epoch={args.steps}", f"pretrain.eval_episodes={args.episodes}",
                  f"eval.episodes={args.episodes}", f"run.root={root}", "run.experiment=policies",
                  f"run.trial={run_name(key, seed)}", "run.progress=false", *env_kwargs(args), *args.overrides,
                  log=log)
    return read_policies(args)


def read_policies(args) -> dict:
    out: dict = {}
    for key in ("A_rev", "A_fwd", "B"):
        rs = []
        for seed in args.seeds:
            f = Path(args.out) / "policies" / run_name(key, seed) / "eval.json"
            if f.exists():
                ev = json.loads(f.read_text())
                rs.append((sum(bool(e["success_once"]) for e in ev["per_episode"]), ev["episodes"]))
        if rs:
            k, n = sum(r[0] for r in rs), sum(r[1] for r in rs)
            out[key] = {"k": k, "n": n, "per_seed": [r[0] / r[1] for r in rs]}
    return out


def fmt(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]"


def report(args, info: dict, pol: dict, log) -> str:
    lines = [f"Reverse-to-forward on {A} / {B}; {args.demos} demos per dataset; seeds {args.seeds}; "
             f"policies: MLP + chunking, {args.steps} gradient steps x 256 ({CONFIG}); success_once over "
             f"{args.episodes} evaluation episodes per seed, 95% Wilson interval of the pooled episodes", "",
             "| measurement | value |", "|---|---|"]
    for key, label in (("B_collect", "task-B scripted expert"), ("A_fwd_collect", "task-A scripted expert")):
        if info.get(key):
            lines.append(f"| {label} | {info[key]} |")
    rv = info.get("reverse")
    if rv:
        lines.append(f"| reversed B data: final state succeeds in A | {rv['reversed_final_success']}/{rv['episodes']} |")
        if rv.get("replay_success") is not None:
            lines.append(f"| reversed B data: open-loop replay succeeds in A | {fmt(rv['replay_success'], rv['replay_episodes'])} |")
    names = {"A_rev": "policy A trained on reversed B data", "A_fwd": "policy A trained on forward A data (ablation)",
             "B": "policy B trained on B data"}
    for key, label in names.items():
        if key in pol:
            per = ", ".join(f"{x:.2f}" for x in pol[key]["per_seed"])
            lines.append(f"| {label} | {fmt(pol[key]['k'], pol[key]['n'])} (per seed {per}) |")
    for seed in args.seeds:
        alt = seed_dir(args, "alternate", seed) / "alternate.json"
        if not alt.exists():
            continue
        s = json.loads(alt.read_text())
        cs = s["consecutive_success"]
        tag = f"seed {seed}: " if len(args.seeds) > 1 else ""
        lines.append(f"| {tag}alternating test ({s['chains']} chains, max {s['max_cycles']} cycles): "
                     f"consecutive_success | mean {cs['mean']:.2f}, median {cs['median']:.1f}, max {cs['max']} |")
        for t in ("A", "B"):
            r = s[f"{t}_success_rate"]
            val = "- (no attempt)" if r["mean"] is None else f"{r['mean']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
            lines.append(f"| {tag}alternating test: {t}_success_rate | {val} ({r['successes']}/{r['attempts']} attempts) |")
    text = "\n".join(lines)
    for seed in args.seeds:
        it = seed_dir(args, loop_name(args), seed) / "iterate.md"
        if it.exists():
            text += "\n\n" + (f"Seed {seed}:\n\n" if len(args.seeds) > 1 else "") + it.read_text()
    pooled_its = iterate_summary(args)
    if pooled_its:
        text += "\n\n" + pooled_its
    ctrl = control_summary(args)
    if ctrl:
        text += "\n\n" + ctrl
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the policies")
    ap.add_argument("--demos", type=int, default=100, help="demonstrations per dataset")
    ap.add_argument("--steps", type=int, default=8000, help="gradient steps per policy (every row alike)")
    ap.add_argument("--episodes", type=int, default=100, help="evaluation episodes per policy")
    ap.add_argument("--chains", type=int, default=50, help="alternating-test chains")
    ap.add_argument("--max-cycles", type=int, default=10, help="A->B cycles per chain at most")
    ap.add_argument("--iterations", type=int, default=3, help="offrl iterate iterations after iteration 0")
    ap.add_argument("--data", default="datasets", help="where the datasets go")
    ap.add_argument("--env-kwargs", default="", metavar="YAML",
                    help="task settings for every stage, e.g. '{target_noise: 0.02}' (use with its own --data/--out)")
    ap.add_argument("--out", default="runs/rev2fwd", help="where runs and the report go")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to run")
    ap.add_argument("--expert-b", action="store_true",
                    help="the loop with iterate.expert_b=true (B's expert demonstrates from B's failed chain starts); "
                         "its runs go to OUT/iterate_expertb[_seedS]")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 demos, 200 steps, 10 episodes, 4 chains")
    ap.add_argument("--report-only", action="store_true", help="run nothing; tabulate what exists")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every pretrain run")
    args = ap.parse_args()
    if args.quick:
        args.demos, args.steps, args.episodes, args.chains, args.max_cycles, args.iterations = 10, 200, 10, 4, 3, 1
        if args.out == ap.get_default("out"):
            args.out = "runs/rev2fwd_quick"
        if args.data == ap.get_default("data"):
            args.data = "runs/rev2fwd_quick/data"
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.data).mkdir(parents=True, exist_ok=True)
    info, pol = {}, {}
    if not args.report_only:
        if "data" in args.stages:
            info = stage_data(args, log)
        if "policies" in args.stages:
            pol = stage_policies(args, log)
        if "alternate" in args.stages:
            stage_alternate(args, log)
        if "iterate" in args.stages:
            stage_iterate(args, log)
        if "control" in args.stages:
            stage_control(args, log)
    if not info and data_paths(args)["A_rev"].exists():
        info = {"reverse": json.loads(data_paths(args)["A_rev"].with_suffix(".json").read_text())["offrl"]["reverse"]}
        for key in ("B", "A_fwd"):
            txt = data_paths(args)[key].with_suffix(".collect.txt")
            if txt.exists():
                info[f"{key}_collect"] = next((ln for ln in txt.read_text().splitlines() if ln.startswith("attempted")), "")
    pol = pol or read_policies(args)
    text = report(args, info, pol, log)
    print(text)
    (Path(args.out) / ("rev2fwd_expertb.md" if args.expert_b else "rev2fwd.md")).write_text(text + "\n")
    return 0


def seed_dir(args, name: str, seed: int) -> Path:
    """Where a seed's alternating test / loop goes: ``OUT/NAME`` for the first seed, ``OUT/NAME_seedS`` after."""
    return Path(args.out) / (name if seed == args.seeds[0] else f"{name}_seed{seed}")


def stage_alternate(args, log) -> None:
    for seed in args.seeds:
        out = seed_dir(args, "alternate", seed)
        if (out / "alternate.json").exists():
            continue
        pa = Path(args.out) / "policies" / run_name("A_rev", seed)
        pb = Path(args.out) / "policies" / run_name("B", seed)
        offrl("alternate", "--policy-a", str(pa), "--policy-b", str(pb), "--chains", str(args.chains),
              "--max-cycles", str(args.max_cycles), "--out", str(out), log=log)


def loop_name(args) -> str:
    """The loop's folder name: ``iterate``, or ``iterate_expertb`` with ``--expert-b``."""
    return "iterate_expertb" if args.expert_b else "iterate"


def stage_iterate(args, log) -> None:
    paths = data_paths(args)
    for seed in args.seeds:
        pa = Path(args.out) / "policies" / run_name("A_rev", seed)
        pb = Path(args.out) / "policies" / run_name("B", seed)
        offrl("iterate", "tune_configs/rev2fwd.yaml", f"iterate.policy_a={pa}", f"iterate.policy_b={pb}",
              f"iterate.data_a={paths['A_rev']}", f"iterate.data_b={paths['B']}",
              f"iterate.root={seed_dir(args, loop_name(args), seed)}", f"iterate.max_iterations={args.iterations + 1}",
              f"iterate.chains={args.chains}", f"iterate.max_cycles={args.max_cycles}",
              f"iterate.expert_b={str(args.expert_b).lower()}", log=log)


def stage_control(args, log) -> None:
    """The loop's finetuning without the loop's data: A finetuned on its original (reversed) data only, the same
    rounds, steps and evaluation as ``offrl iterate`` runs; separates "more finetuning" from "chain rollouts"."""
    from offrl.config import load_config
    from offrl.platform.iterate import _finetune, policy_checkpoint

    cfg = load_config("tune_configs/rev2fwd.yaml", [f"iterate.max_iterations={args.iterations + 1}"])
    for seed in args.seeds:
        ck = policy_checkpoint(Path(args.out) / "policies" / run_name("A_rev", seed))
        for i in range(args.iterations):
            run = _finetune(Path(ck), data_paths(args)["A_rev"], Path(args.out) / f"control_A_seed{seed}" / f"iter_{i}",
                            "A", cfg.iterate, log)
            ck = policy_checkpoint(run)


def loop_iterations(args) -> dict:
    """``{seed: iterate.json's iterations}`` for the seeds whose loop has a state file."""
    out = {}
    for seed in args.seeds:
        f = seed_dir(args, loop_name(args), seed) / "iterate.json"
        if f.exists():
            out[seed] = json.loads(f.read_text())["iterations"]
    return out


def control_summary(args) -> str:
    rows = []
    runs = loop_iterations(args)
    for i in range(args.iterations):
        loop = [its[i]["eval"]["A"] for its in runs.values()
                if i < len(its) and its[i].get("eval", {}).get("A") is not None]
        ctrl = []
        for seed in args.seeds:
            ev = Path(args.out) / f"control_A_seed{seed}" / f"iter_{i}" / "finetune" / "A" / "eval.json"
            if ev.exists():
                ctrl.append(json.loads(ev.read_text())["success_once"]["mean"])
        if ctrl:
            fm = lambda xs: f"{sum(xs) / len(xs):.2f} ({', '.join(f'{x:.2f}' for x in xs)})" if xs else "-"  # noqa: E731
            rows.append(f"| {i} | {fm(loop)} | {fm(ctrl)} |")
    if not rows:
        return ""
    return "\n".join(["A's own-task success after each finetuning round, mean over seeds (per seed):", "",
                      "| round | the loop (original + chain successes) | control (original data only) |",
                      "|---:|---|---|", *rows])


def iterate_summary(args) -> str:
    """Iterations pooled over the seeds whose loop finished: consecutive_success as the mean over seeds (each
    seed's own mean in brackets), A/B chain success rates over the pooled attempts with Wilson intervals."""
    runs = list(loop_iterations(args).items())
    if len(runs) < 2:
        return ""
    lines = [f"Pooled over seeds {[s for s, _ in runs]}:", "",
             "| iteration | consecutive_success, mean over seeds (per seed) | A_success_rate (pooled attempts) | "
             "B_success_rate (pooled attempts) | own-task success after finetuning A / B, mean over seeds |",
             "|---:|---|---|---|---|"]
    for i in range(max(len(its) for _, its in runs)):
        alts = [its[i]["alternate"] for _, its in runs if i < len(its) and "alternate" in its[i]]
        if not alts:
            break
        cs = [a["consecutive_success"]["mean"] for a in alts]
        cells = []
        for t in "AB":
            k = sum(a[f"{t}_success_rate"]["successes"] for a in alts)
            n = sum(a[f"{t}_success_rate"]["attempts"] for a in alts)
            cells.append(f"{fmt(k, n)} ({k}/{n})" if n else "- (no attempt)")
        evs = [its[i]["eval"] for _, its in runs if i < len(its) and its[i].get("eval")]
        own = (" / ".join(f"{sum(e[t] for e in evs) / len(evs):.2f}" for t in "AB") if evs else "- / -")
        lines.append(f"| {i} | {sum(cs) / len(cs):.2f} ({', '.join(f'{c:.2f}' for c in cs)}) | {cells[0]} | "
                     f"{cells[1]} | {own} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
