"""Starting a local Ray cluster: the retry when a node misses Ray's fixed startup window."""

import subprocess
import sys
import textwrap

# Run in a fresh interpreter: the test session's own Ray cluster must not be touched. The first attempt's
# raylet never "registers" (get_node fails), so Ray gives up after its 30 s window with the error a loaded
# machine produces; the processes that attempt started must be gone and the second attempt must work.
SCRIPT = textwrap.dedent("""
    import psutil, ray, ray._private.services as services
    from offrl.config import ClusterConfig
    from offrl.platform.cluster import init_ray, shutdown_ray
    real, calls = services.get_node, {"first": True}
    first_children = []
    def flaky(*a, **k):
        if calls["first"]:
            first_children[:] = psutil.Process().children(recursive=True)
            raise RuntimeError("node info not available (injected)")
        return real(*a, **k)
    services.get_node = flaky
    import ray._private.node as node_mod
    orig_init = node_mod.Node.__init__
    def init(self, *a, **k):
        try:
            orig_init(self, *a, **k)
        finally:
            calls["first"] = False
    node_mod.Node.__init__ = init
    res = init_ray(ClusterConfig(num_cpus=1))
    assert first_children, "the first attempt started no processes"
    alive = [p.pid for p in first_children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert ray.is_initialized() and res.get("CPU") == 1.0, res
    assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
    print("LEFTOVER", alive)
    shutdown_ray()
""")


def test_a_local_node_that_misses_the_startup_window_is_cleaned_up_and_started_again():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "missed its startup window (attempt 1 of 3" in p.stderr
    assert "LEFTOVER []" in p.stdout, p.stdout
