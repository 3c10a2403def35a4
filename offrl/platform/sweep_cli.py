"""Command ``offrl sweep``: run a sweep YAML as a Ray Tune experiment, or resume one.

Registered by :func:`register` from :mod:`offrl.cli`. Mistakes raise OffrlError (one line, exit 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offrl.errors import OffrlError


def cmd_sweep(args: argparse.Namespace) -> int:
    from offrl.platform.sweep import describe, load_sweep, resume_sweep, run_sweep

    if args.resume:
        if args.config or args.overrides or args.dry_run:
            raise OffrlError("--resume continues a sweep with the settings saved in its experiment dir; "
                             "give no CONFIG, KEY=VALUE or --dry-run with it")
        return resume_sweep(args.resume)
    if not args.config:
        raise OffrlError("give a sweep YAML (e.g. tune_configs/quickstart.yaml) or --resume EXPERIMENT_DIR")
    if "=" in args.config and not Path(args.config).exists():
        raise OffrlError(f"the first argument must be a sweep YAML file, got {args.config!r}")
    sweep = load_sweep(args.config, args.overrides)
    storage = Path(args.storage).expanduser().resolve()
    if args.dry_run:
        print(describe(sweep, storage))
        return 0
    return run_sweep(sweep, storage)


def register(subparsers) -> None:
    """Add ``offrl sweep`` to the top-level subparsers."""
    import textwrap

    from offrl.platform.sweep import sweep_keys

    p = subparsers.add_parser(
        "sweep", help="run a sweep YAML (experiment + sweep axes) as a Ray Tune experiment; --resume continues one",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Run every trial of a sweep on the current Ray cluster (cluster.address; a local one by default). "
            "Each trial runs `offrl <sweep.job>` in a placement group holding its learner bundle and "
            "cluster.num_hosts SimHost bundles, reports metrics and checkpoints to Tune, and writes its offrl run "
            "directory into its Tune trial folder <storage>/<sweep.name>/<trial>/. Overrides apply to the "
            "experiment (finetune.iterations=2) and to the sweep settings (sweep.seeds=[0] sweep.max_concurrent=1); "
            "overriding a swept key fixes it.", 100) + "\n\nKeys of the `sweep:` section:\n" + sweep_keys(),
        epilog="examples:\n"
               "  offrl sweep tune_configs/quickstart.yaml --dry-run\n"
               "  offrl sweep tune_configs/advantage_x_update.yaml sweep.seeds=[0] finetune.iterations=5\n"
               "  offrl sweep --resume runs/advantage_x_update\n"
               "  offrl stats compare runs/advantage_x_update --by finetune.advantage finetune.update")
    p.add_argument("config", nargs="?", default=None,
                   help="sweep YAML: an experiment plus a `sweep:` section (e.g. tune_configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of the experiment and of sweep.* keys, values read as YAML; quote values with "
                        "braces or commas: 'sweep.axes.finetune.update={grid_search: [ppo, awr]}'")
    p.add_argument("--resume", metavar="EXPERIMENT_DIR", default=None,
                   help="continue the sweep in this experiment dir after its driver stopped: finished trials "
                        "are kept, failed and unfinished ones run again from their last checkpoint")
    p.add_argument("--storage", metavar="DIR", default="runs",
                   help="parent folder of the experiment dir (default: runs/, made absolute); on a multi-node "
                        "cluster a folder every node shares")
    p.add_argument("--dry-run", action="store_true",
                   help="print the trial grid and the resources per trial; run nothing")
    p.set_defaults(func=cmd_sweep)
