"""The finetuning loop's advantage estimators as small strategy objects.

Each estimator declares what it needs and turns one round into advantages:

* :class:`GAE`: the online value net (``learner.value``); advantages and lambda-returns for every sample
  of the round (on-policy).
* :class:`MonteCarlo`: recorded simulator states (``record_states``) and the SimHost pool; it re-rolls a
  random ``mc_fraction`` of the round's (state, action) pairs inside the actors, by default to the end of
  the episode, and keeps only those samples.
* :class:`OwnCritics`: update rules with critics of their own (``sac``) take no advantages.
* :class:`Critic`: the expectile critics (IQL with ``tau = finetune.expectile``, SARSA with 0.5). On the
  on-policy path it scores every sample of the round; on the replay path the learner recomputes
  advantages on every minibatch itself, so the round only feeds the replay buffer.

``advantages(learner, rnd)`` returns the batch to learn from (``adv`` added, rows possibly selected) and
extra metrics for the round's log row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from offrl import metrics as M
from offrl.errors import OffrlError


@dataclass
class Round:
    """One round's rollout: per-host results, the concatenated ``[T, N]`` data, its flat batch."""

    iteration: int
    spec: dict            # the policy spec the round was collected with
    results: list[dict]   # per-host rollouts (with ``states`` when the estimator records them)
    data: dict            # concat_rollouts(results), success bonus already added to rewards
    batch: dict           # flat [T * N] tensors in the learner's batch contract


class Estimator:
    name = ""
    record_states = False   # the rollout must record simulator states
    needs_value = False     # an online value net
    needs_critics = False   # pretrained Q/V critics

    def advantages(self, learner: Any, rnd: Round) -> tuple[dict, dict[str, float]]:
        raise NotImplementedError

    def keep(self, rnd: Round, batch: dict) -> dict[str, dict]:
        """What :class:`RecentRounds` stores of a round to re-score it later: its learning batch (``batch``)."""
        return {"batch": batch}

    def readvantage(self, learner: Any, kept: dict[str, dict]) -> dict:
        """A kept earlier round's batch with advantages from the learner as it is now (default: unchanged)."""
        return kept["batch"]


_TRAJ = ("obs", "next_obs", "rewards", "terminated", "truncated")


class GAE(Estimator):
    name = "gae"
    needs_value = True

    def advantages(self, learner: Any, rnd: Round) -> tuple[dict, dict[str, float]]:
        tens = {k: torch.from_numpy(rnd.data[k]) for k in _TRAJ}
        return self._score(learner, rnd.batch, tens), {}

    @staticmethod
    def _score(learner: Any, batch: dict, traj: dict) -> dict:
        adv, ret = learner.gae_advantages(traj)
        return {**batch, "adv": adv.reshape(-1), "returns": ret.reshape(-1)}

    def keep(self, rnd: Round, batch: dict) -> dict[str, dict]:
        return {"batch": batch, "traj": {k: torch.from_numpy(rnd.data[k]) for k in _TRAJ}}

    def readvantage(self, learner: Any, kept: dict[str, dict]) -> dict:
        """GAE and lambda-returns of the kept ``[T, N]`` rollout with the current value net (AWR's TD(lambda))."""
        return self._score(learner, kept["batch"], kept["traj"])


class Critic(Estimator):
    """IQL / SARSA critics: A = min_i Q_target,i(s, a) - V(s)."""

    needs_critics = True

    def __init__(self, name: str, replay: bool):
        self.name, self.replay = name, replay

    def advantages(self, learner: Any, rnd: Round) -> tuple[dict, dict[str, float]]:
        if self.replay:  # per-minibatch advantages inside learner.update_replay
            return dict(rnd.batch), {}
        b = rnd.batch
        return {**b, "adv": learner.critic_advantages(b["obs"], b["actions"])}, {}

    def readvantage(self, learner: Any, kept: dict[str, dict]) -> dict:
        b = kept["batch"]
        return {**b, "adv": learner.critic_advantages(b["obs"], b["actions"])}


