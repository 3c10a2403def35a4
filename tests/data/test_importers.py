"""Importers: pickled dicts of transition arrays and per-trajectory NPZ files, written by the tests."""

import pickle

import numpy as np
import pytest

from offrl.data import OfflineDataset
from offrl.data.importers import import_npz, import_pickle
from offrl.errors import OffrlError


def transitions(lengths, d=5, a=3, seed=0):
    """Continuous episodes of the given lengths, flattened like D4RL-style pickles."""
    rng = np.random.default_rng(seed)
    states, nxt, acts, rews, term = [], [], [], [], []
    for T in lengths:
        obs = rng.normal(size=(T + 1, d)).astype(np.float32)
        states.append(obs[:-1])
        nxt.append(obs[1:])
        acts.append(rng.uniform(-1, 1, (T, a)).astype(np.float32))
        rews.append(rng.normal(size=T).astype(np.float32))
        t = np.zeros(T, bool)
        t[-1] = True
        term.append(t)
    cat = np.concatenate
    return {"states": cat(states), "next_states": cat(nxt), "actions": cat(acts), "rewards": cat(rews)}, cat(term)


def dump(path, d):
    with open(path, "wb") as f:
        pickle.dump(d, f)
    return path


@pytest.mark.parametrize("boundaries", ["inferred", "episode_ids", "episode_lengths", "terminals"])
def test_pickle_import(tmp_path, boundaries):
    lengths = [4, 2, 5]
    d, term = transitions(lengths)
    d["images"] = np.random.default_rng(1).integers(0, 255, (11, 6, 6, 3), dtype=np.uint8)
    if boundaries == "episode_ids":
        d["episode_ids"] = np.repeat([7, 8, 9], lengths)
    elif boundaries == "episode_lengths":
        d["episode_lengths"] = np.array(lengths)
    elif boundaries == "terminals":
        d["terminals"] = term
    ds = import_pickle(dump(tmp_path / "data.pkl", d), env_id="PickCube-v1", control_mode="pd_ee_delta_pos",
                       reward_mode="sparse")
    assert list(ds.lengths) == lengths and ds.obs_layout == [["states", 5]]
    e = ds.episodes[1]
    np.testing.assert_array_equal(e.obs[:-1], d["states"][4:6])
    np.testing.assert_array_equal(e.obs[-1], d["next_states"][5])  # final observation from next_states
    np.testing.assert_array_equal(e.actions, d["actions"][4:6])
    np.testing.assert_array_equal(e.rewards["rewards"], d["rewards"][4:6])
    np.testing.assert_array_equal(e.extras["images/images"], d["images"][4:6])
    if boundaries == "terminals":
        assert e.terminated[-1] and not e.truncated.any()
    else:  # without termination flags the episode end is a truncation
        assert e.truncated[-1] and not e.terminated.any()
    back = OfflineDataset.load(ds.save(tmp_path / "data.h5"))
    np.testing.assert_array_equal(back.transitions()["next_obs"].numpy(), d["next_states"])
    np.testing.assert_array_equal(back.episodes[2].extras["images/images"], d["images"][6:])


def test_pickle_errors(tmp_path):
    d, _ = transitions([3, 3])
    imp = lambda p: import_pickle(p, env_id="PickCube-v1", control_mode="pd_ee_delta_pos")  # noqa: E731
    with pytest.raises(OffrlError, match=r"bad\.pkl: missing next_states"):
        imp(dump(tmp_path / "bad.pkl", {k: v for k, v in d.items() if k != "next_states"}))
    with pytest.raises(OffrlError, match=r"bad\.pkl: rewards has 5 rows but states has 6"):
        imp(dump(tmp_path / "bad.pkl", {**d, "rewards": d["rewards"][:5]}))
    nan = {**d, "actions": d["actions"].copy()}
    nan["actions"][4, 1] = np.nan
    with pytest.raises(OffrlError, match=r"bad\.pkl: actions contains NaN/Inf \(first at row 4\)"):
        imp(dump(tmp_path / "bad.pkl", nan))
    with pytest.raises(OffrlError, match="expected a pickled dict of arrays, got list"):
        imp(dump(tmp_path / "bad.pkl", [1, 2]))
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(OffrlError, match=r"junk\.pkl: not a readable pickle"):
        imp(tmp_path / "junk.pkl")
    with pytest.raises(OffrlError, match="episode_lengths sum to 5 but there are 6 transitions"):
        imp(dump(tmp_path / "bad.pkl", {**d, "episode_lengths": [2, 3]}))


