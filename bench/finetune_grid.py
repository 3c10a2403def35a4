"""Finetuning grid: success before and after finetuning for advantage x update combinations.

Runs ``offrl finetune`` (``tune_configs/finetune.yaml`` unless ``--config``) once per combination, mode and
seed, sequentially on the local Ray cluster, at an equal env-step budget, from the same pretrained
checkpoint; then prints a markdown table read back from each run's ``finetune_summary.json`` and
``metrics.csv`` and writes it to ``<root>/finetune_grid.md``. Every figure is recomputed from the run
directories. A finished run under ``<root>`` is reused only when its config is the cell's (every key outside
``run.*``); one that differs stops the grid before anything runs. ``--cell ADV:UPDATE:key=value`` gives a
setting to the matching cells only. The overrides after ``--`` reach every cell, except for the keys the
grid sets itself (the advantage, the update, the mode's keys such as ``finetune.bc_coef``, the seed and
``run.*``): naming one of those stops the grid with one error line saying which flag or ``--cell`` to use.

Modes (``--modes``): ``onpolicy`` is each rule as its own literature runs it on fresh rollouts only;
``offline`` keeps the pretraining data in the loop: the replay + offline mix (``finetune.replay=true``)
for IQL / SARSA with AWR / push-away, and the DAPG behaviour-cloning term (``finetune.bc_coef``, see
``--bc-coef``) on offline minibatches for everything else. ``--updates sac`` adds the RLPD-style
reference row (it brings its own critics, so it runs once per seed whatever ``--advantages`` says) on the
replay + offline mix with the DAPG term, two Q heads and ``actor_lr`` 3e-5.
``--updates recap`` (RECAP) runs once per guidance weight of ``--recap-weights``; in the offline mode it
takes the replay + offline mix (IQL, SARSA) or offline rows at ``finetune.offline_ratio`` of every
minibatch (GAE, MC); in the on-policy mode none (``offline_ratio=0``).

``--control`` adds, for every seed, the demos-only control (trial ``control_seed<N>``): GAE x PPO with the
DAPG term at ``--bc-coef`` and ``finetune.rule_coef=0``, so only behaviour cloning on the demos moves the
actor, over the same rounds and rollouts as every cell (``--cell`` settings do not reach it). A second
table then sets every cell against it on the seeds both have: mean success after, the control's, the mean
paired difference, and P(cell > control) with its bootstrap 95% CI (``offrl.stats.aggregate``). A cell
that is not clearly above the control has not shown that its update rule learns anything the demos did
not already teach. ``--from-dir`` recognises a control as any run with ``finetune.rule_coef`` 0.

AUC is the area under the evaluation success curve (the start evaluation at step 0 included) divided by
the step range. "Rollouts" is the behaviour policy's own success (``rollout/success_rate``, the stochastic
policy that collects the data, over the episodes that end in each round), mean of the first and of the
last ten rounds.

    python bench/finetune_grid.py [key=value ...] [--advantages gae mc iql sarsa] [--updates ppo awr push_away]
                                  [--modes onpolicy offline] [--seeds 0] [--root runs/finetune_grid]

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
    lines = ["| advantage | update | mode | seed | success before | success after | 95% CI after | AUC | rollouts, first "
             "-> last 10 rounds | env steps | re-rollout steps |", "|---|---|---|---:|---:|---:|---|---:|---|---:|---:|"]
    for s in rows:
        lo, hi = s["success_after_ci95"]
        auc = f"{s['auc']:.2f}" if s.get("auc") is not None else "-"
        trend = s.get("rollouts")
        trend = f"{trend[0]:.2f} -> {trend[1]:.2f}" if trend else "-"
        upd = s["update"] + (f" (w={s['recap_w']:g})" if s["update"] == "recap" else "")
        lines.append(f"| {s['advantage']} | {upd} | {s.get('mode', '-')} | {s['seed']} | "
                     f"{s['success_before']:.2f} | {s['success_after']:.2f} | [{lo:.2f}, {hi:.2f}] | {auc} | {trend} | "
                     f"{s['env_steps']} | {s['rerollout_steps']} |")
    return "\n".join(lines)


def _auc(run: Path) -> "float | None":
    """Area under the eval/success_rate curve of ``run`` (offrl.stats' trapezoid over env steps / the step range)."""
    import csv

    from offrl.stats.aggregate import auc

    pts = [(float(r["step"]), float(r["eval/success_rate"])) for r in csv.DictReader(open(run / "metrics.csv"))
           if r.get("eval/success_rate")]
    return auc(*zip(*pts)) if len(pts) >= 2 else None


def _rollouts(run: Path, k: int = 10) -> "tuple[float, float] | None":
    """Mean ``rollout/success_rate`` of the first and of the last ``k`` rounds of ``run`` (fewer rounds: half each)."""
    import csv

    v = [float(r["rollout/success_rate"]) for r in csv.DictReader(open(run / "metrics.csv"))
         if r.get("rollout/success_rate")]
    if not v:
        return None
    k = max(1, min(k, len(v) // 2))
    return sum(v[:k]) / k, sum(v[-k:]) / k


CONTROL = ("control", "demos only")  # the (advantage, update) labels of the demos-only control's rows


def _vs_control(rows: list[dict]) -> "str | None":
    """Markdown table of every cell against the demos-only control on the seeds both ran (None without a
    control row, or when no cell shares a seed with one)."""
    import numpy as np

    from offrl.stats.aggregate import probability_of_improvement_ci

    ctrl = {r["seed"]: r["success_after"] for r in rows if (r["advantage"], r["update"]) == CONTROL}
    groups: dict = {}
    for r in rows:
        if (r["advantage"], r["update"]) != CONTROL and r["seed"] in ctrl:
            groups.setdefault((r["advantage"], r["update"], r.get("recap_w", 0.0), r.get("mode", "-")), []).append(r)
    if not groups:
        return None
    lines = ["| advantage | update | mode | seeds | success after (mean) | control (mean) | difference (mean) | "
             "P(cell > control) [95% CI] |", "|---|---|---|---|---:|---:|---:|---|"]
    for (adv, upd, w, mode), rs in groups.items():
        seeds = sorted(r["seed"] for r in rs)
        x = np.array([r["success_after"] for r in rs])  # P and the means need no pairing order
        y = np.array([ctrl[s] for s in seeds])
        p = probability_of_improvement_ci(x, y)
        upd = upd + (f" (w={w:g})" if upd == "recap" else "")
        lines.append(f"| {adv} | {upd} | {mode} | {' '.join(map(str, seeds))} | {x.mean():.3f} | {y.mean():.3f} | "
                     f"{(x - y).mean():+.3f} | {p.point:.2f} [{p.lo:.2f}, {p.hi:.2f}] |")
    return "\n".join(lines)


def _report(rows: list[dict]) -> str:
    """The grid's table, followed by the table against the control when the grid has one."""
    vs = _vs_control(rows)
    return _table(rows) + (f"\n\nAgainst the demos-only control (same seeds):\n\n{vs}" if vs else "")


def _read_back(run: Path) -> dict:
    """The table's figures that come from ``run``'s metrics.csv rather than its summary."""
    return {"auc": _auc(run), "rollouts": _rollouts(run), "run": str(run)}


def _mode_overrides(adv: str, upd: str, mode: str, bc_coef: float) -> list[str]:
    if upd == "sac":
        # sac trains on the replay + offline mix, with the DAPG term of the offline mode (without it the actor
        # left the demos within 5 rounds, rollout success 0.41 -> 0.00, at actor_lr 1e-4 and at 3e-5 alike; the
        # run with the term used 3e-5); two Q heads keep a run to 6-8 minutes alone on 2 cores (ten: about 14)
        return ["finetune.replay=true", f"finetune.bc_coef={bc_coef}", "finetune.sac_ensemble=2",
                "finetune.actor_lr=3e-5"]
    if mode == "onpolicy":
        return ["finetune.offline_ratio=0"] if upd == "recap" else []
    if adv in ("iql", "sarsa") and upd in ("awr", "push_away", "recap"):
        return ["finetune.replay=true"]
    if upd == "recap":  # GAE / MC: offline rows (labelled positive) join every minibatch at offline_ratio
        return []
    return [f"finetune.bc_coef={bc_coef}"]


def _parse_cells(specs: list[str], advantages: set[str], updates: set[str]) -> list[tuple[str, str, str]]:
    """``--cell ADV:UPDATE:key=value`` specs as (advantage, update, override); ``*`` matches any. Raises
    ValueError naming the spec that is malformed or names an unknown advantage / update."""
    cells = []
    for spec in specs:
        parts = spec.split(":", 2)
        if len(parts) != 3 or "=" not in parts[2] or not parts[2].split("=", 1)[0]:
            raise ValueError(f"--cell {spec!r}: expected ADV:UPDATE:key=value (ADV or UPDATE may be *)")
        adv, upd, kv = parts
        if adv != "*" and adv not in advantages:
            raise ValueError(f"--cell {spec!r}: unknown advantage {adv!r} (one of {sorted(advantages)} or *)")
        if upd != "*" and upd not in updates:
            raise ValueError(f"--cell {spec!r}: unknown update {upd!r} (one of {sorted(updates)} or *)")
        cells.append((adv, upd, kv))
    return cells


def _cell_overrides(cells: list[tuple[str, str, str]], adv: str, upd: str) -> list[str]:
    """The ``--cell`` overrides that apply to the cell (adv, upd), in the order given."""
    return [kv for a, u, kv in cells if a in ("*", adv) and u in ("*", upd)]


_GRID_FLAGS = {"finetune.bc_coef": "--bc-coef", "finetune.advantage": "--advantages",
               "finetune.update": "--updates", "seed": "--seeds", "run.root": "--root"}


def _shadowed_override(overrides: list[str], grid_keys: list[str]) -> "str | None":
    """Why a global ``key=value`` override would not reach a cell (the grid sets that key itself, after the
    overrides), or None. Without this check such an override is silently replaced."""
    own = {kv.split("=", 1)[0].strip() for kv in grid_keys}
    for kv in overrides:
        key = kv.split("=", 1)[0].strip()
        if key in own:
            how = _GRID_FLAGS.get(key, f"--cell ADV:UPDATE:{key}=VALUE")
            return f"the grid sets {key} itself, so the override {kv!r} would not reach it (use {how})"
    return None


def _config_mismatch(run: Path, cfg) -> "str | None":
    """Why the finished run at ``run`` is not the cell ``cfg`` (None when they agree on every key outside
    ``run.*``): the grid reuses a run only when it is the one it would start."""
    from offrl.config import load_config, to_dict
    from offrl.errors import OffrlError
    from offrl.stats.load import flatten_config

    try:
        old = flatten_config(to_dict(load_config(run / "config.yaml")))
    except (OffrlError, OSError) as e:
        return f"its config.yaml cannot be read ({e})"
    new = flatten_config(to_dict(cfg))
    diff = sorted(k for k in old.keys() | new.keys() if not k.startswith("run.") and old.get(k) != new.get(k))
    if not diff:
        return None
    k = diff[0]
    more = f" and {len(diff) - 1} more key(s)" if len(diff) > 1 else ""
    return f"{k} is {old.get(k)!r} in the run, {new.get(k)!r} for the cell{more}"


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from offrl.config import ADVANTAGES, UPDATES, load_config
    from offrl.errors import OffrlError
    from offrl.platform.cluster import init_ray
    from offrl.platform.finetune import run_finetune_job

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tune_configs/finetune.yaml", help="finetuning config")
    ap.add_argument("--advantages", nargs="+", default=["gae", "mc", "iql", "sarsa"])
    ap.add_argument("--updates", nargs="+", default=["ppo", "awr", "push_away"])
    ap.add_argument("--modes", nargs="+", default=["onpolicy"], choices=["onpolicy", "offline"],
                    help="onpolicy: fresh rollouts only; offline: replay + offline mix or the DAPG BC term")
    ap.add_argument("--bc-coef", type=float, default=0.1, help="finetune.bc_coef of the offline mode's DAPG term")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recap-weights", type=float, nargs="+", default=[0.0],
                    help="finetune.recap_cfg_weight of the recap cells: one cell per weight (0: no guidance)")
    ap.add_argument("--cell", action="append", default=[], metavar="ADV:UPDATE:key=value",
                    help="an override for the matching cells only, after the mode's own keys (repeatable; ADV or "
                         "UPDATE may be *), e.g. --cell mc:*:finetune.mc_v_actions=true "
                         "--cell iql:ppo:finetune.ref_kl_coef=1.0")
    ap.add_argument("--control", action="store_true",
                    help="also run, per seed, the demos-only control (GAE x PPO, DAPG term at --bc-coef, "
                         "finetune.rule_coef=0) and print every cell against it")
    ap.add_argument("--root", default="runs/finetune_grid", help="where the runs go")
    ap.add_argument("--from-dir", default=None,
                    help="only tabulate the finetune_summary.json of runs found under this folder "
                         "(e.g. a sweep's experiment dir); runs nothing")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run (give them before the list "
                                                 "options, or after --)")
    args = ap.parse_args()
    try:
        cell_specs = _parse_cells(args.cell, set(ADVANTAGES) | {"sac"}, set(UPDATES) | {"sac"})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.from_dir:
        rows = []
        for f in sorted(Path(args.from_dir).rglob("finetune_summary.json")):
            import yaml

            cfg = yaml.safe_load((f.parent / "config.yaml").read_text())
            ft = cfg.get("finetune", {})
            mode = "offline" if (ft.get("replay") or ft.get("bc_coef") or ft.get("update") == "sac"
                                 or (ft.get("update") == "recap" and ft.get("offline_ratio"))) else "onpolicy"
            s = json.loads(f.read_text())
            if s.get("update") == "sac":  # sac brings its own critics: finetune.advantage is not used
                s["advantage"] = "sac"
            if ft.get("rule_coef") == 0:  # the update rule's loss is off: a demos-only control
                s["advantage"], s["update"] = CONTROL
            rows.append(s | {"seed": cfg["seed"], "mode": mode, **_read_back(f.parent),
                             "recap_w": float(ft.get("recap_cfg_weight", 0.0))})
        rows.sort(key=lambda r: (r["advantage"], r["update"], r["recap_w"], r["mode"], r["seed"]))
        print(_report(rows))
        return 0

    root = Path(args.root)
    rows = []
    cells = []
    for mode, adv, upd, seed in itertools.product(args.modes, args.advantages, args.updates, args.seeds):
        if upd == "sac":
            adv, mode = "sac", "offline"
        for w in (args.recap_weights if upd == "recap" else [0.0]):
            if (adv, upd, mode, seed, w) not in cells:
                cells.append((adv, upd, mode, seed, w))
    if args.control:
        cells += [(*CONTROL, "offline", seed, 0.0) for seed in args.seeds]
    configs = []  # every cell's config is checked before the first run starts
    for adv, upd, mode, seed, w in cells:
        tag = f"{upd}_w{w:g}" if upd == "recap" and w else upd
        trial = f"sac_seed{seed}" if upd == "sac" else f"{adv}_{tag}_{mode}_seed{seed}"
        if (adv, upd) == CONTROL:  # the global overrides only: --cell settings belong to the cells
            trial = f"control_seed{seed}"
            keys = ["finetune.advantage=gae", "finetune.update=ppo", f"finetune.bc_coef={args.bc_coef}",
                    "finetune.rule_coef=0.0"]
        else:
            keys = [*([] if upd == "sac" else [f"finetune.advantage={adv}"]), f"finetune.update={upd}",
                    *_mode_overrides(adv, upd, mode, args.bc_coef),
                    *([f"finetune.recap_cfg_weight={w}"] if upd == "recap" else [])]
        per_run = [f"seed={seed}", f"run.root={root}", "run.experiment=finetune", f"run.trial={trial}",
                   "run.progress=false"]
        clash = _shadowed_override(args.overrides, keys + per_run)
        if clash:
            print(f"error: cell {trial}: {clash}", file=sys.stderr)
            return 2
        if (adv, upd) != CONTROL:
            keys += _cell_overrides(cell_specs, adv, upd)
        try:
            configs.append(load_config(args.config, [*args.overrides, *keys, *per_run]))
        except OffrlError as e:
            print(f"error: cell {trial}: {e}", file=sys.stderr)
            return 2
        run = root / "finetune" / trial
        why = _config_mismatch(run, configs[-1]) if (run / "finetune_summary.json").exists() else None
        if why:
            print(f"error: {run} is finished but is not this cell: {why} (remove it, or use another --root)",
                  file=sys.stderr)
            return 2
    init_ray(configs[0].cluster)  # one local cluster for the whole grid
    for (adv, upd, mode, seed, w), cfg in zip(cells, configs):
        run = root / "finetune" / cfg.run.trial
        if not (run / "finetune_summary.json").exists():
            if run.exists():
                import shutil

                shutil.rmtree(run)
            run_finetune_job(cfg)
        s = json.loads((run / "finetune_summary.json").read_text())
        rows.append(s | {"advantage": adv, "update": upd, "seed": seed, "mode": mode, **_read_back(run), "recap_w": w})
    table = _report(rows)
    print(table)
    root.mkdir(parents=True, exist_ok=True)
    (root / "finetune_grid.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