class RecentRounds:
    """The samples of the last ``keep`` rounds, for on-policy AWR and push-away (``finetune.keep_rounds``).

    Peng et al. (2019) run AWR on a buffer of recent samples rather than on one batch: each round's
    regression then averages over several rounds' exploration, instead of refitting the policy to one
    round's noise. :meth:`merge` adds a round and returns the round's batch followed by the kept earlier
    rounds', whose advantages the estimator recomputes with the current value net or critics (MC keeps each
    pair's re-rolled advantage), plus ``logprob_start``: the current policy's log-prob of every action, the
    reference of the round's trust region. ``logprob`` stays each sample's behaviour log-prob (push-away's
    floor).
    """

    def __init__(self, keep: int):
        self.keep = int(keep)
        self.rounds: list[dict[str, dict]] = []

    def __len__(self) -> int:
        return len(self.rounds)

    def merge(self, estimator: Estimator, learner: Any, rnd: Round, batch: dict) -> dict:
        kept = self.rounds[max(0, len(self.rounds) - (self.keep - 1)):] if self.keep > 1 else []
        older = [estimator.readvantage(learner, k) for k in kept]
        self.rounds = (self.rounds + [estimator.keep(rnd, batch)])[-self.keep:]
        parts = [batch] + older[::-1]  # newest first
        out = {k: torch.cat([p[k] for p in parts]) for k in batch}
        with torch.no_grad():
            out["logprob_start"] = learner.actor.log_prob(out["obs"], out.get("raw_actions", out["actions"]))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"<round>.<part>.<key>": tensor}`` (oldest round first), for a checkpoint's state tensors."""
        # cloned: a round's batch and trajectory are views of the same arrays, which safetensors refuses to save
        return {f"{i}.{part}.{k}": v.clone() for i, r in enumerate(self.rounds) for part, d in r.items()
                for k, v in d.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], n_rounds: int) -> None:
        rounds: list[dict[str, dict]] = [{} for _ in range(int(n_rounds))]
        for name, v in tensors.items():
            if name.startswith("_"):  # the placeholder of an empty set
                continue
            i, part, k = name.split(".", 2)
            rounds[int(i)].setdefault(part, {})[k] = v
        self.rounds = rounds


class OwnCritics(Estimator):
    """Update rules that bring their own critics (``sac``): the round only feeds the replay buffer."""

    name = "sac"

    def advantages(self, learner: Any, rnd: Round) -> tuple[dict, dict[str, float]]:
        return dict(rnd.batch), {}


def rerollout_spec(cfg: Any, actor_spec_now: dict) -> dict:
    """The policy the MC re-rollouts follow (``finetune.rerollout_policy``)."""
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


class MonteCarlo(Estimator):
    """Q(s, a) - V(s) from ``mc_samples`` re-rollouts each, restored from the round's saved states."""

    name = "mc"
    record_states = True

    def __init__(self, cfg: Any, pool: Any, success_bonus: float, rng: np.random.Generator):
        self.cfg, self.pool, self.bonus, self.rng = cfg, pool, success_bonus, rng
        self.rerollout_steps = 0

    def advantages(self, learner: Any, rnd: Round) -> tuple[dict, dict[str, float]]:
        fc = self.cfg.finetune
        seed = self.cfg.seed * 100_003 + rnd.iteration
        idx, adv, st = mc_advantages(self.pool, rnd.results, rnd.data, rerollout_spec(self.cfg, rnd.spec),
                                     fc, self.rng, seed, self.bonus)
        self.rerollout_steps += st["steps"]
        batch = {k: v[torch.from_numpy(idx)] for k, v in rnd.batch.items()}
        batch["adv"] = torch.from_numpy(adv)
        # V's first actions join the batch; with no reward or next observation of their own, the batch keeps
        # only what the policy update reads (obs, actions, raw_actions, logprob, adv)
        if st["v_rows"] is not None:
            batch = {k: torch.cat([batch[k], torch.from_numpy(v).to(batch[k].dtype)])
                     for k, v in st["v_rows"].items()}
        row = {M.REROLLOUT_SPS: st["steps"] / max(st["seconds"], 1e-9), M.REROLLOUT_STEPS: self.rerollout_steps,
               M.MC_Q_MEAN: st["q_mean"], M.MC_V_MEAN: st["v_mean"]}
        if st["reliability"] is not None:  # needs mc_samples >= 2
            row.update({M.MC_RELIABILITY: st["reliability"], M.MC_NOISE_STD: st["noise_std"]})
        return batch, row


