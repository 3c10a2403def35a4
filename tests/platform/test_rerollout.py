"""Monte-Carlo re-rollouts: a tiny deterministic env with known Q and V, and PickCube with the scripted expert."""

import numpy as np
import pytest
import torch

from offrl.algos.advantages import mc_rerollout_advantage
from offrl.platform.rerollout import index_state, rerollout_on_sim, rerollout_pool, stack_states
from offrl.platform.simhost import SimHostImpl, SimHostPool


class ChainSim:
    """N envs on a line 0..L; action > 0 moves right, else left (floored at 0); reward 1 on reaching L (terminal)."""

    def __init__(self, n=3, L=5, max_episode_steps=100):
        self.num_envs, self.L, self.max_episode_steps = n, L, max_episode_steps
        self.obs_dim, self.act_dim = 1, 1
        self.action_low, self.action_high = np.array([-1.0], np.float32), np.array([1.0], np.float32)
        self.x = np.zeros(n, np.int64)
        self.elapsed_steps = np.zeros(n, np.int64)
        self._obs = np.zeros((n, 1), np.float32)

    def _sync(self):
        self._obs[:, 0] = self.x

    def reset(self, seed=None):
        self.x[:] = 0
        self.elapsed_steps[:] = 0
        self._sync()
        return self._obs.copy()

    def step(self, actions):
        self.x = np.where(actions[:, 0] > 0, self.x + 1, np.maximum(self.x - 1, 0))
        self.elapsed_steps += 1
        term = self.x >= self.L
        trunc = (self.elapsed_steps >= self.max_episode_steps) & ~term
        rew = term.astype(np.float32)
        self._sync()
        final = self._obs.copy()
        done = term | trunc
        self.x[done] = 0
        self.elapsed_steps[done] = 0
        self._sync()
        return self._obs.copy(), rew, term, trunc, {"success": term, "final_obs": final, "done": done,
                                                    "elapsed_steps": self.elapsed_steps.copy()}

    def get_state(self, env_ids=None):
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids)
        return {"sim": {"x": self.x[ids].copy()}, "elapsed_steps": self.elapsed_steps[ids].copy(),
                "obs": self._obs[ids].copy()}

    def set_state(self, state, env_ids=None):
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids)
        self.x[ids] = state["sim"]["x"]
        self.elapsed_steps[ids] = state["elapsed_steps"]
        self._sync()
        return self._obs[ids].copy()


def go_right(obs, sim):
    return np.ones((obs.shape[0], 1), np.float32), np.zeros(obs.shape[0], np.float32)


def test_mc_estimator_matches_known_q_and_v():
    """From x, going right reaches L after d = L - x steps: V(x) = Q(x, right) = g^(d-1); Q(x, left) = g^(d+1)."""
    sim, g, L = ChainSim(n=3, L=5), 0.9, 5
    xs = np.array([0, 2, 4, 1, 3])
    states = {"sim": {"x": xs}, "elapsed_steps": np.zeros(5, np.int64), "obs": xs[:, None].astype(np.float32)}
    left = -np.ones((5, 1), np.float32)
    q, _ = rerollout_on_sim(sim, go_right, states, left, samples=2, horizon=20, gamma=g)
    v, _ = rerollout_on_sim(sim, go_right, states, None, samples=2, horizon=20, gamma=g)
    d = L - xs
    exp_v = g ** (d - 1)
    # left from 0 stays at 0 (floor): then L more steps
    exp_q = np.where(xs == 0, g ** L, g ** (d + 1))
    np.testing.assert_allclose(v, np.stack([exp_v, exp_v], 1), rtol=1e-12)
    np.testing.assert_allclose(q, np.stack([exp_q, exp_q], 1), rtol=1e-12)
    adv, qm, vm = mc_rerollout_advantage(torch.from_numpy(q), torch.from_numpy(v))
    assert (adv < 0).all()  # stepping left is worse than the policy's right step everywhere
    # horizon cap: with 2 steps nothing further than 2 from L is reached
    v2, _ = rerollout_on_sim(sim, go_right, states, None, samples=1, horizon=2, gamma=g)
    np.testing.assert_allclose(v2[:, 0], np.where(d <= 2, g ** (d - 1), 0.0))


