import os
from pathlib import Path

import pytest
import torch

from offrl.algos.bc import BCLearner
from offrl.algos.networks import GaussianActor
from offrl.errors import OffrlError
from offrl.platform import checkpoint as ck


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 6, generator=g) * 3 + 1
    act = torch.tanh(obs[:, :2] * 0.5 + 0.1 * torch.randn(n, 2, generator=g))
    return {"obs": obs, "actions": act}


def _learner(seed=0):
    torch.manual_seed(seed)
    actor = GaussianActor(6, 2, hidden=(16, 16))
    actor.normalizer.update(_data()["obs"])
    return BCLearner(actor, lr=1e-3, seed=seed)


def _train(learner, data, steps):
    for _ in range(steps):
        learner.update(learner.sample(data, 32))
        torch.rand(1)  # global RNG use in the loop must also resume exactly


def _save(learner, root, step):
    return ck.save_checkpoint(root, step, learner.modules(), optimizers=learner.optimizers(),
                              generators=learner.generators(), extra_state=learner.extra_state(),
                              config={"k": 1})


def test_resume_is_exact(tmp_path):
    data = _data()
    ref = _learner()
    _train(ref, data, 40)
    ref_after = torch.rand(3)

    first = _learner()
    _train(first, data, 20)
    _save(first, tmp_path / "checkpoints", 20)
    del first
    torch.manual_seed(12345)  # a fresh process would start from other RNG states

    resumed = _learner(seed=99)  # different init: everything must come from the checkpoint
    state = ck.load_checkpoint(tmp_path / "checkpoints", resumed.modules(), optimizers=resumed.optimizers(),
                               generators=resumed.generators())
    resumed.load_extra_state(state)
    assert state["step"] == 20 and resumed.step == 20 and state["config"] == {"k": 1}
    _train(resumed, data, 20)
    for (k, a), (_, b) in zip(ref.actor.state_dict().items(), resumed.actor.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(ref_after, torch.rand(3))


def test_layout_and_selective_loading(tmp_path):
    learner = _learner()
    critic = torch.nn.Linear(6, 1)
    path = ck.save_checkpoint(tmp_path, 7, {"actor": learner.actor, "critic": critic}, config={"a": 1})
    assert path == tmp_path / "7"
    for f in ("model.safetensors", "normalizer.safetensors", "config.json", "training_state/optimizers.pt",
              "training_state/state.json", "training_state/rng.pt"):
        assert (path / f).exists(), f
    fresh = GaussianActor(6, 2, hidden=(16, 16))
    fresh_critic = torch.nn.Linear(6, 1)
    before = fresh_critic.weight.clone()
    ck.load_checkpoint(path, {"actor": fresh, "critic": fresh_critic}, parts=["actor"], restore_rng=False)
    assert torch.equal(fresh.net[0].weight, learner.actor.net[0].weight)
    assert torch.equal(fresh.normalizer.mean, learner.actor.normalizer.mean)  # normalizer travels with the actor
    assert torch.equal(fresh_critic.weight, before)  # not asked for: untouched
    with pytest.raises(OffrlError, match="no part 'q1'"):
        ck.load_checkpoint(path, {"q1": torch.nn.Linear(6, 1)}, restore_rng=False)
    with pytest.raises(OffrlError, match="does not fit"):
        ck.load_checkpoint(path, {"actor": GaussianActor(6, 2, hidden=(8,))}, restore_rng=False)


def test_kill_during_save_leaves_no_torn_checkpoint(tmp_path, monkeypatch):
    learner = _learner()
    _save(learner, tmp_path, 1)

    def boom(*a, **k):
        raise KeyboardInterrupt  # as if killed while writing the optimizer state

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(learner, tmp_path, 2)
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["1"]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    # a leftover temp folder from a SIGKILL is ignored by readers
    (tmp_path / ".tmp-3-abc").mkdir()
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "1"


def test_keep_prunes_old_checkpoints(tmp_path):
    learner = _learner()
    for s in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, s, learner.modules(), keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["3", "4"]


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(OffrlError, match="not found"):
        ck.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OffrlError, match="no checkpoint"):
        ck.resolve_checkpoint(tmp_path / "empty")
    learner = _learner()
    path = ck.save_checkpoint(tmp_path / "c", 5, learner.modules())
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OffrlError, match="corrupt checkpoint"):
        ck.load_checkpoint(path, learner.modules())
