"""Online finetuning loop (``offrl finetune``): one loop for every advantage estimator x update rule.

Each round: rollouts of the current stochastic policy on SimHost actors -> advantages by
``finetune.advantage`` (GAE with an online value net; MC re-rollouts inside the actors; IQL or SARSA
critics) -> update by ``finetune.update`` (PPO, AWR, push-away AWR, RECAP) -> periodic deterministic
evaluation with fixed seeds -> checkpoint. The metrics ``step`` is the number of env steps taken by the
main rollouts (re-rollout steps are counted apart in ``time/rerollout_steps``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Optional

import numpy as np
import torch

from offrl import metrics as M
from offrl.config import from_dict, to_dict
from offrl.errors import OffrlError


def _load_start(cfg: Any, log: Any, explicit: Collection[str] = ()) -> tuple[Any, dict, Any, Optional[Any], Optional[Any], Path]:
    """Actor (+ critics / value net) from the pretrained checkpoint; the env follows the checkpoint's."""
    from offrl.algos.critics import VNet, build_critics, distributional_spec
    from offrl.algos.networks import GaussianActor
    from offrl.platform.checkpoint import checkpoint_json, load_checkpoint, resolve_checkpoint

    fc = cfg.finetune
    if not fc.checkpoint:
        raise OffrlError("finetune.checkpoint is empty: give a pretrained checkpoint or run directory "
                         "(offrl pretrain ... with algo bc, bc+iql or bc+sarsa)")
    ckpt = resolve_checkpoint(fc.checkpoint)
    state = checkpoint_json(ckpt, "training_state/state.json")
    arch = state.get("actor_arch")
    if not arch:
        raise OffrlError(f"checkpoint {ckpt} has no actor to finetune")
    if arch.get("kind", "mlp") != "mlp":
        raise OffrlError(f"checkpoint {ckpt} holds a {arch['kind']} policy; online finetuning needs the Gaussian "
                         "mlp policy (its log-probabilities drive every update rule); pretrain with policy.kind=mlp")
    saved = from_dict(checkpoint_json(ckpt, "config.json"))
    from offrl.platform.pretrain import follow_source

    cfg = follow_source(cfg, {"env.id": saved.env.id, "env.control_mode": saved.env.control_mode},
                        f"checkpoint {ckpt}", explicit, log)
    actor = GaussianActor(**arch)
    load_checkpoint(ckpt, {"actor": actor}, parts=["actor"], restore_rng=False)
    if fc.update == "recap":  # + the advantage indicator input, zero-initialised: acts as before at step 0
        from offrl.algos.networks import with_indicator

        actor, arch = with_indicator(actor, arch, fc.recap_cfg_weight)
    if fc.init_log_std is not None:
        with torch.no_grad():
            actor.log_std.fill_(fc.init_log_std)
    from offrl.platform.estimators import estimator_class

    needs = estimator_class(cfg)
    if not (needs.needs_critics or needs.needs_value):  # MC re-rollouts and SAC's own Q ensemble: the actor only
        return cfg, arch, actor, None, None, ckpt
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        has_critics = any(k.startswith("critics.") for k in f.keys())
    if needs.needs_critics and not has_critics:
        raise OffrlError(f"finetune.advantage={fc.advantage} needs critics in {ckpt} "
                         "(pretrain with algo bc+iql or bc+sarsa)")
    critics = value = None
    if has_critics:
        sc = saved.critic
        critics = build_critics(sc, arch["obs_dim"], arch["act_dim"], state.get("critic_obs_ignore") or ())
        load_checkpoint(ckpt, {"critics": critics}, parts=["critics"], restore_rng=False)
    if needs.needs_critics and critics.v.distributional and fc.critic_online:
        raise OffrlError(f"finetune.advantage={fc.advantage} trains the critics of {ckpt} online by expectile "
                         "regression, but they are distributional (critic_mc with critic.distributional); set "
                         "finetune.critic_online=false")
    if needs.needs_value:
        want = distributional_spec(cfg.critic)
        if critics is not None and (want is None or critics.v.distributional == want):
            value = critics.v  # warm start from the pretrained V
        else:
            if critics is not None:
                log(f"[offrl] GAE value net: a fresh distributional V {want} (the checkpoint's V is "
                    f"{critics.v.distributional or 'scalar'})")
            value = VNet(arch["obs_dim"], list(cfg.critic.hidden), cfg.critic.activation, want)
            value.normalizer.load_state_dict(actor.normalizer.state_dict())
    if not needs.needs_critics:
        critics = None
    return cfg, arch, actor, value, critics, ckpt


