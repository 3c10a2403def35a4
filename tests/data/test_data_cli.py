"""`offrl data merge|split|validate|import` and `offrl inspect` as users run them (smoke tests with tiny data)."""

import json
import pickle
import re

import numpy as np
import pytest

from offrl.cli import main
from offrl.data import OfflineDataset


def run(capsys, *args):
    rc = main(list(map(str, args)))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_documents_every_command(capsys):
    for args in (["--help"], ["data", "--help"], ["collect", "--help"], ["inspect", "--help"],
                 ["data", "merge", "--help"], ["data", "split", "--help"], ["data", "validate", "--help"],
                 ["data", "import", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 0
    text = capsys.readouterr().out
    for words in ("collect", "inspect", "--val-fraction", "--obs-keys", "--obs-layout-like", "KEY=VALUE"):
        assert words in text


def test_merge_split_validate(tmp_path, capsys, expert_ds, maniskill_joint_pos_file):
    a = expert_ds.subset(range(4)).save(tmp_path / "a.h5")
    b = expert_ds.subset(range(4, 7)).save(tmp_path / "b.h5")
    rc, out, _ = run(capsys, "data", "merge", a, b, "-o", tmp_path / "ab.h5")
    assert rc == 0 and "wrote" in out and "(7 episodes" in out
    merged = OfflineDataset.load(tmp_path / "ab.h5")
    assert len(merged) == 7 and merged.meta["offrl"]["merged_from"] == [str(a), str(b)]
    np.testing.assert_array_equal(merged.episodes[4].actions, expert_ds.episodes[4].actions)

    rc, _, err = run(capsys, "data", "merge", a, maniskill_joint_pos_file, "-o", tmp_path / "bad.h5")
    assert rc == 2 and err.count("\n") == 1
    assert err == (f"offrl: error: cannot merge {maniskill_joint_pos_file} with {a}: "
                   "control mode pd_joint_pos != pd_ee_delta_pos\n")
    assert not (tmp_path / "bad.h5").exists() and not (tmp_path / "bad.json").exists()
    rc, _, err = run(capsys, "data", "merge", a, b, "-o", tmp_path / "ab.h5")
    assert rc == 2 and "already exists (pass --overwrite" in err

    rc, out, _ = run(capsys, "data", "split", tmp_path / "ab.h5", "--val-fraction", "0.3", "--seed", "1")
    assert rc == 0
    train, val = OfflineDataset.load(tmp_path / "ab_train.h5"), OfflineDataset.load(tmp_path / "ab_val.h5")
    assert (len(train), len(val)) == (5, 2)
    ref_train, ref_val = merged.split(0.3, seed=1)
    assert [e.info["episode_seed"] for e in val.episodes] == [e.info["episode_seed"] for e in ref_val.episodes]
    assert val.meta["offrl"]["split"]["part"] == "val"

    rc, out, _ = run(capsys, "data", "validate", tmp_path / "ab_train.h5", maniskill_joint_pos_file)
    assert rc == 0 and out.count("ok: ") == 2 and "5 episodes" in out
    with open(tmp_path / "ab_val.h5", "r+b") as f:  # torn file
        f.truncate(1000)
    rc, out, err = run(capsys, "data", "validate", tmp_path / "ab_val.h5")
    assert rc == 2 and err.startswith(f"offrl: error: {tmp_path / 'ab_val.h5'}: is not a readable HDF5 file")


def test_import_commands(tmp_path, capsys, expert_ds):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(7, 42)).astype(np.float32)
    d = {"states": s[:6], "next_states": s[1:], "actions": rng.uniform(-1, 1, (6, 4)).astype(np.float32),
         "rewards": np.zeros(6, np.float32), "terminals": np.array([0, 0, 0, 0, 0, 1], bool), "extra_key": [1]}
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(d))
    ref = expert_ds.subset([0]).save(tmp_path / "ref.h5")
    rc, out, _ = run(capsys, "data", "import", "pickle", tmp_path / "d.pkl", "-o", tmp_path / "p.h5",
                     "--reward-mode", "sparse", "--obs-layout-like", ref)
    assert rc == 0 and "note: ignored keys: extra_key" in out and "(1 episodes, 6 steps)" in out
    p = OfflineDataset.load(tmp_path / "p.h5")
    assert p.obs_layout == expert_ds.obs_layout and p.reward_mode == "sparse"
    npz = tmp_path / "npz"
    npz.mkdir()
    for i in range(2):
        np.savez(npz / f"t{i}.npz", action=rng.uniform(-1, 1, (5, 4)), ee_pose=rng.normal(size=(5, 7)),
                 obj_pose=rng.normal(size=(5, 7)), images=np.zeros((5, 4, 4, 3), np.uint8))
    rc, out, _ = run(capsys, "data", "import", "npz", npz, "-o", tmp_path / "n.h5", "--obs-keys", "obj_pose,ee_pose")
    assert rc == 0 and "observation fields: obj_pose(7), ee_pose(7)" in out
    assert OfflineDataset.load(tmp_path / "n.h5").obs_layout == [["obj_pose", 7], ["ee_pose", 7]]
    rc, _, err = run(capsys, "data", "import", "npz", tmp_path / "nothing", "-o", tmp_path / "x.h5")
    assert rc == 2 and "no .npz trajectory files" in err


def test_inspect_writes_table_and_plots(tmp_path, capsys, expert_ds):
    path = expert_ds.subset(range(6)).save(tmp_path / "demo.h5")
    rc, out, _ = run(capsys, "inspect", path)
    assert rc == 0
    for pattern in (r"episodes +6\n", r"success rate +100.0%", r"episode length +mean", r"env states +yes",
                    r"return \(rewards_sparse\) +mean 1.000  std 0.000", r"action dim +min +max +mean +std"):
        assert re.search(pattern, out), out
    folder = tmp_path / "demo_inspect"
    assert sorted(p.name for p in folder.iterdir()) == ["action_histograms.png", "episode_lengths.png",
                                                         "summary.json", "trajectories_xy.png"]
    assert all((folder / n).read_bytes()[:4] == b"\x89PNG" for n in ("episode_lengths.png", "trajectories_xy.png"))
    s = json.loads((folder / "summary.json").read_text())
    assert s["episodes"] == 6 and s["success_rate"] == 1.0 and len(s["action_min"]) == 4
    rc, out, _ = run(capsys, "inspect", path, "--no-plots", "--out-dir", tmp_path / "elsewhere")
    assert rc == 0 and not (tmp_path / "elsewhere").exists()
    rc, _, err = run(capsys, "inspect", tmp_path / "missing.h5")
    assert rc == 2 and err == f"offrl: error: dataset not found: {tmp_path / 'missing.h5'}\n"
