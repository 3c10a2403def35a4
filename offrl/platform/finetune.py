"""Online finetuning loop (``offrl finetune``): one loop for every advantage estimator x update rule.

Each round: rollouts of the current stochastic policy on SimHost actors -> advantages by
``finetune.advantage`` (GAE with an online value net; MC re-rollouts inside the actors; IQL or SARSA
critics) -> update by ``finetune.update`` (PPO, AWR, push-away AWR) -> periodic deterministic
evaluation with fixed seeds -> checkpoint. The metrics ``step`` is the number of env steps taken by the
main rollouts (re-rollout steps are counted apart in ``time/rerollout_steps``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from offrl import metrics as M
from offrl.config import from_dict, replace, to_dict
from offrl.errors import OffrlError


def _load_start(cfg: Any, log: Any) -> tuple[Any, dict, Any, Optional[Any], Optional[Any], Path]:
    """Actor (+ critics / value net) from the pretrained checkpoint; the env follows the checkpoint's."""
    from offrl.algos.critics import Critics, VNet
    from offrl.algos.networks import GaussianActor
    from offrl.platform.checkpoint import load_checkpoint, resolve_checkpoint

    fc = cfg.finetune
    if not fc.checkpoint:
        raise OffrlError("finetune.checkpoint is empty: give a pretrained checkpoint or run directory "
                         "(offrl pretrain ... with algo bc, bc+iql or bc+sarsa)")
    ckpt = resolve_checkpoint(fc.checkpoint)
    state = json.loads((ckpt / "training_state" / "state.json").read_text())
    arch = state.get("actor_arch")
    if not arch:
        raise OffrlError(f"checkpoint {ckpt} has no actor to finetune")
    if arch.get("kind", "mlp") != "mlp":
        raise OffrlError(f"checkpoint {ckpt} holds a {arch['kind']} policy; online finetuning needs the Gaussian "
                         "mlp policy (its log-probabilities drive every update rule); pretrain with policy.kind=mlp")
    saved = from_dict(json.loads((ckpt / "config.json").read_text()))
    changes = {k: v for k, v in (("env.id", saved.env.id), ("env.control_mode", saved.env.control_mode))
               if v != getattr(cfg.env, k.split(".")[1])}
    if changes:
        log(f"[offrl] using the checkpoint's {', '.join(f'{k}={v}' for k, v in changes.items())}")
        cfg = replace(cfg, **changes)
    actor = GaussianActor(**arch)
    load_checkpoint(ckpt, {"actor": actor}, parts=["actor"], restore_rng=False)
    if fc.init_log_std is not None:
        with torch.no_grad():
            actor.log_std.fill_(fc.init_log_std)
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        has_critics = any(k.startswith("critics.") for k in f.keys())
    critics = value = None
    if has_critics:
        sc = saved.critic
        critics = Critics(arch["obs_dim"], arch["act_dim"], list(sc.hidden), sc.activation, sc.twin_q)
        load_checkpoint(ckpt, {"critics": critics}, parts=["critics"], restore_rng=False)
    if fc.advantage in ("iql", "sarsa") and critics is None:
        raise OffrlError(f"finetune.advantage={fc.advantage} needs critics in {ckpt} "
                         "(pretrain with algo bc+iql or bc+sarsa)")
    if fc.advantage == "gae":
        if critics is not None:  # warm start from the pretrained V
            value = critics.v
        else:
            value = VNet(arch["obs_dim"], list(cfg.critic.hidden), cfg.critic.activation)
            value.normalizer.load_state_dict(actor.normalizer.state_dict())
    if fc.advantage not in ("iql", "sarsa"):
        critics = None
    return cfg, arch, actor, value, critics, ckpt


def _flat(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])))


def _rerollout_spec(cfg: Any, actor_spec_now: dict) -> dict:
    fc = cfg.finetune
    if fc.rerollout_policy == "current":
        return actor_spec_now
    if fc.rerollout_policy == "expert":
        return {"kind": "expert", "name": "auto"}
    from offrl.algos.networks import build_actor
    from offrl.platform.checkpoint import load_checkpoint, resolve_checkpoint
    from offrl.platform.pretrain import actor_spec

    ck = resolve_checkpoint(fc.rerollout_checkpoint)
    arch = json.loads((ck / "training_state" / "state.json").read_text()).get("actor_arch")
    if not arch:
        raise OffrlError(f"finetune.rerollout_checkpoint {ck} has no actor")
    ref = build_actor(arch)  # any policy kind: re-rollouts reset a stateful policy after each restore
    load_checkpoint(ck, {"actor": ref}, parts=["actor"], restore_rng=False)
    return actor_spec(ref, arch, deterministic=False)


