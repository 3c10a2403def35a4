"""Bad inputs, one class each: every one is refused with one line naming the problem (exit 2 from the
CLI, no traceback) and leaves nothing half-written behind.

No Ray cluster is started here: each check has to fire before Ray would start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, run_cli
from offrl.cli import main
from offrl.config import ExperimentConfig, load_config, to_dict
from offrl.errors import ConfigError, OffrlError


def _one_error_line(capsys) -> str:
    """The single ``offrl: error:`` line the CLI printed (asserting there is exactly one stderr line)."""
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("offrl: error: "), err
    return err[0]


def _episode(T: int, obs_dim: int, act_dim: int, seed: int):
    from offrl.data.format import Episode

    rng = np.random.default_rng(seed)
    term = np.zeros(T, bool)
    term[-1] = True
    return Episode(obs=rng.normal(size=(T + 1, obs_dim)).astype(np.float32),
                   actions=rng.uniform(-1, 1, size=(T, act_dim)).astype(np.float32),
                   terminated=term, truncated=np.zeros(T, bool), success=term.copy(),
                   rewards={"rewards": rng.normal(size=T).astype(np.float32)},
                   info={"control_mode": "pd_ee_delta_pos"})


def _dataset(path: Path, n: int = 4) -> Path:
    """A small synthetic PickCube-v1 (pd_ee_delta_pos) dataset written by the real writer."""
    from offrl.data.format import write_trajectories

    meta = {"env_info": {"env_id": "PickCube-v1", "max_episode_steps": 50,
                         "env_kwargs": {"obs_mode": "state", "control_mode": "pd_ee_delta_pos",
                                        "reward_mode": "normalized_dense"}},
            "offrl": {"obs_layout": [["obs", 42]]}}
    return write_trajectories(path, [_episode(8, 42, 4, i) for i in range(n)], meta)


def _checkpoint(root: Path, obs_dim: int = 42, act_dim: int = 4) -> Path:
    """A real checkpoint folder holding a tiny Gaussian actor for ``obs_dim`` observations."""
    from offrl.algos.networks import GaussianActor
    from offrl.platform.checkpoint import save_checkpoint

    arch = dict(obs_dim=obs_dim, act_dim=act_dim, hidden=[8], activation="relu", log_std_init=-0.5, squash="clip",
                action_low=[-1.0] * act_dim, action_high=[1.0] * act_dim, min_log_std=-3.0)
    cfg = to_dict(load_config(None, ["env.num_envs=1", "cluster.num_hosts=1", "run.progress=false"]))
    return save_checkpoint(root, 1, {"actor": GaussianActor(**arch)}, config=cfg, extra_state={"actor_arch": arch})


# ------------------------------------------------------------------------ 1. non-finite floats

def _float_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every float, Optional[float] or tuple-of-float key of the config, found from the annotations."""
    out = []
    for f in dataclasses.fields(cls):
        tp, path = typing.get_type_hints(cls)[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _float_keys(tp, path + ".")
            continue
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        for a in args:
            if a is float or (typing.get_origin(a) is tuple and typing.get_args(a)[0] is float):
                out.append(path)
    return out


FLOAT_KEYS = _float_keys()


def test_the_float_keys_named_in_the_issue_are_found():
    for key in ("pretrain.actor_lr", "finetune.critic_lr", "finetune.clip", "finetune.target_kl",
                "finetune.ent_coef", "finetune.beta", "finetune.max_weight", "policy.log_std_init",
                "finetune.init_log_std", "pretrain.target_tau", "cluster.cpus_per_host", "collect.action_noise",
                "collect.cube_xy_range"):
        assert key in FLOAT_KEYS


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", "-.inf"])
def test_non_finite_floats_are_refused_for_every_float_key(value):
    for key in FLOAT_KEYS:
        tuple_key = key.endswith("_range")
        override = f"{key}=[0, {value}, 0, 1]" if tuple_key else f"{key}={value}"
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        path = f"{key}[1]" if tuple_key else key
        assert e.value.path == path and f"'{path}': must be a finite number" in str(e.value), (key, str(e.value))


@pytest.mark.parametrize("override", ["finetune.clip=inf", "finetune.target_kl=nan", "cluster.cpus_per_host=-inf"])
def test_non_finite_float_from_the_cli_is_one_line(capsys, override):
    assert main(["config", "show", override]) == 2
    line = _one_error_line(capsys)
    assert f"'{override.split('=')[0]}': must be a finite number" in line


def test_non_finite_float_in_a_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("finetune:\n  beta: .inf\n")
    with pytest.raises(ConfigError, match="'finetune.beta': must be a finite number, got inf"):
        load_config(p)


# ------------------------------------------------------------------------ 2. actor construction noise

@pytest.mark.parametrize("override, words", [("env.control_mode=pd_bogus", "control_mode=pd_bogus"),
                                             ("env.obs_mode=rgb", "obs_mode 'rgb'"),
                                             ("env.sim_config={bogus_field: 1}", "env.sim_config")])
def test_bad_controller_or_obs_mode_is_one_line_and_no_actor_starts(tmp_path, override, words):
    r = run_cli("rollout", "tune_configs/rollout.yaml", override, f"run.root={tmp_path / 'runs'}",
                "cluster.num_hosts=1", "env.num_envs=1", timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out and "raylet" not in out and "Ray cluster" not in out, out  # Ray never started
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("offrl: error: ") and words in errors[0], out
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------ 3. evaluation

def test_eval_refuses_a_checkpoint_for_another_observation_size(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ck", obs_dim=5)
    assert main(["eval", str(ckpt), "--episodes", "1"]) == 2
    line = _one_error_line(capsys)
    assert "expects obs/action sizes 5/4" in line and "(42/4)" in line
    assert not list(tmp_path.rglob("eval.json"))


def test_eval_refuses_a_checkpoint_without_config_json(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ck")
    (ckpt / "config.json").unlink()
    assert main(["eval", str(ckpt), "--episodes", "1"]) == 2
    assert f"incomplete checkpoint {ckpt}: no config.json" in _one_error_line(capsys)


@pytest.mark.parametrize("episodes", ["0", "-3"])
def test_eval_refuses_episodes_below_one(tmp_path, capsys, episodes):
    ckpt = _checkpoint(tmp_path / "ck")
    assert main(["eval", str(ckpt), "--episodes", episodes]) == 2
    assert f"--episodes must be >= 1, got {episodes}" in _one_error_line(capsys)


def test_eval_refuses_a_negative_seed(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ck")
    assert main(["eval", str(ckpt), "--episodes", "1", "--seed", "-1"]) == 2
    assert "--seed must be >= 0" in _one_error_line(capsys)
    assert main(["eval", str(ckpt), "--episodes", "1", "eval.seed=-5"]) == 2
    assert "'eval.seed': must be >= 0" in _one_error_line(capsys)


# ------------------------------------------------------------------------ 4. sweeps

def _garble(ckpt: Path, how: str) -> None:
    model = ckpt / "model.safetensors"
    if how == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif how == "garbage":
        model.write_bytes(os.urandom(model.stat().st_size))
    else:
        (ckpt / "config.json").write_text("{not json")


@pytest.mark.parametrize("how, words", [("truncated", "model.safetensors"), ("garbage", "model.safetensors"),
                                        ("config", "config.json is not readable JSON")])
def test_sweep_finds_a_corrupt_start_checkpoint_before_ray(tmp_path, how, words):
    """In a fresh process (this one may hold the session's Ray cluster): one line, exit 2, Ray never
    started, no experiment folder."""
    ckpt = _checkpoint(tmp_path / "ck")
    _garble(ckpt, how)
    storage = tmp_path / "storage"
    r = run_cli("sweep", str(ROOT / "tune_configs" / "quickstart.yaml"), f"finetune.checkpoint={ckpt}",
                "--storage", str(storage), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("offrl: error: "), err
    assert "finetune.checkpoint" in err[0] and f"corrupt checkpoint {ckpt}" in err[0] and words in err[0]
    assert "Traceback" not in r.stdout + r.stderr and "Ray instance" not in r.stdout + r.stderr
    assert not storage.exists()  # no experiment folder


# ------------------------------------------------------------------------ 5. statistics

def _run_dir(root: Path, csv_text: str) -> Path:
    run = root / "exp" / "t0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "finetune": {"advantage": "gae"}}))
    (run / "metrics.csv").write_text(csv_text)
    return run


HEADER = "step,eval/success_rate,losses/policy_loss\n"


@pytest.mark.parametrize("body, where, words", [
    ("0,0.5,0.1\n10,oops,0.2\n", ":3:", "column 'eval/success_rate' holds 'oops', not a number"),
    ("0,0.5,0.1\n10,0.6,0.2,0.3\n", ":3:", "4 cells but the header has 3 columns"),
    ("0,0.5,0.1\n10\n", ":3:", "1 cells but the header has 3 columns"),
])
def test_stats_refuse_a_malformed_metrics_csv_naming_file_and_line(tmp_path, capsys, body, where, words):
    run = _run_dir(tmp_path, HEADER + body)
    rc = main(["stats", "compare", str(tmp_path / "exp"), "--metric", "eval/success_rate",
               "--out", str(tmp_path / "out")])
    assert rc == 2
    line = _one_error_line(capsys)
    assert f"{run / 'metrics.csv'}{where}" in line and words in line
    assert not (tmp_path / "out").exists()


def test_stats_keep_empty_cells_and_nan_values(tmp_path):
    from offrl.stats.load import load_runs

    _run_dir(tmp_path, HEADER + "0,,0.1\n10,0.6,\n20,nan,0.3\n")
    df = load_runs(tmp_path / "exp")
    assert list(df["step"]) == [0, 10, 20]
    assert np.isnan(df["eval/success_rate"][0]) and df["eval/success_rate"][1] == 0.6
    assert np.isnan(df["losses/policy_loss"][1])


# ------------------------------------------------------------------------ 6. leftovers

def test_a_killed_dataset_write_leaves_temps_the_next_write_removes(tmp_path, capsys):
    from offrl.data.format import read_trajectories

    target = tmp_path / "demos.h5"
    # a writer SIGKILLed mid-write: its temporary files stay behind under its pid
    child = subprocess.run([sys.executable, "-c",
                            "import os, signal\n"
                            f"for ext in ('h5', 'json'):\n"
                            f"    open(os.path.join({str(tmp_path)!r}, f'.demos.tmp-{{os.getpid()}}.{{ext}}'), 'w')"
                            ".write('partial')\n"
                            "os.kill(os.getpid(), signal.SIGKILL)\n"])
    assert child.returncode == -signal.SIGKILL
    stale = sorted(tmp_path.glob(".demos.tmp-*"))
    assert len(stale) == 2
    live = tmp_path / f".demos.tmp-{os.getppid()}.h5"  # a write in progress in a live process: kept
    live.write_text("in progress")
    _dataset(target)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("[offrl] note: removed 2 stale temporary file(s) of demos.h5"), err
    assert not any(p.exists() for p in stale) and live.exists()
    assert len(read_trajectories(target)[0]) == 4


def test_a_run_failing_at_its_first_step_leaves_no_run_directory(tmp_path, capsys):
    ds = _dataset(tmp_path / "demos.h5")
    root = tmp_path / "runs"
    rc = main(["pretrain", f"pretrain.dataset={ds}", "pretrain.algo=critic_mc", "pretrain.critic_lr=1e30",
               "pretrain.epochs=2", f"run.root={root}", "run.experiment=doomed", "run.progress=false",
               "run.tensorboard=false"])
    assert rc == 2
    assert "critic loss became" in _one_error_line(capsys)
    assert not (root / "doomed").exists()  # neither the trial folder nor an empty experiment folder


# ------------------------------------------------------------------------ 7. debatable cases, decided

def test_an_empty_config_file_means_defaults_with_one_note(tmp_path, capsys):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing here yet\n")
    assert main(["config", "show", str(p)]) == 0
    out = capsys.readouterr()
    assert yaml.safe_load(out.out) == to_dict(load_config())
    assert [ln for ln in out.err.splitlines() if ln.strip()] == [f"[offrl] note: {p} is empty: every key takes its default"]


def test_a_duplicate_yaml_key_is_refused_naming_it(tmp_path, capsys):
    p = tmp_path / "dup.yaml"
    p.write_text("env:\n  id: PickCube-v1\n  num_envs: 2\n  id: StackCube-v1\n")
    assert main(["config", "show", str(p)]) == 2
    assert f"config key 'env.id': is given twice in {p} (lines 2 and 4)" in _one_error_line(capsys)
    with pytest.raises(ConfigError, match="'policy.hidden.a': is given twice"):
        load_config(None, ["policy.hidden={a: 1, a: 2}"])


def test_an_explicit_env_id_the_dataset_contradicts_is_refused(tmp_path, capsys):
    ds = _dataset(tmp_path / "demos.h5")
    args = [f"pretrain.dataset={ds}", "pretrain.algo=critic_mc", "pretrain.epochs=1", "pretrain.steps_per_epoch=1",
            "run.progress=false", "run.tensorboard=false", f"run.root={tmp_path / 'runs'}"]
    assert main(["pretrain", *args, "env.id=StackCube-v1"]) == 2
    line = _one_error_line(capsys)
    assert "env.id=StackCube-v1 is set on the command line" in line and "env.id=PickCube-v1" in line
    assert not (tmp_path / "runs").exists()
    # the same value from the YAML file follows the dataset, with a note
    cfg = tmp_path / "c.yaml"
    cfg.write_text("env:\n  id: StackCube-v1\n")
    assert main(["pretrain", str(cfg), *args]) == 0
    assert "[offrl] using the dataset's env.id=PickCube-v1" in capsys.readouterr().out