def write_npz(folder, name, T, obs_rows=None, images=True, **extra):
    rng = np.random.default_rng(T)
    rows = obs_rows or T
    arrays = {"action": rng.uniform(-1, 1, (T, 4)).astype(np.float32),
              "obj_pose": rng.normal(size=(rows, 7)).astype(np.float32),
              "ee_pose": rng.normal(size=(rows, 7)).astype(np.float32)}
    if images:
        arrays["images"] = rng.integers(0, 255, (rows, 8, 8, 3), dtype=np.uint8)
        arrays["wrist_images"] = rng.integers(0, 255, (rows, 4, 4, 3), dtype=np.uint8)
    arrays.update(extra)
    folder.mkdir(exist_ok=True)
    np.savez(folder / name, **arrays)
    return arrays


def test_npz_import_maps_fields(tmp_path):
    src = tmp_path / "npz"
    a = write_npz(src, "ep_000.npz", 6, reward=np.arange(6, dtype=np.float32), success=np.array(True))
    b = write_npz(src, "ep_001.npz", 4, obs_rows=5, reward=np.ones(4, np.float32), success=np.array(False))
    ds = import_npz(src, env_id="PickCube-v1", control_mode="pd_ee_delta_pos")
    assert ds.obs_layout == [["ee_pose", 7], ["obj_pose", 7]]  # alphabetical by default
    e0, e1 = ds.episodes
    # T observation rows: the final action has no following observation and is dropped
    assert e0.length == 5 and e0.obs.shape == (6, 14)
    np.testing.assert_array_equal(e0.obs[:, :7], a["ee_pose"])
    np.testing.assert_array_equal(e0.obs[:, 7:], a["obj_pose"])
    np.testing.assert_array_equal(e0.actions, a["action"][:5])
    np.testing.assert_array_equal(e0.rewards["rewards"], np.arange(5))
    np.testing.assert_array_equal(e0.extras["images/images"], a["images"])
    np.testing.assert_array_equal(e0.extras["images/wrist_images"], a["wrist_images"])
    assert e0.truncated[-1] and ds.success.tolist() == [True, False]
    # T + 1 observation rows: every action is kept
    assert e1.length == 4 and e1.obs.shape == (5, 14)
    np.testing.assert_array_equal(e1.actions, b["action"])
    back = OfflineDataset.load(ds.save(tmp_path / "npz.h5"))
    assert back.obs_layout == ds.obs_layout and back.episodes[1].extras["images/wrist_images"].shape == (5, 4, 4, 3)
    picked = import_npz(src / "ep_000.npz", env_id="PickCube-v1", control_mode="pd_ee_delta_pos",
                        obs_keys=["obj_pose"])
    assert picked.obs_layout == [["obj_pose", 7]] and picked.obs_dim == 7
    # the end-effector/object plot finds the mapped fields
    from offrl.data.summary import write_plots

    files = write_plots(back, tmp_path / "plots")
    assert [f.name for f in files] == ["episode_lengths.png", "action_histograms.png", "trajectories_xy.png"]


def test_npz_errors(tmp_path):
    imp = lambda p, **kw: import_npz(p, env_id="PickCube-v1", control_mode="pd_ee_delta_pos", **kw)  # noqa: E731
    with pytest.raises(OffrlError, match="no .npz trajectory files"):
        imp(tmp_path / "none")
    write_npz(tmp_path / "a", "x.npz", 5)
    np.savez(tmp_path / "a" / "y.npz", ee_pose=np.zeros((5, 7)))
    with pytest.raises(OffrlError, match=r"y\.npz: has no 'action' array"):
        imp(tmp_path / "a")
    write_npz(tmp_path / "b", "x.npz", 5)
    write_npz(tmp_path / "b", "y.npz", 5, obj_pose=np.zeros((5, 3), np.float32))
    with pytest.raises(OffrlError, match=r"y\.npz: observation fields .* differ from x\.npz"):
        imp(tmp_path / "b")
    write_npz(tmp_path / "c", "x.npz", 5, ee_pose=np.zeros((3, 7), np.float32))
    with pytest.raises(OffrlError, match=r"x\.npz: observation fields must all have T=5 or T\+1=6 rows"):
        imp(tmp_path / "c")
    write_npz(tmp_path / "d", "x.npz", 5, ee_pose=np.full((5, 7), np.inf, np.float32))
    with pytest.raises(OffrlError, match=r"x\.npz: observations contains NaN/Inf"):
        imp(tmp_path / "d")
    with pytest.raises(OffrlError, match=r"observation field 'joint_pos' is missing"):
        imp(tmp_path / "b" / "x.npz", obs_keys=["joint_pos"])
    ref = tmp_path / "ref.h5"
    import_npz(tmp_path / "b" / "x.npz", env_id="PickCube-v1", control_mode="pd_ee_delta_pos").save(ref)
    with pytest.raises(OffrlError, match="observations have 7 columns but .*ref.h5 has 14"):
        imp(tmp_path / "b" / "x.npz", obs_keys=["ee_pose"], obs_layout_like=ref)
