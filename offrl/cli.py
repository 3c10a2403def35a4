"""Command line: ``python -m offrl <command>`` (also the ``offrl`` console script).

User mistakes print one line (``offrl: error: ...``) and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from offrl.errors import OffrlError

EXIT_USAGE = 2

_OVERRIDES_HELP = ("config overrides key.sub=value, values read as YAML "
                   "(e.g. env.num_envs=2 policy.hidden=[64,64]); `offrl config keys` lists every key")


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("config", help="experiment YAML file (e.g. tune_configs/rollout.yaml)")
    else:
        p.add_argument("config", nargs="?", default=None, help="experiment YAML file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES_HELP)


def _config_and_overrides(args: argparse.Namespace) -> tuple[Optional[str], list[str]]:
    from pathlib import Path

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config] + overrides  # `offrl config show key=value` without a file
    return config, overrides


def _load(args: argparse.Namespace):
    from offrl.config import load_config

    return load_config(*_config_and_overrides(args))


def _explicit_keys(args: argparse.Namespace) -> set[str]:
    """The dotted config keys set on the command line (a job refuses to silently replace them)."""
    from offrl.config import parse_override

    return {".".join(parse_override(o)[0]) for o in _config_and_overrides(args)[1]}


# ---------------------------------------------------------------------------------------- commands

def cmd_rollout(args: argparse.Namespace) -> int:
    from offrl.platform.jobs import run_rollout_job

    cfg = _load(args)
    run_rollout_job(cfg)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from offrl.platform.pretrain import run_pretrain_job

    cfg = _load(args)
    parts = [p.strip() for p in args.init_parts.split(",")] if args.init_parts else None
    run_pretrain_job(cfg, resume=args.resume, init_from=args.init_from, init_parts=parts,
                     explicit=_explicit_keys(args))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from offrl.platform.pretrain import run_eval_job

    run_eval_job(args.checkpoint, episodes=args.episodes, seed=args.seed, overrides=args.overrides, out=args.out)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from offrl.platform.finetune import run_finetune_job

    run_finetune_job(_load(args), resume=args.resume, explicit=_explicit_keys(args))
    return 0


def cmd_workflow(args: argparse.Namespace) -> int:
    from offrl.platform.workflow import Rules, run_workflow

    rules = Rules(smooth=args.smooth, drop_fraction=args.drop_fraction, min_drop=args.min_drop,
                  td_level=args.td_level, td_decrease=args.td_decrease, cql_level=args.cql_level, tail=args.tail)
    print(run_workflow(args.path, rules))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from offrl.config import to_dict

    cfg = _load(args)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from offrl.config import iter_keys

    rows = list(iter_keys())
    width = max(len(k) for k, *_ in rows)
    for key, tp, default, help_ in rows:
        if args.prefix and not key.startswith(args.prefix):
            continue
        print(f"{key:<{width}}  {help_}\n{'':<{width}}  type: {tp}; default: {default!r}")
    return 0


def cmd_envs(args: argparse.Namespace) -> int:
    from offrl.envs.maniskill import list_tasks

    for t in list_tasks():
        if not args.filter or args.filter.lower() in t.lower():
            print(t)
    return 0


# ------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="offrl", description="offrl: offline and offline-to-online RL on ManiSkill, scaled with Ray.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Run `offrl <command> --help` for the options of a command.")
    p.add_argument("--version", action="version", version=f"offrl {__import__('offrl').__version__}")
    sub = p.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    sub.required = True

    r = sub.add_parser("rollout", help="roll a policy out on SimHost actors and write a run directory",
                       description="Start (or join) a Ray cluster, build the task in SimHost actors, roll the "
                                   "policy out and write runs/<experiment>/<trial>/ with config.yaml, meta.json, "
                                   "metrics.csv, TensorBoard events and a checkpoint of the policy.")
    _add_config_args(r)
    r.set_defaults(func=cmd_rollout)

    pt = sub.add_parser("pretrain", help="offline pretraining: BC, critic_mc, IQL, SARSA (and bc+critic combos), CQL, BRAC",
                        description="Train a policy and/or critics offline on a ManiSkill-format dataset "
                                    "(pretrain.dataset), evaluate the policy on SimHost actors, and write a run "
                                    "directory with metrics, checkpoints/<epoch>/, checkpoints/best/ and eval.json.")
    _add_config_args(pt)
    pt.add_argument("--resume", action="store_true",
                    help="continue run.trial from its latest checkpoint (same config; exact continuation)")
    pt.add_argument("--init-from", metavar="CHECKPOINT", default=None,
                    help="initialise networks from this checkpoint (a checkpoint folder or a run directory)")
    pt.add_argument("--init-parts", metavar="PARTS", default=None,
                    help="comma-separated parts to load with --init-from: actor, critics (default: all present here)")
    pt.set_defaults(func=cmd_pretrain)

    ev = sub.add_parser("eval", help="evaluate a checkpoint's policy in simulation with fixed seeds",
                        description="Run the checkpoint's actor on SimHost actors for N episodes with fixed "
                                    "evaluation seeds (eval.seed + j). Reports success_once, success_at_end, return "
                                    "and episode length with 95% confidence intervals and writes eval.json into "
                                    "the run directory.")
    ev.add_argument("checkpoint", help="checkpoint folder, checkpoints/ folder, or run directory (latest checkpoint)")
    ev.add_argument("--episodes", type=int, default=None, help="episodes to run (default: eval.episodes)")
    ev.add_argument("--seed", type=int, default=None, help="first evaluation seed (default: eval.seed)")
    ev.add_argument("--out", default=None, help="where to write the JSON (default: <run dir>/eval.json)")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="overrides of the checkpoint's config, e.g. env.num_envs=8 cluster.num_hosts=2 "
                         "eval.deterministic=false; for a diffusion policy also its sampler, e.g. "
                         "diffusion.scheduler=ddpm diffusion.inference_steps=100; for a sequence policy (mlp_chunk, "
                         "diffusion) the executed actions per replanning, e.g. policy.action_horizon=12")
    ev.set_defaults(func=cmd_eval)

    ft = sub.add_parser("finetune", help="online finetuning: advantage {gae, mc, iql, sarsa} x update {ppo, awr, push_away, sac}",
                        description="Finetune a pretrained policy (finetune.checkpoint) online on SimHost actors. "
                                    "Each round: stochastic rollouts -> advantages by finetune.advantage -> update by "
                                    "finetune.update -> periodic deterministic evaluation -> checkpoint. Writes a run "
                                    "directory with metrics.csv, TensorBoard events, checkpoints/<env_steps>/, "
                                    "eval.json and finetune_summary.json (success before and after). "
                                    "finetune.replay=true trains IQL/SARSA critics and an AWR/push-away actor "
                                    "off-policy on a replay buffer mixed with the offline data.")
    _add_config_args(ft)
    ft.add_argument("--resume", action="store_true",
                    help="continue run.trial from its latest checkpoint (networks, optimizers, RNGs, replay buffer; "
                         "the same rounds as an uninterrupted run); give the same config, a larger "
                         "finetune.iterations extends the run")
    ft.set_defaults(func=cmd_finetune)

    from offrl.platform.workflow import Rules

    d = Rules()
    wf = sub.add_parser(
        "workflow", help="offline RL workflow: overfitting / underfitting, correction and checkpoint from the curves",
        description="The workflow of Kumar et al. (CoRL 2021), from a pretraining run's workflow/* curves alone "
                    "(no online evaluation): the regime (overfitting: dataset Q rises then falls; underfitting: "
                    "TD error or CQL's gap stays large; both: overfitting is addressed first) with its evidence, the "
                    "correction the paper recommends as "
                    "config overrides (overfitting: critic.vib_size, critic.dropout, critic.weight_decay, "
                    "critic.l1; underfitting: critic.hidden, critic.residual, critic.dr3_weight) and the checkpoint "
                    "to use (overfitting: the saved one nearest the dataset-Q peak; otherwise the last). Writes "
                    "workflow.json and workflow.png into the run directory. Given a folder of runs (a sweep), "
                    "analyses each and ranks them: not underfitting first, then the held-out dataset Q at the "
                    "selected checkpoint, higher first; writes workflow.json there too and prints the ranking.",
        epilog="Formulas: the docstring of offrl.platform.workflow. eval/success_rate is shown when logged, "
               "never used.")
    wf.add_argument("path", help="a pretraining run directory (metrics.csv + checkpoints/<epoch>/), or a folder "
                                 "searched recursively for run directories (a sweep)")
    wf.add_argument("--smooth", type=int, default=d.smooth, metavar="EPOCHS",
                    help="window of the running median applied to every curve, odd; 1 disables (default: %(default)s)")
    wf.add_argument("--drop-fraction", type=float, default=d.drop_fraction, metavar="F",
                    help="overfitting needs the smoothed dataset Q to end at least F x its rise (start to peak) "
                         "below its peak (default: %(default)s)")
    wf.add_argument("--min-drop", type=float, default=d.min_drop, metavar="F",
                    help="... and at least F x max |dataset Q| below it, so a flat noisy curve is no peak "
                         "(default: %(default)s)")
    wf.add_argument("--td-level", type=float, default=d.td_level, metavar="L",
                    help="underfitting needs the final smoothed TD error >= L x (mean |dataset Q| over the tail)^2 "
                         "(default: %(default)s)")
    wf.add_argument("--td-decrease", type=float, default=d.td_decrease, metavar="F",
                    help="... and a fall over the tail below F (the least-squares line's fall across the tail "
                         "relative to the tail's mean); the same for the CQL gap (default: %(default)s)")
    wf.add_argument("--cql-level", type=float, default=d.cql_level, metavar="L",
                    help="the CQL gap stays large when its final smoothed value >= L x mean |dataset Q| over the "
                         "tail (and it falls less than --td-decrease) (default: %(default)s)")
    wf.add_argument("--tail", type=float, default=d.tail, metavar="F",
                    help="the last fraction of logged epochs (at least 2) over which trends and the Q scale are "
                         "measured, in (0, 1] (default: %(default)s)")
    wf.set_defaults(func=cmd_workflow)

    c = sub.add_parser("config", help="show the resolved config or document every key",
                       description="Inspect configuration.")
    csub = c.add_subparsers(dest="config_command", metavar="<subcommand>", parser_class=_Parser)
    csub.required = True
    cs = csub.add_parser("show", help="print the resolved config (YAML + overrides + defaults)",
                         description="Print the resolved, validated config as YAML.")
    _add_config_args(cs, required=False)
    cs.set_defaults(func=cmd_config_show)
    ck = csub.add_parser("keys", help="list every config key with its type, default and meaning",
                         description="List every config key with its type, default and meaning.")
    ck.add_argument("--prefix", default="", help="only keys starting with this prefix, e.g. env.")
    ck.set_defaults(func=cmd_config_keys)

    e = sub.add_parser("envs", help="list the ManiSkill task ids", description="List the registered ManiSkill task ids.")
    e.add_argument("--filter", default="", help="only ids containing this text (case-insensitive)")
    e.set_defaults(func=cmd_envs)

    # Later stages register their own commands (collect, data, inspect, pretrain, eval, finetune, ...).
    for mod in _COMMAND_MODULES:
        __import__(mod, fromlist=["register"]).register(sub)
    return p


# Modules with a ``register(subparsers)`` function adding their commands; each defines its own
# ``func`` per command and raises OffrlError for user mistakes.
_COMMAND_MODULES: list[str] = ["offrl.data.cli", "offrl.stats.cli", "offrl.platform.sweep_cli", "offrl.platform.rev2fwd_cli"]


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after options (`offrl eval RUN --episodes 5 env.num_envs=2`)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except OffrlError as e:
        sys.stderr.write(f"offrl: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("offrl: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
