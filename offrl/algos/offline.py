"""The offline pretraining learner: BC / advantage-weighted actor and MC / expectile (IQL, SARSA) critics.

One learner covers every ``pretrain.algo``:

==============  =====================================  ==================================
algo            critics                                actor
==============  =====================================  ==================================
bc              --                                     max log pi(a|s)
critic_mc       V, Q regress on MC returns G_t         --
iql             expectile V (tau), TD Q                max exp(beta A) log pi(a|s)
sarsa           expectile V (tau = 0.5), TD Q          max exp(beta A) log pi(a|s)
bc+<critic>     as <critic>                            max log pi(a|s)
cql, brac       see :mod:`offrl.algos.conservative`    (:class:`ConservativeLearner`)
==============  =====================================  ==================================

Every critic algorithm takes the workflow's corrections (``critic.*``, :func:`offrl.algos.critics.correction_loss`)
and reports the workflow's curves (:func:`workflow_metrics`).

Batch contract (``[B]``-shaped unless noted): obs ``[B, d]``, actions ``[B, a]``, rewards,
next_obs ``[B, d]``, terminated, truncated, mc_return.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from offrl.algos.bc import bc_loss
from offrl.algos.critics import (Critics, awr_weights, correction_loss, iql_q_loss, iql_value_loss, mc_critic_loss,
                                 td_target)
from offrl.algos.networks import GaussianActor
from offrl.algos.optim import guarded_step


class LearnerState:
    """What every offline learner saves beside its modules and optimizers: the data-order generators (its own,
    and that of a separate critic dataset) and the gradient-step counter."""

    gen: torch.Generator
    critic_gen: torch.Generator
    step: int

    def _init_state(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(int(seed))
        # the critics' own data order when they train on another dataset (the actor's order stays as without it)
        self.critic_gen = torch.Generator().manual_seed(int(seed) + 1)
        self.step = 0

    def permutation(self, n: int, critics: bool = False) -> torch.Tensor:
        """A shuffled index order drawn from the learner's own generator (saved in checkpoints);
        ``critics=True`` draws from the generator of the critics' separate dataset."""
        return torch.randperm(n, generator=self.critic_gen if critics else self.gen)

    def generators(self) -> dict[str, torch.Generator]:
        return {"learner": self.gen, "critic_data": self.critic_gen}

    def extra_state(self) -> dict[str, Any]:
        return {"learner_step": self.step}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.step = int(state.get("learner_step", 0))


