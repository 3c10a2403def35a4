"""policy.obs_min_std: the floor of a Gaussian policy's observation normaliser's std."""

import pytest
import torch

from offrl.algos.networks import GaussianActor, RunningNorm, build_actor
from offrl.config import load_config
from offrl.errors import ConfigError


def test_floor_bounds_how_far_a_nearly_constant_entry_is_scaled():
    torch.manual_seed(0)
    data = torch.randn(1000, 3)
    data[:, 1] = 0.5 + 0.0005 * torch.randn(1000)  # hardly varies, as a quaternion component of an upright cube
    plain, floored = RunningNorm(3), RunningNorm(3, min_std=0.01)
    plain.update(data)
    floored.update(data)
    x = torch.tensor([[0.2, 0.53, -0.4]])  # 0.03 off in the flat entry: ~60 stds without the floor
    assert plain(x)[0, 1] == pytest.approx(10.0)  # clipped at 10
    assert floored(x)[0, 1] == pytest.approx((0.53 - float(floored.mean[1])) / 0.01, rel=1e-4)
    assert 2.9 < float(floored(x)[0, 1]) < 3.1
    # entries that vary more than the floor are normalised as before, bit for bit
    assert torch.equal(plain(x)[0, [0, 2]], floored(x)[0, [0, 2]])


def test_the_floor_is_part_of_the_architecture_and_old_architectures_keep_none():
    arch = {"obs_dim": 4, "act_dim": 2, "hidden": [16]}
    assert build_actor(arch).normalizer.min_std is None  # checkpoints written before the key: unchanged
    actor = build_actor({**arch, "obs_min_std": 0.01})
    assert actor.normalizer.min_std == 0.01
    # a buffer-free setting: the weights (and normaliser statistics) load across the two
    GaussianActor(4, 2, hidden=(16,)).load_state_dict(actor.state_dict())
    assert load_config(None, []).policy.obs_min_std is None  # off unless asked for


@pytest.mark.parametrize("value", ["0", "-0.1", "nan", "inf"])
def test_bad_floors_name_the_key(value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"policy.obs_min_std={value}"])
    assert "policy.obs_min_std" in str(e.value) and "\n" not in str(e.value)
    assert load_config(None, ["policy.obs_min_std=null"]).policy.obs_min_std is None