def test_full_horizon_default_runs_to_the_time_limit():
    """horizon=None: each re-rollout runs the remaining ``M - elapsed`` steps of its episode. From x with
    d = L - x steps to go and e steps already taken, V = g^(d-1) when d <= M - e, else 0 (cut by the limit)."""
    M, L, g = 8, 5, 0.9
    sim = ChainSim(n=4, L=L, max_episode_steps=M)
    xs = np.array([0, 0, 2, 3, 1, 4])
    el = np.array([0, 4, 5, 6, 2, 7])
    states = {"sim": {"x": xs}, "elapsed_steps": el, "obs": xs[:, None].astype(np.float32)}
    v, steps = rerollout_on_sim(sim, go_right, states, None, samples=1, horizon=None, gamma=g)
    d = L - xs
    np.testing.assert_allclose(v[:, 0], np.where(d <= M - el, g ** (d - 1), 0.0), rtol=1e-12)
    assert steps == int(np.minimum(d, M - el).sum())  # every job stopped at success or at its time limit
    # a cap shorter than the remaining episode loses the far successes (the truncation bias)
    v3, _ = rerollout_on_sim(sim, go_right, states, None, samples=1, horizon=3, gamma=g)
    np.testing.assert_allclose(v3[:, 0], np.where((d <= M - el) & (d <= 3), g ** (d - 1), 0.0), rtol=1e-12)
    assert (v3 <= v).all() and (v3 < v).any()


class CountingChainSim(ChainSim):
    """ChainSim that counts the env steps it takes."""

    stepped = 0

    def step(self, actions):
        self.stepped += self.num_envs
        return super().step(actions)


class ActiveChainSim(CountingChainSim):
    """... and can step a subset of its envs without resetting any, as the CPU backend can."""

    def step_active(self, actions, active):
        self.stepped += int(active.sum())
        moved = np.where(actions[:, 0] > 0, self.x + 1, np.maximum(self.x - 1, 0))
        self.x = np.where(active, moved, self.x)
        self.elapsed_steps = self.elapsed_steps + active
        term = active & (self.x >= self.L)
        trunc = active & (self.elapsed_steps >= self.max_episode_steps) & ~term
        self._sync()
        obs = self._obs.copy()
        return obs, term.astype(np.float32), term, trunc, {"success": term, "final_obs": obs, "done": term | trunc,
                                                           "elapsed_steps": self.elapsed_steps.copy()}


def test_rerollouts_step_only_live_envs_where_the_sim_can():
    """With ``step_active`` the re-rollouts give the same returns and take only their live steps; a sim
    without it steps every env until the chunk's longest re-rollout ends."""
    M, L, g = 8, 5, 0.9
    xs = np.array([0, 0, 2, 3, 1, 4, 4])
    el = np.array([0, 4, 5, 6, 2, 7, 0])
    states = {"sim": {"x": xs}, "elapsed_steps": el, "obs": xs[:, None].astype(np.float32)}
    plain, live = CountingChainSim(n=4, L=L, max_episode_steps=M), ActiveChainSim(n=4, L=L, max_episode_steps=M)
    v0, s0 = rerollout_on_sim(plain, go_right, states, None, samples=2, horizon=None, gamma=g)
    v1, s1 = rerollout_on_sim(live, go_right, states, None, samples=2, horizon=None, gamma=g)
    d = L - xs
    np.testing.assert_allclose(v1[:, 0], np.where(d <= M - el, g ** (d - 1), 0.0), rtol=1e-12)
    np.testing.assert_array_equal(v0, v1)
    assert s0 == s1 == live.stepped == 2 * int(np.minimum(d, M - el).sum())
    assert live.stepped == 40 and plain.stepped == 4 * (5 + 3 + 4 + 1)  # chunks of 4 jobs: longest 5, 3, 4, 1


def test_success_bonus_in_rerollout_returns():
    """Reaching L is a successful termination: its reward 1 becomes 1 + bonus, discounted like the reward."""
    sim, g, L, b = ChainSim(n=2, L=5), 0.9, 5, 3.0
    xs = np.array([0, 3])
    states = {"sim": {"x": xs}, "elapsed_steps": np.zeros(2, np.int64), "obs": xs[:, None].astype(np.float32)}
    v, _ = rerollout_on_sim(sim, go_right, states, None, samples=1, horizon=20, gamma=g, success_bonus=b)
    np.testing.assert_allclose(v[:, 0], g ** (L - xs - 1) * (1 + b), rtol=1e-12)
    # no success within the horizon: no bonus either
    v0, _ = rerollout_on_sim(sim, go_right, states, None, samples=1, horizon=1, gamma=g, success_bonus=b)
    np.testing.assert_allclose(v0[:, 0], 0.0)


