"""RLlib peers: RLlib's BC and CQL (new API stack) on offrl's demonstrations, scored by offrl's evaluator.

Each learner trains on the same episodes as offrl's imitation cell for the dataset (the training split of
``pretrain.val_fraction`` with the run's seed), for the same number of gradient steps of the same batch size,
with the same MLP (256x256 ReLU). The trained RLlib module becomes an offrl actor checkpoint
(``offrl.data.rllib``: the conversion is checked to act exactly like the RLlib module) and ``offrl eval``
scores it with the imitation protocol of ``tune_configs/pretrain_diffusion.yaml``: 100 episodes from seed
1,000,000,000 on, ``max_episode_steps=100``, terminations ignored, ``success_once`` with 95% Wilson intervals.

Learners: ``bc`` (RLlib BCConfig, lr 1e-3 like offrl's MLP BC; RLlib's default policy head, a Gaussian
with a state-dependent log std), ``bc_free`` (the same with ``free_log_std``: one state-independent log std,
like offrl's actor), ``cql_a1`` (CQL with offrl's penalty weight, min_q_weight 1), ``cql`` (RLlib CQLConfig with RLlib's
learning rates and penalty, offrl's gamma 0.8, reward and terminal success bonus; the policy's tanh-squashed
mean acts), and ``cql_rllib_det``: the same CQL module acting as RLlib's own ``explore=False`` path does (the
unsquashed mean clipped into the bounds, see ``offrl.data.rllib``). When ``bench/imitation.py`` has run for the
default data, its offrl rows for the same seeds are printed beside them. Finished runs are read back from their
eval.json, so an interrupted benchmark continues where it stopped.

    python bench/rllib_peers.py [--dataset datasets/PickCube-v1_scripted100.h5] [--learners bc cql]
                                [--seeds 0] [--steps 8000] [--out runs/rllib_peers] [--quick] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from offrl.platform.evaluate import wilson_interval as wilson  # noqa: E402

SCRIPTED = "datasets/PickCube-v1_scripted100.h5"
CONFIG = "tune_configs/pretrain_diffusion.yaml"  # the imitation benchmark's budget and protocol
LEARNERS = {"bc": ("bc", "clip"), "bc_free": ("bc_free", "clip"), "cql": ("cql", "tanh"),
            "cql_rllib_det": ("cql", "clip"), "cql_a1": ("cql_a1", "tanh")}
NAMES = {"bc": "RLlib BC", "bc_free": "RLlib BC, free_log_std (a state-independent std)",
         "cql": "RLlib CQL (tanh-squashed mean)", "cql_a1": "RLlib CQL, min_q_weight 1 (tanh-squashed mean)",
         "cql_rllib_det": "RLlib CQL (RLlib's explore=False action: unsquashed mean, clipped)"}
# offrl rows of bench/imitation.py for the scripted data: (cell run name, label)
OFFRL_ROWS = {"mlp": "offrl MLP BC (bench/imitation.py)", "mlp_chunk": "offrl MLP + chunking (bench/imitation.py)"}


def experiment_config(args, ds, learner: str, seed: int):
    """The offrl config the checkpoint carries: the imitation protocol, the dataset's task and control mode."""
    from offrl.config import load_config

    return load_config(CONFIG, ["policy.kind=mlp", "policy.hidden=[256,256]", "policy.activation=relu",
                                f"pretrain.dataset={args.dataset}", f"env.id={ds.env_id}",
                                f"env.control_mode={ds.control_mode}", f"pretrain.batch_size={args.batch_size}",
                                f"pretrain.eval_episodes={args.episodes}", f"seed={seed}", f"run.root={args.out}",
                                "run.experiment=runs", f"run.trial={learner}_seed{seed}", "run.progress=false",
                                *args.overrides])