class OfflineLearner(LearnerState):
    """Networks + optimizers for offline pretraining; ``update(batch) -> metrics``; exact-resume state."""

    def __init__(self, actor: Optional[GaussianActor], critics: Optional[Critics], *, actor_mode: Optional[str],
                 critic_mode: Optional[str], tau: float = 0.7, gamma: float = 0.8, beta: float = 3.0,
                 max_weight: float = 100.0, target_tau: float = 0.005, actor_lr: float = 3e-4,
                 critic_lr: float = 3e-4, bc_loss: str = "mle", grad_clip: float = 1.0, seed: int = 0,
                 critic_cfg: Any = None):
        if actor_mode == "awr" and critics is None:
            raise ValueError("advantage-weighted actor needs critics")
        self.actor, self.critics = actor, critics
        self.actor_mode, self.critic_mode = actor_mode, critic_mode
        self.tau, self.gamma, self.beta, self.max_weight = tau, gamma, beta, max_weight
        self.target_tau, self.bc_kind, self.grad_clip = target_tau, bc_loss, grad_clip
        self.critic_cfg = critic_cfg  # the critic section: its loss-side corrections (None: none)
        self.actor_opt = torch.optim.Adam(actor.parameters(), lr=actor_lr) if actor is not None and actor_mode else None
        self.critic_opt = None
        if critics is not None and critic_mode:
            params = list(critics.v.parameters()) + list(critics.q.parameters())
            self.critic_opt = torch.optim.Adam(params, lr=critic_lr)
        self._init_state(seed)

    # ------------------------------------------------------------------ data
    def fit_normalizers(self, obs: torch.Tensor, critic_obs: Optional[torch.Tensor] = None) -> None:
        """Set observation statistics from the training data (before the first update); the critics use
        ``critic_obs`` when they train on other data than the actor."""
        if self.actor is not None:
            self.actor.normalizer.update(obs)
        if self.critics is not None:
            self.critics.update_normalizers(obs if critic_obs is None else critic_obs)

    # ---------------------------------------------------------------- update
    def _opt_step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, params: Any, what: str) -> None:
        guarded_step(opt, loss, params, self.grad_clip,
                     f"{what} loss became {{loss}} at step {self.step}; "
                     "lower the learning rate or check the dataset for extreme values")

    def update(self, batch: Mapping[str, torch.Tensor],
               critic_batch: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, float]:
        """One gradient step of the critics on ``critic_batch`` (default: ``batch``), then of the actor on
        ``batch`` (an advantage-weighted actor reads the just-updated critics on its own batch)."""
        m: dict[str, float] = {}
        c = self.critics
        if self.critic_opt is not None:
            cb = batch if critic_batch is None else critic_batch
            if self.critic_mode == "mc":
                loss, cm = mc_critic_loss(c, cb["obs"], cb["actions"], cb["mc_return"])
            else:
                v_loss, vm = iql_value_loss(c, cb["obs"], cb["actions"], self.tau)
                q_loss, qm = iql_q_loss(c, cb["obs"], cb["actions"], cb["rewards"], cb["next_obs"],
                                        cb["terminated"], self.gamma)
                loss, cm = v_loss + q_loss, {**vm, **qm}
            if self.critic_cfg is not None and self.critic_cfg.corrected:
                mask = None if "terminated" not in cb else 1.0 - cb["terminated"].float()
                corr, km = correction_loss(c, self.critic_cfg, cb["obs"], cb["actions"], cb.get("next_obs"),
                                           cb.get("next_actions"), mask, True)
                loss = loss + corr
                cm.update(km)
            self._opt_step(self.critic_opt, loss, self.critic_opt.param_groups[0]["params"], "critic")
            c.polyak(self.target_tau if self.critic_mode != "mc" else 1.0)
            m.update(cm)
        if self.actor_opt is not None:
            if self.actor_mode == "bc":
                loss, am = bc_loss(self.actor, batch["obs"], batch["actions"], self.bc_kind)
                m["actor_loss"] = am["loss"]
            else:
                adv = c.advantage(batch["obs"], batch["actions"])
                w = awr_weights(adv, self.beta, self.max_weight)
                loss = -(w * self.actor.log_prob(batch["obs"], batch["actions"])).mean()
                m.update(actor_loss=float(loss.detach()), adv_mean=float(adv.mean()), adv_std=float(adv.std()),
                         weight_mean=float(w.mean()))
            self._opt_step(self.actor_opt, loss, self.actor.parameters(), "actor")
        self.step += 1
        return m

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def bootstrap_target(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What Q regresses on: ``r + gamma (1 - term) V(s')`` (IQL/SARSA) or the MC return (critic_mc)."""
        if self.critic_mode == "mc":
            return d["mc_return"]
        return td_target(d["rewards"], self.critics.v(d["next_obs"]), d["terminated"], self.gamma)

    @torch.no_grad()
    def validate(self, data: Mapping[str, torch.Tensor],
                 critic_data: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, float]:
        """Held-out metrics: actor NLL/MSE on ``data``; critic TD error and MC error, mean Q, V, advantage
        on ``critic_data`` (default: ``data``)."""
        out: dict[str, float] = {}
        if self.actor is not None:
            self.actor.eval()
            loss, _ = bc_loss(self.actor, data["obs"], data["actions"], self.bc_kind)
            out["actor_val_loss"] = float(loss)
            self.actor.train()
        if self.critics is not None:
            data = data if critic_data is None else critic_data
            self.critics.eval()
            try:
                y = td_target(data["rewards"], self.critics.v(data["next_obs"]), data["terminated"], self.gamma)
                out.update(critic_validation(self.critics, data, y))
            finally:
                self.critics.train()
        return out

    def workflow_metrics(self, train_sample: Mapping[str, torch.Tensor],
                         val: Optional[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """The offline RL workflow's curves (see :func:`workflow_metrics`); empty without critics."""
        if self.critics is None:
            return {}
        return workflow_metrics(self.actor, self.critics, self.bootstrap_target, train_sample, val)

    # ------------------------------------------------------------ checkpoint
    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {}
        if self.actor is not None:
            mods["actor"] = self.actor
        if self.critics is not None:
            mods["critics"] = self.critics
        return mods

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {k: o for k, o in (("actor", self.actor_opt), ("critics", self.critic_opt)) if o is not None}


@torch.no_grad()
def critic_validation(critics: Critics, data: Mapping[str, torch.Tensor], y: torch.Tensor) -> dict[str, float]:
    """Held-out critic metrics against the TD target ``y``: td_error, mean V / Q / advantage, mc_error."""
    v = critics.v(data["obs"])
    q = critics.q.min(data["obs"], data["actions"])
    return dict(td_error=float((q - y).pow(2).mean()), v_mean=float(v.mean()), q_mean=float(q.mean()),
                mc_error=float((v - data["mc_return"]).pow(2).mean()),
                adv_mean=float((q - v).mean()), adv_std=float((q - v).std()) if q.numel() > 1 else 0.0)


@torch.no_grad()
def workflow_metrics(actor: Optional[GaussianActor], critics: Critics,
                     target: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
                     train_sample: Mapping[str, torch.Tensor],
                     val: Optional[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """The curves of Kumar et al.'s workflow, in eval mode (no dropout noise, the bottleneck's mean):

    * ``dataset_q_{train,val}``: mean ``min_i Q_i(s, a)`` over dataset transitions;
    * ``td_error_{train,val}``: ``mean_i E (Q_i(s, a) - y)^2`` with ``y = target(batch)``, the learner's own
      regression target (for critic_mc the MC return);
    * ``policy_q``: mean ``min_i Q_i(s, mu(s))`` on held-out states (the actor's mean action);
    * ``action_mse``: ``E ||mu(s) - a||^2`` on held-out transitions.

    ``val`` None (no held-out episodes) leaves the held-out curves out; ``policy_q`` and ``action_mse`` then
    use the training sample.
    """
    was = critics.training
    critics.eval()
    if actor is not None:
        actor_was = actor.training
        actor.eval()
    out: dict[str, float] = {}
    try:
        for name, d in (("train", train_sample), ("val", val)):
            if d is None:
                continue
            qs = critics.q(d["obs"], d["actions"])
            y = target(d)
            out[f"dataset_q_{name}"] = float(qs.min(0).values.mean())
            out[f"td_error_{name}"] = float((qs - y.unsqueeze(0)).pow(2).mean())
        if actor is not None:
            d = val if val is not None else train_sample
            mu, _ = actor.act(d["obs"], deterministic=True)
            out["policy_q"] = float(critics.q.min(d["obs"], mu).mean())
            out["action_mse"] = float((mu - d["actions"]).pow(2).sum(-1).mean())
    finally:
        critics.train(was)
        if actor is not None:
            actor.train(actor_was)
    return out
