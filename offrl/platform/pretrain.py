"""Offline pretraining job (``offrl pretrain``) and checkpoint evaluation job (``offrl eval``).

The metrics ``step`` of a pretraining run is the epoch; checkpoints are ``checkpoints/<epoch>/``, the
best one by validation loss is ``checkpoints/best/<epoch>/``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Collection, Optional, Sequence

import numpy as np
import torch

from offrl import metrics as M
from offrl.config import from_dict, replace, to_dict
from offrl.errors import OffrlError

# learner metric key -> logged metric name
_TRAIN_NAMES = {"actor_loss": M.TRAIN_ACTOR_LOSS, "lr": M.TRAIN_LR, "v_loss": M.TRAIN_V_LOSS, "q_loss": M.TRAIN_Q_LOSS,
                "q_mean": M.TRAIN_Q_MEAN, "v_mean": M.TRAIN_V_MEAN, "weight_mean": M.TRAIN_WEIGHT_MEAN,
                "vib_kl": M.TRAIN_VIB_KL, "dr3": M.TRAIN_DR3, "entropy": M.TRAIN_ENTROPY,
                "alpha": M.TRAIN_ENTROPY_ALPHA, "cql_alpha": M.TRAIN_CQL_ALPHA,
                "cql_gap": M.WF_CQL_REGULARIZER, "brac_divergence": M.WF_BRAC_DIVERGENCE}
# learner.workflow_metrics key -> logged metric name (Kumar et al.'s curves; offrl workflow reads them)
_WORKFLOW_NAMES = {"dataset_q_train": M.WF_DATASET_Q_TRAIN, "dataset_q_val": M.WF_DATASET_Q_VAL,
                   "policy_q": M.WF_POLICY_Q, "td_error_train": M.WF_TD_ERROR_TRAIN,
                   "td_error_val": M.WF_TD_ERROR_VAL, "action_mse": M.WF_ACTION_MSE}
# rows of the fixed training sample the workflow curves are measured on
WORKFLOW_SAMPLE = 2048
_VAL_NAMES = {"actor_val_loss": M.VAL_ACTOR_LOSS, "action_mse": M.VAL_ACTION_MSE, "td_error": M.VAL_TD_ERROR, "mc_error": M.VAL_MC_ERROR,
              "q_mean": M.VAL_Q_MEAN, "v_mean": M.VAL_V_MEAN, "adv_mean": M.VAL_ADVANTAGE_MEAN,
              "adv_std": M.VAL_ADVANTAGE_STD}


def _reward_name(cfg: Any) -> str:
    return "rewards" if cfg.pretrain.reward == "dataset" else cfg.pretrain.reward


def success_bonus(cfg: Any, ds: Any) -> float:
    """The critics' terminal success bonus (``pretrain.success_bonus``; see :mod:`offrl.algos.rewards`)."""
    from offrl.algos.rewards import auto_success_bonus

    mode = ds.reward_mode if cfg.pretrain.reward == "dataset" else cfg.pretrain.reward
    return auto_success_bonus(cfg.pretrain.success_bonus, mode, cfg.pretrain.gamma, cfg.env.max_episode_steps)


_NO_REWARD_FIX = ("set pretrain.reward=success for the sparse 0/1 reward from the success flags, or re-record "
                  "the file with ManiSkill's replay_trajectory --record-rewards --reward-mode normalized_dense; "
                  "BC alone (pretrain.algo=bc) needs no reward")


def training_tensors(ds: Any, gamma: float, reward: Optional[str], bonus: float = 0.0) -> dict[str, torch.Tensor]:
    """Dataset transitions in the learner's batch contract (see :mod:`offrl.algos.offline`).

    ``reward=None`` (behaviour cloning) reads no reward: only ``obs`` and ``actions``.
    """
    if reward is None:
        t = ds.transitions(None)
        return {"obs": t["obs"], "actions": t["action"]}
    try:
        t = ds.transitions(reward, success_bonus=bonus)
    except OffrlError as e:
        if "rewards; available" in str(e):
            raise OffrlError(f"{str(e).split(' (')[0]}: the critics need rewards; {_NO_REWARD_FIX}") from None
        raise
    # the dataset's next action (SARSA's a'; DR3's bootstrap action); an episode's last step repeats its own
    nxt = torch.cat([t["action"][1:], t["action"][-1:]])
    nxt[t["last"]] = t["action"][t["last"]]
    return {"obs": t["obs"], "actions": t["action"], "rewards": t["reward"], "next_obs": t["next_obs"],
            "next_actions": nxt, "terminated": t["terminated"], "truncated": t["truncated"],
            "mc_return": ds.mc_returns(gamma, reward, success_bonus=bonus)}


def sequence_arch(cfg: Any, obs_dim: int, act_dim: int, action_low: Sequence[float],
                  action_high: Sequence[float]) -> dict:
    """Architecture dict of a sequence policy (``policy.kind`` mlp_chunk or diffusion)."""
    p, d = cfg.policy, cfg.diffusion
    arch: dict[str, Any] = dict(kind=p.kind, obs_dim=obs_dim, act_dim=act_dim, obs_horizon=p.obs_horizon,
                                pred_horizon=p.pred_horizon, action_horizon=p.action_horizon,
                                action_low=[float(x) for x in action_low], action_high=[float(x) for x in action_high])
    if p.kind == "mlp_chunk":
        arch.update(hidden=list(p.hidden), activation=p.activation)
    else:
        arch.update(widths=list(d.widths), step_embed_dim=d.step_embed_dim, kernel_size=d.kernel_size,
                    groups=d.groups, train_steps=d.train_steps, inference_steps=d.inference_steps,
                    scheduler=d.scheduler, beta_schedule=d.beta_schedule, prediction_type=d.prediction_type)
    return arch


