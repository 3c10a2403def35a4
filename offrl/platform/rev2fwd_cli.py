"""Commands of reverse-to-forward imitation: ``offrl alternate`` and ``offrl iterate``.

Registered by :func:`register` from :mod:`offrl.cli`. Mistakes raise OffrlError (one line, exit 2).
"""

from __future__ import annotations

import argparse


def cmd_alternate(args: argparse.Namespace) -> int:
    from offrl.platform.alternate import run_alternate

    run_alternate(args.policy_a, args.policy_b, chains=args.chains, max_cycles=args.max_cycles, horizon=args.horizon,
                  seed=args.seed, out=args.out, overrides=args.overrides, overwrite=args.overwrite)
    return 0


def cmd_iterate(args: argparse.Namespace) -> int:
    from offrl.cli import _load
    from offrl.platform.iterate import run_iterate

    run_iterate(_load(args))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from offrl.cli import _add_config_args

    a = sub.add_parser(
        "alternate", help="the alternating A->B test of two pick-and-place policies, without resets",
        description="Chains of attempts in one environment each, without resets: policy A places the cube on the "
                    "target (offrl/PickPlaceA-v1), policy B moves it from there to a random goal "
                    "(offrl/PickPlaceB-v1), then A again... A chain stops at its first failed attempt or after "
                    "--max-cycles A->B cycles. Chains run in parallel on SimHost actors (one chain per env; chain j "
                    "starts from seed --seed + j). Writes alternate.json (consecutive_success mean/median/"
                    "distribution, A_success_rate and B_success_rate with 95% intervals, every chain), "
                    "consecutive_success.png, and every attempt to rollouts_A.h5 / rollouts_B.h5 (labelled with "
                    "success, with env states).",
        epilog="example: offrl alternate --policy-a runs/pickplace_a/RUN --policy-b runs/pickplace_b/RUN --chains 50")
    a.add_argument("--policy-a", required=True, metavar="CKPT",
                   help="checkpoint (or run directory) of a policy trained for offrl/PickPlaceA-v1")
    a.add_argument("--policy-b", required=True, metavar="CKPT",
                   help="checkpoint (or run directory) of a policy trained for offrl/PickPlaceB-v1 (same task settings)")
    a.add_argument("--chains", type=int, default=20, help="independent chains (default %(default)s)")
    a.add_argument("--max-cycles", type=int, default=10, help="A->B cycles after which a chain stops (default %(default)s)")
    a.add_argument("--horizon", type=int, default=0,
                   help="control steps per attempt (default 0: policy A's env.max_episode_steps)")
    a.add_argument("--seed", type=int, default=0, help="chain j resets once, with seed SEED + j (default %(default)s)")
    a.add_argument("--out", default="runs/alternate", help="output folder (default %(default)s)")
    a.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    a.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of both checkpoints' configs, e.g. env.num_envs=4 cluster.num_hosts=2 "
                        "eval.deterministic=false policy.action_horizon=4")
    a.set_defaults(func=cmd_alternate)

    it = sub.add_parser(
        "iterate", help="the reverse-to-forward loop: alternating test -> merge successes -> finetune A and B",
        description="Each iteration (its own folder iterate.root/iter_<i>): the alternating test of the current A and B "
                    "policies (offrl alternate), then each task's original data merged with the successful "
                    "rollouts collected so far (offrl data merge), then A and B finetuned from their latest "
                    "checkpoints for iterate.steps_per_iter gradient steps on the merged data. Stops after "
                    "iterate.max_iterations alternating tests (the last iteration only tests) or when an iteration "
                    "collects no successful rollout. Resumes where it stopped: run the same command again. Writes "
                    "iterate.json, iterate.md and iterate.png (consecutive_success and per-task success by "
                    "iteration). `offrl config keys --prefix iterate.` documents every option.",
        epilog="example: offrl iterate tune_configs/rev2fwd.yaml iterate.policy_a=RUN_A iterate.policy_b=RUN_B")
    _add_config_args(it)
    it.set_defaults(func=cmd_iterate)
