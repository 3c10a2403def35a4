"""Metric names, defined once. Loggers refuse names that are not declared here.

Namespaces: ``eval/`` deterministic evaluation, ``rollout/`` episodes of the behaviour policy,
``train/`` and ``losses/`` optimisation, ``charts/`` diagnostics, ``time/`` throughput.
"""

from __future__ import annotations

# evaluation
EVAL_SUCCESS_RATE = "eval/success_rate"
EVAL_SUCCESS_ONCE = "eval/success_once"
EVAL_RETURN = "eval/return"
EVAL_EPISODE_LENGTH = "eval/episode_length"

# episodes finished by rollouts of the behaviour policy
ROLLOUT_SUCCESS_RATE = "rollout/success_rate"
ROLLOUT_SUCCESS_ONCE = "rollout/success_once"
ROLLOUT_RETURN = "rollout/return"
ROLLOUT_EPISODE_LENGTH = "rollout/episode_length"
ROLLOUT_EPISODES = "rollout/episodes"
POLICY_LAG = "rollout/policy_lag"  # updates between the policy that collected a round and the one it trains

# optimisation
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
VAL_LOSS = "train/val_loss"
POLICY_LOSS = "losses/policy_loss"
VALUE_LOSS = "losses/value_loss"
APPROX_KL = "losses/approx_kl"
# replay path: KL(pi_before || pi_after) of the round's updates on the states of its first minibatch (on
# that path approx_kl compares with each row's own, possibly stale, behaviour log-prob and is no step size)
ROUND_KL = "losses/round_kl"
CLIPFRAC = "losses/clipfrac"

# offline pretraining (step = epoch)
TRAIN_ACTOR_LOSS = "train/actor_loss"
TRAIN_V_LOSS = "train/v_loss"
TRAIN_Q_LOSS = "train/q_loss"
TRAIN_Q_MEAN = "train/q_mean"
TRAIN_V_MEAN = "train/v_mean"
TRAIN_WEIGHT_MEAN = "train/awr_weight_mean"
TRAIN_GRAD_STEPS = "train/grad_steps"
TRAIN_VIB_KL = "train/vib_kl"
TRAIN_DR3 = "train/dr3"
TRAIN_ENTROPY = "train/entropy"
TRAIN_ENTROPY_ALPHA = "train/entropy_alpha"
TRAIN_CQL_ALPHA = "train/cql_alpha"
VAL_ACTOR_LOSS = "val/actor_loss"
VAL_TD_ERROR = "val/td_error"
VAL_MC_ERROR = "val/mc_error"
VAL_Q_MEAN = "val/q_mean"
VAL_V_MEAN = "val/v_mean"
VAL_ADVANTAGE_MEAN = "val/advantage_mean"
VAL_ADVANTAGE_STD = "val/advantage_std"
VAL_ACTION_MSE = "val/action_mse"

# offline RL workflow (Kumar et al. 2021; step = epoch): the curves `offrl workflow` reads
WF_DATASET_Q_TRAIN = "workflow/dataset_q_train"      # mean min_i Q_i(s, a) over a fixed sample of training transitions
WF_DATASET_Q_VAL = "workflow/dataset_q_val"          # the same on held-out episodes
WF_POLICY_Q = "workflow/policy_q"                    # mean min_i Q_i(s, mu(s)) on held-out states
WF_TD_ERROR_TRAIN = "workflow/td_error_train"        # mean squared TD error on the fixed training sample
WF_TD_ERROR_VAL = "workflow/td_error_val"            # the same on held-out episodes
WF_CQL_REGULARIZER = "workflow/cql_regularizer"      # CQL's gap: logsumexp_a Q(s, a) - Q(s, a_data), epoch mean
WF_BRAC_DIVERGENCE = "workflow/brac_divergence"      # BRAC's divergence from the behaviour policy, epoch mean
WF_ACTION_MSE = "workflow/action_mse"                # ||mu(s) - a_data||^2 on held-out episodes

# online finetuning (step = env steps of the main rollouts)
ENTROPY = "losses/entropy"
CRITIC_LOSS = "losses/critic_loss"
BC_LOSS = "losses/bc_loss"
BC_WEIGHT = "charts/bc_weight"                      # the DAPG term's weight this round (bc_coef * bc_decay**round)
BC_KEPT = "charts/bc_kept"                          # sac with bc_q_filter: share of demo rows the Q filter keeps
REF_KL = "losses/ref_kl"                             # KL(start policy || policy) on the minibatches (ref_kl_coef > 0)
OFFLINE_FRACTION = "charts/offline_fraction"
GRAD_STEPS = "charts/grad_steps"
REPLAY_SIZE = "charts/replay_size"
HER_REACHED = "charts/her_reached"                  # share of a round's hindsight-relabelled copies that reach their goal
SAC_ALPHA = "charts/sac_alpha"
SAC_ACTOR_STEPS = "charts/sac_actor_steps"          # actor steps a round took before target_kl ended them
Q_MEAN = "charts/q_mean"
MC_Q_MEAN = "charts/mc_q_mean"
MC_V_MEAN = "charts/mc_v_mean"
MC_RELIABILITY = "charts/mc_reliability"            # share of the round's MC advantage spread that is not sampling noise
MC_NOISE_STD = "charts/mc_noise_std"                # sampling noise of one pair's MC advantage (std)
ADVANTAGE_SAMPLES = "charts/advantage_samples"
REROLLOUT_STEPS = "time/rerollout_steps"
UPDATE_EPOCHS = "charts/update_epochs"
RECAP_POSITIVE = "charts/recap_positive_fraction"   # samples labelled I = positive (before the drop-out)
RECAP_THRESHOLD = "charts/recap_threshold"          # the advantage threshold of the indicator
RECAP_DROPPED = "charts/recap_dropped_fraction"     # samples whose indicator was replaced by none

# diagnostics
ADVANTAGE_MEAN = "charts/advantage_mean"
ADVANTAGE_STD = "charts/advantage_std"
POS_RATIO = "charts/pos_ratio"

# throughput
ENV_SPS = "time/env_sps"
REROLLOUT_SPS = "time/rerollout_sps"
ITERATION_SECONDS = "time/iteration_seconds"
ROLLOUT_WAIT_SECONDS = "time/rollout_wait_seconds"  # a finetuning round's wait for its rollout (finetune.overlap)
UPDATE_SECONDS = "time/update_seconds"  # the learner's share of a finetuning round (its gradient steps)
ENV_STEPS = "time/env_steps"

ALL: frozenset[str] = frozenset(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str))


def check(name: str) -> str:
    """Return ``name`` if it is a declared metric, else raise KeyError (a programming error)."""
    if name not in ALL:
        raise KeyError(f"metric '{name}' is not declared in offrl.metrics")
    return name
