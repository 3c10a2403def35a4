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