def test_state_tree_helpers():
    s = {"sim": {"a": np.arange(6).reshape(3, 2)}, "elapsed_steps": np.array([1, 2, 3])}
    one = index_state(s, 1)
    assert one["sim"]["a"].shape == (1, 2) and one["elapsed_steps"].tolist() == [2]
    both = stack_states([one, index_state(s, 2)])
    assert both["sim"]["a"].tolist() == [[2, 3], [4, 5]]


def test_pickcube_expert_rerollouts_give_its_discounted_return(ray_cluster):
    """V(s0) by re-rollouts with the scripted expert inside SimHost actors = the expert's own discounted return."""
    from offrl.config import load_config

    gamma = 0.8
    cfg = load_config(None, ["env.num_envs=2", "cluster.num_hosts=2", "env.reward_mode=sparse"])
    pool = SimHostPool(cfg.env, cfg.cluster, seed=5)
    try:
        expert = {"kind": "expert", "name": "auto"}
        res = pool.rollout(expert, 50, reset_seed=5, record_states=True)
        for start in (0, 12):  # from the first state, and mid-episode (the expert resumes its phase)
            states, returns = [], []
            for r in res:
                for n in range(r["obs"].shape[1]):
                    end = int(np.flatnonzero(r["terminated"][:, n] | r["truncated"][:, n])[0])
                    assert end > start
                    rew = r["rewards"][start: end + 1, n]
                    returns.append(float(sum(gamma ** k * x for k, x in enumerate(rew))))
                    states.append(index_state(r["states"][start], n))
            assert all(x > 0 for x in returns)  # the expert solved every episode
            out = rerollout_pool(pool, expert, stack_states(states), None, samples=1, horizon=50, gamma=gamma)
            ratio = out["q"][:, 0] / np.array(returns)
            if start == 0:  # the same episode again, up to physics noise
                np.testing.assert_allclose(ratio, 1.0, rtol=0.15)
            else:  # mid-episode the expert re-enters its state machine: success within 5 steps of the original
                assert ((ratio > gamma ** 5 - 1e-9) & (ratio < gamma ** -5 + 1e-9)).all(), ratio
            assert out["steps"] > 0
    finally:
        pool.shutdown()


def test_rerollouts_leave_the_main_rollout_alone():
    a = SimHostImpl({"num_envs": 2}, seed=3)
    b = SimHostImpl({"num_envs": 2}, seed=3)
    spec = {"kind": "random"}
    ra = a.rollout(spec, 6, policy_seed=1)
    rb = b.rollout(spec, 6, policy_seed=1)
    np.testing.assert_array_equal(ra["obs"], rb["obs"])
    from offrl.platform.rerollout import rerollout_on_host

    st = stack_states([index_state(ra["states"][0], 0)]) if "states" in ra else stack_states([a.snapshot([0])])
    rerollout_on_host(a, spec, st, np.zeros((1, 4), np.float32), 2, 5, 0.9, seed=0)
    ca = a.rollout(spec, 6, policy_seed=2)
    cb = b.rollout(spec, 6, policy_seed=2)
    np.testing.assert_allclose(ca["obs"], cb["obs"], atol=1e-3)  # restored (contact caches are not saved)
    assert a.tracker.length.tolist() == b.tracker.length.tolist()
    a.close()
    b.close()


def test_rebuilt_host_rerolls_like_a_fresh_one():
    """A host that has run episodes, evaluations and re-rollouts, rebuilt at a reset, rolls out and re-rolls
    bit for bit like a host that has run nothing (finetuning's exact resume relies on it)."""
    from offrl.platform.rerollout import rerollout_on_host

    cfg = {"num_envs": 2, "reward_mode": "sparse"}
    used, fresh = SimHostImpl(cfg, seed=4), SimHostImpl(cfg, seed=4)
    spec = {"kind": "expert", "name": "auto", "kwargs": {"action_noise": 0.3}}
    warm = used.rollout(spec, 60, policy_seed=9, record_states=True)
    rerollout_on_host(used, spec, stack_states([index_state(warm["states"][t], 1) for t in (7, 20)]), None, 2, None,
                      0.8, seed=1)
    outs = []
    for h in (used, fresh):
        h.rebuild()
        r = h.rollout(spec, 25, reset_seed=11, record_states=True, policy_seed=5)
        st = stack_states([index_state(r["states"][t], n) for t in (5, 15) for n in range(2)])
        acts = np.stack([r["actions"][t, n] for t in (5, 15) for n in range(2)]).astype(np.float32)
        outs.append((r["obs"], rerollout_on_host(h, spec, st, acts, 2, None, 0.8, seed=2)))
    (oa, ra), (ob, rb) = outs
    np.testing.assert_array_equal(oa, ob)
    np.testing.assert_array_equal(ra["q"], rb["q"])
    np.testing.assert_array_equal(ra["v"], rb["v"])
    assert ra["steps"] == rb["steps"] > 0
    used.close()
    fresh.close()


