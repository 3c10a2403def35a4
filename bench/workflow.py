"""Checkpoint selection without online evaluation, checked against the simulator (Kumar et al. 2021's workflow).

CQL (``tune_configs/pretrain_cql.yaml``) on scripted PickCube-v1 demos in two regimes, each with and without
the correction the workflow recommends:

* ``overfit``: 10 demos, long training (the workflow expects dataset Q to rise, then fall);
* ``overfit_vib``: the same with a variational information bottleneck in the critics;
* ``underfit``: 200 demos, a small critic (the workflow expects a TD error that stays large);
* ``underfit_capacity``: the same data with a wide residual critic.

Every run keeps its 10 periodic checkpoints. ``offrl workflow`` reads each run's curves and gives its verdict
and selected checkpoint; then every checkpoint is evaluated in simulation (100 episodes, fixed seeds) on one
SimHost pool. Per run it reports the verdict, the Spearman rank correlation over the checkpoints between the
selection criterion (smoothed dataset Q on the training sample at the checkpoint's epoch, the curve the
workflow's peak rule reads) and success, and the success of the selected checkpoint against the last one and
the best one in hindsight. Finished runs and evaluations are read back, so an interrupted bench continues.

    python bench/workflow.py [--runs overfit overfit_vib underfit underfit_capacity] [--root runs/workflow_bench]
                             [--episodes 100] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CONFIG = "tune_configs/pretrain_cql.yaml"
DATA = "datasets/PickCube-v1_scripted200.h5"
RUNS = {
    "overfit": ("10 demos, critic [256, 256]", ["pretrain.num_episodes=10"]),
    "overfit_vib": ("10 demos, critic [256, 256] + VIB (k=16, weight 0.01)",
                    ["pretrain.num_episodes=10", "critic.vib_size=16", "critic.vib_weight=0.01"]),
    "underfit": ("200 demos, critic [16, 16]", ["critic.hidden=[16,16]"]),
    "underfit_capacity": ("200 demos, critic [256, 256, 256] residual",
                          ["critic.hidden=[256,256,256]", "critic.residual=true"]),
}


def ensure_data(log) -> None:
    if Path(DATA).exists():
        return
    from offrl.config import load_config
    from offrl.data.collect import collect

    log(f"[bench] collecting {DATA}")
    collect(load_config("tune_configs/collect_pickcube.yaml", ["collect.episodes=200", f"collect.output={DATA}",
                                                                "seed=0", "run.progress=false"]))


def train(name: str, root: Path, log) -> Path:
    from offrl.config import load_config
    from offrl.platform.pretrain import run_pretrain_job

    run = root / "runs" / name
    if (run / "pretrain_done.json").exists():
        return run
    if run.exists():  # an interrupted run: continue it
        cfg = load_config(CONFIG, RUNS[name][1] + [f"run.root={root}", "run.experiment=runs", f"run.trial={name}",
                                                   "run.progress=false", "pretrain.eval_episodes=1"])
        return run_pretrain_job(cfg, resume=True, log=log)
    cfg = load_config(CONFIG, RUNS[name][1] + [f"run.root={root}", "run.experiment=runs", f"run.trial={name}",
                                               "run.progress=false", "pretrain.eval_episodes=1"])
    return run_pretrain_job(cfg, log=log)


def evaluate_checkpoints(run: Path, episodes: int, pool_box: dict, log) -> dict[int, dict]:
    """success_once of every periodic checkpoint (cached in checkpoint_evals.json)."""
    from offrl.algos.networks import build_actor
    from offrl.config import from_dict
    from offrl.platform.checkpoint import checkpoint_json, load_checkpoint
    from offrl.platform.evaluate import evaluate
    from offrl.platform.pretrain import actor_spec

    cache = run / "checkpoint_evals.json"
    done = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.exists() else {}
    for ckpt in sorted((p for p in (run / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        epoch = int(ckpt.name)
        if epoch in done:
            continue
        cfg = from_dict(checkpoint_json(ckpt, "config.json"))
        if "pool" not in pool_box:
            from offrl.platform.cluster import init_ray
            from offrl.platform.simhost import SimHostPool

            init_ray(cfg.cluster)
            pool_box["pool"] = SimHostPool(cfg.env, cfg.cluster, seed=cfg.seed)
        arch = checkpoint_json(ckpt, "training_state/state.json")["actor_arch"]
        actor = build_actor(arch)
        load_checkpoint(ckpt, {"actor": actor}, parts=["actor"], restore_rng=False)
        s = evaluate(pool_box["pool"], actor_spec(actor, arch, True), episodes, cfg.eval.seed,
                     ignore_terminations=cfg.eval.ignore_terminations)
        done[epoch] = {"success_once": s["success_once"]["mean"], "ci95": s["success_once"]["ci95"],
                       "episodes": s["episodes"]}
        log(f"[bench] {run.name} epoch {epoch}: success_once {done[epoch]['success_once']:.2f}")
        cache.write_text(json.dumps({str(k): v for k, v in sorted(done.items())}, indent=1))
    return done


def analyse(run: Path) -> dict:
    from offrl.platform.workflow import Rules, analyse_run, smooth

    rules = Rules()
    a = analyse_run(run, rules)
    epochs, q = a.curves.series(a.result["overfitting"]["column"])
    qs = dict(zip(epochs.tolist(), smooth(q, rules.smooth).tolist()))
    return {"result": a.result, "criterion": qs}


def summarise(name: str, run: Path, evals: dict[int, dict]) -> dict:
    from scipy.stats import spearmanr

    an = analyse(run)
    res = an["result"]
    epochs = sorted(evals)
    succ = [evals[e]["success_once"] for e in epochs]
    crit = [an["criterion"][e] for e in epochs]
    rho = spearmanr(crit, succ).statistic if len(set(succ)) > 1 and len(set(crit)) > 1 else float("nan")
    sel = res["selected"]["epoch"]
    best = max(epochs, key=lambda e: (evals[e]["success_once"], -e))
    return {"run": name, "setting": RUNS[name][0], "regime": res["regime"], "triggered": res["triggered"],
            "peak_epoch": res["overfitting"].get("peak_epoch"), "selected": sel,
            "selected_reason": res["selected"]["reason"], "spearman": rho,
            "success_selected": evals[sel]["success_once"], "success_last": evals[epochs[-1]]["success_once"],
            "last_epoch": epochs[-1], "best_epoch": best, "success_best": evals[best]["success_once"],
            "curve": {e: {"criterion": an["criterion"][e], **evals[e]} for e in epochs},
            "evidence": {"overfitting": res["overfitting"], "underfitting": res["underfitting"]},
            "correction": res["correction"]}


def table(rows: list[dict]) -> str:
    out = ["| run | setting | verdict | dataset-Q peak (epoch) | Spearman(criterion, success) | selected (epoch) "
           "| last | best in hindsight (epoch) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rho = "n/a" if r["spearman"] != r["spearman"] else f"{r['spearman']:.2f}"
        verdict = r["regime"] + (f" (+{', '.join(r['triggered'][1:])})" if len(r["triggered"]) > 1 else "")
        out.append(f"| {r['run']} | {r['setting']} | {verdict} | {r['peak_epoch']} | {rho} | "
                   f"{r['success_selected']:.2f} ({r['selected']}) | {r['success_last']:.2f} ({r['last_epoch']}) | "
                   f"{r['success_best']:.2f} ({r['best_epoch']}) |")
    return "\n".join(out)


def plot(rows: list[dict], root: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        import csv

        rows_csv = list(csv.DictReader(open(root / "runs" / r["run"] / "metrics.csv")))
        ep = [int(x["step"]) for x in rows_csv]
        ax.plot(ep, [float(x["workflow/dataset_q_train"]) for x in rows_csv], label="dataset Q (train)")
        ax.plot(ep, [float(x["workflow/dataset_q_val"]) for x in rows_csv], label="dataset Q (held out)", alpha=0.7)
        ax.plot(ep, [float(x["workflow/td_error_train"]) for x in rows_csv], label="TD error (train)", ls=":")
        ax.axvline(r["selected"], color="k", ls="--", lw=1, label=f"selected ({r['selected']})")
        ax2 = ax.twinx()
        ce = sorted(int(e) for e in r["curve"])
        ax2.plot(ce, [r["curve"][e]["success_once"] for e in ce], "o-", color="tab:red", label="sim success")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("success (not used)", color="tab:red")
        ax.set_title(f"{r['run']}: {r['regime']}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path = root / "workflow_bench.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="runs to train and report")
    ap.add_argument("--root", default="runs/workflow_bench", help="where the run directories and results go")
    ap.add_argument("--episodes", type=int, default=100, help="evaluation episodes per checkpoint")
    ap.add_argument("--report-only", action="store_true", help="print the table from finished runs; train nothing")
    args = ap.parse_args()
    root = Path(args.root)
    log = print
    rows = []
    pool_box: dict = {}
    try:
        if not args.report_only:
            ensure_data(log)
        for name in args.runs:
            run = root / "runs" / name
            if not args.report_only:
                run = train(name, root, log)
                evals = evaluate_checkpoints(run, args.episodes, pool_box, log)
                if "pool" in pool_box:  # the next run's training makes its own SimHosts
                    pool_box.pop("pool").shutdown()
            else:
                cache = run / "checkpoint_evals.json"
                if not cache.exists():
                    continue
                evals = {int(k): v for k, v in json.loads(cache.read_text()).items()}
            rows.append(summarise(name, run, evals))
    finally:
        if "pool" in pool_box:
            pool_box["pool"].shutdown()
    (root / "workflow_bench.json").write_text(json.dumps(rows, indent=1, default=float))
    print(table(rows))
    if rows:
        print(f"\nplot: {plot(rows, root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