def mc_advantages(pool: Any, results: list[dict], data: dict, spec: dict, cfg: Any, rng: np.random.Generator,
                  seed: int, success_bonus: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Re-roll a random ``mc_fraction`` of the round's (state, action) pairs inside the actors.

    Returns (flat indices into ``[T * N]``, advantages for them, stats).
    """
    from offrl.algos.advantages import mc_rerollout_advantage
    from offrl.platform.rerollout import index_state, rerollout_pool, stack_states

    fc = cfg.finetune
    T, N = data["rewards"].shape
    k = max(1, int(math.ceil(fc.mc_fraction * T * N)))
    chosen = np.sort(rng.choice(T * N, size=k, replace=False))
    offsets = np.cumsum([0] + [r["obs"].shape[1] for r in results])
    states, actions = [], []
    for f in chosen:
        t, n = divmod(int(f), N)
        h = int(np.searchsorted(offsets, n, side="right") - 1)
        states.append(index_state(results[h]["states"][t], n - offsets[h]))
        actions.append(data["actions"][t, n])
    out = rerollout_pool(pool, spec, stack_states(states), np.stack(actions), fc.mc_samples, fc.mc_horizon,
                         fc.gamma, seed, success_bonus)
    adv, q, v = mc_rerollout_advantage(torch.from_numpy(out["q"]), torch.from_numpy(out["v"]))
    return chosen, adv.numpy().astype(np.float32), {"steps": out["steps"], "seconds": out["seconds"],
                                                    "q_mean": float(q.mean()), "v_mean": float(v.mean())}


def run_finetune_job(cfg: Any, log: Any = print, reporter: Optional[Callable[[int, dict, Optional[Path]], None]] = None,
                     exist_ok: bool = False) -> Path:
    """Finetune a pretrained policy online; write a run directory with metrics, checkpoints and eval.json.

    ``reporter(step, metrics, checkpoint_dir_or_None)`` is called after every logged row (Ray Tune
    trials report through it); ``exist_ok`` lets the run directory pre-exist (a Tune trial folder).
    """
    from offrl.algos.finetune import FinetuneLearner
    from offrl.algos.rewards import add_success_bonus, auto_success_bonus
    from offrl.platform.checkpoint import save_checkpoint
    from offrl.platform.cluster import init_ray
    from offrl.platform.evaluate import eval_metrics, evaluate, write_eval_json
    from offrl.platform.jobs import progress
    from offrl.platform.logger import MetricLogger
    from offrl.platform.pretrain import actor_spec
    from offrl.platform.rollout import summarize_episodes
    from offrl.platform.rundir import create_run_dir
    from offrl.platform.simhost import SimHostPool, concat_rollouts

    torch.manual_seed(cfg.seed)
    cfg, arch, actor, value, critics, start_ckpt = _load_start(cfg, log)
    fc = cfg.finetune
    bonus = auto_success_bonus(fc.success_bonus, cfg.env.reward_mode, fc.gamma, cfg.env.max_episode_steps)
    init_ray(cfg.cluster)
    pool = SimHostPool(cfg.env, cfg.cluster, seed=cfg.seed)
    run_dir = None
    try:
        if pool.spec["obs_dim"] != arch["obs_dim"] or pool.spec["act_dim"] != arch["act_dim"]:
            raise OffrlError(f"checkpoint {start_ckpt} expects obs/action sizes {arch['obs_dim']}/{arch['act_dim']}, "
                             f"{cfg.env.id} gives {pool.spec['obs_dim']}/{pool.spec['act_dim']}")
        learner = FinetuneLearner(actor, fc, value=value, critics=critics, seed=cfg.seed)
        run_dir = create_run_dir(cfg, exist_ok=exist_ok)
        logger = MetricLogger(run_dir, tensorboard=cfg.run.tensorboard)
        rng = np.random.default_rng(cfg.seed)
        T, N = fc.steps_per_iter, pool.num_envs
        log(f"[offrl] finetune {fc.advantage} x {fc.update} from {start_ckpt}: {len(pool)} SimHosts x "
            f"{pool.spec['num_envs']} envs, {fc.iterations} rounds x {T * N} env steps"
            + (f", success bonus {bonus:.3g}" if bonus else ""))

        def do_eval() -> dict:
            return evaluate(pool, actor_spec(actor, arch, cfg.eval.deterministic), fc.eval_episodes, cfg.eval.seed,
                            ignore_terminations=cfg.eval.ignore_terminations)

        def checkpoint(step: int) -> None:
            save_checkpoint(run_dir / "checkpoints", step, learner.modules(), optimizers=learner.optimizers(),
                            generators=learner.generators(), config=to_dict(cfg), keep=3,
                            extra_state={**learner.extra_state(), "actor_arch": arch, "env_steps": step,
                                         "start_checkpoint": str(start_ckpt)})

        start = do_eval()
        logger.log(0, eval_metrics(start))
        checkpoint(0)
        if reporter is not None:
            reporter(0, eval_metrics(start), run_dir / "checkpoints" / "0")
        log(f"[offrl] start: success {start['success_at_end']['mean']:.2f} on {fc.eval_episodes} eval episodes")
        env_steps, rr_steps, last = 0, 0, start
        bar = progress(fc.iterations, f"finetune {fc.advantage}x{fc.update}", cfg.run.progress, unit="round")
        bar.set_postfix(success=f"{start['success_at_end']['mean']:.2f}")
        for it in range(1, fc.iterations + 1):
            t0 = time.perf_counter()
            spec = actor_spec(actor, arch, deterministic=False)
            results = pool.rollout(spec, T, reset_seed=cfg.seed if it == 1 else None,
                                   record_states=fc.advantage == "mc")
            t_roll = time.perf_counter() - t0
            data = concat_rollouts(results)
            data["rewards"] = add_success_bonus(data["rewards"], data["terminated"], data["success"], bonus)
            env_steps += T * N
            row: dict[str, float] = {M.ENV_SPS: T * N / t_roll, M.ENV_STEPS: env_steps}
            batch = {"obs": _flat(data["obs"]), "actions": _flat(data["actions"]),
                     "raw_actions": _flat(data["raw_actions"]), "logprob": _flat(data["logprob"]),
                     "rewards": _flat(data["rewards"]), "next_obs": _flat(data["next_obs"]),
                     "terminated": _flat(data["terminated"])}
            if fc.advantage == "gae":
                tens = {k: torch.from_numpy(data[k]) for k in ("obs", "next_obs", "rewards", "terminated", "truncated")}
                adv, ret = learner.gae_advantages(tens)
                batch["adv"], batch["returns"] = adv.reshape(-1), ret.reshape(-1)
            elif fc.advantage in ("iql", "sarsa"):
                batch["adv"] = learner.critic_advantages(batch["obs"], batch["actions"])
            else:
                idx, adv, st = mc_advantages(pool, results, data, _rerollout_spec(cfg, spec), cfg, rng,
                                             seed=cfg.seed * 100_003 + it, success_bonus=bonus)
                batch = {k: v[torch.from_numpy(idx)] for k, v in batch.items()}
                batch["adv"] = torch.from_numpy(adv)
                rr_steps += st["steps"]
                row.update({M.REROLLOUT_SPS: st["steps"] / max(st["seconds"], 1e-9), M.REROLLOUT_STEPS: rr_steps,
                            M.MC_Q_MEAN: st["q_mean"], M.MC_V_MEAN: st["v_mean"]})
            a = batch["adv"]
            row.update({M.ADVANTAGE_MEAN: float(a.mean()), M.ADVANTAGE_STD: float(a.std()) if a.numel() > 1 else 0.0,
                        M.POS_RATIO: float((a > 0).float().mean()), M.ADVANTAGE_SAMPLES: float(a.numel())})
            train_actor = not (fc.advantage == "gae" and it <= fc.value_warmup_iters)
            m = learner.update(batch, train_actor=train_actor)
            learner.iteration = it
            names = {"policy_loss": M.POLICY_LOSS, "value_loss": M.VALUE_LOSS, "approx_kl": M.APPROX_KL,
                     "clipfrac": M.CLIPFRAC, "entropy": M.ENTROPY, "critic_loss": M.CRITIC_LOSS,
                     "epochs": M.UPDATE_EPOCHS}
            row.update({names[k]: v for k, v in m.items() if k in names})
            s = summarize_episodes(data["episodes"])
            if s:
                row.update({M.ROLLOUT_SUCCESS_RATE: s["success_rate"], M.ROLLOUT_RETURN: s["return"],
                            M.ROLLOUT_EPISODE_LENGTH: s["length"]})
            row[M.ITERATION_SECONDS] = time.perf_counter() - t0
            saved = None
            if it % fc.eval_every == 0 or it == fc.iterations:
                last = do_eval()
                row.update(eval_metrics(last))
                checkpoint(env_steps)
                saved = run_dir / "checkpoints" / str(env_steps)
                bar.set_postfix(success=f"{last['success_at_end']['mean']:.2f}")
            logger.log(env_steps, row)
            if reporter is not None:
                reporter(env_steps, row, saved)
            bar.update(1)
        bar.close()
        logger.close()
        summary = {"advantage": fc.advantage, "update": fc.update, "env_steps": env_steps,
                   "rerollout_steps": rr_steps, "start_checkpoint": str(start_ckpt),
                   "success_before": start["success_at_end"]["mean"], "success_after": last["success_at_end"]["mean"],
                   "success_before_ci95": start["success_at_end"]["ci95"],
                   "success_after_ci95": last["success_at_end"]["ci95"], "eval_episodes": fc.eval_episodes}
        write_eval_json(run_dir / "eval.json", last, {"checkpoint": str(run_dir / "checkpoints" / str(env_steps)),
                                                      "seed": cfg.eval.seed, "env_id": cfg.env.id})
        (run_dir / "finetune_summary.json").write_text(json.dumps(summary, indent=2))
        log(f"[offrl] success {summary['success_before']:.2f} -> {summary['success_after']:.2f} "
            f"after {env_steps} env steps ({rr_steps} re-rollout steps)")
        log(f"[offrl] run directory: {run_dir}")
        return run_dir
    except BaseException:
        if run_dir is not None and not exist_ok and not any((run_dir / "checkpoints").glob("[0-9]*")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        pool.shutdown()