def noisy_walk(obs, sim, noise=None, rng=np.random.default_rng(0)):
    """A Gaussian chain policy, mean 0.3, std 1: right when its draw is positive (draws from ``noise`` if given)."""
    eps = rng.standard_normal((obs.shape[0], 1)).astype(np.float32) if noise is None else noise
    return (0.3 + eps).astype(np.float32), np.zeros(obs.shape[0], np.float32)


def test_common_noise_pairs_q_and_v_samples_on_the_chain():
    """Common random numbers: sample m of Q(x, right) and of V(x) share every policy draw, so the walk after
    the first step is the same one, started one place further right (or the same place, where V's first draw
    also went right). Q_m - V_m is then never negative and exactly 0 where V stepped right; with independent
    draws the per-sample differences take both signs."""
    L, g, S, H = 6, 0.9, 64, 40
    sim = ChainSim(n=8, L=L, max_episode_steps=H)
    xs = np.array([1, 2, 3])
    states = {"sim": {"x": xs}, "elapsed_steps": np.zeros(3, np.int64), "obs": xs[:, None].astype(np.float32)}
    right = np.ones((3, 1), np.float32)
    noise = np.random.default_rng(7).standard_normal((3, S, H, 1)).astype(np.float32)
    q, _ = rerollout_on_sim(sim, noisy_walk, states, right, samples=S, horizon=H, gamma=g, noise=noise)
    v, _ = rerollout_on_sim(sim, noisy_walk, states, None, samples=S, horizon=H, gamma=g, noise=noise)
    d = q - v
    v_right = 0.3 + noise[:, :, 0, 0] > 0
    assert (d >= 0).all()
    np.testing.assert_array_equal(d[v_right], 0.0)
    assert (d[~v_right] > 0).any()
    qi, _ = rerollout_on_sim(sim, noisy_walk, states, right, samples=S, horizon=H, gamma=g)
    vi, _ = rerollout_on_sim(sim, noisy_walk, states, None, samples=S, horizon=H, gamma=g)
    assert ((qi - vi) < 0).any() and ((qi - vi) > 0).any()
    with pytest.raises(ValueError, match="noise covers 5 steps"):
        rerollout_on_sim(sim, noisy_walk, states, right, samples=S, horizon=H, gamma=g, noise=noise[:, :, :5])


def _gaussian_pickcube_jobs(steps, times):
    """A real PickCube host (3 envs) rolled out ``steps`` by a small Gaussian MLP with recorded states; returns
    (host, spec, env info, the saved states of (t, n) for t in ``times``, their observations, their actions)."""
    from offrl.algos.networks import GaussianActor
    from offrl.platform.pretrain import actor_spec

    host = SimHostImpl({"num_envs": 3, "reward_mode": "normalized_dense"}, seed=2)
    try:
        info = host.spec()
        arch = {"obs_dim": info["obs_dim"], "act_dim": info["act_dim"], "hidden": [32, 32], "log_std_init": -1.0}
        torch.manual_seed(0)
        spec = actor_spec(GaussianActor(**arch), arch, deterministic=False)
        r = host.rollout(spec, steps, reset_seed=3, record_states=True, policy_seed=1)
    except BaseException:
        host.close()
        raise
    jobs = [(t, n) for t in times for n in range(3)]
    st = stack_states([index_state(r["states"][t], n) for t, n in jobs])
    obs = np.stack([r["obs"][t, n] for t, n in jobs]).astype(np.float32)
    acts = np.stack([r["actions"][t, n] for t, n in jobs]).astype(np.float32)
    return host, spec, info, st, obs, acts


