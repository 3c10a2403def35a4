"""What one gradient step of the ``sac`` reference row costs, on the CPU and (where there is one) a GPU.

RLPD's sample-efficient ManiSkill config takes 16 gradient steps per env step with 10 Q heads: 806,400 steps
for the finetuning budget of 50,400 env steps. The grid's ``sac`` row takes 200 a round with 2 heads (12,600
steps). This times the platform's own step, ``SACLearner.gradient_step`` (TD target from a random pair of
target heads, the ensemble's regression, Polyak, actor + DAPG term + bound penalty, temperature), on
synthetic minibatches of PickCube's shapes, and prints milliseconds a step, the ratio to the first row
(measured in the same run: machines are shared and noisy) and what each budget would take at that rate.

    python bench/sac_step_cost.py [--devices cpu cuda] [--ensembles 2 10] [--forwards loop batched]
                                  [--steps 200] [--threads 1]

Only the learner's arithmetic is timed: no simulator, no replay sampling. The finetuning loop itself runs
its learner on the CPU; the GPU rows say what moving it would buy, not what the platform does today.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BUDGETS = {"grid sac row (12,600 steps)": 12_600, "RLPD UTD 16 (806,400 steps)": 806_400}


def _batches(n: int, obs_dim: int, act_dim: int, batch: int, device: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {"obs": torch.randn(batch, obs_dim, generator=g), "next_obs": torch.randn(batch, obs_dim, generator=g),
             "actions": torch.rand(batch, act_dim, generator=g) * 2 - 1,
             "rewards": (torch.rand(batch, generator=g) < 0.05).float(),
             "terminated": torch.rand(batch, generator=g) < 0.05}
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def time_step(device: str, ensemble: int, steps: int, warmup: int, obs_dim: int, act_dim: int, batch: int,
              hidden: list[int], batched: bool = False) -> float:
    """Seconds per ``SACLearner.gradient_step`` on ``device`` with ``ensemble`` Q heads (``batched``: the
    ensemble's batched forward, ``QEnsemble._forward_batched``, in the Q net and its target)."""
    import torch

    from offrl.algos.networks import GaussianActor
    from offrl.algos.sac import SACLearner
    from offrl.config import FinetuneConfig

    cfg = FinetuneConfig(update="sac", replay=True, sac_ensemble=ensemble, bc_coef=0.1, target_kl=None)
    torch.manual_seed(0)
    actor = GaussianActor(obs_dim, act_dim, hidden, log_std_init=-2.0)
    g = torch.Generator().manual_seed(1)
    offline = {"obs": torch.randn(4096, obs_dim, generator=g), "actions": torch.rand(4096, act_dim, generator=g) * 2 - 1}
    learner = SACLearner(actor, cfg, hidden, "relu", seed=0, offline=offline)
    actor.to(device)
    learner.critics.to(device)  # in place: the optimizers keep the same parameter objects
    learner.critics.q.batched = learner.critics.q_target.batched = batched
    learner.offline = {k: v.to(device) for k, v in offline.items()}
    if device != "cpu":
        learner.gen = None  # a CPU generator cannot draw CUDA noise
    pool = _batches(16, obs_dim, act_dim, batch, device, seed=2)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(warmup):
        learner.gradient_step(pool[i % len(pool)])
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        learner.gradient_step(pool[i % len(pool)])
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--devices", nargs="+", default=None,
                    help="torch devices to time, in order; the first row is the ratio's baseline "
                         "(default: cpu, plus cuda when torch sees a GPU)")
    ap.add_argument("--ensembles", nargs="+", type=int, default=[2, 10], help="Q heads (grid row: 2; RLPD: 10)")
    ap.add_argument("--forwards", nargs="+", default=["loop", "batched"], choices=["loop", "batched"],
                    help="the ensemble's forward: a loop over heads (the default in finetuning) or one batched "
                         "matrix product a layer")
    ap.add_argument("--steps", type=int, default=200, help="timed gradient steps per row")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (allocator, kernels)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (the finetuning driver's learner runs with cluster.torch_threads, 1)")
    ap.add_argument("--obs-dim", type=int, default=42, help="observation size (PickCube-v1 state: 42)")
    ap.add_argument("--act-dim", type=int, default=4, help="action size (pd_ee_delta_pos: 4)")
    ap.add_argument("--batch", type=int, default=256, help="minibatch size (finetune.batch_size)")
    ap.add_argument("--hidden", nargs="+", type=int, default=[256, 256], help="hidden sizes of actor and Q heads")
    args = ap.parse_args()
    for name in ("steps", "warmup", "threads", "obs_dim", "act_dim", "batch"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            print(f"error: --{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}", file=sys.stderr)
            return 2
    if any(e < 2 for e in args.ensembles):
        print("error: --ensembles must each be >= 2 (the TD target takes the minimum of 2 heads)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for d in devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            print(f"error: --devices names {d} but torch sees no GPU", file=sys.stderr)
            return 2
    rows = []
    for d in devices:
        for e in args.ensembles:
            for f in args.forwards:
                s = time_step(d, e, args.steps, args.warmup, args.obs_dim, args.act_dim, args.batch, args.hidden,
                              batched=f == "batched")
                rows.append((d, e, f, s))
                print(f"[bench] {d} {e} heads {f}: {s * 1e3:.2f} ms a step", file=sys.stderr, flush=True)
    base = rows[0][3]
    name = torch.cuda.get_device_name(0) if any(d.startswith("cuda") for d in devices) else ""
    print(f"\nSAC gradient step, batch {args.batch}, obs {args.obs_dim}, act {args.act_dim}, hidden {args.hidden}, "
          f"{args.threads} CPU thread(s){', GPU: ' + name if name else ''}; {args.steps} timed steps a row\n")
    print("| device | Q heads | ensemble forward | ms / step | ratio to first row | " + " | ".join(BUDGETS) + " |")
    print("|---|---:|---|---:|---:|" + "---:|" * len(BUDGETS))
    for d, e, f, s in rows:
        cost = " | ".join(f"{s * n / 3600:.2f} h" for n in BUDGETS.values())
        print(f"| {d} | {e} | {f} | {s * 1e3:.2f} | {s / base:.3f} | {cost} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
