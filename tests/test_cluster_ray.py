"""``--executor ray`` on a real multi-node Ray cluster that this module starts on this one machine.

The cluster is Ray's own ``ray.cluster_utils.Cluster``: every node is a real raylet with its own object
store, workers and resources, all of them bound to 127.0.0.1 and nothing else. The head node has no CPU
for tasks (as on a real cluster, where it hosts the driver and Ray's services); two worker nodes have one
CPU each, so two runs asking for one CPU each must train on different nodes, and a run whose node is killed
can only be retried on the other one. A third node that does not see the sweep folder is started by the
real ``ray start`` in its own mount namespace, with a tmpfs over the folder that holds ``--out``.

Runs train with one thread (resources.cpus_per_run = 1), as the local references here do: CPU results
depend on the thread count, not on how busy the machine is.

On Linux, ``ray start`` and ``ray.init`` turn 127.0.0.1 (in ``--address`` and ``--node-ip-address``) into
the machine's outward address unless Ray believes multi-node clusters are off; that switch also stops
``ray start`` from joining a cluster at all. So this process clears the switch (as the single-node fixture
in test_executors.py does), and the mount-namespace node runs ``ray start`` with that one rewriting
turned off.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from depthbench.cli import app
from depthbench.sweep import run_sweep
from tests.conftest import learned, steps, tiny_sweep, write_config

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; mount namespaces"),
    # About 15 s each on two idle cores; with both cores busy with other work, the node-kill test took 3 minutes.
    pytest.mark.timeout(600),
]

runner = CliRunner()
LOOPBACK = "127.0.0.1"
NODE = {"node_ip_address": LOOPBACK, "object_store_memory": 80 * 1024**2}
# Nodes whose raylet died are declared dead after 5 missed health checks: 5 s rather than Ray's 15 s.
SYSTEM_CONFIG = {"health_check_period_ms": 1000}
KILL_SWEEP = "nodekill"
WAIT_S = 240  # for anything to happen on a busy 2-core machine (the first checkpoint took 111 s under load)
# `ray start` as installed, with Ray's rewriting of 127.0.0.1 into the machine's outward address turned off.
RAY_START = ("import sys, ray._private.services as services; services.resolve_ip_for_localhost = lambda host: host; "
             "from ray.scripts.scripts import main; sys.exit(main())")


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)
    return value


# --- processes and sockets --------------------------------------------------------------------------


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def ray_processes() -> dict[int, str]:
    """This process's descendants that are Ray's (raylets, GCS, agents, workers), with their command lines."""
    found = {}
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "ray" in cmdline:
                found[pid] = cmdline.strip()
    return found


def listeners(pids: set[int]) -> list[tuple[str, bool]]:
    """Every TCP/UDP socket that one of ``pids`` listens on: (the ss line, whether it is loopback only)."""
    lines = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 7 or not {int(pid) for pid in re.findall(r"pid=(\d+)", line)} & pids:
            continue
        host = fields[4].rsplit(":", 1)[0].strip("[]").split("%")[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:  # "*": every address
            found.append((line, False))
            continue
        ip = getattr(ip, "ipv4_mapped", None) or ip
        found.append((line, ip.is_loopback))
    return found


def assert_loopback_only() -> int:
    """No process of the cluster, this driver included, listens on anything but loopback; returns how many do."""
    socks = listeners({os.getpid(), *ray_processes()})
    exposed = [line for line, loopback in socks if not loopback]
    assert not exposed, "Ray listens beyond loopback:\n" + "\n".join(exposed)
    assert any("raylet" in line for line, _ in socks) and any("gcs_server" in line for line, _ in socks), socks
    return len(socks)


# --- the cluster ------------------------------------------------------------------------------------


@dataclass
class RayNodes:
    cluster: Any  # ray.cluster_utils.Cluster
    workers: list[Any] = field(default_factory=list)  # the two 1-CPU nodes (ray._private.node.Node)

    @property
    def address(self) -> str:
        return self.cluster.address

    def alive(self) -> set[str]:
        return {node["NodeID"] for node in self.cluster.global_state.node_table() if node["Alive"]}

    def add_worker(self) -> Any:
        node = self.cluster.add_node(num_cpus=1, **NODE)
        self.workers.append(node)
        wait_for(lambda: node.node_id in self.alive(), f"node {node.node_id[:8]} to join")
        return node

    def wait_dead(self, node_id: str) -> None:
        wait_for(lambda: node_id not in self.alive(), f"the GCS to declare node {node_id[:8]} dead")


@pytest.fixture(scope="module")
def nodes() -> Iterator[RayNodes]:
    """A head node with no CPU for tasks and two worker nodes with one CPU each, all on 127.0.0.1."""
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        # 127.0.0.1 stays 127.0.0.1 in this process's ray.init(address=...), the CLI's included.
        mp.setattr("ray._private.ray_constants.ENABLE_RAY_CLUSTER", False)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "_system_config": SYSTEM_CONFIG, **NODE})
        try:
            found = RayNodes(cluster)
            for _ in range(2):
                found.add_worker()
            yield found
        finally:
            ray.shutdown()  # a test's own connection, if it left one
            cluster.shutdown()
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not ray_processes(), "Ray's processes to exit", timeout_s=60)
            left = ray_processes()
            for pid in left:  # never leave a raylet behind, even when the test is failing
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            assert not left, f"Ray processes left after the cluster shut down: {left}"


# --- helpers ----------------------------------------------------------------------------------------


def sweep_on(nodes: RayNodes, config: Path, out: Path) -> Any:
    args = ["sweep", str(config), "--executor", "ray", "--address", nodes.address, "--out", str(out)]
    result = runner.invoke(app, args, catch_exceptions=False)
    print(f"$ depthbench {shlex.join(args)}\n{result.output}")  # shown when the test fails
    return result


def starts(output: str) -> list[tuple[str, str, str]]:
    """(run id, short node id, the rest) of each "started" line."""
    return re.findall(rf"^started (\S+)(?: again)? on {re.escape(LOOPBACK)} \(.+?\), node ([0-9a-f]{{8}}), "
                      r"pid \d+(.*?)  \[", output, re.MULTILINE)


@pytest.fixture(scope="module")
def one_thread_reference(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The tiny sweep (v1 and v2, depth 8, seed 0) trained one run after another here, on one thread."""
    out = tmp_path_factory.mktemp("reference")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(tiny_sweep(), out, handle_signals=False)
    finally:
        torch.set_num_threads(before)
    reference = learned(out / "tiny")
    assert list(reference.status) == ["completed", "completed"]
    return reference


