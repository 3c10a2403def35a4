"""The bias of a capped Monte-Carlo re-rollout horizon, measured once on PickCube-v1.

MC re-rollouts (``finetune.advantage=mc``) estimate Q(s, a) and V(s) by restoring saved simulator states
inside the SimHost actors and following a re-rollout policy. A horizon cap (``finetune.mc_horizon=H``)
drops the return after H steps, so Q and V are biased low by up to gamma^H times the value of the rest of
the episode; ``mc_horizon: null`` (the default) runs to the end of the episode. This script restores the
same (state, action) pairs, taken from a rollout of the re-rollout policy, once per horizon and reports
for each cap: mean Q, the mean and largest bias of Q and of A = Q - V against the full horizon, the
share of pairs whose Q changed, and the re-rollout steps per pair (the cost the cap saves).

    python bench/mc_horizon_bias.py [--horizons 5 10 20] [--pairs 96] [--reward-mode normalized_dense]
                                    [--checkpoint RUN_DIR --samples 4] [--root runs/mc_horizon_bias]

The default re-rollout policy is the scripted expert (deterministic: 1 sample per pair), as
``tune_configs/finetune.yaml`` uses; ``--checkpoint`` re-rolls with a pretrained Gaussian policy instead
(stochastic: give ``--samples`` >= 2). Rewards and the success bonus follow the finetuning defaults
(gamma 0.8; normalized_dense gets the bonus of :mod:`offrl.algos.rewards`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import numpy as np

    from offrl.algos.rewards import auto_success_bonus
    from offrl.config import load_config
    from offrl.platform.cluster import init_ray
    from offrl.platform.rerollout import index_state, rerollout_pool, stack_states
    from offrl.platform.simhost import SimHostPool

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--horizons", type=int, nargs="+", default=[5, 10, 20], help="capped horizons to compare")
    ap.add_argument("--pairs", type=int, default=96, help="(state, action) pairs re-rolled")
    ap.add_argument("--samples", type=int, default=1, help="re-rollouts per pair (>= 2 for a stochastic policy)")
    ap.add_argument("--gamma", type=float, default=0.8, help="discount")
    ap.add_argument("--reward-mode", default="normalized_dense", choices=["normalized_dense", "dense", "sparse"])
    ap.add_argument("--max-episode-steps", type=int, default=50, help="episode time limit")
    ap.add_argument("--checkpoint", default=None, help="re-roll with this pretrained policy instead of the expert")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default="runs/mc_horizon_bias", help="where the report goes")
    args = ap.parse_args()
    if any(h < 1 for h in args.horizons) or args.pairs < 1 or args.samples < 1:
        ap.error("--horizons, --pairs and --samples must be >= 1")
    if args.checkpoint and args.samples < 2:
        ap.error("a stochastic re-rollout policy (--checkpoint) needs --samples >= 2")

    cfg = load_config(None, [f"env.reward_mode={args.reward_mode}", f"env.max_episode_steps={args.max_episode_steps}",
                             "env.num_envs=8"])
    bonus = auto_success_bonus(None, args.reward_mode, args.gamma, args.max_episode_steps)
    if args.checkpoint:
        import json

        from offrl.algos.networks import build_actor
        from offrl.platform.checkpoint import load_checkpoint, resolve_checkpoint
        from offrl.platform.pretrain import actor_spec

        ck = resolve_checkpoint(args.checkpoint)
        arch = json.loads((ck / "training_state" / "state.json").read_text())["actor_arch"]
        actor = build_actor(arch)
        load_checkpoint(ck, {"actor": actor}, parts=["actor"], restore_rng=False)
        spec, who = actor_spec(actor, arch, deterministic=False), f"policy {ck}"
    else:
        spec, who = {"kind": "expert", "name": "auto"}, "the scripted expert"
    init_ray(cfg.cluster)
    pool = SimHostPool(cfg.env, cfg.cluster, seed=args.seed)
    try:
        res = pool.rollout(spec, args.max_episode_steps, reset_seed=args.seed, record_states=True,
                           policy_seed=args.seed)
        rng = np.random.default_rng(args.seed)
        cells = [(h, t, n) for h, r in enumerate(res) for t in range(r["obs"].shape[0]) for n in range(r["obs"].shape[1])]
        pick = rng.choice(len(cells), size=min(args.pairs, len(cells)), replace=False)
        states = stack_states([index_state(res[cells[i][0]]["states"][cells[i][1]], cells[i][2]) for i in pick])
        actions = np.stack([res[cells[i][0]]["actions"][cells[i][1], cells[i][2]] for i in pick])
        out = {}
        for h in [None, *sorted(set(args.horizons))]:
            t0 = time.perf_counter()
            r = rerollout_pool(pool, spec, states, actions, args.samples, h, args.gamma, seed=args.seed,
                               success_bonus=bonus)
            out[h] = {"q": r["q"].mean(1), "v": r["v"].mean(1), "steps": r["steps"], "s": time.perf_counter() - t0}
    finally:
        pool.shutdown()

    full = out[None]
    a_full = full["q"] - full["v"]
    n = len(pick)
    lines = [f"MC re-rollout horizon bias on PickCube-v1 ({args.reward_mode} reward"
             + (f" + success bonus {bonus:.3g}" if bonus else "") + f", gamma {args.gamma}, "
             f"{args.max_episode_steps}-step episodes): {n} (state, action) pairs from a rollout of {who}, "
             f"{args.samples} sample(s) per pair; bias = capped - full horizon.", "",
             "| horizon | mean Q | Q bias (mean) | Q bias (largest) | A bias (mean abs) | pairs with Q changed | "
             "re-rollout steps / pair |", "|---|---:|---:|---:|---:|---:|---:|"]
    for h in [None, *sorted(set(args.horizons))]:
        o = out[h]
        dq = o["q"] - full["q"]
        da = (o["q"] - o["v"]) - a_full
        lines.append(f"| {'full (null)' if h is None else h} | {o['q'].mean():.3f} | {dq.mean():+.3f} | "
                     f"{dq.min():+.3f} | {np.abs(da).mean():.3f} | {(np.abs(dq) > 1e-6).mean():.2f} | "
                     f"{o['steps'] / n:.1f} |")
    text = "\n".join(lines)
    print(text)
    Path(args.root).mkdir(parents=True, exist_ok=True)
    (Path(args.root) / "report.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