def obs_ignore_indices(cfg: Any, entries: Sequence[str], obs_dim: int, key: str) -> list[int]:
    """The observation indices ``entries`` (``policy.obs_ignore`` / ``critic.obs_ignore``) name for ``cfg.env``'s
    task; field names need its observation layout (one probe), index ranges do not."""
    from offrl.envs.maniskill import probe_env, resolve_obs_ignore

    fields = None
    if any(":" not in str(e) for e in entries):
        fields = (probe_env(cfg.env) or {}).get("obs_fields")
    return resolve_obs_ignore(entries, obs_dim, fields, key)


def build_learner(cfg: Any, obs_dim: int, act_dim: int, action_low: Sequence[float], action_high: Sequence[float],
                  total_steps: int = 0):
    """Networks and the learner for ``cfg.pretrain``: an OfflineLearner (Gaussian actor and/or critics) or,
    for ``policy.kind`` mlp_chunk / diffusion, a SequenceBCLearner."""
    from offrl.algos.critics import build_critics
    from offrl.algos.networks import GaussianActor
    from offrl.algos.offline import OfflineLearner

    pc, p = cfg.pretrain, cfg.policy
    torch.manual_seed(cfg.seed)
    if p.is_sequence:
        from offrl.algos.sequence import SequenceBCLearner, build_sequence_net

        arch = sequence_arch(cfg, obs_dim, act_dim, action_low, action_high)
        d = cfg.diffusion
        learner = SequenceBCLearner(build_sequence_net(arch), lr=pc.actor_lr, weight_decay=d.weight_decay,
                                    grad_clip=pc.grad_clip, ema=d.ema, ema_decay=d.ema_decay, ema_power=d.ema_power,
                                    warmup_steps=d.lr_warmup_steps, total_steps=total_steps, seed=cfg.seed)
        return learner, arch
    arch = dict(obs_dim=obs_dim, act_dim=act_dim, hidden=list(p.hidden), activation=p.activation,
                log_std_init=p.log_std_init, squash=p.squash, action_low=[float(x) for x in action_low],
                action_high=[float(x) for x in action_high], min_log_std=p.min_log_std, obs_min_std=p.obs_min_std)
    if p.obs_ignore:
        arch["obs_ignore"] = obs_ignore_indices(cfg, p.obs_ignore, obs_dim, "policy.obs_ignore")
    actor = GaussianActor(**arch) if pc.trains_actor else None
    critics = None
    if pc.critic_mode:
        critics = build_critics(cfg.critic, obs_dim, act_dim,
                                obs_ignore_indices(cfg, cfg.critic.obs_ignore, obs_dim, "critic.obs_ignore"))
    if pc.conservative:
        from offrl.algos.conservative import ConservativeLearner

        learner = ConservativeLearner(actor, critics, pc, cfg.critic, seed=cfg.seed)
        if pc.algo == "brac":  # the behaviour policy's module exists from the start: checkpoints restore it
            b_arch = behavior_arch(cfg, arch)
            learner.behavior = GaussianActor(**b_arch)
        return learner, arch
    learner = OfflineLearner(actor, critics, actor_mode=pc.actor_mode, critic_mode=pc.critic_mode, tau=pc.tau,
                             gamma=pc.gamma, beta=pc.beta, max_weight=pc.max_weight, target_tau=pc.target_tau,
                             actor_lr=pc.actor_lr, critic_lr=pc.critic_lr, bc_loss=pc.bc_loss,
                             grad_clip=pc.grad_clip, seed=cfg.seed, critic_cfg=cfg.critic)
    return learner, arch


def behavior_arch(cfg: Any, arch: dict) -> dict:
    """BRAC's behaviour-policy architecture: that of ``pretrain.behavior_checkpoint``'s actor, or the actor's."""
    path = cfg.pretrain.behavior_checkpoint
    if not path:
        return dict(arch)
    from offrl.platform.checkpoint import checkpoint_json, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    b = checkpoint_json(ckpt, "training_state/state.json").get("actor_arch")
    if not b or b.get("kind", "mlp") != "mlp":
        raise OffrlError(f"pretrain.behavior_checkpoint {path}: needs a Gaussian MLP actor (policy.kind=mlp), "
                         f"got {'none' if not b else b.get('kind')}")
    b = {k: v for k, v in b.items() if k != "kind"}
    for k in ("obs_dim", "act_dim", "squash", "action_low", "action_high"):
        if b.get(k) != arch.get(k):
            raise OffrlError(f"pretrain.behavior_checkpoint {path}: its actor's {k} {b.get(k)} does not match "
                             f"this run's {arch.get(k)}")
    return b


def actor_spec(actor: Any, arch: dict, deterministic: bool = True) -> dict:
    """The picklable policy spec SimHosts build the policy from (see ``build_policy``)."""
    from offrl.algos.networks import numpy_state_dict

    return {"kind": arch.get("kind", "mlp"), "arch": arch, "weights": numpy_state_dict(actor), "deterministic": deterministic}


def _load_dataset(cfg: Any):
    from offrl.data.dataset import OfflineDataset

    ds = OfflineDataset.load(cfg.pretrain.dataset)
    n = cfg.pretrain.num_episodes
    if n is not None:
        if n > len(ds):
            raise OffrlError(f"pretrain.num_episodes={n} but {cfg.pretrain.dataset} has only {len(ds)} episodes")
        ds = ds.subset(range(n))
    return ds


