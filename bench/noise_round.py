"""How far one on-policy round moves the policy when its advantages carry no signal.

The on-policy AWR and push-away cells of the finetuning grid lose success while their advantage spread
falls towards zero, yet their per-round ``approx_kl`` stays where it started. This measures the part of a
round's step that needs no signal at all: the start policy acts on ``--samples`` states from its own
training demos (actions sampled with the finetuning exploration std, log-probs recorded, as a rollout
records them), and one round of each update rule (``epochs`` x ``minibatches``, the finetuning config's
settings) is taken with

* ``zero``: every advantage exactly 0 (a round in which nothing succeeded, as sparse MC re-rollouts often are);
* ``noise``: advantages drawn independently of the actions (N(0, 1)): any direction they give is chance.

It reports KL(policy before || after) on those states and how far the mean moved (in units of the std),
averaged over ``--repeats`` rounds with different samples. A rule whose expected gradient is zero without
signal should move little; the same figures for the round sizes of ``--samples`` show whether larger
rounds average the noise out.

A second table follows the walk over ``--drift-rounds`` consecutive signal-free rounds of 800 samples, each
collected by the policy as the previous rounds left it, for AWR and push-away learning from the last
``--keep`` rounds (``finetune.keep_rounds``, through the finetuning loop's own ``RecentRounds``): KL from the
start policy and the mean's shift every 5 rounds; ``--ref-kl`` adds rows with the anchor to the start
policy (``finetune.ref_kl_coef``).

    python bench/noise_round.py [--checkpoint runs/finetune_start/bc_iql_sparse_mix] [--samples 800 2400]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--checkpoint", default="runs/finetune_start/bc_iql_sparse_mix",
                    help="finetuning start point (bench/finetune_start.py builds it)")
    ap.add_argument("--config", default="tune_configs/finetune_sparse.yaml", help="finetuning config")
    ap.add_argument("--samples", type=int, nargs="+", default=[800, 2400], help="round sizes (states per round)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds per (rule, advantages, size), fresh samples each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drift-rounds", type=int, default=20, help="consecutive signal-free rounds of the drift table "
                                                                  "(0: skip it)")
    ap.add_argument("--keep", type=int, nargs="+", default=[1, 8], help="finetune.keep_rounds values of the drift table")
    ap.add_argument("--ref-kl", type=float, nargs="+", default=[0.0, 1.0],
                    help="finetune.ref_kl_coef values of the drift table (the anchor to the start policy)")
    args = ap.parse_args()
    for name in ("samples", "keep"):
        if min(getattr(args, name)) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.repeats < 1 or args.drift_rounds < 0:
        ap.error("--repeats must be >= 1 and --drift-rounds >= 0")
    if not all(math.isfinite(v) and v >= 0 for v in args.ref_kl):
        ap.error("--ref-kl values must be finite and >= 0")

    import numpy as np
    import torch

    from offrl.algos.finetune import FinetuneLearner
    from offrl.algos.rewards import auto_success_bonus
    from offrl.config import load_config
    from offrl.platform.finetune import _load_start, load_offline

    torch.manual_seed(args.seed)
    print(f"start point {args.checkpoint}; one round of each rule on the start policy's own samples")
    print("| rule | advantages | samples | epochs run | KL(before \\|\\| after) | mean shift / std |")
    print("|---|---|---:|---:|---:|---:|")
    # the start point and its demos are the same for every rule (GAE's value net, no RECAP indicator)
    cfg = load_config(args.config, [f"finetune.checkpoint={args.checkpoint}", "finetune.advantage=gae",
                                    "run.progress=false"])
    cfg, arch, actor0, value, _, ckpt = _load_start(cfg, lambda *a: None)
    bonus = auto_success_bonus(cfg.finetune.success_bonus, cfg.env.reward_mode, cfg.finetune.gamma,
                               cfg.env.max_episode_steps)
    demos = load_offline(cfg, ckpt, actor0, bonus, need_rewards=False, log=lambda *a: None)
    for rule in ("ppo", "awr", "push_away"):
        fc = load_config(args.config, [f"finetune.checkpoint={args.checkpoint}", "finetune.advantage=gae",
                                       f"finetune.update={rule}", "run.progress=false"]).finetune
        for kind in ("zero", "noise"):
            for n in args.samples:
                kls, shifts, epochs = [], [], []
                for r in range(args.repeats):
                    g = torch.Generator().manual_seed(args.seed * 1000 + r)
                    obs = demos["obs"][torch.randint(0, demos["obs"].shape[0], (n,), generator=g)]
                    actor = copy.deepcopy(actor0)
                    with torch.no_grad():
                        before = actor.dist(obs)
                        raw = before.mean + before.stddev * torch.randn(before.mean.shape, generator=g)
                        logp = before.log_prob(raw).sum(-1)
                    adv = torch.zeros(n) if kind == "zero" else torch.randn(n, generator=g)
                    batch = {"obs": obs, "actions": raw.clamp(-1, 1), "raw_actions": raw, "logprob": logp,
                             "adv": adv, "returns": torch.zeros(n)}
                    learner = FinetuneLearner(actor, fc, value=copy.deepcopy(value) if value is not None else None,
                                              seed=args.seed + r)
                    m = learner.update(batch, train_actor=True)
                    with torch.no_grad():
                        after = actor.dist(obs)
                        kls.append(float(torch.distributions.kl_divergence(before, after).sum(-1).mean()))
                        shifts.append(float(((after.mean - before.mean) / before.stddev).norm(dim=-1).mean()))
                    epochs.append(m.get("epochs", 0.0))
                print(f"| {rule} | {kind} | {n} | {np.mean(epochs):.1f} | {np.mean(kls):.4f} | {np.mean(shifts):.3f} |")
    if args.drift_rounds:
        drift_table(args, demos, actor0, value)
    return 0


def drift_table(args, demos, actor0, value) -> None:
    """KL from the start / mean shift after every 5 of ``--drift-rounds`` signal-free rounds, per keep_rounds."""
    import torch

    from offrl.algos.finetune import FinetuneLearner
    from offrl.config import load_config
    from offrl.platform.estimators import Estimator, RecentRounds

    marks = list(range(5, args.drift_rounds + 1, 5)) or [args.drift_rounds]
    print(f"\n{args.drift_rounds} consecutive rounds of 800 samples, all advantages 0; KL(start || now) / mean "
          "shift in stds after rounds " + ", ".join(map(str, marks)))
    print("| rule | keep_rounds | ref_kl_coef | " + " | ".join(f"after {m}" for m in marks) + " |")
    print("|---|---:|---:|" + "---|" * len(marks))
    for rule, keep, ref in [(r, k, c) for r in ("awr", "push_away") for k in args.keep for c in args.ref_kl]:
        fc = load_config(args.config, [f"finetune.checkpoint={args.checkpoint}", "finetune.advantage=gae",
                                       f"finetune.update={rule}", f"finetune.keep_rounds={keep}",
                                       f"finetune.ref_kl_coef={ref}", "run.progress=false"]).finetune
        g = torch.Generator().manual_seed(args.seed)
        probe = demos["obs"][torch.randint(0, demos["obs"].shape[0], (2000,), generator=g)]
        actor = copy.deepcopy(actor0)
        learner = FinetuneLearner(actor, fc, value=copy.deepcopy(value) if value is not None else None,
                                  seed=args.seed)
        recent, est = RecentRounds(keep), Estimator()  # zero advantages: nothing to re-score
        with torch.no_grad():
            start = actor.dist(probe)
        cells = []
        for r in range(1, args.drift_rounds + 1):
            obs = demos["obs"][torch.randint(0, demos["obs"].shape[0], (800,), generator=g)]
            with torch.no_grad():
                d = actor.dist(obs)
                raw = d.mean + d.stddev * torch.randn(d.mean.shape, generator=g)
                batch = {"obs": obs, "actions": raw.clamp(-1, 1), "raw_actions": raw,
                         "logprob": d.log_prob(raw).sum(-1), "adv": torch.zeros(800), "returns": torch.zeros(800)}
            learner.update(recent.merge(est, learner, None, batch) if keep > 1 else batch)
            if r in marks:
                with torch.no_grad():
                    now = actor.dist(probe)
                    kl = float(torch.distributions.kl_divergence(start, now).sum(-1).mean())
                    shift = float(((now.mean - start.mean) / start.stddev).norm(dim=-1).mean())
                cells.append(f"{kl:.3f} / {shift:.2f}")
        print(f"| {rule} | {keep} | {ref:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