def test_common_noise_on_pickcube_hosts():
    """On a real PickCube host with a Gaussian MLP policy: when a job's given first action is the one V's
    sample would draw from the shared noise table, Q's and V's re-rollouts take the same actions throughout and
    return the same; a chunked policy or the expert is refused."""
    from offrl.platform.rerollout import rerollout_on_host
    from offrl.platform.rollout import MLPPolicy

    host, spec, info, st, obs, _ = _gaussian_pickcube_jobs(12, (2, 9))
    try:
        seed, H = 11, 6
        table = np.random.default_rng(seed).standard_normal((len(obs), 1, H, info["act_dim"]), dtype=np.float32)
        first, _ = MLPPolicy(spec["arch"], spec["weights"])(obs, None, noise=table[:, 0, 0])
        out = rerollout_on_host(host, spec, st, first, 1, H, 0.8, seed=seed, common_noise=True)
        np.testing.assert_allclose(out["q"], out["v"], rtol=1e-4, atol=1e-5)
        other = rerollout_on_host(host, spec, st, -first, 1, H, 0.8, seed=seed, common_noise=True)
        assert not np.allclose(other["q"], other["v"], rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="Gaussian MLP"):
            rerollout_on_host(host, {"kind": "expert", "name": "auto"}, st, first, 1, H, 0.8, seed=seed,
                              common_noise=True)
    finally:
        host.close()


def test_mc_common_noise_refuses_a_policy_without_gaussian_noise():
    """A fixed re-rollout checkpoint that is a chunked or diffusion policy has no per-step Gaussian draws to share."""
    from offrl.config import load_config
    from offrl.errors import OffrlError
    from offrl.platform.estimators import mc_advantages

    fc = load_config(None, ["finetune.mc_common_noise=true"]).finetune
    for spec in ({"kind": "mlp_chunk"}, {"kind": "mlp", "deterministic": True}):
        with pytest.raises(OffrlError, match="mc_common_noise needs a stochastic Gaussian MLP"):
            mc_advantages(None, [], {}, spec, fc, np.random.default_rng(0), seed=0)


def test_v_first_actions_on_pickcube_hosts():
    """finetune.mc_v_actions: V's re-rollouts report their first step (the restored observation, the action
    taken, its raw draw and log-prob under the policy). Re-rolling Q from the recorded action with the same
    noise table returns exactly V's returns, so the recorded action is the one whose return V measured."""
    from offrl.platform.rerollout import rerollout_on_host
    from offrl.platform.rollout import MLPPolicy

    host, spec, info, st, obs, acts = _gaussian_pickcube_jobs(10, (1, 7))
    try:
        S, H, seed = 2, 6, 5
        out = rerollout_on_host(host, spec, st, acts, S, H, 0.8, seed=seed, common_noise=True, v_actions=True)
        first = out["v_first"]
        assert first["obs"].shape == (6, S, info["obs_dim"]) and first["raw_actions"].shape == (6, S, info["act_dim"])
        np.testing.assert_allclose(first["obs"], np.repeat(obs[:, None], S, 1), atol=1e-5)
        net = MLPPolicy(spec["arch"], spec["weights"]).net
        with torch.no_grad():
            lp = net.log_prob(torch.from_numpy(first["obs"].reshape(-1, info["obs_dim"])),
                              torch.from_numpy(first["raw_actions"].reshape(-1, info["act_dim"])))
        np.testing.assert_allclose(first["logprob"].reshape(-1), lp.numpy(), rtol=1e-4, atol=1e-4)
        assert len({tuple(a) for a in first["actions"].reshape(-1, info["act_dim"]).round(5)}) == 6 * S  # fresh draws
        for m in range(S):
            again = rerollout_on_host(host, spec, st, first["actions"][:, m], S, H, 0.8, seed=seed, common_noise=True)
            np.testing.assert_allclose(again["q"][:, m], out["v"][:, m], rtol=1e-4, atol=1e-5)
        assert "v_first" not in rerollout_on_host(host, spec, st, acts, 1, H, 0.8, seed=seed)
        with pytest.raises(ValueError, match="V's first actions needs a stochastic Gaussian MLP"):
            rerollout_on_host(host, {"kind": "expert", "name": "auto"}, st, acts, 1, H, 0.8, seed=seed,
                              v_actions=True)
    finally:
        host.close()
