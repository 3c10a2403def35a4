"""ManiSkill trajectory format: round trip, ManiSkill's own reader, atomic writes, validation of every corruption."""

import dataclasses
import json
import os
import re

import h5py
import numpy as np
import pytest

from offrl.data import OfflineDataset, read_trajectories, write_trajectories
from offrl.data.format import json_path
from offrl.errors import OffrlError

from .conftest import make_episode, synthetic_meta


def assert_tree_equal(a, b):
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_tree_equal(a[k], b[k])
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_round_trip_is_identical(tmp_path, expert_ds):
    src = expert_ds.subset(range(4))
    # extra datasets survive too: camera frames (stored with gzip) and an unknown per-step array
    e0 = src.episodes[0]
    src.episodes[0] = dataclasses.replace(e0, extras={
        "images/wrist": np.random.default_rng(0).integers(0, 255, (e0.length + 1, 8, 8, 3), dtype=np.uint8),
        "custom": np.arange(e0.length)})
    path = src.save(tmp_path / "rt.h5")
    back = OfflineDataset.load(path)
    assert len(back) == 4 and back.obs_layout == src.obs_layout and back.reward_mode == "normalized_dense"
    for a, b in zip(src.episodes, back.episodes):
        for name in ("obs", "actions", "terminated", "truncated", "success"):
            assert_tree_equal(getattr(a, name), getattr(b, name))
        assert_tree_equal(a.rewards, b.rewards)
        assert_tree_equal(a.env_states, b.env_states)
        assert_tree_equal(a.extras, b.extras)
        assert b.info == a.info
    # saving what was loaded gives the same arrays again
    again = OfflineDataset.load(back.save(tmp_path / "rt2.h5"))
    assert_tree_equal(again.episodes[3].env_states, src.episodes[3].env_states)


def test_layout_and_sidecar_follow_maniskill(expert_dataset):
    meta = json.loads(json_path(expert_dataset).read_text())
    assert meta["env_info"]["env_id"] == "PickCube-v1"
    assert meta["env_info"]["env_kwargs"]["control_mode"] == "pd_ee_delta_pos"
    assert meta["env_info"]["max_episode_steps"] == 50
    ep = meta["episodes"][0]
    assert set(ep) >= {"episode_id", "episode_seed", "reset_kwargs", "control_mode", "elapsed_steps", "success"}
    assert ep["reset_kwargs"]["seed"] == ep["episode_seed"]
    with h5py.File(expert_dataset, "r") as f:
        assert list(f.keys())[:3] == ["traj_0", "traj_1", "traj_2"]  # creation order, like RecordEpisode
        g = f["traj_0"]
        T = ep["elapsed_steps"]
        assert g["obs"].shape == (T + 1, 42) and g["actions"].shape == (T, 4)
        for k in ("terminated", "truncated", "success", "rewards", "rewards_sparse", "rewards_dense"):
            assert g[k].shape == (T,)
        assert g["env_states/actors/cube"].shape == (T + 1, 13)
        assert g["env_states/articulations/panda"].shape == (T + 1, 31)


def test_maniskill_dataset_class_reads_offrl_files(expert_dataset, expert_ds):
    from mani_skill.trajectory.dataset import ManiSkillTrajectoryDataset

    ms = ManiSkillTrajectoryDataset(str(expert_dataset))
    t = expert_ds.transitions()
    assert len(ms) == expert_ds.num_steps
    np.testing.assert_array_equal(ms.actions, t["action"].numpy())
    np.testing.assert_array_equal(ms.obs, t["obs"].numpy())
    np.testing.assert_array_equal(ms.rewards, t["reward"].numpy())