# --- the tests --------------------------------------------------------------------------------------


def test_runs_spread_over_the_nodes(nodes: RayNodes, one_thread_reference: pd.DataFrame, tmp_path: Path) -> None:
    assert_loopback_only()
    config = write_config(tmp_path / "tiny.yaml", tiny_sweep(resources={"cpus_per_run": 1}))
    result = sweep_on(nodes, config, tmp_path)
    assert result.exit_code == 0, result.output
    started = starts(result.output)
    # One CPU per worker node, none on the head: the two runs trained side by side, one on each node.
    assert sorted(run for run, _, _ in started) == sorted(one_thread_reference.run_id), result.output
    assert sorted(node for _, node, _ in started) == sorted(node.node_id[:8] for node in nodes.workers)
    assert result.output.count("✓ v") == 2
    pd.testing.assert_frame_equal(learned(tmp_path / "tiny"), one_thread_reference)


def pause_after_first_checkpoint(marker: str) -> Callable[[], None]:
    """A worker setup hook: the first checkpoint written in the KILL_SWEEP sweep records where it was made
    and the metrics log as it was, then holds its run there until its node is killed (or ``marker``.release
    appears, when the test cannot kill it; at most 10 minutes).

    So the node dies at a known step (4, the first checkpoint), with the run known to be on that node.
    """
    sweep_name, release = KILL_SWEEP, f"{marker}.release"

    def hook() -> None:
        import ray

        from depthbench import storage as worker_storage

        save = worker_storage.save_torch

        def save_then_hold(path: Path, obj: object) -> None:
            save(path, obj)
            if path.name == "checkpoint.pt" and path.parent.parent.name == sweep_name and not os.path.exists(marker):
                seen = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                        "metrics": (path.parent / "metrics.jsonl").read_text()}
                Path(f"{marker}.tmp").write_text(json.dumps(seen))
                os.replace(f"{marker}.tmp", marker)
                deadline = time.monotonic() + 600
                while not os.path.exists(release) and time.monotonic() < deadline:
                    time.sleep(0.1)

        worker_storage.save_torch = save_then_hold

    return hook


