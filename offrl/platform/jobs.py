"""End-to-end jobs the CLI runs. Each takes a validated config and returns its run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from offrl import metrics as M
from offrl.config import to_dict


def actor_arch(cfg: Any, spec: dict) -> dict:
    """GaussianActor kwargs for this experiment's policy config and the sim's spaces."""
    p = cfg.policy
    return dict(obs_dim=spec["obs_dim"], act_dim=spec["act_dim"], hidden=list(p.hidden), activation=p.activation,
                log_std_init=p.log_std_init, squash=p.squash, action_low=np.asarray(spec["action_low"]).tolist(),
                action_high=np.asarray(spec["action_high"]).tolist())


def progress(total: int, desc: str, enabled: bool = True, unit: str = "it", initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=True,
                initial=initial)


def run_rollout_job(cfg: Any, log: Any = print) -> Path:
    """Start/join Ray, build SimHosts, roll out the policy, log episode stats, save the policy.

    Writes ``runs/<experiment>/<trial>/`` with config.yaml, meta.json, metrics.csv, TensorBoard events,
    rollout_summary.json and ``checkpoints/<env_steps>/`` holding the policy that was rolled out.
    """
    import torch

    from offrl.algos.networks import GaussianActor, numpy_state_dict
    from offrl.envs.maniskill import probe_env
    from offrl.platform.checkpoint import save_checkpoint
    from offrl.platform.cluster import init_ray
    from offrl.platform.logger import MetricLogger
    from offrl.platform.rundir import create_run_dir, discard_run_dir
    from offrl.platform.rollout import summarize_episodes
    from offrl.platform.simhost import SimHostPool

    torch.manual_seed(cfg.seed)
    probe_env(cfg.env)  # a bad task or controller is one line before Ray starts
    resources = init_ray(cfg.cluster)
    log(f"[offrl] Ray cluster: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU")
    t0 = time.time()
    pool = SimHostPool(cfg.env, cfg.cluster, seed=cfg.seed)
    log(f"[offrl] {len(pool)} SimHost actors x {pool.spec['num_envs']} {cfg.env.id} envs "
        f"({cfg.env.backend}, {cfg.env.control_mode}) ready in {time.time() - t0:.1f}s")
    run_dir = None
    try:
        arch = actor_arch(cfg, pool.spec)
        actor = GaussianActor(**arch)
        if cfg.rollout.policy == "random":
            spec = {"kind": "random"}
        else:
            spec = {"kind": "mlp", "arch": arch, "weights": numpy_state_dict(actor),
                    "deterministic": cfg.rollout.deterministic}
        run_dir = create_run_dir(cfg)
        logger = MetricLogger(run_dir, tensorboard=cfg.run.tensorboard)
        env_steps = 0
        all_episodes: list[dict] = []
        bar = progress(cfg.rollout.iterations * cfg.rollout.steps_per_iter * pool.num_envs, "rollout",
                       cfg.run.progress, unit="step")
        for it in range(cfg.rollout.iterations):
            t = time.time()
            results = pool.rollout(spec, cfg.rollout.steps_per_iter, reset_seed=cfg.seed if it == 0 else None)
            dt = time.time() - t
            steps = cfg.rollout.steps_per_iter * pool.num_envs
            env_steps += steps
            episodes = [e for r in results for e in r["episodes"]]
            all_episodes += episodes
            s = summarize_episodes(episodes)
            row = {M.ENV_SPS: steps / dt, M.ITERATION_SECONDS: dt, M.ENV_STEPS: env_steps,
                   M.ROLLOUT_EPISODES: len(episodes)}
            if s:
                row.update({M.ROLLOUT_SUCCESS_RATE: s["success_rate"], M.ROLLOUT_SUCCESS_ONCE: s["success_once"],
                            M.ROLLOUT_RETURN: s["return"], M.ROLLOUT_EPISODE_LENGTH: s["length"]})
            logger.log(env_steps, row)
            bar.update(steps)
            bar.set_postfix(sps=f"{steps / dt:.0f}", episodes=len(all_episodes))
        bar.close()
        logger.close()
        save_checkpoint(run_dir / "checkpoints", env_steps, {"actor": actor}, config=to_dict(cfg),
                        extra_state={"env_steps": env_steps})
        summary = {"env_steps": env_steps, "hosts": len(pool), "envs_per_host": pool.spec["num_envs"],
                   **{k: v for k, v in summarize_episodes(all_episodes).items()}}
        (run_dir / "rollout_summary.json").write_text(json.dumps(summary, indent=2))
        log(f"[offrl] {env_steps} env steps, {len(all_episodes)} episodes, "
            f"success rate {summary.get('success_rate', float('nan')):.2f}, "
            f"mean return {summary.get('return', float('nan')):.2f}")
        log(f"[offrl] run directory: {run_dir}")
        return run_dir
    except BaseException:
        # never leave a half-written run directory behind
        if run_dir is not None and not (run_dir / "rollout_summary.json").exists():
            discard_run_dir(run_dir)
        raise
    finally:
        pool.shutdown()