def test_write_is_atomic(tmp_path, expert_ds, monkeypatch):
    import offrl.data.format as fmt

    path = expert_ds.subset([0]).save(tmp_path / "d.h5")
    before = path.read_bytes(), json_path(path).read_text()
    calls = {"n": 0}
    real = fmt._put

    def failing_put(group, name, data):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt  # like Ctrl-C half way through
        real(group, name, data)

    monkeypatch.setattr(fmt, "_put", failing_put)
    with pytest.raises(KeyboardInterrupt):
        expert_ds.subset(range(5)).save(path)
    assert (path.read_bytes(), json_path(path).read_text()) == before  # old pair untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5", "d.json"]  # no temporary files left
    with pytest.raises(OffrlError, match="no episodes"):
        write_trajectories(tmp_path / "e.h5", [], {})
    with pytest.raises(OffrlError, match=r"end in \.h5"):
        write_trajectories(tmp_path / "e.hdf5", expert_ds.episodes[:1], {})


# ------------------------------------------------------------------------------------ corruption

def edit_h5(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def edit_json(path, fn):
    p = json_path(path)
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta))


def replace_dataset(name, fn):
    def edit(f):
        data = fn(f[name][()])
        del f[name]
        f.create_dataset(name, data=data)
    return edit


def flip_chunk_bytes(path, name):
    """Overwrite bytes inside a stored dataset chunk (HDF5's Fletcher-32 checksum must catch it)."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 8)
        fh.write(b"\xde\xad\xbe\xef" * 4)


def truncate_file(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


CASES = {
    "missing sidecar": (lambda p: json_path(p).unlink(), r"small\.h5: JSON sidecar small\.json is missing"),
    "malformed sidecar": (lambda p: json_path(p).write_text("{not json"), r"small\.json: is not valid JSON"),
    "sidecar without episodes": (lambda p: json_path(p).write_text('{"env_info": {"env_id": "x"}}'),
                                 r"has no 'episodes' list"),
    "no episodes": (lambda p: edit_json(p, lambda m: m.update(episodes=[])), r"small\.h5: has no episodes"),
    "truncated file": (truncate_file, r"small\.h5: is not a readable HDF5 file \(truncated or corrupt"),
    "corrupt bytes": (lambda p: flip_chunk_bytes(p, "traj_1/obs"),
                      r"small\.h5: traj_1: cannot read 'obs' \(truncated or corrupt data"),
    "missing group": (lambda p: edit_h5(p, lambda f: f.__delitem__("traj_2")),
                      r"small\.h5: traj_2: listed in small\.json but missing from the HDF5 file"),
    "missing actions": (lambda p: edit_h5(p, lambda f: f.__delitem__("traj_0/actions")),
                        r"small\.h5: traj_0: missing actions"),
    "missing declared rewards": (lambda p: edit_h5(p, lambda f: f.__delitem__("traj_1/rewards_dense")),
                                 r"traj_1: missing rewards_dense"),
    "missing env states": (lambda p: edit_h5(p, lambda f: f.__delitem__("traj_1/env_states")),
                           r"traj_1: missing env_states"),
    "obs rows": (lambda p: edit_h5(p, replace_dataset("traj_1/obs", lambda a: a[:-1])),
                 r"traj_1: obs has \d+ rows but actions has \d+ \(ManiSkill layout: obs has T\+1 rows\)"),
    "reward rows": (lambda p: edit_h5(p, replace_dataset("traj_2/rewards", lambda a: a[:-1])),
                    r"traj_2: rewards has shape \(\d+,\), expected \(\d+,\) to match actions"),
    "flag rows": (lambda p: edit_h5(p, replace_dataset("traj_0/terminated", lambda a: a[1:])),
                  r"traj_0: terminated has shape"),
    "env state rows": (lambda p: edit_h5(p, replace_dataset("traj_0/env_states/actors/cube", lambda a: a[:-2])),
                       r"traj_0: env_states/actors/cube has \d+ rows, expected \d+"),
    "obs width": (lambda p: edit_h5(p, replace_dataset("traj_2/obs", lambda a: a[:, :-1])),
                  r"traj_2: observation layout .* differs from the first episode's"),
    "NaN obs": (lambda p: edit_h5(p, replace_dataset("traj_1/obs", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 50, np.nan, a))),
                r"traj_1: obs contains NaN \(first at index \(1, 8\)\)"),
    "Inf action": (lambda p: edit_h5(p, replace_dataset("traj_0/actions", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.inf, a))),
                   r"traj_0: actions contains Inf \(first at index \(1, 1\)\)"),
    "NaN reward": (lambda p: edit_h5(p, replace_dataset("traj_2/rewards_sparse", lambda a: np.full_like(a, np.nan))),
                   r"traj_2: rewards_sparse contains NaN"),
    "NaN env state": (lambda p: edit_h5(p, replace_dataset("traj_2/env_states/articulations/panda", lambda a: a * np.nan)),
                      r"traj_2: env_states/articulations/panda contains NaN"),
    "unlisted group": (lambda p: edit_h5(p, lambda f: f.copy("traj_0", "traj_9")),
                       r"small\.h5: 1 trajectory group\(s\) \(traj_9\) are not listed in small\.json"),
    "elapsed steps": (lambda p: edit_json(p, lambda m: m["episodes"][1].update(elapsed_steps=999)),
                      r"traj_1: JSON says elapsed_steps=999 but the trajectory has \d+ actions"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_corruption_gives_one_clear_error(case, small_file):
    damage, pattern = CASES[case]
    damage(small_file)
    with pytest.raises(OffrlError) as e:
        OfflineDataset.load(small_file)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(pattern, msg), msg


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(OffrlError, match="dataset not found: .*nope.h5"):
        OfflineDataset.load(tmp_path / "nope.h5")
    with pytest.raises(OffrlError, match="is a folder"):
        read_trajectories(tmp_path)


def test_foreign_files_without_offrl_metadata(tmp_path):
    """ManiSkill files may lack rewards/success/env_states; dict observations are flattened in stored order."""
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("traj_0", track_order=True)
        obs = g.create_group("obs", track_order=True)
        agent = obs.create_group("agent", track_order=True)
        agent.create_dataset("qpos", data=np.ones((4, 2), np.float32))
        extra = obs.create_group("extra", track_order=True)
        extra.create_dataset("is_grasped", data=np.zeros(4, bool))
        extra.create_dataset("tcp_pose", data=np.full((4, 7), 2.0, np.float32))
        g.create_dataset("actions", data=np.zeros((3, 4), np.float32))
        g.create_dataset("terminated", data=np.zeros(3, bool))
        g.create_dataset("truncated", data=np.array([0, 0, 1], bool))
    json_path(path).write_text(json.dumps({"env_info": {"env_id": "PickCube-v1", "env_kwargs": {"obs_mode": "state_dict"}},
                                           "episodes": [{"episode_id": 0, "control_mode": "pd_ee_delta_pos",
                                                         "elapsed_steps": 3}]}))
    ds = OfflineDataset.load(path)
    assert ds.obs_layout == [["agent/qpos", 2], ["extra/is_grasped", 1], ["extra/tcp_pose", 7]]
    np.testing.assert_array_equal(ds.episodes[0].obs[0], [1, 1, 0] + [2] * 7)
    assert ds.reward_keys == [] and ds.success is None and not ds.has_env_states
    with pytest.raises(OffrlError, match="no 'rewards' rewards; available: none .*--record-rewards"):
        ds.transitions()


def test_camera_observations_are_refused_with_the_conversion_command(tmp_path):
    path = tmp_path / "rgb.h5"
    e = make_episode(3)
    write_trajectories(path, [e], synthetic_meta())
    with h5py.File(path, "r+") as f:
        del f["traj_0/obs"]
        f.create_dataset("traj_0/obs/sensor_data/base_camera/rgb", data=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(OffrlError, match="traj_0: obs/sensor_data holds camera data.*replay_trajectory"):
        OfflineDataset.load(path)
