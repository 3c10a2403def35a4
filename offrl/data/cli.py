"""Commands: ``offrl collect``, ``offrl data {merge,split,validate,import}``, ``offrl inspect``.

Registered by :func:`register` from :mod:`offrl.cli`. Mistakes raise OffrlError (one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offrl.errors import OffrlError


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.suffix != ".h5":
        raise OffrlError(f"output must be a .h5 file (ManiSkill's format), got {path}")
    if not overwrite and (path.exists() or path.with_suffix(".json").exists()):
        raise OffrlError(f"{path} already exists (pass --overwrite to replace it)")


def _print_dataset(ds, path: Path) -> None:
    print(f"wrote {path} ({len(ds)} episodes, {ds.num_steps} steps) and {path.with_suffix('.json').name}")


# ---------------------------------------------------------------------------------------- commands

def cmd_collect(args: argparse.Namespace) -> int:
    from offrl.cli import _load
    from offrl.data.collect import collect

    cfg = _load(args)
    report, _eps, _meta = collect(cfg)
    for line in report.lines():
        print(line)
    if report.kept == 0:
        raise OffrlError(f"no episode was kept after {report.attempted} attempts; nothing written "
                         "(raise collect.max_attempts, lower collect.action_noise, or set collect.keep_failures=true)")
    if report.kept < report.requested:
        sys.stderr.write(f"offrl: warning: kept only {report.kept} of {report.requested} requested episodes "
                         f"(collect.max_attempts reached)\n")
        return 1
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from offrl.data.dataset import OfflineDataset

    out = Path(args.output)
    _refuse_existing(out, args.overwrite)
    if len(args.inputs) < 2:
        raise OffrlError("merge needs at least two datasets")
    if any(Path(p).resolve() == out.resolve() for p in args.inputs):
        raise OffrlError(f"the output {out} is also an input; write to a new file")
    merged = OfflineDataset.merge([OfflineDataset.load(p, progress=True) for p in args.inputs])
    for note in merged.meta.get("offrl", {}).get("merge_notes", []):
        print(f"note: {note}")
    merged.save(out, progress=True)
    _print_dataset(merged, out)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from offrl.data.dataset import OfflineDataset

    src = Path(args.dataset)
    prefix = Path(args.output) if args.output else src.with_suffix("")
    outs = [Path(f"{prefix}_train.h5"), Path(f"{prefix}_val.h5")]
    for o in outs:
        _refuse_existing(o, args.overwrite)
    ds = OfflineDataset.load(src, progress=True)
    train, val = ds.split(args.val_fraction, args.seed)
    for part, o, name in ((train, outs[0], "train"), (val, outs[1], "val")):
        part.meta = dict(part.meta, offrl=dict(part.meta.get("offrl", {}),
                                               split={"of": str(src), "part": name, "val_fraction": args.val_fraction,
                                                      "seed": args.seed}))
        part.save(o)
        _print_dataset(part, o)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from offrl.data.dataset import OfflineDataset

    for p in args.datasets:
        ds = OfflineDataset.load(p, progress=len(args.datasets) == 1)
        rewards = ", ".join(ds.reward_keys) or "none"
        print(f"ok: {p}: {len(ds)} episodes, {ds.num_steps} steps, {ds.env_id} / {ds.control_mode}, "
              f"obs {ds.obs_dim}, action {ds.act_dim}, rewards: {rewards}, env_states: {'yes' if ds.has_env_states else 'no'}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from offrl.data import importers

    out = Path(args.output)
    _refuse_existing(out, args.overwrite)
    common = dict(env_id=args.env_id, control_mode=args.control_mode, obs_mode=args.obs_mode,
                  reward_mode=args.reward_mode, max_episode_steps=args.max_episode_steps,
                  obs_layout_like=args.obs_layout_like)
    if args.format == "pickle":
        ds = importers.import_pickle(args.source, **common)
    else:
        keys = [k.strip() for k in args.obs_keys.split(",") if k.strip()] if args.obs_keys else None
        ds = importers.import_npz(args.source, obs_keys=keys, progress=True, **common)
    for note in ds.meta["offrl"].get("import_notes", []):
        print(f"note: {note}")
    ds.save(out, progress=True)
    _print_dataset(ds, out)
    return 0


def cmd_reverse(args: argparse.Namespace) -> int:
    from offrl.data.dataset import OfflineDataset
    from offrl.data.reverse import reverse_dataset

    out = Path(args.output)
    _refuse_existing(out, args.overwrite)
    if Path(args.dataset).resolve() == out.resolve():
        raise OffrlError(f"the output {out} is also the input; write to a new file")
    ds = OfflineDataset.load(args.dataset, progress=True)
    rev, report = reverse_dataset(ds, gain=args.gain, replay=not args.no_replay, progress=True)
    for line in report.lines():
        print(line)
    rev.save(out, progress=True)
    _print_dataset(rev, out)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from offrl.data.dataset import OfflineDataset
    from offrl.data.summary import format_summary, plot_dir, summarize, write_plots

    ds = OfflineDataset.load(args.dataset, progress=True)
    s = summarize(ds)
    print(format_summary(s))
    if not args.no_plots:
        d = plot_dir(ds, args.out_dir)
        files = write_plots(ds, d)
        (d / "summary.json").write_text(json.dumps(s, indent=2))
        print(f"\nplots: {', '.join(str(f) for f in files)}; numbers: {d / 'summary.json'}")
    return 0


# ------------------------------------------------------------------------------------------ parser

def register(sub: argparse._SubParsersAction) -> None:
    """Add ``collect``, ``data`` and ``inspect`` to the ``offrl`` command line."""
    from offrl.cli import _add_config_args

    c = sub.add_parser(
        "collect", help="collect scripted-expert demonstrations into a ManiSkill-format dataset",
        description="Start (or join) a Ray cluster, run the scripted expert for env.id on SimHost actors "
                    "(one env each) and write the first collect.episodes successful episodes (or all, with "
                    "collect.keep_failures=true) to collect.output as ManiSkill's .h5 + .json. Deterministic for "
                    "a given seed and collect.chunk_size, whatever the number of actors. "
                    "`offrl config keys --prefix collect.` documents every option.",
        epilog="example: offrl collect collect.episodes=50 collect.output=datasets/pick50.h5 cluster.num_hosts=2")
    _add_config_args(c, required=False)
    c.set_defaults(func=cmd_collect)

    d = sub.add_parser("data", help="merge, split, validate and import offline datasets",
                       description="Work with ManiSkill-format trajectory datasets (.h5 + .json).")
    dsub = d.add_subparsers(dest="data_command", metavar="<subcommand>", parser_class=type(d))
    dsub.required = True

    m = dsub.add_parser("merge", help="concatenate datasets of the same task, control mode and observation layout",
                        description="Merge datasets into one; refuses when env id, control mode, obs mode, "
                                    "observation layout, action size, success/env-state presence or the reward "
                                    "mode of 'rewards' differ. Episodes are renumbered traj_0..")
    m.add_argument("inputs", nargs="+", metavar="DATASET", help="input .h5 files (each with its .json)")
    m.add_argument("-o", "--output", required=True, help="merged .h5 file to write (its .json is written beside it)")
    m.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    m.set_defaults(func=cmd_merge)

    s = dsub.add_parser("split", help="split a dataset by episode into train and validation files",
                        description="Deterministic split by episode (seeded permutation): writes "
                                    "PREFIX_train.h5 and PREFIX_val.h5 with their .json sidecars.")
    s.add_argument("dataset", help="dataset .h5 file")
    s.add_argument("--val-fraction", type=float, default=0.1, help="fraction of episodes for validation (default 0.1)")
    s.add_argument("--seed", type=int, default=0, help="seed of the permutation (default 0)")
    s.add_argument("-o", "--output", default=None, metavar="PREFIX",
                   help="output prefix (default: the dataset path without .h5)")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.set_defaults(func=cmd_split)

    v = dsub.add_parser("validate", help="check datasets fully (groups, shapes, NaN/Inf, corruption)",
                        description="Load each dataset with full validation; prints one line per dataset, or one "
                                    "error line naming the file and episode (exit 2).")
    v.add_argument("datasets", nargs="+", metavar="DATASET", help=".h5 files")
    v.set_defaults(func=cmd_validate)

    i = dsub.add_parser("import", help="convert a pickled dict of arrays or per-trajectory NPZ files",
                        description="Convert existing data into a ManiSkill-format dataset. pickle: a dict with "
                                    "states, actions, next_states (+ rewards, images, success, terminals, timeouts, "
                                    "dones, episode_ids, episode_lengths); only unpickle files you trust. npz: one file "
                                    "per trajectory with action (T, a) and observation fields (ee_pose, obj_pose, ...; "
                                    "4-D arrays such as images are stored as images/<name>). See README 'Datasets'.")
    i.add_argument("format", choices=["pickle", "npz"], help="source format")
    i.add_argument("source", help="pickle file; or a folder of .npz files, one .npz file, or a glob pattern")
    i.add_argument("-o", "--output", required=True, help=".h5 file to write")
    i.add_argument("--env-id", default="PickCube-v1", help="ManiSkill task the data comes from (default PickCube-v1)")
    i.add_argument("--control-mode", default="pd_ee_delta_pos",
                   help="controller the actions are for (default pd_ee_delta_pos)")
    i.add_argument("--obs-mode", default="state", help="observation mode recorded in the metadata (default state)")
    i.add_argument("--reward-mode", default=None,
                   help="reward mode of the source's rewards, e.g. sparse or normalized_dense (default: unknown)")
    i.add_argument("--max-episode-steps", type=int, default=None, help="time limit the data was recorded with")
    i.add_argument("--obs-keys", default=None,
                   help="npz only: comma-separated observation fields in order (default: all vector fields, alphabetical)")
    i.add_argument("--obs-layout-like", default=None, metavar="DATASET",
                   help="use this dataset's observation layout (the sizes must add up), e.g. to merge imported "
                        "ManiSkill state vectors with collected data")
    i.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    i.set_defaults(func=cmd_import)

    r = dsub.add_parser(
        "reverse", help="time-reverse pick-and-place demonstrations into the partner task's (B -> A)",
        description="Play each successful episode of an offrl/PickPlaceB-v1 dataset backwards as offrl/PickPlaceA-v1 "
                    "data (or A -> B): simulator states reversed with velocities negated, observations recomputed "
                    "in the partner task, pd_ee_delta_pos actions rebuilt from the next-step tool-centre points "
                    "(through the arm's response fitted on the forward data), the gripper switched at the mirrored "
                    "time, success and rewards relabelled by the partner task, each episode ending at its first "
                    "success. Then replays the rebuilt actions open-loop from every reversed initial state and "
                    "prints the fraction that succeeds. Needs env_states (offrl collect records them).",
        epilog="example: offrl data reverse datasets/PickPlaceB-v1_expert.h5 -o datasets/PickPlaceA-v1_reversed.h5")
    r.add_argument("dataset", help="dataset .h5 file of offrl/PickPlaceB-v1 or offrl/PickPlaceA-v1 (pd_ee_delta_pos)")
    r.add_argument("-o", "--output", required=True, help=".h5 file to write (its .json is written beside it)")
    r.add_argument("--gain", default="auto",
                   help="how arm actions are rebuilt: auto (default) fits the arm's step response on the forward "
                        "data and inverts it; a number k divides each displacement by k x the controller's 0.1 m "
                        "(1: the nominal scale)")
    r.add_argument("--no-replay", action="store_true", help="skip the open-loop replay check")
    r.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    r.set_defaults(func=cmd_reverse)

    n = sub.add_parser("inspect", help="summary table and plots of a dataset",
                       description="Print episodes, steps, length distribution, success rate, per-dimension action "
                                   "ranges and return statistics; write PNG plots (episode lengths, action "
                                   "histograms, end-effector/object paths in the xy plane when the observation "
                                   "layout names them) and summary.json to <dataset>_inspect/ next to the dataset.")
    n.add_argument("dataset", help="dataset .h5 file")
    n.add_argument("--out-dir", default=None, help="folder for the plots (default: <dataset stem>_inspect next to it)")
    n.add_argument("--no-plots", action="store_true", help="only print the table")
    n.set_defaults(func=cmd_inspect)