def _flat(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])))


def _n_step_rows(data: Mapping[str, Any], n: int, gamma: float) -> dict[str, torch.Tensor]:
    """``finetune.n_step``: the flat rewards, next_obs, terminated and nsteps of n-step rows (within episodes
    and within the arrays) from time-major ``[T, N, ...]`` arrays (a round; or whole episodes as ``[M, 1]``)."""
    from offrl.algos.replay import n_step

    t = {k: torch.as_tensor(np.ascontiguousarray(data[k])) for k in ("rewards", "terminated", "ends", "next_obs")}
    out = n_step(t["rewards"], t["terminated"], t["ends"], t["next_obs"], n, gamma)
    return {k: v.flatten(0, 1) for k, v in out.items()}


def _round_seeds(seed: int, it: int, eval_every: int) -> tuple[Optional[int], int]:
    """(env reset seed or None, policy sampling seed) of round ``it``.

    The envs are reset at round 1 and at the first round after every checkpoint (checkpoints are written
    at evaluation rounds, every ``eval_every``); episodes in progress there are cut, like the end of any
    rollout segment. The hosts rebuild their sims before those resets: on ManiSkill's CPU backend a seeded
    reset or a state restore keeps the PhysX contact caches of what the env ran before, and a resumed run's
    hosts have run nothing. From a checkpoint on, a round is then a function of the saved weights and these
    seeds alone, so ``--resume`` replays exactly what the uninterrupted run would have done.
    """
    reset = seed if it == 1 else (seed + 1_000_033 * it if (it - 1) % eval_every == 0 else None)
    return reset, seed * 7919 + 104_729 * it


def load_offline(cfg: Any, start_ckpt: Path, actor: Any, success_bonus: float, need_rewards: bool,
                 log: Any, key: str = "offline_dataset") -> dict[str, torch.Tensor]:
    """Offline transitions for the replay mix / BC term, in the replay batch contract.

    The data is ``finetune.<key>`` (``offline_dataset``, or ``bc_dataset`` for the DAPG term's own rows) or,
    where that is empty or ``start``, the start checkpoint's own ``pretrain.dataset`` (and ``num_episodes``).
    Rewards follow the finetuning env's ``reward_mode`` (``sparse``: the success flags) plus the same success
    bonus as the online data. ``logprob`` is the start policy's log-likelihood of the
    data's actions: the BC policy is the estimate of the data's behaviour policy (push-away's bound and the
    approx-KL metric use it).
    """
    from offrl.data.dataset import OfflineDataset

    fc = cfg.finetune
    path, n = getattr(fc, key), None
    if not path or path == "start":
        from offrl.platform.checkpoint import checkpoint_json

        saved = checkpoint_json(start_ckpt, "config.json").get("pretrain", {})
        path, n = saved.get("dataset", ""), saved.get("num_episodes")
        if not path:
            raise OffrlError(f"finetune.{key} is empty or 'start' and {start_ckpt} names no pretrain.dataset")
    if not Path(path).exists():
        raise OffrlError(f"finetune offline data not found: {path} (set finetune.{key})")
    ds = OfflineDataset.load(path)
    if n is not None and n < len(ds):
        ds = ds.subset(range(int(n)))
    if ds.obs_dim != actor.obs_dim or ds.act_dim != actor.act_dim:
        raise OffrlError(f"{ds.name}: obs/action sizes {ds.obs_dim}/{ds.act_dim} do not match the policy's "
                         f"{actor.obs_dim}/{actor.act_dim}")
    reward = None
    if need_rewards:
        reward = "success" if cfg.env.reward_mode == "sparse" else cfg.env.reward_mode
    t = ds.transitions(reward, success_bonus=success_bonus if reward else 0.0)
    obs, act = t["obs"].float(), t["action"].float()
    with torch.no_grad():
        logp = torch.cat([actor.log_prob(obs[i:i + 8192], act[i:i + 8192]) for i in range(0, len(obs), 8192)])
    out = {"obs": obs, "actions": act, "raw_actions": act, "logprob": logp,
           "rewards": t["reward"].float() if reward else torch.zeros(len(obs)),
           "next_obs": t["next_obs"].float(), "terminated": t["terminated"].bool()}
    if fc.n_step > 1 and reward:  # the episodes in order, one column: n-step rows never cross an episode's end
        ends = t["terminated"] | t["truncated"] | t["last"]
        out.update(_n_step_rows({"rewards": out["rewards"][:, None], "terminated": out["terminated"][:, None],
                                 "ends": ends[:, None], "next_obs": out["next_obs"][:, None]}, fc.n_step, fc.gamma))
    what = "offline" if key == "offline_dataset" else "DAPG term"
    log(f"[offrl] {what} data: {len(ds)} episodes, {len(obs)} transitions from {path}"
        + (f", reward '{reward}'" if reward else ""))
    return out


