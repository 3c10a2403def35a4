"""Shared fixtures: a real local Ray cluster (session-wide) and small configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (ManiSkill physx_cuda)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, shared by the whole session."""
    import ray

    from offrl.platform.cluster import init_ray, shutdown_ray
    from offrl.config import ClusterConfig

    init_ray(ClusterConfig(num_cpus=2))
    yield ray
    shutdown_ray()


@pytest.fixture
def small_cfg(tmp_path):
    """An ExperimentConfig with tiny sizes and runs written under tmp_path."""
    from offrl.config import load_config

    return load_config(None, [f"run.root={tmp_path / 'runs'}", "env.num_envs=2", "rollout.iterations=1",
                              "rollout.steps_per_iter=20", "run.progress=false", "policy.hidden=[32,32]"])


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300):
    """Run ``python -m offrl ARGS`` in a subprocess; returns CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "offrl", *args], cwd=str(cwd or ROOT), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def expert_dataset(ray_cluster, tmp_path_factory):
    """20 scripted-expert PickCube-v1 episodes (pd_ee_delta_pos), collected once per session."""
    from offrl.config import load_config
    from offrl.data.collect import collect

    out = tmp_path_factory.mktemp("data") / "pickcube_20.h5"
    cfg = load_config(None, ["collect.episodes=20", f"collect.output={out}", "run.progress=false",
                             "env.num_envs=2"])
    collect(cfg, progress=False)
    return out