def _load_critic_dataset(cfg: Any, ds: Any) -> Any:
    """``pretrain.critic_dataset`` (None when empty or the same file), checked against the actor's data."""
    from offrl.data.dataset import OfflineDataset

    path = cfg.pretrain.critic_dataset
    if not path or Path(path).resolve() == Path(cfg.pretrain.dataset).resolve():
        return None
    cds = OfflineDataset.load(path)
    why = ds.incompatibility(cds)
    if why:
        raise OffrlError(f"pretrain.critic_dataset {path} does not fit pretrain.dataset {ds.name}: {why}")
    return cds


def _split(ds: Any, val_fraction: float, seed: int) -> tuple[Any, Any]:
    """(train, validation-or-None) by episode."""
    if val_fraction > 0 and len(ds) >= 2:
        return ds.split(val_fraction, seed=seed)
    return ds, None


def _provenance(ds: Any, train: Any, val: Any) -> dict:
    """What a network part was trained on: file, episode counts, successes, and episodes per source file
    (a merged dataset keeps each episode's origin in ``offrl_source``)."""
    sources: dict[str, int] = {}
    for e in ds.episodes:
        src = str(e.info.get("offrl_source", Path(ds.name).name)).split("#")[0]
        sources[src] = sources.get(src, 0) + 1
    succ = ds.success
    return {"path": str(ds.path or ds.name), "episodes": len(ds), "train_episodes": len(train),
            "val_episodes": len(val) if val is not None else 0,
            "successful_episodes": None if succ is None else int(np.sum(succ)),
            "transitions": int(sum(len(e.actions) for e in ds.episodes)), "sources": sources}


def follow_source(cfg: Any, values: dict, source: str, explicit: Collection[str] = (), log: Any = print) -> Any:
    """``cfg`` with the keys in ``values`` (dotted, e.g. ``env.id``) taken from ``source`` (a dataset or
    checkpoint whose actions only mean something in its own task and controller), with one note line.

    A key in ``explicit`` (given on the command line) that ``source`` contradicts is refused instead of
    silently replaced: the user asked for something this run cannot do.
    """
    kind = source.split(" ", 1)[0]
    changes = {k: v for k, v in values.items() if v and v != _get(cfg, k)}
    for k, v in changes.items():
        if any(k == e or k.startswith(e + ".") for e in explicit):  # env.id=... or env={id: ...}
            raise OffrlError(f"{k}={_get(cfg, k)} is set on the command line but {source} holds {k}={v} (its "
                             f"actions mean nothing elsewhere); drop the override or give a matching {kind}")
    if changes:
        log(f"[offrl] using the {kind}'s {', '.join(f'{k}={v}' for k, v in changes.items())}")
        cfg = replace(cfg, **changes)
    return cfg


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _resolve_env(cfg: Any, ds: Any, log: Any, explicit: Collection[str] = ()) -> Any:
    """Evaluate in the dataset's task and controller: they define what the actions mean."""
    return follow_source(cfg, {"env.id": ds.env_id, "env.control_mode": ds.control_mode},
                         f"dataset {ds.name}", explicit, log)


