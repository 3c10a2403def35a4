"""Commands: ``offrl stats compare`` and ``offrl stats runs``.

Registered by :func:`register` from :mod:`offrl.cli`. Mistakes raise OffrlError (one line, exit 2).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from offrl.errors import OffrlError

_PATHS_HELP = ("Tune experiment directory or runs/<experiment>/ folder, searched recursively for offrl run "
               "directories (config.yaml + metrics.csv) and, failing those, Tune trials (params.json + "
               "progress.csv); several folders or single run directories may be given")


def write_comparison(cmp, out: Path) -> list[Path]:
    """Write the comparison's markdown, CSV tables and PNGs into ``out``; returns the paths written.

    Everything is rendered in memory first, so a failure leaves no partial set of files behind.
    """
    from offrl.stats.compare import metric_slug
    from offrl.stats.plots import intervals_figure, learning_curves_figure, png_bytes

    stem = f"compare_{metric_slug(cmp.metric)}"
    files = {
        f"{stem}.md": cmp.markdown().encode(),
        f"{stem}.csv": cmp.table.to_csv(index=False).encode(),
        f"{stem}_trials.csv": cmp.trials.to_csv(index=False).encode(),
        f"{stem}_curves.csv": cmp.curves.to_csv(index=False).encode(),
        **({f"{stem}_pairs.csv": cmp.pairs.to_csv(index=False).encode()} if cmp.pairs is not None else {}),
        f"{stem}_curves.png": png_bytes(learning_curves_figure(cmp)),
        f"{stem}_intervals.png": png_bytes(intervals_figure(cmp)),
    }
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            tmp = out / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, out / name)
            written.append(out / name)
    except OSError as e:
        raise OffrlError(f"cannot write to {out}: {e.strerror or e}") from None
    return written


def cmd_compare(args: argparse.Namespace) -> int:
    from offrl.stats.compare import compare
    from offrl.stats.load import load_runs

    df = load_runs(args.paths)
    cmp = compare(df, metric=args.metric, by=args.by, baseline=args.baseline, task_column=args.task_column,
                  reps=args.reps, seed=args.seed, pairwise=args.pairwise)
    out = Path(args.out) if args.out else Path(args.paths[0]) / "stats"
    written = write_comparison(cmp, out)
    print(cmp.markdown())
    print(f"wrote {len(written)} files to {out}/: " + ", ".join(p.name for p in written))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from offrl.stats.compare import format_value
    from offrl.stats.load import TRIAL, load_runs, metric_columns, trial_table, varying_columns

    df = load_runs(args.paths)
    trials = trial_table(df)
    print(f"{len(trials)} trials, {len(df)} rows (trial, step)")
    print("swept config columns:")
    for c in varying_columns(df):
        values = sorted({format_value(v) for v in trials[c]})
        shown = ", ".join(values[:8]) + (f", ... ({len(values)} values)" if len(values) > 8 else "")
        print(f"  {c}: {shown}")
    print("metrics (trials that logged each):")
    for m in metric_columns(df):
        print(f"  {m}: {df.loc[df[m].notna(), TRIAL].nunique()}")
    for t in df.attrs.get("empty_trials", []):
        print(f"note: {t} has no metrics yet")
    if args.csv:
        out = Path(args.csv)
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
        print(f"wrote the tidy table to {out}")
    return 0


def register(subparsers) -> None:
    """Add ``offrl stats {compare,runs}`` to the top-level subparsers."""
    sp = subparsers.add_parser(
        "stats", help="compare methods across runs: IQM/mean/median with bootstrap CIs, AUC, P(improvement)",
        description="Statistics over run directories and Ray Tune experiments. Every table and plot is "
                    "recomputed from the directories.")
    ssub = sp.add_subparsers(dest="stats_command", metavar="<subcommand>", parser_class=type(sp))
    ssub.required = True

    c = ssub.add_parser(
        "compare", help="compare groups of trials on one metric; write markdown, CSV and PNGs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Group the trials by config columns and compare the groups on one metric:\n"
                    "  final performance: the metric's last logged value per trial, summarised per group as\n"
                    "    IQM (mean of the middle 50%), mean and median;\n"
                    "  AUC: the area under each trial's learning curve divided by its step range, averaged;\n"
                    "  P(> baseline): P(X > Y) + 0.5 P(X = Y) over pairs (group trial, baseline trial).\n"
                    "Each comes with a 95% percentile bootstrap CI from resampling the group's trials\n"
                    "(within each task when a task column is present, as in rliable). Writes\n"
                    "compare_<metric>.md/.csv (one row per group), _trials.csv, _curves.csv and the PNGs\n"
                    "_curves.png (mean learning curve with CI band) and _intervals.png.",
        epilog="example: offrl stats compare runs/grid --by finetune.advantage finetune.update "
               "--baseline gae,ppo")
    c.add_argument("paths", nargs="+", metavar="EXPERIMENT_DIR", help=_PATHS_HELP)
    c.add_argument("--metric", default="eval/success_rate",
                   help="metric column to compare (default: eval/success_rate); `offrl stats runs DIR` lists them")
    c.add_argument("--by", nargs="+", metavar="COLUMN", default=None,
                   help="config columns whose value combinations form the groups, e.g. finetune.advantage "
                        "finetune.update (default: every config column that varies between trials, except "
                        "seed, *.seed, run.* and the task column)")
    c.add_argument("--baseline", metavar="GROUP", default=None,
                   help="group to compute P(> baseline) against: its name as in the table "
                        "('a.b=x, c.d=1'), or comma-separated key=value parts or values that pick out one "
                        "group ('gae,ppo', 'finetune.update=ppo'), or 'start': every group against its own "
                        "trials' first logged values (a finetuning run's step-0 evaluation of its start point) "
                        "(default: the first group)")
    c.add_argument("--task-column", metavar="COLUMN", default="auto",
                   help="config column naming the task: the bootstrap resamples trials within each task "
                        "(stratified) and P(> baseline) averages over tasks; 'auto': env.id when present; "
                        "'none': no strata (default: auto)")
    c.add_argument("--seed", type=int, default=0, help="seed of the bootstrap; the same seed gives the same "
                                                       "tables and plots (default: 0)")
    c.add_argument("--reps", type=int, default=2000, help="bootstrap resamples per interval (default: 2000)")
    c.add_argument("--pairwise", action="store_true",
                   help="also P(a > b) with its bootstrap CI for every ordered pair of groups: a matrix in the "
                        "markdown and compare_<metric>_pairs.csv")
    c.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: <first EXPERIMENT_DIR>/stats/)")
    c.set_defaults(func=cmd_compare)

    r = ssub.add_parser("runs", help="list the trials, swept config columns and metrics found under a folder",
                        description="Load the runs under the given folders into the tidy table (one row per "
                                    "trial and step) and summarise it: trials, the config columns that vary "
                                    "between trials (the swept axes, usable with compare --by) and the metrics.")
    r.add_argument("paths", nargs="+", metavar="EXPERIMENT_DIR", help=_PATHS_HELP)
    r.add_argument("--csv", metavar="FILE", default=None,
                   help="also write the tidy table (trial, step, metrics, flattened config) to this CSV file")
    r.set_defaults(func=cmd_runs)
