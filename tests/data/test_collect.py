"""Collection on a real local Ray cluster: determinism across actor counts, failures, limits, the CLI."""

import json

import numpy as np
import pytest

from offrl.cli import main
from offrl.config import load_config, replace
from offrl.data import OfflineDataset
from offrl.data.collect import CollectReport, collect
from offrl.errors import OffrlError


def cfg_for(tmp_path, name, *overrides):
    return load_config(None, [f"collect.output={tmp_path / name}", "run.progress=false", *overrides])


@pytest.fixture
def pool(ray_cluster):
    """Two SimHost actors for a test that runs several collections (saves starting actors each time)."""
    from offrl.data.collect import _wait_for_cpus
    from offrl.platform.simhost import SimHostPool

    cfg = load_config(None, ["cluster.num_hosts=2"])
    cpus = ray_cluster.available_resources().get("CPU", 0.0)
    p = SimHostPool(replace(cfg.env, num_envs=1), cfg.cluster, seed=0)
    yield p
    p.shutdown()
    _wait_for_cpus(cpus)  # later tests size their pools to the free CPUs


def test_same_data_with_one_or_two_actors(ray_cluster, tmp_path):
    common = ["collect.episodes=5", "collect.chunk_size=2", "collect.first_seed=500"]
    r1, eps1, meta1 = collect(cfg_for(tmp_path, "one.h5", "cluster.num_hosts=1", *common))
    r2, eps2, meta2 = collect(cfg_for(tmp_path, "two.h5", "cluster.num_hosts=2", *common))
    assert (r1.num_hosts, r2.num_hosts) == (1, 2)
    assert r1.kept == r2.kept == 5 and r1.attempted == r2.attempted == 5 and r1.successes == 5
    a, b = OfflineDataset.load(tmp_path / "one.h5"), OfflineDataset.load(tmp_path / "two.h5")
    assert [e.info["episode_seed"] for e in a.episodes] == [500, 501, 502, 503, 504]
    for x, y in zip(a.episodes, b.episodes):
        np.testing.assert_array_equal(x.obs, y.obs)
        np.testing.assert_array_equal(x.actions, y.actions)
        np.testing.assert_array_equal(x.rewards["rewards_dense"], y.rewards["rewards_dense"])
        np.testing.assert_array_equal(x.env_states["articulations"]["panda"], y.env_states["articulations"]["panda"])
    assert meta1["offrl"]["obs_layout"][0] == ["agent/qpos", 9] and meta1["offrl"]["attempted"] == 5
    assert "2 SimHost actor(s)" in r2.lines()[1] and "episodes/s" in r2.lines()[1]


def test_noisy_data_keeps_failures_when_asked(pool, tmp_path):
    cfg = cfg_for(tmp_path, "noisy.h5", "collect.episodes=6", "collect.action_noise=0.5", "collect.keep_failures=true",
                  "collect.first_seed=0", "collect.chunk_size=3")
    report, eps, _ = collect(cfg, pool=pool)
    ds = OfflineDataset.load(tmp_path / "noisy.h5")
    assert report.kept == report.attempted == len(ds) == 6
    assert report.successes == int(ds.success.sum()) < 6  # noise 0.5 makes the expert fail
    failed = [e for e in ds.episodes if not e.succeeded]
    assert failed and all(e.truncated[-1] and e.length == 50 for e in failed)
    sidecar = json.loads((tmp_path / "noisy.json").read_text())
    assert [ep["success"] for ep in sidecar["episodes"]] == ds.success.tolist()
    assert sidecar["offrl"]["collect"]["action_noise"] == 0.5
    # the same attempts without keep_failures: only the successful ones, in attempt order
    cfg = replace(cfg, **{"collect.keep_failures": False, "collect.output": str(tmp_path / "ok.h5"),
                          "collect.max_attempts": 6})
    report2, eps2, _ = collect(cfg, pool=pool)
    assert report2.kept == report.successes and report2.attempted == 6 and report2.kept < report2.requested
    assert [e.info["episode_seed"] for e in eps2] == [e.info["episode_seed"] for e in ds.episodes if e.succeeded]
    for a, b in zip(eps2, [e for e in ds.episodes if e.succeeded]):
        np.testing.assert_array_equal(a.obs, b.obs)
    # DART labels: the same noisy attempts, recorded with the expert's noise-free action for each visited state
    cfg = replace(cfg, **{"collect.keep_failures": True, "collect.output": str(tmp_path / "dart.h5"),
                          "collect.action_labels": "expert"})
    collect(cfg, pool=pool)
    dart = OfflineDataset.load(tmp_path / "dart.h5")
    assert "DART" in json.loads((tmp_path / "dart.json").read_text())["source_desc"]
    resid = []
    for d, e in zip(dart.episodes, ds.episodes):
        np.testing.assert_array_equal(d.obs, e.obs)                        # the env ran the same noisy actions
        np.testing.assert_array_equal(d.extras["executed_actions"], e.actions)
        assert np.abs(d.actions).max() <= 1.0 and not np.array_equal(d.actions, e.actions)
        inside = np.abs(e.actions) < 1.0                                     # executed = label + noise where unclipped
        resid.append((e.actions - d.actions)[inside])
    assert 0.4 < np.concatenate(resid).std() < 0.6                          # the noise (std 0.5) is not in the labels
    # critics trained on such labels get a warning
    from offrl.platform.pretrain import run_pretrain_job

    lines = []
    run_pretrain_job(load_config(None, [f"pretrain.dataset={tmp_path / 'dart.h5'}", "pretrain.algo=critic_mc",
                                        "pretrain.epochs=1", "pretrain.steps_per_epoch=2", "pretrain.batch_size=16",
                                        "pretrain.val_fraction=0", f"run.root={tmp_path}", "run.progress=false",
                                        "run.tensorboard=false"]), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("warning" in ln and "collect.action_labels=expert" in ln for ln in lines), lines


def test_cli_collect_reports_and_refuses_to_overwrite(ray_cluster, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    args = ["collect", "collect.episodes=3", f"collect.output={out}", "run.progress=false", "collect.first_seed=9"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "attempted 3 episodes, 3 successful (100.0%), kept 3 of 3 requested" in text
    assert "episodes/s" in text and f"wrote {out}" in text
    assert len(OfflineDataset.load(out)) == 3
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (f"offrl: error: {out} already exists; choose another collect.output "
                                               "or set collect.overwrite=true")


@pytest.mark.parametrize("kept, rc, words", [(2, 1, "warning: kept only 2 of 4"), (0, 2, "no episode was kept")])
def test_cli_collect_exit_codes_when_short(monkeypatch, capsys, kept, rc, words):
    import offrl.data.collect as c

    fake = CollectReport(path=None, requested=4, kept=kept, attempted=22, successes=kept, discarded_extra=0,
                         num_hosts=1, seconds=1.0, startup_seconds=1.0)
    monkeypatch.setattr(c, "collect", lambda cfg: (fake, [], {}))
    assert main(["collect", "collect.episodes=4"]) == rc
    assert words in capsys.readouterr().err


def test_collect_refuses_bad_settings(tmp_path):
    for overrides, words in [
        (["env.id=PushCube-v1"], "no scripted expert for env 'PushCube-v1'"),
        (["env.control_mode=pd_joint_delta_pos"], "acts in control_mode pd_ee_delta_pos"),
        (["env.backend=gpu"], "runs on env.backend=cpu"),
        (["collect.output=x.hdf5"], "must end in .h5"),
    ]:
        with pytest.raises(OffrlError, match=words):
            collect(cfg_for(tmp_path, "x.h5", *overrides))