def run_pretrain_job(cfg: Any, *, resume: bool = False, init_from: Optional[str] = None,
                     init_parts: Optional[Sequence[str]] = None, log: Any = print,
                     reporter: Optional[Callable[[int, dict, Optional[Path]], None]] = None,
                     exist_ok: bool = False, explicit: Collection[str] = (),
                     _worker: Optional[dict] = None) -> Path:
    """Train offline on ``cfg.pretrain.dataset``; evaluate in simulation; write a run directory.

    ``pretrain.workers > 1`` runs the training loop data-parallel in a Ray Train ``TorchTrainer`` (see
    :func:`_run_data_parallel`); ``_worker`` (``{"rank", "world", "pool"}``) is how each of its workers calls
    this function: rank 0 logs, checkpoints and evaluates, every rank takes its share of each global batch.

    ``reporter(step, metrics, checkpoint_dir_or_None)`` is called after every logged row (Ray Tune
    trials report through it); ``exist_ok`` lets the run directory pre-exist (a Tune trial folder).
    ``explicit``: config keys given on the command line (an ``env.id`` the dataset contradicts is refused).
    A run that fails before its first checkpoint leaves no run directory behind.
    """
    from offrl.platform.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from offrl.platform.cluster import init_ray
    from offrl.platform.evaluate import eval_metrics, evaluate, write_eval_json
    from offrl.platform.jobs import progress
    from offrl.platform.logger import MetricLogger
    from offrl.envs.maniskill import probe_env
    from offrl.platform.rundir import create_run_dir, discard_run_dir, update_resumed_config
    from offrl.platform.simhost import SimHostPool

    pc = cfg.pretrain
    if pc.workers > 1 and _worker is None:
        return _run_data_parallel(cfg, resume=resume, init_from=init_from, init_parts=init_parts, log=log,
                                  reporter=reporter, exist_ok=exist_ok, explicit=explicit)
    rank, world = (_worker["rank"], _worker["world"]) if _worker else (0, 1)
    lead = rank == 0  # the worker that logs, checkpoints and evaluates
    seq = cfg.policy.is_sequence
    if seq and pc.algo != "bc":
        raise OffrlError(f"policy.kind={cfg.policy.kind} trains with pretrain.algo=bc only (got {pc.algo}); "
                         "critics pair with the Gaussian policy.kind=mlp")
    ds = _load_dataset(cfg)
    cfg = _resolve_env(cfg, ds, log, explicit)
    cds = _load_critic_dataset(cfg, ds)  # None: the critics train on the actor's data
    reward = _reward_name(cfg) if pc.critic_mode else None  # behaviour cloning reads no reward
    train, val = _split(ds, pc.val_fraction, cfg.seed)
    bonus = success_bonus(cfg, ds if cds is None else cds) if pc.critic_mode else 0.0
    cdata = cvdata = None
    if seq:
        pad = cfg.policy.end_padding
        log(f"[pretrain] sequence windows: To={cfg.policy.obs_horizon}, Tp={cfg.policy.pred_horizon}, "
            f"end padding {pad}")
        data = sequence_tensors(train, cfg.policy, pad)
        vdata = sequence_tensors(val, cfg.policy, pad) if val is not None else None
    elif cds is not None:
        ctrain, cval = _split(cds, pc.val_fraction, cfg.seed)
        data = training_tensors(train, pc.gamma, None)
        vdata = training_tensors(val, pc.gamma, None) if val is not None else None
        cdata = training_tensors(ctrain, pc.gamma, reward, bonus)
        cvdata = training_tensors(cval, pc.gamma, reward, bonus) if cval is not None else None
    else:
        data = training_tensors(train, pc.gamma, reward, bonus)
        vdata = training_tensors(val, pc.gamma, reward, bonus) if val is not None else None
    n = next(iter(data.values())).shape[0]
    what = (f"{n} windows (To={cfg.policy.obs_horizon}, Tp={cfg.policy.pred_horizon}, Ta={cfg.policy.action_horizon})"
            if seq else f"{n} train transitions")
    log(f"[offrl] {pc.algo} ({cfg.policy.kind} policy) on {ds.name}: {len(train)} train / {len(val) if val else 0} "
        f"val episodes, {what}" + (f", reward '{reward}'" if reward and cds is None else "")
        + (", no reward needed" if not reward else "")
        + (f" + success bonus {bonus:.3g}" if bonus and cds is None else ""))
    critic_ds = cds if cds is not None else ds
    if reward and any("executed_actions" in e.extras for e in critic_ds.episodes):
        log(f"[offrl] warning: {critic_ds.name} holds expert labels (collect.action_labels=expert): its actions are "
            "not the ones that produced its next states, so the critics learn values of actions never taken")
    if cds is not None:
        nc = next(iter(cdata.values())).shape[0]
        log(f"[offrl] critics on {cds.name}: {len(ctrain)} train / {len(cval) if cval else 0} val episodes, "
            f"{nc} train transitions, reward '{reward}'" + (f" + success bonus {bonus:.3g}" if bonus else ""))
    provenance = {"actor" if pc.trains_actor else "critics": _provenance(ds, train, val)}
    if pc.critic_mode and pc.trains_actor:
        provenance["critics"] = provenance["actor"] if cds is None else _provenance(cds, ctrain, cval)

    run_dir = Path(cfg.run.root) / cfg.run.experiment / (cfg.run.trial or "")
    ckpt_root = run_dir / "checkpoints"
    if resume:
        if not cfg.run.trial:
            raise OffrlError("--resume needs run.trial=<name> of the run to continue")
        if latest_checkpoint(ckpt_root) is None:
            raise OffrlError(f"--resume: no checkpoint in {ckpt_root}")

    needs_sim = pc.trains_actor
    if needs_sim and _worker is None:  # the task is checked here before Ray starts (one line, no actor traceback)
        _check_sizes(probe_env(cfg.env), ds.obs_dim, ds.act_dim, f"{ds.name}: obs/action sizes", cfg)
    pool = None
    created = False
    try:
        if _worker is not None:  # the driver made the pool; its actor handles came with the worker's config
            pool = _worker.get("pool") if lead else None
            low, high = _worker["action_low"], _worker["action_high"]
        elif needs_sim:
            init_ray(cfg.cluster)
            pool = SimHostPool(cfg.env, cfg.cluster, seed=cfg.seed)
            low, high = pool.spec["action_low"], pool.spec["action_high"]
            _check_sizes(pool.spec, ds.obs_dim, ds.act_dim, f"{ds.name}: obs/action sizes", cfg)
        else:
            low, high = [-1.0] * ds.act_dim, [1.0] * ds.act_dim
        bs = min(pc.batch_size, n)
        G = bs * world  # the global batch: every worker takes bs rows of it
        steps_per_epoch = pc.steps_per_epoch or max(1, n // G)
        learner, arch = build_learner(cfg, ds.obs_dim, ds.act_dim, low, high, total_steps=pc.epochs * steps_per_epoch)
        start_epoch = 0
        if resume:
            state = load_checkpoint(ckpt_root, learner.modules(), optimizers=learner.optimizers(),
                                    generators=learner.generators(), keep_lr=True)
            learner.load_extra_state(state)
            start_epoch = int(state["step"])
            best = state.get("best_val", math.inf)
            logger = MetricLogger(run_dir, tensorboard=cfg.run.tensorboard) if lead else None
            if logger is not None:
                logger.truncate_after(start_epoch)
            log(f"[offrl] resuming {run_dir} from epoch {start_epoch}")
            if lead:
                update_resumed_config(cfg, run_dir, log)
        else:
            if lead:
                run_dir = create_run_dir(cfg, exist_ok=exist_ok)
            created = not exist_ok
            ckpt_root = run_dir / "checkpoints"
            if seq:
                learner.fit_normalizers(data)
            else:
                learner.fit_normalizers(data["obs"], cdata["obs"] if cdata is not None else None)
            if init_from:
                parts = list(init_parts) if init_parts else list(learner.modules())
                load_checkpoint(init_from, learner.modules(), parts=parts, restore_rng=False)
                if "actor" in parts and hasattr(learner, "start_from_actor"):  # an EMA learner trains on from it
                    learner.start_from_actor(raw_loaded="actor_train" in parts)
                log(f"[offrl] initialised {', '.join(parts)} from {init_from}")
            if pc.algo == "brac":
                _setup_behavior(cfg, learner, data, log)
            best = math.inf
            logger = MetricLogger(run_dir, tensorboard=cfg.run.tensorboard) if lead else None
        if pc.algo == "brac" and resume:
            learner.set_behavior(learner.behavior)
        if world > 1:  # every worker starts from rank 0's weights, as DistributedDataParallel does
            _broadcast_modules(learner.modules())

        crit = getattr(learner, "critics", None)
        critic_view = {"critic_obs_ignore": crit.v.obs_ignore} if crit is not None and crit.v.obs_ignore else {}

        def checkpoint(root: Path, epoch: int, keep: int, best_val: float) -> None:
            save_checkpoint(root, epoch, learner.modules(), optimizers=learner.optimizers(),
                            generators=learner.generators(), config=to_dict(cfg), keep=keep,
                            extra_state={**learner.extra_state(), "actor_arch": arch, "algo": pc.algo,
                                         "best_val": best_val, "dataset": str(pc.dataset),
                                         "data": provenance, **critic_view})

        def run_eval(episodes: int, actor: Any = None) -> dict:
            spec = actor_spec(actor if actor is not None else learner.actor, arch, cfg.eval.deterministic)
            return evaluate(pool, spec, episodes, cfg.eval.seed, ignore_terminations=cfg.eval.ignore_terminations)

        select = pc.select if pc.select != "auto" else ("last" if cfg.policy.kind == "diffusion" else "best")
        evaluated = f"last (epoch {pc.epochs})"
        val_key = "actor_val_loss" if learner.actor is not None else ("mc_error" if pc.critic_mode == "mc" else "td_error")
        wf_train = None
        if pc.critic_mode and not seq:  # the fixed training rows the workflow curves are measured on
            src = data if cdata is None else cdata
            nsrc = next(iter(src.values())).shape[0]
            pick = torch.randperm(nsrc, generator=torch.Generator().manual_seed(cfg.seed + 2))[:WORKFLOW_SAMPLE]
            wf_train = {k: x[pick] for k, x in src.items()}
        bar = progress(pc.epochs - start_epoch, f"pretrain {pc.algo}", cfg.run.progress and lead, unit="epoch")
        summary = None
        for epoch in range(start_epoch + 1, pc.epochs + 1):
            t0 = time.time()
            need = steps_per_epoch * G
            # the same generator on every worker: the same order, of which each worker takes its share
            perm = torch.cat([learner.permutation(n) for _ in range(-(-need // n))])
            if cdata is not None:  # the critics' own pass over their data
                cbs = min(pc.batch_size, nc)
                cperm = torch.cat([learner.permutation(nc, critics=True)
                                   for _ in range(-(-(steps_per_epoch * cbs * world) // nc))])
            acc: dict[str, list[float]] = {}
            for i in range(steps_per_epoch):
                idx = perm[i * G + rank * bs:i * G + (rank + 1) * bs]
                batch = {k: x[idx] for k, x in data.items()}
                if cdata is None:
                    m = learner.update(batch)
                else:
                    cidx = cperm[(i * world + rank) * cbs:(i * world + rank + 1) * cbs]
                    m = learner.update(batch, {k: x[cidx] for k, x in cdata.items()})
                for k, v in m.items():
                    acc.setdefault(k, []).append(v)
            row = {_TRAIN_NAMES[k]: float(np.mean(v)) for k, v in acc.items() if k in _TRAIN_NAMES}
            row[M.TRAIN_GRAD_STEPS] = learner.step
            row[M.ITERATION_SECONDS] = time.time() - t0
            if not lead:  # the other workers only take their share of the gradient steps
                continue
            vm = ({} if vdata is None else learner.validate(vdata) if cvdata is None else learner.validate(vdata, cvdata))
            row.update({_VAL_NAMES[k]: v for k, v in vm.items() if k in _VAL_NAMES})
            if wf_train is not None:
                wm = learner.workflow_metrics(wf_train, vdata if cvdata is None else cvdata)
                row.update({_WORKFLOW_NAMES[k]: v for k, v in wm.items()})
            if pool is not None and pc.eval_every and epoch % pc.eval_every == 0 and epoch != pc.epochs:
                row.update(eval_metrics(run_eval(pc.eval_episodes)))
            score = vm.get(val_key, math.inf)
            if vdata is not None and score < best:
                best = score
                checkpoint(ckpt_root / "best", epoch, 1, best)
            if epoch == pc.epochs and pool is not None:
                final_actor = None
                best_ckpt = latest_checkpoint(ckpt_root / "best")
                if select == "best" and best_ckpt is not None:
                    import copy

                    final_actor = copy.deepcopy(learner.actor)
                    load_checkpoint(best_ckpt, {"actor": final_actor}, parts=["actor"], restore_rng=False)
                    evaluated = f"best (epoch {best_ckpt.name}, {val_key} {best:.4g})"
                log(f"[offrl] evaluating the {evaluated} policy")
                summary = run_eval(pc.eval_episodes, final_actor)
                row.update(eval_metrics(summary))
            logger.log(epoch, row)
            saved = None
            if epoch % pc.checkpoint_every == 0 or epoch == pc.epochs:
                checkpoint(ckpt_root, epoch, pc.keep_checkpoints, best)
                saved = ckpt_root / str(epoch)
            if reporter is not None:
                reporter(epoch, row, saved)
            post = {"loss": f"{row.get(M.TRAIN_ACTOR_LOSS, row.get(M.TRAIN_V_LOSS, 0.0)):.3f}"}
            if M.EVAL_SUCCESS_RATE in row:
                post["success"] = f"{row[M.EVAL_SUCCESS_RATE]:.2f}"
            bar.set_postfix(post)
            bar.update(1)
        bar.close()
        if not lead:
            return run_dir
        logger.close()
        if summary is not None:
            ev_ckpt = best_ckpt if evaluated.startswith("best") else ckpt_root / str(pc.epochs)
            write_eval_json(run_dir / "eval.json", summary,
                            {"checkpoint": str(ev_ckpt), "evaluated": evaluated, "policy": cfg.policy.kind,
                             "seed": cfg.eval.seed,
                             "deterministic": cfg.eval.deterministic, "env_id": cfg.env.id,
                             "protocol": eval_protocol(cfg)})
            s, o = summary["success_at_end"], summary["success_once"]
            log(f"[offrl] eval ({summary['episodes']} episodes, {eval_protocol(cfg)}): success_once {o['mean']:.2f} "
                f"[{o['ci95'][0]:.2f}, {o['ci95'][1]:.2f}], success_at_end {s['mean']:.2f}, "
                f"return {summary['return']['mean']:.2f}")
        (run_dir / "pretrain_done.json").write_text(json.dumps({"epochs": pc.epochs, "best_val": best}))
        log(f"[offrl] run directory: {run_dir}")
        return run_dir
    except BaseException as e:
        if created and not resume and not isinstance(e, KeyboardInterrupt) and not any(ckpt_root.glob("[0-9]*")):
            discard_run_dir(run_dir)  # nothing worth keeping: leave no half-written run
        raise
    finally:
        if pool is not None and _worker is None:  # a worker's pool belongs to the driver
            pool.shutdown()


def _setup_behavior(cfg: Any, learner: Any, data: dict, log: Any) -> None:
    """BRAC's behaviour policy: ``pretrain.behavior_checkpoint``'s actor, or BC trained here first."""
    from offrl.platform.checkpoint import load_checkpoint, resolve_checkpoint

    pc = cfg.pretrain
    if pc.behavior_checkpoint:
        ckpt = resolve_checkpoint(pc.behavior_checkpoint)
        load_checkpoint(ckpt, {"actor": learner.behavior}, parts=["actor"], restore_rng=False)
        learner.set_behavior(learner.behavior)
        log(f"[offrl] brac behaviour policy: the actor of {ckpt}")
        return
    loss = learner.train_behavior(learner.behavior, data, pc.behavior_steps, pc.batch_size, pc.actor_lr)
    log(f"[offrl] brac behaviour policy: BC for {pc.behavior_steps} steps on the training episodes "
        f"(last loss {loss:.3f})")


def _broadcast_modules(modules: dict) -> None:
    """Copy rank 0's parameters and buffers to every worker of the process group."""
    import torch.distributed as dist

    for m in modules.values():
        for t in m.state_dict().values():
            dist.broadcast(t, src=0)


def _pretrain_worker(config: dict) -> None:
    """The training function of every Ray Train worker (``pretrain.workers > 1``).

    It continues from the run's latest checkpoint when there is one: after Ray Train restarted the worker
    group because a worker died, or under ``--resume``.
    """
    import ray.train

    from offrl.algos.optim import data_parallel
    from offrl.platform.checkpoint import latest_checkpoint

    import os

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    if os.path.isdir(config["cwd"]):  # relative paths in the config mean what they meant to the driver
        os.chdir(config["cwd"])
    cfg = from_dict(config["cfg"])
    run_dir = Path(cfg.run.root) / cfg.run.experiment / cfg.run.trial
    latest = latest_checkpoint(run_dir / "checkpoints")
    resume = latest is not None
    _record_workers(run_dir, rank, world, int(latest.name) if latest is not None else None)
    log = print if rank == 0 else (lambda *a, **k: None)
    with data_parallel():
        run_pretrain_job(cfg, resume=resume, init_from=None if resume else config["init_from"],
                         init_parts=config["init_parts"], log=log, exist_ok=True,
                         _worker={"rank": rank, "world": world, "pool": config["pool"],
                                  "action_low": config["action_low"], "action_high": config["action_high"]})


WORKERS_FILE = "train_workers.json"


def _record_workers(run_dir: Path, rank: int, world: int, resumed_from: Optional[int]) -> None:
    """Rank 0 appends this attempt of the worker group (pids, nodes, the checkpoint it continues from) to
    ``train_workers.json``: a restart after a worker died shows up as a second attempt."""
    import os

    import ray
    import torch.distributed as dist

    me = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, me)
    if rank != 0:
        return
    path = run_dir / WORKERS_FILE
    data = json.loads(path.read_text()) if path.exists() else {"attempts": []}
    data["attempts"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": world,
                             "resumed_from": resumed_from, "pids": [w["pid"] for w in everyone],
                             "node_ids": [w["node_id"] for w in everyone]})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _run_data_parallel(cfg: Any, *, resume: bool, init_from: Optional[str], init_parts: Optional[Sequence[str]],
                       log: Any, reporter: Any, exist_ok: bool, explicit: Collection[str]) -> Path:
    """``pretrain.workers = N > 1``: the driver makes the run directory and the evaluation SimHosts, then a
    ``ray.train.torch.TorchTrainer`` runs :func:`_pretrain_worker` on N workers (gloo on CPU, NCCL with
    ``pretrain.worker_gpu``). A worker that dies makes Ray Train restart the group
    (``FailureConfig(max_failures=pretrain.worker_failures)``); the restarted workers continue from the latest
    checkpoint, so the run ends with the same number of gradient steps."""
    import os

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from offrl.envs.maniskill import probe_env
    from offrl.platform.checkpoint import latest_checkpoint
    from offrl.platform.cluster import init_ray
    from offrl.platform.rundir import create_run_dir, discard_run_dir, trial_name
    from offrl.platform.simhost import SimHostPool

    pc = cfg.pretrain
    if reporter is not None:
        raise OffrlError("pretrain.workers > 1 does not run inside a sweep trial yet; use pretrain.workers=1 there")
    ds = _load_dataset(cfg)
    cfg = _resolve_env(cfg, ds, log, explicit)
    if not cfg.run.trial:
        cfg = replace(cfg, **{"run.trial": trial_name()})
    run_dir = Path(cfg.run.root) / cfg.run.experiment / cfg.run.trial
    if resume and latest_checkpoint(run_dir / "checkpoints") is None:
        raise OffrlError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    needs_sim = pc.trains_actor
    if needs_sim:
        _check_sizes(probe_env(cfg.env), ds.obs_dim, ds.act_dim, f"{ds.name}: obs/action sizes", cfg)
    resources = init_ray(cfg.cluster)
    cpus, need = resources.get("CPU", 0.0), pc.workers * pc.worker_cpus
    hosts = 0
    if needs_sim:  # the evaluation SimHosts share the cluster with the workers: size them to what is left
        per_host = max(cfg.cluster.cpus_per_host, 1e-9)
        hosts = cfg.cluster.num_hosts or max(1, int((cpus - need + 1e-9) // per_host))
        cfg = replace(cfg, **{"cluster.num_hosts": hosts})
        need += hosts * cfg.cluster.cpus_per_host
    if not cfg.cluster.address and need > cpus + 1e-9:  # Ray Train would wait for the CPUs forever
        sims = f" and {hosts} SimHost(s) x cluster.cpus_per_host={cfg.cluster.cpus_per_host:g}" if hosts else ""
        raise OffrlError(f"pretrain.workers={pc.workers} x pretrain.worker_cpus={pc.worker_cpus:g}{sims} need "
                         f"{need:g} CPUs; this Ray cluster has {cpus:g} (lower pretrain.worker_cpus or "
                         f"cluster.cpus_per_host, or raise cluster.num_cpus)")
    pool = created = None
    try:
        if needs_sim:
            pool = SimHostPool(cfg.env, cfg.cluster, seed=cfg.seed)
            _check_sizes(pool.spec, ds.obs_dim, ds.act_dim, f"{ds.name}: obs/action sizes", cfg)
            low, high = pool.spec["action_low"], pool.spec["action_high"]
        else:
            low, high = [-1.0] * ds.act_dim, [1.0] * ds.act_dim
        if not resume:
            run_dir = create_run_dir(cfg, exist_ok=exist_ok)
            created = not exist_ok
        log(f"[offrl] data-parallel pretraining: {pc.workers} Ray Train workers x batch {pc.batch_size} = global "
            f"batch {pc.workers * pc.batch_size} ({'NCCL on GPUs' if pc.worker_gpu else 'gloo on CPUs'})")
        trainer = TorchTrainer(
            _pretrain_worker,
            train_loop_config={"cfg": to_dict(cfg), "pool": pool, "init_from": init_from, "init_parts": init_parts,
                               "action_low": low, "action_high": high, "threads": pc.worker_cpus,
                               "cwd": os.getcwd()},
            scaling_config=ScalingConfig(num_workers=pc.workers, use_gpu=pc.worker_gpu,
                                         resources_per_worker={"CPU": pc.worker_cpus,
                                                               **({"GPU": 1} if pc.worker_gpu else {})}),
            run_config=RunConfig(storage_path=str((run_dir / "ray_train").resolve()), name="train",
                                 failure_config=FailureConfig(max_failures=pc.worker_failures)))
        try:
            trainer.fit()
        except Exception as e:  # Ray Train wraps the worker's error; show its one line
            import re

            m = re.search(r"OffrlError: ([^\n]+)", str(e))
            raise OffrlError(m.group(1).strip() if m else
                             f"data-parallel pretraining failed: {str(e).strip().splitlines()[0]}") from None
        if not (run_dir / "pretrain_done.json").exists():
            raise OffrlError(f"data-parallel pretraining stopped before its last epoch ({run_dir})")
        log(f"[offrl] run directory: {run_dir}")
        return run_dir
    except BaseException as e:
        if created and not isinstance(e, KeyboardInterrupt) and not any((run_dir / "checkpoints").glob("[0-9]*")):
            discard_run_dir(run_dir)
        raise
    finally:
        if pool is not None:
            pool.shutdown()


def _check_sizes(spec: Optional[dict], obs_dim: int, act_dim: int, what: str, cfg: Any) -> None:
    """Raise OffrlError when the env's obs/action sizes (``spec`` from the sim) are not the expected ones."""
    if spec is not None and (spec["obs_dim"] != obs_dim or spec["act_dim"] != act_dim):
        raise OffrlError(f"{what} {obs_dim}/{act_dim} do not match {cfg.env.id} with {cfg.env.control_mode} "
                         f"and obs_mode {cfg.env.obs_mode} ({spec['obs_dim']}/{spec['act_dim']})")


def sequence_tensors(ds: Any, policy_cfg: Any, end_padding: str = "last") -> dict[str, torch.Tensor]:
    """Training windows of a sequence policy (see :func:`offrl.algos.sequence.make_windows`)."""
    from offrl.algos.sequence import make_windows

    w = make_windows([(e.obs, e.actions) for e in ds.episodes], policy_cfg.obs_horizon, policy_cfg.pred_horizon,
                     end_padding)
    return {"obs_seq": w["obs_seq"], "act_seq": w["act_seq"]}


def eval_protocol(cfg: Any) -> str:
    """One phrase naming the evaluation protocol."""
    end = "terminations ignored (full horizon)" if cfg.eval.ignore_terminations else "episodes end on success"
    return f"{cfg.env.id} {cfg.env.control_mode}, max_episode_steps={cfg.env.max_episode_steps}, {end}"


def find_run_dir(ckpt: Path) -> Optional[Path]:
    """The run directory holding ``ckpt`` (the nearest parent with config.yaml)."""
    for p in [ckpt, *ckpt.parents]:
        if (p / "config.yaml").exists():
            return p
    return None


def load_acting_actor(checkpoint: str, overrides: Sequence[str] = (), log: Any = print) -> tuple:
    """The actor of a checkpoint, ready to act under its config with ``overrides`` applied (sampler and
    action horizon of sequence policies may change; sizes are checked against the env).

    Returns ``(ckpt, cfg, actor, arch, extra)``: ``extra`` records a changed sampler or action horizon."""
    from offrl.algos.networks import build_actor
    from offrl.config import apply_overrides
    from offrl.envs.maniskill import probe_env
    from offrl.platform.checkpoint import checkpoint_json, load_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)  # complete and readable, or one line
    arch = checkpoint_json(ckpt, "training_state/state.json").get("actor_arch")
    if not arch:
        raise OffrlError(f"checkpoint {ckpt} has no actor to evaluate")
    cfg = from_dict(apply_overrides(checkpoint_json(ckpt, "config.json"), list(overrides)))
    sampler = None
    if arch.get("kind") == "diffusion":  # sampling is not training: diffusion.scheduler / inference_steps may change
        sampler = {"scheduler": cfg.diffusion.scheduler, "inference_steps": cfg.diffusion.inference_steps}
        if any(arch.get(k) != v for k, v in sampler.items()):
            log(f"[offrl] sampling with {sampler['scheduler']} x {sampler['inference_steps']} steps (trained with "
                f"{arch.get('scheduler')} x {arch.get('inference_steps')})")
            arch = {**arch, **sampler}
    acting = None
    if arch.get("kind") in ("mlp_chunk", "diffusion"):  # acting is not training: Ta may change
        acting = {"action_horizon": cfg.policy.action_horizon}
        if arch.get("action_horizon") != cfg.policy.action_horizon:
            ta_max = arch["pred_horizon"] - arch["obs_horizon"] + 1
            if not 1 <= cfg.policy.action_horizon <= ta_max:
                raise OffrlError(f"policy.action_horizon={cfg.policy.action_horizon} does not fit this checkpoint: "
                                 f"it must be in [1, Tp - To + 1 = {ta_max}]")
            log(f"[offrl] executing {cfg.policy.action_horizon} actions per replanning (trained with "
                f"Ta={arch.get('action_horizon')})")
            arch = {**arch, "action_horizon": cfg.policy.action_horizon}
    actor = build_actor(arch)
    load_checkpoint(ckpt, {"actor": actor}, parts=["actor"], restore_rng=False)
    # the env is built once here, before Ray starts: a bad control mode or a checkpoint made for another
    # observation size is one line, not a SimHost traceback
    _check_sizes(probe_env(cfg.env), arch["obs_dim"], arch["act_dim"], f"checkpoint {ckpt} expects obs/action sizes",
                 cfg)
    return ckpt, cfg, actor, arch, {**({"sampler": sampler} if sampler else {}), **({"acting": acting} if acting else {})}


def run_eval_job(checkpoint: str, episodes: Optional[int] = None, seed: Optional[int] = None,
                 overrides: Sequence[str] = (), out: Optional[str] = None, log: Any = print) -> dict:
    """Evaluate a checkpoint's actor on SimHost actors with fixed seeds; write eval.json."""
    from offrl.platform.cluster import init_ray
    from offrl.platform.evaluate import evaluate, write_eval_json
    from offrl.platform.simhost import SimHostPool

    if episodes is not None and episodes < 1:
        raise OffrlError(f"--episodes must be >= 1, got {episodes}")
    if seed is not None and seed < 0:
        raise OffrlError(f"--seed must be >= 0 (simulator seeds are unsigned), got {seed}")
    ckpt, cfg, actor, arch, acting_extra = load_acting_actor(checkpoint, overrides, log)
    episodes = cfg.eval.episodes if episodes is None else episodes
    seed = cfg.eval.seed if seed is None else seed
    log(f"[offrl] protocol: {eval_protocol(cfg)}; success_once is the headline metric")
    init_ray(cfg.cluster)
    pool = SimHostPool(cfg.env, cfg.cluster, seed=cfg.seed)
    try:
        t = time.time()
        summary = evaluate(pool, actor_spec(actor, arch, cfg.eval.deterministic), episodes, seed,
                           ignore_terminations=cfg.eval.ignore_terminations)
        dt = time.time() - t
    finally:
        pool.shutdown()
    extra = {"checkpoint": str(ckpt), "protocol": eval_protocol(cfg), "policy": arch.get("kind", "mlp"), "seed": seed, "deterministic": cfg.eval.deterministic, "env_id": cfg.env.id,
             "control_mode": cfg.env.control_mode, "seconds": dt, **acting_extra}
    run_dir = find_run_dir(ckpt)
    path = Path(out) if out else (run_dir / "eval.json" if run_dir else ckpt / "eval.json")
    write_eval_json(path, summary, extra)
    s = summary["success_at_end"]
    log(f"[offrl] {episodes} episodes (seeds {seed}..{seed + episodes - 1}): success_at_end {s['mean']:.3f} "
        f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}], success_once {summary['success_once']['mean']:.3f}, "
        f"return {summary['return']['mean']:.2f}, length {summary['length']['mean']:.1f}")
    log(f"[offrl] wrote {path}")
    return summary
