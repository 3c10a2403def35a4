"""bench/failure_modes.py on a real policy in real ManiSkill."""


def test_failure_modes_asks_the_expert_about_stalled_episodes(tmp_path, tiny_bc_iql_run):
    """bench/failure_modes.py on a barely trained policy: every episode is sorted, and each grasped-not-placed
    episode that still holds the cube carries the stall judgement (the policy's and the expert's arm command)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "modes.json"
    r = subprocess.run([sys.executable, "bench/failure_modes.py", str(tiny_bc_iql_run), "--episodes", "3",
                        "--steps", "12", "--out", str(out)], cwd=str(ROOT), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    eps = json.loads(out.read_text())["episodes"]
    assert len(eps) == 3
    kinds = {"success", "placed_not_static", "grasped_not_placed", "never_grasped"}
    assert all(e["kind"] in kinds for e in eps)
    for e in eps:
        if "stalled" in e:
            assert e["kind"] == "grasped_not_placed" and len(e["expert_command"]) == 3
            assert e["stalled"] == (e["policy_arm_command"] < 0.05 and e["expert_arm_command"] > 0.2)


def test_critic_view_reads_sacs_q_ensemble(tmp_path, tiny_bc_iql_run):
    """The Q comparison at stalled states: a sac checkpoint's ensemble answers Q and dQ/da; a policy without
    sac's critics gives None, and the script runs on the sac checkpoint."""
    import json
    import subprocess
    import sys

    import numpy as np
    import torch
    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from failure_modes import critic_view

    from offrl.algos.sac import SACCritics
    from offrl.config import load_config
    from offrl.platform.checkpoint import checkpoint_json, latest_checkpoint, load_checkpoint, resolve_checkpoint
    from offrl.platform.finetune import run_finetune_job

    run = run_finetune_job(load_config(None, [
        f"finetune.checkpoint={tiny_bc_iql_run}", "finetune.update=sac", "finetune.replay=true",
        "finetune.sac_ensemble=2", "finetune.iterations=2", "finetune.steps_per_iter=4", "finetune.eval_every=2",
        "finetune.eval_episodes=1", "finetune.value_warmup_iters=0", "finetune.updates_per_round=2",
        "finetune.batch_size=16", "env.num_envs=1", "cluster.num_hosts=1", f"run.root={tmp_path}",
        "run.progress=false", "run.tensorboard=false"]), log=lambda *a: None)
    ckpt = latest_checkpoint(run / "checkpoints")
    arch = checkpoint_json(ckpt, "training_state/state.json")["actor_arch"]
    cfg = checkpoint_json(ckpt, "config.json")
    q = critic_view(ckpt, arch, cfg)
    obs, act = np.linspace(-1, 1, arch["obs_dim"]), np.array([0.1, -0.2, 0.3, 0.0])
    value, grad = q(obs, act)
    critics = SACCritics(arch["obs_dim"], 4, cfg["critic"]["hidden"], cfg["critic"]["activation"], 2, True, 1e-3)
    load_checkpoint(ckpt, {"sac_critics": critics}, parts=["sac_critics"], restore_rng=False)
    with torch.no_grad():
        want = critics.q(torch.tensor(obs, dtype=torch.float32)[None], torch.tensor(act, dtype=torch.float32)[None])
    assert abs(value - float(want.mean())) < 1e-5 and grad.shape == (4,) and np.isfinite(grad).all()
    bc = resolve_checkpoint(tiny_bc_iql_run)
    assert critic_view(bc, checkpoint_json(bc, "training_state/state.json")["actor_arch"],
                       checkpoint_json(bc, "config.json")) is None
    out = tmp_path / "modes.json"
    r = subprocess.run([sys.executable, "bench/failure_modes.py", str(ckpt), "--episodes", "2", "--steps", "8",
                        "--out", str(out)], cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads(out.read_text())["episodes"]) == 2
