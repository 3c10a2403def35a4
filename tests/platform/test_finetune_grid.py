"""bench/finetune_grid.py's table, read back from a real (tiny) finetuning run."""


def test_grid_table_reads_success_auc_and_rollout_trend_from_the_run(tmp_path, tiny_bc_iql_run):
    import csv
    import json
    import subprocess
    import sys

    from conftest import ROOT

    from offrl.config import load_config
    from offrl.platform.finetune import run_finetune_job

    run = run_finetune_job(load_config(None, [
        f"finetune.checkpoint={tiny_bc_iql_run}", "finetune.advantage=gae", "finetune.update=ppo",
        "finetune.bc_coef=0.1", "finetune.iterations=4", "finetune.steps_per_iter=6", "finetune.eval_every=2",
        "finetune.eval_episodes=2", "finetune.value_warmup_iters=1", "env.num_envs=2", "cluster.num_hosts=1",
        "env.max_episode_steps=6",  # every round ends its episodes, so each logs a rollout success
        f"run.root={tmp_path}", "run.experiment=finetune", "run.trial=gae_ppo_offline_seed0", "run.progress=false",
        "run.tensorboard=false"]), log=lambda *a: None)
    r = subprocess.run([sys.executable, "bench/finetune_grid.py", "--from-dir", str(tmp_path)], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    header, _, row = r.stdout.strip().splitlines()
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    summary = json.loads((run / "finetune_summary.json").read_text())
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    rollouts = [float(x["rollout/success_rate"]) for x in rows if x.get("rollout/success_rate")]
    assert len(rollouts) == 4  # one per round; 4 rounds -> the first 2 and the last 2
    first, last = sum(rollouts[:2]) / 2, sum(rollouts[-2:]) / 2
    assert cells["rollouts, first -> last 10 rounds"] == f"{first:.2f} -> {last:.2f}"
    assert (cells["advantage"], cells["update"], cells["mode"], cells["seed"]) == ("gae", "ppo", "offline", "0")
    assert cells["success after"] == f"{summary['success_after']:.2f}"
    evals = [(float(x["step"]), float(x["eval/success_rate"])) for x in rows if x.get("eval/success_rate")]
    assert [s for s, _ in evals] == [0, 24, 48]  # eval every 2 rounds of 6 steps x 2 envs
    auc = ((evals[1][1] + evals[0][1]) / 2 + (evals[2][1] + evals[1][1]) / 2) / 2
    assert cells["AUC"] == f"{auc:.2f}"
    assert cells["env steps"] == "48" and cells["re-rollout steps"] == "0"


def test_rollout_trend_means_the_first_and_last_ten_rounds(tmp_path):
    """_rollouts: rows without a rollout success (evaluation-only rows) are skipped; ten rounds a side, or half
    of a shorter run."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from finetune_grid import _rollouts

    lines = ["step,eval/success_rate,rollout/success_rate", "0,0.5,"]
    lines += [f"{i + 1},,{i / 100}" for i in range(25)]
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    first, last = _rollouts(tmp_path)
    assert abs(first - 0.045) < 1e-12 and abs(last - 0.195) < 1e-12  # mean of 0..9 and of 15..24, /100
    first, last = _rollouts(tmp_path, k=30)  # more than the run has: half each
    assert abs(first - 0.055) < 1e-12 and abs(last - 0.185) < 1e-12  # 0..11 and 13..24
    (tmp_path / "metrics.csv").write_text("step,eval/success_rate\n0,0.5\n")
    assert _rollouts(tmp_path) is None


def test_cell_overrides_apply_to_the_matching_cells_only():
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from finetune_grid import _cell_overrides, _parse_cells

    cells = _parse_cells(["mc:*:finetune.mc_v_actions=true", "iql:ppo:finetune.ref_kl_coef=1.0",
                          "*:ppo:finetune.target_kl=0.02", "sarsa:ppo:a.b=x:y=z"], {"gae", "mc", "iql", "sarsa", "sac"},
                         {"ppo", "awr", "push_away", "sac"})
    assert _cell_overrides(cells, "mc", "awr") == ["finetune.mc_v_actions=true"]
    assert _cell_overrides(cells, "mc", "ppo") == ["finetune.mc_v_actions=true", "finetune.target_kl=0.02"]
    assert _cell_overrides(cells, "iql", "ppo") == ["finetune.ref_kl_coef=1.0", "finetune.target_kl=0.02"]
    assert _cell_overrides(cells, "sarsa", "ppo") == ["finetune.target_kl=0.02", "a.b=x:y=z"]  # value keeps its ':'
    assert _cell_overrides(cells, "gae", "awr") == []


def test_global_overrides_of_the_grids_own_keys_are_named():
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from finetune_grid import _mode_overrides, _shadowed_override

    sac = ["finetune.update=sac", *_mode_overrides("sac", "sac", "offline", 0.1)]
    assert "use --cell ADV:UPDATE:finetune.actor_lr=VALUE" in _shadowed_override(["finetune.actor_lr=1e-4"], sac)
    gae = ["finetune.advantage=gae", "finetune.update=ppo", *_mode_overrides("gae", "ppo", "offline", 0.1)]
    assert _shadowed_override(["finetune.actor_lr=1e-4", "finetune.gamma=0.95"], gae) is None  # reaches gae x ppo
    assert "run.trial" in _shadowed_override(["run.trial=x"], [*gae, "run.trial=gae_ppo_offline_seed0"])


def test_bad_cell_specs_and_cell_configs_are_refused_before_anything_runs(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    for args, msg in [(["--cell", "mc:ppo"], "expected ADV:UPDATE:key=value"),
                      (["--cell", "td:ppo:finetune.gamma=0.9"], "unknown advantage 'td'"),
                      (["--cell", "mc:dqn:finetune.gamma=0.9"], "unknown update 'dqn'"),
                      (["--cell", "iql:ppo:finetune.ref_kl_coef=nan"],
                       "cell iql_ppo_offline_seed0: config key 'finetune.ref_kl_coef': must be a finite number"),
                      # a global override of a key the grid sets itself would be silently replaced
                      (["--", "finetune.bc_coef=0.03"], "cell gae_ppo_offline_seed0: the grid sets finetune.bc_coef "
                       "itself, so the override 'finetune.bc_coef=0.03' would not reach it (use --bc-coef)"),
                      (["--", "seed=3"], "the grid sets seed itself, so the override 'seed=3' would not reach it "
                       "(use --seeds)")]:
        r = subprocess.run([sys.executable, "bench/finetune_grid.py", "--config", "tune_configs/finetune_sparse.yaml",
                            "--advantages", "gae", "iql", "--updates", "ppo", "--modes", "offline", "--root",
                            str(tmp_path / "grid"), *args], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (args, r.stderr[-2000:])
    assert not (tmp_path / "grid").exists()  # refused before the first run: nothing written


def test_cell_settings_reach_only_their_cells_runs(tmp_path, tiny_bc_iql_run):
    """The grid script end to end on two tiny cells: the --cell setting is in the matching run's config and
    not in the other's; a finished run is reused only for the cell it is."""
    import subprocess
    import sys

    import yaml
    from conftest import ROOT

    tiny = [f"finetune.checkpoint={tiny_bc_iql_run}", "finetune.iterations=1", "finetune.steps_per_iter=4",
            "finetune.eval_every=1", "finetune.eval_episodes=1", "finetune.value_warmup_iters=0", "env.num_envs=2",
            "cluster.num_hosts=1", "env.max_episode_steps=4", "run.tensorboard=false"]
    r = subprocess.run([sys.executable, "bench/finetune_grid.py", "--advantages", "gae", "--updates", "ppo", "awr",
                        "--modes", "offline", "--root", str(tmp_path), "--cell", "gae:awr:finetune.beta=0.5", "--",
                        *tiny], cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = {u: yaml.safe_load((tmp_path / "finetune" / f"gae_{u}_offline_seed0" / "config.yaml").read_text())
           for u in ("ppo", "awr")}
    assert cfg["awr"]["finetune"]["beta"] == 0.5 and cfg["ppo"]["finetune"]["beta"] == 1.0
    assert cfg["awr"]["finetune"]["bc_coef"] == 0.1  # the mode's own keys are kept
    rows = [line for line in r.stdout.splitlines() if line.startswith("| gae |")]
    assert [row.split("|")[2].strip() for row in rows] == ["ppo", "awr"]  # one table row per cell
    # the same root without the setting: the finished gae x awr run is not that cell, so nothing is reused or run
    r = subprocess.run([sys.executable, "bench/finetune_grid.py", "--advantages", "gae", "--updates", "ppo", "awr",
                        "--modes", "offline", "--root", str(tmp_path), "--", *tiny], cwd=str(ROOT), capture_output=True,
                        text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert "gae_awr_offline_seed0 is finished but is not this cell: finetune.beta is 0.5 in the run, 1.0 for the cell" \
        in r.stderr


def test_vs_control_pairs_each_cell_with_the_control_on_shared_seeds():
    """_vs_control: only the seeds a cell shares with the control count; P is the Mann-Whitney share of pairs."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from finetune_grid import CONTROL, _vs_control

    def row(adv, upd, seed, after):
        return {"advantage": adv, "update": upd, "seed": seed, "success_after": after, "mode": "offline",
                "recap_w": 0.0}

    rows = [row(*CONTROL, 0, 0.60), row(*CONTROL, 1, 0.50),
            row("gae", "ppo", 0, 0.70), row("gae", "ppo", 1, 0.55), row("gae", "ppo", 2, 0.10),  # seed 2: no control
            row("mc", "awr", 5, 0.90)]  # shares no seed: no row
    assert _vs_control([row("gae", "ppo", 0, 0.7)]) is None  # no control at all
    lines = _vs_control(rows).splitlines()
    assert len(lines) == 3  # header, rule, one cell
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:4] == ["gae", "ppo", "offline", "0 1"]
    assert cells[4:7] == ["0.625", "0.550", "+0.075"]
    # pairs (0.70, 0.55) x (0.60, 0.50): 0.70 beats both, 0.55 beats 0.50 only -> 3 of 4
    assert cells[7].startswith("0.75 [")


def test_control_runs_per_seed_without_cell_settings_and_is_tabulated(tmp_path, tiny_bc_iql_run):
    """--control: one demos-only run per seed (rule_coef 0, the DAPG term on, --cell settings kept out), the
    table against it printed, and --from-dir recognising it from its config."""
    import subprocess
    import sys

    import yaml
    from conftest import ROOT

    tiny = [f"finetune.checkpoint={tiny_bc_iql_run}", "finetune.iterations=1", "finetune.steps_per_iter=4",
            "finetune.eval_every=1", "finetune.eval_episodes=1", "finetune.value_warmup_iters=0", "env.num_envs=2",
            "cluster.num_hosts=1", "env.max_episode_steps=4", "run.tensorboard=false"]
    r = subprocess.run([sys.executable, "bench/finetune_grid.py", "--advantages", "gae", "--updates", "awr",
                        "--modes", "offline", "--root", str(tmp_path), "--control", "--cell",
                        "*:*:finetune.target_kl=0.5", "--", *tiny], cwd=str(ROOT), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ctrl = yaml.safe_load((tmp_path / "finetune" / "control_seed0" / "config.yaml").read_text())["finetune"]
    cell = yaml.safe_load((tmp_path / "finetune" / "gae_awr_offline_seed0" / "config.yaml").read_text())["finetune"]
    assert (ctrl["advantage"], ctrl["update"], ctrl["rule_coef"], ctrl["bc_coef"]) == ("gae", "ppo", 0.0, 0.1)
    assert cell["target_kl"] == 0.5 and ctrl["target_kl"] != 0.5 and cell["rule_coef"] == 1.0
    for out in (r.stdout, (tmp_path / "finetune_grid.md").read_text()):
        assert "| control | demos only | offline | 0 |" in out
        assert "Against the demos-only control" in out
        assert [line.split("|")[4].strip() for line in out.splitlines() if line.startswith("| gae | awr |")] \
            == ["0", "0"]  # the cell's row in the grid table (seed 0), then its row against the control (seeds "0")
    r2 = subprocess.run([sys.executable, "bench/finetune_grid.py", "--from-dir", str(tmp_path)], cwd=str(ROOT),
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "| control | demos only | offline | 0 |" in r2.stdout and "Against the demos-only control" in r2.stdout