def run_finetune_job(cfg: Any, log: Any = print, reporter: Optional[Callable[[int, dict, Optional[Path]], None]] = None,
                     exist_ok: bool = False, resume: bool = False, explicit: Collection[str] = ()) -> Path:
    """Finetune a pretrained policy online; write a run directory with metrics, checkpoints and eval.json.

    ``reporter(step, metrics, checkpoint_dir_or_None)`` is called after every logged row (Ray Tune
    trials report through it); ``exist_ok`` lets the run directory pre-exist (a Tune trial folder).
    ``resume`` continues ``run.trial`` from its latest checkpoint: networks, optimizers, RNGs, round and
    step counters and the replay buffer come back, the metric rows after the checkpoint are dropped, and
    the rounds that follow are those the uninterrupted run would have taken (see :func:`_round_seeds`).
    """
    from offrl.algos.finetune import FinetuneLearner
    from offrl.algos.rewards import add_success_bonus, auto_success_bonus
    from offrl.platform.checkpoint import latest_checkpoint, load_checkpoint, load_state_tensors, save_checkpoint
    from offrl.platform.cluster import init_ray
    from offrl.platform.estimators import RecentRounds, Round, make_estimator
    from offrl.platform.evaluate import eval_metrics, evaluate, write_eval_json
    from offrl.platform.jobs import progress
    from offrl.platform.logger import MetricLogger
    from offrl.platform.pretrain import actor_spec
    from offrl.platform.rollout import summarize_episodes
    from offrl.platform.rundir import create_run_dir, discard_run_dir, update_resumed_config
    from offrl.platform.simhost import SimHostPool, concat_rollouts

    run_dir = Path(cfg.run.root) / cfg.run.experiment / (cfg.run.trial or "")
    resume_from = None
    if resume:
        if not cfg.run.trial:
            raise OffrlError("--resume needs run.trial=<name> of the run to continue")
        resume_from = latest_checkpoint(run_dir / "checkpoints")
        if resume_from is None:
            raise OffrlError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    torch.manual_seed(cfg.seed)
    cfg, arch, actor, value, critics, start_ckpt = _load_start(cfg, log, explicit)
    fc = cfg.finetune
    bonus = auto_success_bonus(fc.success_bonus, cfg.env.reward_mode, fc.gamma, cfg.env.max_episode_steps)
    offline = None
    if fc.bc_coef > 0 or ((fc.replay or fc.update == "recap") and fc.offline_ratio > 0):
        offline = load_offline(cfg, start_ckpt, actor, bonus, need_rewards=fc.replay, log=log)
    bc_data = None
    if fc.bc_coef > 0 and fc.bc_dataset:  # the DAPG term's own rows, apart from the offline mix
        bc_data = load_offline(cfg, start_ckpt, actor, bonus, need_rewards=False, log=log, key="bc_dataset")
    relabeller = None
    if fc.her_relabel > 0:  # before any actor starts: a task without a known goal layout fails here
        from offrl.envs.goals import GoalRelabeller
        from offrl.envs.maniskill import probe_env

        relabeller = GoalRelabeller(cfg.env.id, (probe_env(cfg.env) or {}).get("obs_fields"))
    init_ray(cfg.cluster)
    pool = SimHostPool(cfg.env, cfg.cluster, seed=cfg.seed)
    created = False
    threads = torch.get_num_threads()
    torch.set_num_threads(fc.learner_threads or (1 if fc.overlap else threads))
    try:
        if pool.spec["obs_dim"] != arch["obs_dim"] or pool.spec["act_dim"] != arch["act_dim"]:
            raise OffrlError(f"checkpoint {start_ckpt} expects obs/action sizes {arch['obs_dim']}/{arch['act_dim']}, "
                             f"{cfg.env.id} gives {pool.spec['obs_dim']}/{pool.spec['act_dim']}")
        if fc.update == "sac":
            from offrl.algos.sac import SACLearner

            learner = SACLearner(actor, fc, list(cfg.critic.hidden), cfg.critic.activation, seed=cfg.seed,
                                 offline=offline, bc_data=bc_data)
        else:
            learner = FinetuneLearner(actor, fc, value=value, critics=critics, seed=cfg.seed, offline=offline,
                                      bc_data=bc_data)
        rng = np.random.default_rng(cfg.seed)
        estimator = make_estimator(cfg, pool, bonus, rng)
        keeps = fc.keep_rounds > 1 and not fc.replay and fc.update in ("awr", "push_away")
        recent = RecentRounds(fc.keep_rounds) if keeps else None
        T, N = fc.steps_per_iter, pool.num_envs

        def do_eval() -> dict:
            return evaluate(pool, actor_spec(actor, arch, cfg.eval.deterministic), fc.eval_episodes, cfg.eval.seed,
                            ignore_terminations=cfg.eval.ignore_terminations)

        best = {"value": -math.inf}  # eval/success_rate of the best evaluated policy so far

        def checkpoint(step: int, start: dict, last: dict, root: Optional[Path] = None, keep: int = 3) -> Path:
            extra = {**learner.extra_state(), "actor_arch": arch, "env_steps": step, "start_checkpoint": str(start_ckpt),
                     "rerollout_steps": getattr(estimator, "rerollout_steps", 0), "rng": rng.bit_generator.state,
                     "start_eval": start, "last_eval": last, "best_eval": best["value"]}
            tensors = {}
            if learner.replay is not None:
                st = learner.replay.state_dict()
                extra["replay_added"] = st["added"]
                tensors["replay"] = st["rows"]
            if recent is not None:
                extra["recent_rounds"] = len(recent)
                tensors["recent"] = recent.state_dict()
            return save_checkpoint(root or run_dir / "checkpoints", step, learner.modules(),
                                   optimizers=learner.optimizers(), generators=learner.generators(), config=to_dict(cfg),
                                   keep=keep, extra_state=extra, state_tensors=tensors)

        def keep_best(step: int, start: dict, last: dict) -> None:
            """checkpoints/best/<step>: the policy with the highest eval/success_rate so far (ties: the first)."""
            if last["success_at_end"]["mean"] > best["value"]:
                best["value"] = last["success_at_end"]["mean"]
                checkpoint(step, start, last, root=run_dir / "checkpoints" / "best", keep=1)

        if resume_from is not None:
            state = load_checkpoint(resume_from, learner.modules(), optimizers=learner.optimizers(),
                                    generators=learner.generators(), keep_lr=True)
            learner.load_extra_state(state)
            env_steps, it0 = int(state["env_steps"]), int(state["iteration"])
            rng.bit_generator.state = state["rng"]
            if hasattr(estimator, "rerollout_steps"):
                estimator.rerollout_steps = int(state["rerollout_steps"])
            if learner.replay is not None:
                learner.replay.load_state_dict({"rows": load_state_tensors(resume_from, "replay"),
                                                "added": state["replay_added"]})
            if recent is not None:
                recent.load_state_dict(load_state_tensors(resume_from, "recent"), state["recent_rounds"])
            start, last = state["start_eval"], state["last_eval"]
            best["value"] = float(state.get("best_eval", -math.inf))
            logger = MetricLogger(run_dir, tensorboard=cfg.run.tensorboard)
            logger.truncate_after(env_steps)
            log(f"[offrl] resuming {run_dir} from round {it0} ({env_steps} env steps)")
            update_resumed_config(cfg, run_dir, log)
        else:
            run_dir = create_run_dir(cfg, exist_ok=exist_ok)
            created = not exist_ok
            logger = MetricLogger(run_dir, tensorboard=cfg.run.tensorboard)
            env_steps, it0 = 0, 0
            what = "sac" if fc.update == "sac" else f"{fc.advantage} x {fc.update}"
            path = ("replay" if fc.replay else "on-policy") + (f", DAPG term {fc.bc_coef:g}" if fc.bc_coef else "") \
                + (f" x {fc.bc_decay:g}^round" if fc.bc_coef and fc.bc_decay != 1.0 else "") \
                + (", rule loss off: demos-only control" if fc.rule_coef == 0 else "")
            log(f"[offrl] finetune {what} ({path}) from "
                f"{start_ckpt}: {len(pool)} SimHosts x {pool.spec['num_envs']} envs, {fc.iterations} rounds x "
                f"{T * N} env steps" + (f", success bonus {bonus:.3g}" if bonus else ""))
            start = do_eval()
            last = start
            logger.log(0, eval_metrics(start))
            keep_best(0, start, last)
            saved0 = checkpoint(0, start, last)
            if reporter is not None:
                reporter(0, eval_metrics(start), saved0)
            log(f"[offrl] start: success {start['success_at_end']['mean']:.2f} on {fc.eval_episodes} eval episodes")
        bar = progress(fc.iterations, f"finetune {fc.advantage}x{fc.update}", cfg.run.progress, unit="round",
                       initial=it0)
        bar.set_postfix(success=f"{last['success_at_end']['mean']:.2f}")
        names = {"policy_loss": M.POLICY_LOSS, "value_loss": M.VALUE_LOSS, "approx_kl": M.APPROX_KL,
                 "clipfrac": M.CLIPFRAC, "entropy": M.ENTROPY, "critic_loss": M.CRITIC_LOSS,
                 "epochs": M.UPDATE_EPOCHS, "bc_loss": M.BC_LOSS, "bc_weight": M.BC_WEIGHT, "bc_kept": M.BC_KEPT,
                 "offline_frac": M.OFFLINE_FRACTION, "ref_kl": M.REF_KL,
                 "grad_steps": M.GRAD_STEPS, "alpha": M.SAC_ALPHA, "q_mean": M.Q_MEAN,
                 "actor_steps": M.SAC_ACTOR_STEPS,
                 "round_kl": M.ROUND_KL, "recap_pos": M.RECAP_POSITIVE, "recap_thr": M.RECAP_THRESHOLD,
                 "recap_dropped": M.RECAP_DROPPED}

        def launch(round_it: int) -> tuple[list, dict, float]:
            """Start round ``round_it``'s rollout with the actor as it is now (its weights copied: the spec's
            arrays share the actor's memory, and an overlapped round is updated before it is read)."""
            reset_seed, policy_seed = _round_seeds(cfg.seed, round_it, fc.eval_every)
            spec = actor_spec(actor, arch, deterministic=False)
            spec["weights"] = {k: v.copy() for k, v in spec["weights"].items()}
            return (pool.rollout_async(spec, T, reset_seed=reset_seed, record_states=estimator.record_states,
                                       policy_seed=policy_seed), spec, time.perf_counter())

        ahead = None  # finetune.overlap: the next round's rollout, started before this round's update
        for it in range(it0 + 1, fc.iterations + 1):
            lag = 0 if ahead is None else 1
            if ahead is None and _round_seeds(cfg.seed, it, fc.eval_every)[0] is not None:
                pool.call("rebuild")  # new sims for the seeded reset (untimed, like checkpoints; _round_seeds)
            t0 = time.perf_counter()
            pending, spec, t_launch = ahead or launch(it)
            results = pool.collect(pending)
            t_got = time.perf_counter()
            # evaluation rounds (and the last) start nothing ahead: a checkpoint never has a rollout in flight
            ahead = launch(it + 1) if fc.overlap and it % fc.eval_every and it < fc.iterations else None
            data = concat_rollouts(results)
            data["rewards"] = add_success_bonus(data["rewards"], data["terminated"], data["success"], bonus)
            env_steps += T * N
            row: dict[str, float] = {M.ENV_SPS: T * N / (t_got - t_launch), M.ENV_STEPS: env_steps}
            if fc.overlap:
                row.update({M.ROLLOUT_WAIT_SECONDS: t_got - t0, M.POLICY_LAG: float(lag)})
            batch = {k: _flat(data[k]) for k in ("obs", "actions", "raw_actions", "logprob", "rewards", "next_obs",
                                                 "terminated")}
            rnd = Round(it, spec, results, data, batch)
            batch, extra = estimator.advantages(learner, rnd)
            row.update(extra)
            if recent is not None:  # the kept earlier rounds join, re-scored with the current value net / critics
                batch = recent.merge(estimator, learner, rnd, batch)
            # GAE's value net and SAC's fresh Q ensemble learn alone for the first value_warmup_iters rounds
            train_actor = not ((fc.advantage == "gae" or fc.update == "sac") and it <= fc.value_warmup_iters)
            t_upd = time.perf_counter()
            if fc.replay:
                if fc.n_step > 1:
                    batch = {**batch, **_n_step_rows({**data, "ends": data["terminated"] | data["truncated"]},
                                                     fc.n_step, fc.gamma)}
                learner.replay.add(batch)
                if relabeller is not None:  # hindsight copies of the round (rng: the loop's, checkpointed)
                    her, row[M.HER_REACHED] = relabeller.relabel(data, fc.her_relabel, rng, fc.her_min_move,
                                                                 fc.her_move_from)
                    her["rewards"] = add_success_bonus(her["rewards"], her["terminated"], her["terminated"], bonus)
                    learner.replay.add(her)
                m = learner.update_replay(train_actor=train_actor)
                row.update({M.ADVANTAGE_SAMPLES: float(fc.updates_per_round * fc.batch_size),
                            M.REPLAY_SIZE: float(len(learner.replay))})
                if "adv_mean" in m:
                    row.update({M.ADVANTAGE_MEAN: m.pop("adv_mean"), M.ADVANTAGE_STD: m.pop("adv_std"),
                                M.POS_RATIO: m.pop("pos_ratio")})
            else:
                a = batch["adv"]
                row.update({M.ADVANTAGE_MEAN: float(a.mean()), M.ADVANTAGE_STD: float(a.std()) if a.numel() > 1 else 0.0,
                            M.POS_RATIO: float((a > 0).float().mean()), M.ADVANTAGE_SAMPLES: float(a.numel())})
                m = learner.update(batch, train_actor=train_actor)
            row[M.UPDATE_SECONDS] = time.perf_counter() - t_upd
            learner.iteration = it
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
                bar.set_postfix(success=f"{last['success_at_end']['mean']:.2f}")
            logger.log(env_steps, row)
            if it % fc.eval_every == 0 or it == fc.iterations:
                keep_best(env_steps, start, last)
                saved = checkpoint(env_steps, start, last)  # after the row: a resume never loses it
            if reporter is not None:
                reporter(env_steps, row, saved)
            bar.update(1)
        bar.close()
        logger.close()
        rr_steps = getattr(estimator, "rerollout_steps", 0)
        summary = {"advantage": fc.advantage, "update": fc.update, "replay": fc.replay, "env_steps": env_steps,
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
        if created and not any((run_dir / "checkpoints").glob("[0-9]*")):
            discard_run_dir(run_dir)
        raise
    finally:
        torch.set_num_threads(threads)
        pool.shutdown()
