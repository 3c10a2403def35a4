"""Why a PickCube-v1 policy fails: each evaluation episode sorted into what it reached.

PickCube-v1 counts a success when the cube is within 2.5 cm of the goal *and* the arm is static. This plays a
checkpoint's policy (the way ``offrl eval`` does: deterministic, the same evaluation seeds, terminations ignored)
in one CPU env and reads ManiSkill's own ``evaluate()`` flags every step:

* ``success``: success at least once (``success_once``);
* ``placed_not_static``: the cube reached the goal but the arm never stood still there;
* ``grasped_not_placed``: the cube was grasped but never brought within 2.5 cm of the goal; the closest
  distance it reached is reported, so "stopped short" and "never got near" can be told apart;
* ``never_grasped``.

For the episodes that grasped the cube and never placed it, it also asks the scripted expert
(:class:`offrl.envs.experts.PickCubeExpert`, its state machine resumed from the scene) what it would do in
the episode's last states, and prints how many of those episodes *stalled*: over the last 5 steps the policy
commands less than 0.05 of arm motion (``|a_xyz|``) where the expert commands more than 0.2. For them it
prints where the cube stopped: its horizontal and vertical distance from the goal, and the expert's command.
When the checkpoint holds ``sac``'s Q ensemble it also prints what the critic thinks of the stalled states:
Q(s, policy's action) against Q(s, expert's action) (ensemble means), and the cosine between dQ/da at the
policy's action and the expert's arm command. Equal values and a cosine near 0 say the critic does not tell
the expert's move from standing still, so the actor has nothing to follow there.

    python bench/failure_modes.py CHECKPOINT [--episodes 30] [--seed 1000000000] [--steps 100]
                                  [policy.action_horizon=12 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def critic_view(ckpt, arch: dict, cfg: dict, actor=None):
    """``q(obs [d], action [a]) -> (Q ensemble mean, dQ/da [a])`` from a ``sac`` finetuning checkpoint's
    ``sac_critics``; None for any other checkpoint (a pretrained policy, or a rule with other critics)."""
    fc = cfg.get("finetune", {})
    if fc.get("update") != "sac":  # every checkpoint a sac run writes holds its Q ensemble
        return None
    import torch

    from offrl.algos.sac import SACCritics
    from offrl.platform.checkpoint import load_checkpoint

    critics = SACCritics(arch["obs_dim"], arch["act_dim"], cfg["critic"]["hidden"], cfg["critic"]["activation"],
                         fc["sac_ensemble"], fc["sac_layer_norm"], fc["sac_init_alpha"],
                         fc.get("sac_critic_bins", 0), fc.get("sac_value_range", (-2.0, 2.0)))
    load_checkpoint(ckpt, {"sac_critics": critics}, parts=["sac_critics"], restore_rng=False)
    if fc.get("sac_critic_obs", "full") == "actor":  # the Q ensemble saw the observation as the actor does
        from offrl.algos.networks import build_actor

        critics.view_as(actor if actor is not None else build_actor(arch))  # the view comes from the architecture

    def q(obs, action):
        o = torch.as_tensor(np.asarray(obs), dtype=torch.float32).reshape(1, -1)
        a = torch.as_tensor(np.asarray(action), dtype=torch.float32).reshape(1, -1).requires_grad_(True)
        v = critics.q(o, a).mean()
        (g,) = torch.autograd.grad(v, a)
        return float(v.detach()), g[0].numpy()

    return q


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("checkpoint", help="checkpoint folder or run directory")
    ap.add_argument("--episodes", type=int, default=30, help="evaluation episodes (seeds from --seed on)")
    ap.add_argument("--seed", type=int, default=1_000_000_000, help="first evaluation seed (offrl eval's default)")
    ap.add_argument("--steps", type=int, default=100, help="episode length (terminations ignored)")
    ap.add_argument("--out", default=None, help="also write the per-episode records to this JSON file")
    ap.add_argument("overrides", nargs="*", help="acting overrides: policy.action_horizon=N, diffusion.inference_steps=N")
    args = ap.parse_args()
    from offrl.algos.networks import build_actor
    from offrl.envs.maniskill import ManiSkillCPUSim
    from offrl.platform.checkpoint import checkpoint_json, load_checkpoint, resolve_checkpoint
    from offrl.platform.pretrain import actor_spec
    from offrl.platform.rollout import build_policy

    ckpt = resolve_checkpoint(args.checkpoint)
    arch = dict(checkpoint_json(ckpt, "training_state/state.json")["actor_arch"])
    cfg = checkpoint_json(ckpt, "config.json")
    keys = {"policy.action_horizon": "action_horizon", "diffusion.inference_steps": "inference_steps",
            "diffusion.scheduler": "scheduler"}
    for kv in args.overrides:
        k, _, v = kv.partition("=")
        if k not in keys:
            ap.error(f"unknown override {k!r} (known: {', '.join(keys)})")
        arch[keys[k]] = type(arch[keys[k]])(v)
    actor = build_actor(arch)
    load_checkpoint(ckpt, {"actor": actor}, parts=["actor"], restore_rng=False)
    spec = actor_spec(actor, arch, True)
    q = critic_view(ckpt, arch, cfg, actor)
    env = cfg["env"]
    if env["id"] != "PickCube-v1":
        ap.error(f"this reads PickCube-v1's flags; the checkpoint is for {env['id']}")
    sim = ManiSkillCPUSim(env["id"], num_envs=1, control_mode=env["control_mode"], max_episode_steps=args.steps,
                          autoreset=False)
    sim.ignore_terminations = True
    u = sim.envs[0].unwrapped
    from offrl.envs.experts import PickCubeExpert

    expert = PickCubeExpert(1)
    tail = 5  # the last steps a stall is judged on
    records = []
    for ep in range(args.episodes):
        seed = args.seed + ep
        policy = build_policy(spec, sim, seed=seed)
        obs = sim.reset(seed=seed)
        grasped = placed = success = False
        closest, first = np.inf, None
        last: list = []
        for t in range(args.steps):
            act = np.asarray(policy(obs, sim)[0], np.float64)
            if t >= args.steps - tail and bool(u.evaluate()["is_grasped"][0]):
                priv = expert.privileged(u)
                expert.resume(priv, [0], [u])
                ex = np.clip(expert.clean_action(priv), -1.0, 1.0)[0]
                off = priv["cube"][0] - priv["goal"][0]
                crit = {}
                if q is not None:
                    (qp, grad), (qe, _) = q(obs, act[0]), q(obs, ex)
                    cos = float(grad[:3] @ ex[:3] / (np.linalg.norm(grad[:3]) * np.linalg.norm(ex[:3]) + 1e-12))
                    crit = {"q_policy": qp, "q_expert": qe, "dq_da_cos_expert": cos}
                last.append((float(np.linalg.norm(act[0, :3])), float(np.linalg.norm(ex[:3])),
                             float(np.linalg.norm(off[:2])), float(off[2]), ex[:3].round(2).tolist(), crit))
            obs, _, _, _, info = sim.step(act)
            ev = u.evaluate()
            grasped |= bool(ev["is_grasped"][0])
            placed |= bool(ev["is_obj_placed"][0])
            if bool(info["success"][0]) and first is None:
                first = t + 1
            success |= bool(info["success"][0])
            closest = min(closest, float((u.goal_site.pose.p - u.cube.pose.p).norm()))
        kind = ("success" if success else "placed_not_static" if placed else
                "grasped_not_placed" if grasped else "never_grasped")
        rec = {"seed": seed, "kind": kind, "closest_to_goal_m": closest, "first_success_step": first}
        if kind == "grasped_not_placed" and len(last) == tail:
            pol, exp = np.mean([x[0] for x in last]), np.mean([x[1] for x in last])
            rec.update(stalled=bool(pol < 0.05 and exp > 0.2), policy_arm_command=float(pol),
                       expert_arm_command=float(exp), end_xy_from_goal_m=last[-1][2], end_z_minus_goal_m=last[-1][3],
                       expert_command=last[-1][4], **last[-1][5])
        records.append(rec)
        print(f"seed {seed}: {kind}, closest to goal {closest * 100:.1f} cm"
              + (f", first success at step {first}" if first else ""), flush=True)
    sim.close()
    counts = Counter(r["kind"] for r in records)
    short = [r["closest_to_goal_m"] for r in records if r["kind"] == "grasped_not_placed"]
    steps = [r["first_success_step"] for r in records if r["first_success_step"]]
    print(f"\n{args.checkpoint} ({', '.join(args.overrides) or 'as trained'}), {args.episodes} episodes:")
    for kind in ("success", "placed_not_static", "grasped_not_placed", "never_grasped"):
        print(f"  {kind:20s} {counts.get(kind, 0):3d}")
    if short:
        print(f"  grasped_not_placed: closest to the goal median {np.median(short) * 100:.1f} cm "
              f"(success needs < 2.5 cm)")
    if steps:
        print(f"  first success at step: median {np.median(steps):.0f}, max {max(steps)}")
    judged = [r for r in records if "stalled" in r]
    stalled = [r for r in judged if r["stalled"]]
    if judged:
        print(f"  grasped_not_placed and holding the cube at the end: {len(judged)}; stalled (policy |a_xyz| < 0.05 "
              f"over the last {tail} steps where the scripted expert commands > 0.2): {len(stalled)}")
    if stalled:
        xy = np.median([r["end_xy_from_goal_m"] for r in stalled]) * 100
        z = np.median([abs(r["end_z_minus_goal_m"]) for r in stalled]) * 100
        share = np.median([abs(r["expert_command"][2]) / max(np.linalg.norm(r["expert_command"]), 1e-9)
                           for r in stalled])
        print(f"  stalled: cube from goal median {xy:.1f} cm horizontally, {z:.1f} cm vertically; "
              f"the expert's command is median {share:.2f} vertical (|dz| / |a_xyz|)")
    if stalled and q is not None:
        qp, qe = (np.median([r[k] for r in stalled]) for k in ("q_policy", "q_expert"))
        print(f"  stalled, sac's critic at the last state: median Q(s, policy) {qp:.3f}, Q(s, expert) {qe:.3f}; "
              f"expert's Q higher in {np.mean([r['q_expert'] > r['q_policy'] for r in stalled]):.2f} of them; "
              f"cos(dQ/da, expert's arm command) median {np.median([r['dq_da_cos_expert'] for r in stalled]):.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checkpoint": str(ckpt), "overrides": args.overrides, "episodes": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
