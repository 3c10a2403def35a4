"""How well each advantage estimator ranks the actions a finetuning round actually samples.

The critic x PPO cells of the finetuning grid end below their start, and freezing their critics does not
help, so the question is whether A = Q(s, a) - V(s) from the critics carries any signal at the states and
actions an on-policy round feeds PPO. This script takes one round of the start policy's rollouts (the
finetuning config's exploration std, sparse reward), picks ``--pairs`` of its (state, action) pairs and
scores them four ways:

* ``mc``: Monte-Carlo re-rollouts from the restored simulator states (``finetune.mc_samples`` returns for
  Q and for V each, to the end of the episode), done twice with independent noise; the mean of the two is
  the reference, and the correlation between the two halves is its reliability (Spearman-Brown corrected
  for the doubled sample), which bounds how well any estimator can correlate with it. Each half's own
  estimate of its reliability from the spread within its pairs (``charts/mc_reliability`` in finetuning)
  is printed beside it (``-- finetune.mc_common_noise=true`` pairs Q's and V's noise);
* ``critics``: min of the target Q heads minus V of the start checkpoint's IQL critics (what the IQL and
  SARSA estimators use in round 1), and of every run given with ``--critics`` (their last checkpoint);
* ``gae``: GAE(gamma, lambda) of the rollout with the start's V (GAE's warm start), one trajectory each;
* ``td``: the one-step r + gamma V(s') - V(s) with the same V.

It prints each estimator's Pearson and Spearman correlation with the reference, the share of pairs whose
sign agrees with it, and its spread.

    python bench/advantage_accuracy.py --checkpoint runs/finetune_start/bc_iql_sparse_mix_noquat75 \
        [--critics runs/grid_nq75/finetune/iql_ppo_offline_seed0 ...] [--pairs 400] [--samples 8] \
        [-- key=value ...]     # finetuning config overrides (e.g. env.num_envs=2)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time


def _corr(x, y) -> tuple[float, float, float]:
    """(Pearson, Spearman, sign agreement where ``y`` is not 0) of two 1-d arrays."""
    import numpy as np
    from scipy.stats import spearmanr

    nz = y != 0
    return (float(np.corrcoef(x, y)[0, 1]), float(spearmanr(x, y).statistic),
            float(np.mean(np.sign(x[nz]) == np.sign(y[nz]))))


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from offrl.errors import OffrlError

    try:
        return _main()
    except OffrlError as e:
        print(f"advantage_accuracy: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


def _main() -> int:
    import numpy as np
    import torch

    from offrl.algos.advantages import critic_advantage, gae
    from offrl.config import load_config
    from offrl.platform.checkpoint import latest_checkpoint, load_checkpoint
    from offrl.platform.cluster import init_ray
    from offrl.platform.estimators import mc_advantages, rerollout_spec
    from offrl.platform.finetune import _flat, _load_start
    from offrl.platform.pretrain import actor_spec
    from offrl.platform.simhost import SimHostPool, concat_rollouts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the finetuning start point (a bc+iql pretraining run)")
    ap.add_argument("--config", default="tune_configs/finetune_sparse.yaml", help="finetuning config")
    ap.add_argument("--critics", nargs="*", default=[], help="finetuning runs whose last checkpoint's critics "
                                                              "are scored too")
    ap.add_argument("--pairs", type=int, default=400, help="(state, action) pairs scored (from one round)")
    ap.add_argument("--samples", type=int, default=8, help="MC returns for Q and for V per pair, per half")
    ap.add_argument("--seed", type=int, default=0, help="rollout and selection seed")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the finetuning config (after --)")
    args = ap.parse_args()
    for name, v in (("--pairs", args.pairs), ("--samples", args.samples)):
        if v < 1:
            print(f"advantage_accuracy: {name} must be >= 1, got {v}", file=sys.stderr)
            return 2

    cfg = load_config(args.config, ["finetune.advantage=iql", f"finetune.checkpoint={args.checkpoint}",
                                    f"finetune.mc_samples={args.samples}", f"seed={args.seed}", *args.overrides])
    cfg, arch, actor, _value, critics, _ = _load_start(cfg, lambda *a: None)
    fc = cfg.finetune
    init_ray(cfg.cluster)
    pool = SimHostPool(cfg.env, cfg.cluster, seed=args.seed)
    t0 = time.perf_counter()
    try:
        spec = actor_spec(actor, arch, deterministic=False)
        results = pool.rollout(spec, fc.steps_per_iter, reset_seed=args.seed, record_states=True, policy_seed=args.seed)
        data = concat_rollouts(results)
        T, N = data["rewards"].shape
        fc = dataclasses.replace(fc, mc_fraction=min(1.0, args.pairs / (T * N)))
        mc = [mc_advantages(pool, results, data, rerollout_spec(cfg, spec), fc, np.random.default_rng(args.seed),
                            seed=1000 * (half + 1))
              for half in range(2)]
        rr_steps = sum(m[2]["steps"] for m in mc)
    finally:
        pool.shutdown()
    idx = mc[0][0]
    assert (mc[1][0] == idx).all()
    a1, a2 = mc[0][1].astype(np.float64), mc[1][1].astype(np.float64)
    ref = (a1 + a2) / 2
    r_half = float(np.corrcoef(a1, a2)[0, 1])
    reliability = 2 * r_half / (1 + r_half)

    flat = {k: _flat(data[k]).float() for k in ("obs", "actions", "next_obs")}
    obs, act = flat["obs"][idx], flat["actions"][idx]
    with torch.no_grad():
        v = critics.v(flat["obs"]).reshape(T, N)
        nv = critics.v(flat["next_obs"]).reshape(T, N)
        rew, term = torch.from_numpy(data["rewards"]).float(), torch.from_numpy(data["terminated"])
        trunc = torch.from_numpy(data["truncated"])
        a_gae, _ = gae(rew, v, nv, term, trunc, fc.gamma, fc.gae_lambda)
        a_td, _ = gae(rew, v, nv, term, trunc, fc.gamma, 0.0)
        est = {"start critics (IQL, round 1)": critic_advantage(critics.q_target.min(obs, act), critics.v(obs)),
               f"gae (lambda {fc.gae_lambda}, start V)": a_gae.reshape(-1)[idx],
               "td (lambda 0, start V)": a_td.reshape(-1)[idx]}
        for run in args.critics:
            ck = latest_checkpoint(os.path.join(run, "checkpoints"))
            if ck is None:
                print(f"advantage_accuracy: no checkpoint in {run}/checkpoints", file=sys.stderr)
                return 2
            c = copy.deepcopy(critics)  # finetuning keeps the start's critic architecture and view
            load_checkpoint(ck, {"critics": c}, parts=["critics"], restore_rng=False)
            est[f"critics of {os.path.basename(run.rstrip('/'))} (end)"] = critic_advantage(c.q_target.min(obs, act),
                                                                                           c.v(obs))

    print(f"{cfg.env.id}, start {args.checkpoint}: {len(idx)} (state, action) pairs of one round "
          f"({N} envs x {T} steps, exploration std {float(actor.log_std.detach().exp().mean()):.3f}), reward "
          f"{cfg.env.reward_mode}, gamma {fc.gamma}")
    print(f"MC reference: 2 x {args.samples} re-rollouts for Q and for V per pair ({rr_steps} env steps, "
          f"{time.perf_counter() - t0:.0f} s); mean {ref.mean():+.4f}, std {ref.std():.4f}, "
          f"nonzero {np.mean(ref != 0):.2f}")
    print(f"reliability of the reference: halves correlate {r_half:.3f} -> {reliability:.3f} for their mean; an "
          f"estimator's correlation with it is at most sqrt = {np.sqrt(max(reliability, 0)):.3f}")
    if mc[0][2]["reliability"] is not None:  # needs --samples >= 2
        print(f"reliability of one half estimated from the spread within its pairs (what finetuning logs as "
              f"charts/mc_reliability): {mc[0][2]['reliability']:.3f}, {mc[1][2]['reliability']:.3f}; "
              f"noise std of one pair's advantage {mc[0][2]['noise_std']:.4f}")
    print()
    print("| estimator | Pearson r with MC | Spearman rho | sign agrees (MC not 0) | std |")
    print("|---|---:|---:|---:|---:|")
    p, s, g = _corr(a1, a2)
    print(f"| one MC half against the other | {p:.3f} | {s:.3f} | {g:.2f} | {a1.std():.4f} |")
    for name, a in est.items():
        a = a.double().numpy()
        p, s, g = _corr(a, ref)
        print(f"| {name} | {p:.3f} | {s:.3f} | {g:.2f} | {a.std():.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