def mc_advantages(pool: Any, results: list[dict], data: dict, spec: dict, fc: Any, rng: np.random.Generator,
                  seed: int, success_bonus: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Re-roll a random ``fc.mc_fraction`` of the round's (state, action) pairs inside the actors.

    Returns (flat indices into ``[T * N]``, advantages for them, stats; the stats' ``reliability`` and
    ``noise_std`` are None with one sample). With ``fc.mc_v_actions`` the stats' ``v_rows`` holds the first
    actions of V's re-rollouts as flat rows (``obs``, ``actions``, ``raw_actions``, ``logprob``, ``adv``;
    :func:`offrl.algos.advantages.mc_v_action_advantage`), else None.
    """
    from offrl.algos.advantages import mc_reliability, mc_rerollout_advantage, mc_v_action_advantage
    from offrl.platform.rerollout import draws_gaussian_noise, index_state, rerollout_pool, stack_states

    for key in ("mc_common_noise", "mc_v_actions"):
        if getattr(fc, key) and not draws_gaussian_noise(spec):
            raise OffrlError(f"finetune.{key} needs a stochastic Gaussian MLP re-rollout policy; "
                             f"{fc.rerollout_policy!r} gives kind {spec.get('kind')!r}")
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
                         fc.gamma, seed, success_bonus, common_noise=fc.mc_common_noise, v_actions=fc.mc_v_actions)
    qr, vr = torch.from_numpy(out["q"]), torch.from_numpy(out["v"])
    adv, q, v = mc_rerollout_advantage(qr, vr)
    rel, noise = mc_reliability(qr, vr) if fc.mc_samples >= 2 else (None, None)
    v_rows = None
    if fc.mc_v_actions:
        first = out["v_first"]
        v_rows = {k: first[k].reshape((-1,) + first[k].shape[2:]) for k in ("obs", "actions", "raw_actions", "logprob")}
        v_rows["adv"] = mc_v_action_advantage(qr, vr).numpy().reshape(-1).astype(np.float32)
    return chosen, adv.numpy().astype(np.float32), {"steps": out["steps"], "seconds": out["seconds"],
                                                    "q_mean": float(q.mean()), "v_mean": float(v.mean()),
                                                    "reliability": rel, "noise_std": noise, "v_rows": v_rows}


def estimator_class(cfg: Any) -> type[Estimator]:
    """The estimator class of ``finetune.advantage`` (its class attributes say what it needs)."""
    fc = cfg.finetune
    if fc.update == "sac":
        return OwnCritics
    classes = {"gae": GAE, "mc": MonteCarlo, "iql": Critic, "sarsa": Critic}
    if fc.advantage not in classes:
        raise OffrlError(f"unknown finetune.advantage {fc.advantage!r}")
    return classes[fc.advantage]


def make_estimator(cfg: Any, pool: Any, success_bonus: float, rng: Optional[np.random.Generator] = None) -> Estimator:
    """The estimator named by ``finetune.advantage``."""
    fc = cfg.finetune
    cls = estimator_class(cfg)
    if cls is MonteCarlo:
        return MonteCarlo(cfg, pool, success_bonus, rng if rng is not None else np.random.default_rng(cfg.seed))
    if cls is Critic:
        return Critic(fc.advantage, fc.replay)
    return cls()