def train_seed(args, seed: int, todo: list[str], log) -> None:
    """Export the seed's training split, train each RLlib algorithm ``todo`` needs once, save and evaluate."""
    from offrl.algos.rewards import auto_success_bonus
    from offrl.config import to_dict
    from offrl.data.dataset import OfflineDataset
    from offrl.data.rllib import RLlibPeerConfig, export_dataset, save_rllib_checkpoint, train_rllib
    from offrl.envs.maniskill import probe_env
    from offrl.errors import OffrlError
    from offrl.platform.pretrain import run_eval_job
    from offrl.platform.rundir import create_run_dir

    ds = OfflineDataset.load(args.dataset)
    if args.num_episodes:
        ds = ds.subset(range(min(args.num_episodes, len(ds))))
    cfg = experiment_config(args, ds, todo[0], seed)
    pc = cfg.pretrain
    train = ds.split(pc.val_fraction, seed=cfg.seed)[0] if pc.val_fraction > 0 and len(ds) >= 2 else ds
    reward = "rewards" if pc.reward == "dataset" else pc.reward
    mode = ds.reward_mode if pc.reward == "dataset" else pc.reward
    bonus = auto_success_bonus(pc.success_bonus, mode, pc.gamma, cfg.env.max_episode_steps)
    spec = probe_env(cfg.env) or {"action_low": [-1.0] * ds.act_dim, "action_high": [1.0] * ds.act_dim}
    n = train.num_steps
    repeats = max(1, min(math.ceil(args.steps * args.batch_size / n), args.max_rows // n))
    kw = dict(action_low=spec["action_low"], action_high=spec["action_high"], repeats=repeats,
              batch_size=args.batch_size, seed=seed, overwrite=True)
    where = Path(args.out) / "exports" / f"seed{seed}"
    try:
        exp = export_dataset(train, where, reward=reward, success_bonus=bonus, **kw)
    except OffrlError as e:  # no rewards in the file: BC still runs, CQL refuses with one line
        log(f"[rllib_peers] {e}; exporting without rewards")
        reward, bonus = None, 0.0
        exp = export_dataset(train, where, reward=None, **kw)
    log(f"[rllib_peers] seed {seed}: {len(train)} of {len(ds)} episodes, {n} transitions x {repeats} shuffled "
        f"passes = {exp.rows} rows, reward {reward} + success bonus {bonus:.3g}")
    check = train.transitions(None)["obs"][:2048].numpy()
    for algo in dict.fromkeys(LEARNERS[k][0] for k in todo):
        rc = RLlibPeerConfig(algo={"bc_free": "bc", "cql_a1": "cql"}.get(algo, algo), steps=args.steps,
                             batch_size=args.batch_size, seed=seed, gamma=pc.gamma, free_log_std=algo == "bc_free",
                             min_q_weight=1.0 if algo == "cql_a1" else RLlibPeerConfig.min_q_weight)
        t = time.time()
        try:
            module, info = train_rllib(exp, rc, log=log)
        except Exception as e:  # one learner failing does not stop the others
            print(f"[rllib_peers] {algo} seed {seed}: FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        log(f"[rllib_peers] {algo} seed {seed}: trained {info['gradient_steps']} steps in {time.time() - t:.0f}s")
        for learner in [k for k in todo if LEARNERS[k][0] == algo]:
            cfg = experiment_config(args, ds, learner, seed)
            run = create_run_dir(cfg, exist_ok=True)
            info_l = {**info, "learner": learner, "acting": LEARNERS[learner][1]}
            (run / "rllib.json").write_text(json.dumps(info_l, indent=2))
            ckpt = save_rllib_checkpoint(module, exp, run / "checkpoints", args.steps, config=to_dict(cfg),
                                         extra=info_l, squash=LEARNERS[learner][1], check_obs=check)
            run_eval_job(str(ckpt), episodes=args.episodes, out=str(run / "eval.json"), log=log)


def heldout_mse(run: Path, dataset: str, seed: int, val_fraction: float = 0.1) -> "float | None":
    """Mean squared error of the final Gaussian policy's deterministic action against the demonstrated one,
    on the held-out episodes of the seed's split (the episodes no learner trained on); None for a policy
    that is not a Gaussian MLP or a run without checkpoints."""
    import torch

    from offrl.algos.networks import build_actor
    from offrl.data.dataset import OfflineDataset
    from offrl.platform.checkpoint import latest_checkpoint, load_checkpoint

    ck = latest_checkpoint(run / "checkpoints")
    if ck is None:
        return None
    arch = json.loads((ck / "training_state" / "state.json").read_text()).get("actor_arch") or {}
    if arch.get("kind", "mlp") != "mlp":
        return None
    actor = build_actor(arch)
    load_checkpoint(ck, {"actor": actor}, parts=["actor"], restore_rng=False)
    actor.eval()
    val = OfflineDataset.load(dataset).split(val_fraction, seed=seed)[1].transitions(None)
    with torch.no_grad():
        a, _ = actor.act(val["obs"].float(), deterministic=True)
    return float((a - val["action"].float()).pow(2).mean())


def read_run(run: Path) -> dict:
    """success_once / success_at_end counts of a finished run, its gradient steps and training seconds."""
    from offrl.config import load_config

    ev = json.loads((run / "eval.json").read_text())
    info = json.loads((run / "rllib.json").read_text()) if (run / "rllib.json").exists() else {}
    steps = info.get("gradient_steps")
    if steps is None and (run / "config.yaml").exists():  # an offrl run of bench/imitation.py
        pc = load_config(run / "config.yaml").pretrain
        steps = pc.epochs * pc.steps_per_epoch if pc.steps_per_epoch else None
    return {"k": sum(bool(e["success_once"]) for e in ev["per_episode"]), "n": ev["episodes"],
            "end": sum(bool(e["success_at_end"]) for e in ev["per_episode"]), "steps": steps,
            "seconds": info.get("train_seconds")}


def pooled(rs: list[dict], key: str = "k") -> str:
    k, n = sum(r[key] for r in rs), sum(r["n"] for r in rs)
    lo, hi = wilson(k, n)
    per = ", ".join(f"{r[key] / r['n']:.2f}" for r in rs)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]" + (f" ({per})" if len(rs) > 1 else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--dataset", default=SCRIPTED, help="offrl/ManiSkill trajectory file (.h5 with its .json)")
    ap.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS), help="table rows")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training (and split) seeds")
    ap.add_argument("--steps", type=int, default=8000, help="gradient steps per learner (needs a divisor in 2..10)")
    ap.add_argument("--batch-size", type=int, default=256, help="minibatch size, every learner alike")
    ap.add_argument("--episodes", type=int, default=100, help="evaluation episodes per run")
    ap.add_argument("--num-episodes", type=int, default=0, help="use only the first N demos (0: all)")
    ap.add_argument("--max-rows", type=int, default=100_000,
                    help="cap on exported rows (shuffled passes x transitions)")
    ap.add_argument("--out", default="runs/rllib_peers", help="where exports, runs and the report go")
    ap.add_argument("--offrl-root", default="runs/imitation", help="bench/imitation.py root to read offrl rows from")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 demos, 20 steps, 5 eval episodes")
    ap.add_argument("--report-only", action="store_true", help="train nothing: tabulate finished runs")
    ap.add_argument("--quiet", action="store_true", help="less output")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides of the offrl config (e.g. env.num_envs=4)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.episodes, args.num_episodes = 20, 5, args.num_episodes or 10
        args.batch_size = min(args.batch_size, 64)
        if args.out == ap.get_default("out"):
            args.out = "runs/rllib_peers_quick"
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"

    if not args.report_only:
        from offrl.config import load_config
        from offrl.platform.cluster import init_ray

        if not Path(args.dataset).exists():
            if args.dataset != SCRIPTED:
                print(f"missing {args.dataset}")
                return 2
            from offrl.data.collect import collect

            init_ray(load_config(CONFIG).cluster)
            collect(load_config("tune_configs/collect_pickcube.yaml",
                                ["collect.episodes=100", f"collect.output={SCRIPTED}", "seed=0"]))
        init_ray(load_config(CONFIG).cluster)
        for seed in args.seeds:
            todo = [k for k in args.learners if not (runs / f"{k}_seed{seed}" / "eval.json").exists()]
            if todo:
                train_seed(args, seed, todo, log)

    results = {k: [read_run(runs / f"{k}_seed{s}") for s in args.seeds
                   if (runs / f"{k}_seed{s}" / "eval.json").exists()] for k in args.learners}
    lines = [f"success_once on {Path(args.dataset).name}, {args.episodes} evaluation episodes per run (offrl eval, "
             f"the {CONFIG} protocol), {args.steps} gradient steps x batch {args.batch_size}; seeds {args.seeds}; "
             "mean over seeds [95% Wilson interval of the pooled episodes] (per-seed values); held-out action MSE: "
             "the deterministic action against the demonstrated one on each seed's held-out episodes, mean over "
             "seeds", "",
             "| learner | success_once | success_at_end | held-out action MSE | gradient steps | training s |",
             "|---|---:|---:|---:|---:|---:|"]

    def mse(runs_: list[Path]) -> str:
        vals = [heldout_mse(r, args.dataset, s) if not args.num_episodes else None for r, s in runs_]
        vals = [v for v in vals if v is not None]
        return f"{sum(vals) / len(vals):.4f}" if vals else "-"

    for k in args.learners:
        rs = results[k]
        if not rs:
            lines.append(f"| {NAMES[k]} | - | - | - | - | - |")
            continue
        secs = [r["seconds"] for r in rs if r["seconds"] is not None]
        t = f"{sum(secs) / len(secs):.0f}" if secs else "-"
        m = mse([(runs / f"{k}_seed{s}", s) for s in args.seeds if (runs / f"{k}_seed{s}" / "eval.json").exists()])
        lines.append(f"| {NAMES[k]} | {pooled(rs)} | {pooled(rs, 'end')} | {m} | {rs[0]['steps'] or '-'} | {t} |")
    if Path(args.dataset).resolve() == Path(SCRIPTED).resolve() and not args.num_episodes:
        for p, label in OFFRL_ROWS.items():
            found = [(Path(args.offrl_root) / "runs" / f"scripted100_{p}_seed{s}", s) for s in args.seeds
                     if (Path(args.offrl_root) / "runs" / f"scripted100_{p}_seed{s}" / "eval.json").exists()]
            rs = [read_run(r) for r, _ in found]
            if rs:
                lines.append(f"| {label} | {pooled(rs)} | {pooled(rs, 'end')} | {mse(found)} | "
                             f"{rs[0]['steps'] or '-'} | - |")
    text = "\n".join(lines)
    print(text)
    (out / "rllib_peers.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