def test_a_worker_node_killed_mid_run_resumes_on_another_node(
    nodes: RayNodes, one_thread_reference: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from depthbench import cli

    said: list[str] = []  # the sweep's lines, as the CLI prints them
    print_line = cli.console.print

    def tap(*args: Any, **kwargs: Any) -> None:
        said.append(str(args[0]) if args else "")
        print_line(*args, **kwargs)

    monkeypatch.setattr(cli.console, "print", tap)
    cfg = tiny_sweep(KILL_SWEEP, grid={"version": ["v2"], "depth": [8], "seed": [0]},
                     resources={"cpus_per_run": 1, "max_restarts": 1})
    (run,) = cfg.runs()
    config = write_config(tmp_path / "nodekill.yaml", cfg)
    marker = tmp_path / "paused.json"
    seen: dict[str, Any] = {}

    def kill_the_node_at_its_first_checkpoint() -> None:
        try:
            wait_for(marker.exists, "the run's first checkpoint")
            paused = json.loads(marker.read_text())
            # Word of the start travels apart from the run; a node killed before it arrives takes it along.
            wait_for(lambda: any(line.startswith(f"started {run.run_id} on ") for line in said),
                     "the driver to hear that the run started")
            (node,) = [node for node in nodes.workers if node.node_id == paused["node"]]
            assert_loopback_only()  # with every process up: the driver, the board, the run's worker
            # The whole node at once, as when a machine is lost: its raylet, its agents and its workers.
            doomed = descendants(node.all_processes["raylet"][0].process.pid)
            assert paused["pid"] in doomed
            (seen["survivor"],) = [other.node_id for other in nodes.workers if other is not node]
            nodes.cluster.remove_node(node, allow_graceful=False)
            nodes.workers.remove(node)
            for pid in doomed:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            seen.update(paused)
        except BaseException as err:  # noqa: BLE001 - reported by the test itself
            seen["error"] = err
            Path(f"{marker}.release").touch()  # the run goes on, and the sweep ends

    ray.init(address=nodes.address, logging_level=logging.WARNING, log_to_driver=False, runtime_env={
        "env_vars": {"DEPTHBENCH_DATA": os.environ["DEPTHBENCH_DATA"]},
        "worker_process_setup_hook": pause_after_first_checkpoint(str(marker))})
    killer = threading.Thread(target=kill_the_node_at_its_first_checkpoint, daemon=True)
    try:
        killer.start()
        result = sweep_on(nodes, config, tmp_path)  # uses this connection, with its setup hook
        killer.join(WAIT_S)
    finally:
        ray.shutdown()
        with contextlib.suppress(AssertionError):  # the other tests find two 1-CPU worker nodes again
            if "node" in seen:
                nodes.wait_dead(seen["node"])
            while len(nodes.workers) < 2:
                nodes.add_worker()
    assert "error" not in seen, seen.get("error")
    assert result.exit_code == 0, result.output
    first, again = starts(result.output)
    assert first == (run.run_id, seen["node"][:8], "")
    # Retried by Ray on the other worker node, where it resumed from its checkpoint.
    assert again == (run.run_id, seen["survivor"][:8], ", resuming from its checkpoint")
    assert f"started {run.run_id} again on" in result.output and f"✓ {run.run_id}" in result.output
    # Ray's own word of the lost node ("(raylet) Task _train_in_ray failed ...") goes to sweep.log, if it came.
    assert "(raylet)" not in result.output and "Task _train_in_ray failed" not in result.output
    run_dir = tmp_path / KILL_SWEEP / run.run_id
    assert steps(run_dir) == [2, 4, 6, 8]  # nothing lost, nothing repeated
    # The rows written before the node died are byte for byte those of the first attempt, timings included.
    assert seen["metrics"] and (run_dir / "metrics.jsonl").read_text().startswith(seen["metrics"])
    expected = one_thread_reference[one_thread_reference.run_id == run.run_id].reset_index(drop=True)
    pd.testing.assert_frame_equal(learned(tmp_path / KILL_SWEEP), expected)


def can_mount_privately(folder: Path) -> str | None:
    """Why a tmpfs cannot be mounted in a private mount namespace here, or None when it can."""
    try:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs none "$1" && umount "$1"', "sh",
                                str(folder)], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return None if probe.returncode == 0 else (probe.stderr.strip() or f"exit status {probe.returncode}")


