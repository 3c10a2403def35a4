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


@pytest.fixture(scope="session")
def tiny_bc_iql_run(expert_dataset, ray_cluster, tmp_path_factory):
    """A pretrained BC + IQL run directory (64x64 networks, 2 short epochs): a finetuning start point."""
    from offrl.config import load_config
    from offrl.platform.pretrain import run_pretrain_job

    cfg = load_config(None, [f"pretrain.dataset={expert_dataset}", "pretrain.algo=bc+iql", "pretrain.epochs=2",
                             "pretrain.steps_per_epoch=10", "pretrain.eval_episodes=1", "env.num_envs=1",
                             "cluster.num_hosts=1", "policy.hidden=[64,64]", "critic.hidden=[64,64]",
                             f"run.root={tmp_path_factory.mktemp('start')}", "run.progress=false",
                             "run.tensorboard=false"])
    return run_pretrain_job(cfg, log=lambda *a: None)


class ProcessSessions:
    """Commands started in process sessions of their own, and every process left in those sessions."""

    def __init__(self) -> None:
        self.sids: list[int] = []
        self.dirs: list[str] = []

    def temp_dir(self, prefix: str = "offrl-ray-") -> str:
        """A short folder under /tmp (Ray's socket paths must stay under 108 characters), removed at the end."""
        import tempfile

        self.dirs.append(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        return self.dirs[-1]

    def popen(self, args: list, **kw):
        import subprocess

        p = subprocess.Popen([str(a) for a in args], start_new_session=True, **kw)
        self.sids.append(p.pid)
        return p

    def run(self, args: list, timeout: float = 300, **kw):
        """Run to completion; returns CompletedProcess with stdout and stderr merged into ``stdout``."""
        import subprocess

        p = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, args))}\n{out[-3000:]}")
        return subprocess.CompletedProcess(args, p.returncode, out, None)

    def pids(self) -> set[int]:
        """Live processes in these sessions, plus their descendants (which may have started sessions of
        their own, like the drivers of Ray jobs)."""
        procs = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                fields = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":  # zombies are gone already, only not reaped
                procs[int(name)] = (int(fields[1]), int(fields[3]))  # ppid, session id
        found = {p for p, (_, sid) in procs.items() if sid in self.sids}
        grew = True
        while grew:
            more = {p for p, (ppid, _) in procs.items() if ppid in found} - found
            found |= more
            grew = bool(more)
        return found

    def kill(self, timeout: float = 20) -> None:
        """SIGKILL every process of these sessions (and descendants) and wait until they are gone."""
        import signal
        import time

        deadline = time.time() + timeout
        while True:
            left = self.pids() - {os.getpid()}
            if not left or time.time() > deadline:
                break
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.2)


@pytest.fixture
def process_sessions():
    """Start commands in new process sessions; at teardown every process left in them is SIGKILLed.

    A local Ray cluster started by such a command (a driver's ``ray.init()`` or ``ray start --head``)
    stays in the command's session, so it is stopped with it, and other Ray clusters on the machine are
    left alone (``ray stop`` would stop every Ray process of the machine, the test session's included).
    """
    import shutil

    sessions = ProcessSessions()
    yield sessions
    sessions.kill()
    for d in sessions.dirs:
        shutil.rmtree(d, ignore_errors=True)