@contextlib.contextmanager
def blind_node(nodes: RayNodes, hidden: Path, log: Path) -> Iterator[str]:
    """A 1-CPU node started by `ray start` that sees an empty tmpfs at ``hidden``; yields its node id."""
    before = nodes.alive()
    start = [sys.executable, "-c", RAY_START, "start", f"--address={nodes.address}",
             f"--node-ip-address={LOOPBACK}", "--num-cpus=1", f"--object-store-memory={NODE['object_store_memory']}",
             "--disable-usage-stats", "--block"]
    script = f'mount -t tmpfs none {shlex.quote(str(hidden))} && exec {shlex.join(start)}'
    # A node joins a cluster only where Ray believes multi-node clusters are on (Linux's default).
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    with log.open("w") as output:
        node = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=output, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    def joined() -> set[str]:
        assert node.poll() is None, f"ray start exited with {node.returncode}:\n{log.read_text()}"
        return nodes.alive() - before

    node_id = None
    try:
        (node_id,) = wait_for(joined, "the node without the sweep folder to join")
        yield node_id
    finally:
        # Its own process group: `ray start --block`, its raylet, agents, workers.
        with contextlib.suppress(OSError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=60)
        group = ["pgrep", "-g", str(node.pid)]
        wait_for(lambda: subprocess.run(group, capture_output=True, check=False).returncode == 1,
                 "the node's processes to exit", timeout_s=60)
        if node_id is not None:
            nodes.wait_dead(node_id)


def test_a_node_that_cannot_see_the_sweep_folder_is_refused_up_front(nodes: RayNodes, tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # holds --out: mounted over (empty) on the blind node
    shared.mkdir()
    if why := can_mount_privately(shared):
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here (unshare -m: {why}); needs root")
    config = write_config(tmp_path / "tiny.yaml", tiny_sweep(resources={"cpus_per_run": 1}))
    with blind_node(nodes, shared, tmp_path / "blind-node.log") as blind:
        assert_loopback_only()  # `ray start`'s node too
        result = sweep_on(nodes, config, shared / "runs")
    sweep_dir = (shared / "runs" / "tiny").resolve()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: the sweep folder {re.escape(str(sweep_dir))} is not shared with Ray node\(s\) "
        rf"{re.escape(LOOPBACK)} \({re.escape(socket.gethostname())}\), node {blind[:8]}, pid \d+; "
        r"put --out on storage every node mounts at the same path \(NFS, Lustre, \.\.\.\)", last), last
    assert "started" not in result.output  # nothing trained, nothing left behind
    assert not [path for path in sweep_dir.rglob("*") if path.name in ("metrics.jsonl", "checkpoint.pt", "results.csv")
                or path.name.startswith(".ray-")]
