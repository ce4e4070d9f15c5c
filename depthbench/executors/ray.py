"""``--executor ray``: one Ray task per run, with the run's GPUs and CPUs as its resources.

Ray matches runs to nodes and GPUs and retries a task whose worker died; this module checks first that
the cluster can run the sweep at all (a node big enough, the sweep folder shared), and follows the runs
through a small actor the tasks report to. Ray is an optional extra, imported only when used (this
module's name does not shadow it: imports are absolute).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from depthbench import stopping
from depthbench.config import ResourcesConfig, RunConfig
from depthbench.errors import DepthbenchError
from depthbench.executors.base import (
    LogFn, _Attempt, _gpus_for, _has_checkpoint, _LiveRuns, _on_assigned_gpu, _record_failure, engine_log,
    quiet_engines,
)
from depthbench.sweep import RunFlags, RunOutcome, SweepContext, execute_run
from depthbench.train import TrainingProgress


class _Board:
    """A small Ray actor the tasks tell when their run starts, logs and stops; the driver drains it.

    Tasks only ever send to it and never wait on it: Ray lends the CPU of a task that blocks to
    another task, so a waiting task would let more runs train at once than there are CPUs.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    def tell(self, event: tuple[str, str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[tuple[str, str, Any]]:
        events, self.events = self.events, []
        return events


def _where_in_ray() -> str:
    import ray

    gpus = ray.get_gpu_ids()
    # The node id tells apart nodes that share an address (several raylets on one host, containers).
    node = ray.get_runtime_context().get_node_id()[:8]
    where = f"{ray.util.get_node_ip_address()} ({socket.gethostname()}), node {node}, pid {os.getpid()}"
    return where + (f", GPU {','.join(map(str, gpus))}" if gpus else "")


def _train_in_ray(cfg: RunConfig, sweep_dir: Path, flags: RunFlags, board: Any,
                  stop_file: Path, threads: int) -> _Attempt | None:
    """The body of a run's Ray task; a retry after its worker died resumes from the run's checkpoint.

    The driver asks for a stop by creating ``stop_file`` in the sweep folder, which every node shares.
    """
    import ray

    if stop_file.exists():
        return None  # the sweep was stopped before this run began: leave it untouched
    torch.set_num_threads(threads)
    if ray.get_gpu_ids():
        cfg = _on_assigned_gpu(cfg)
    where, resumed = _where_in_ray(), _has_checkpoint(sweep_dir, cfg)
    board.tell.remote(("started", cfg.run_id, (where, resumed)))
    looked, stopping = 0.0, False

    def should_stop() -> bool:
        # The trainer asks every step; the shared folder is looked at once a second at most.
        nonlocal looked, stopping
        if not stopping and time.monotonic() - looked >= 1.0:
            looked, stopping = time.monotonic(), stop_file.exists()
        return stopping

    def progress(p: TrainingProgress) -> None:
        if p.row is not None:
            board.tell.remote(("progress", cfg.run_id, p))

    try:
        outcome = execute_run(cfg, sweep_dir, flags, on_progress=progress, should_stop=should_stop)
        return _Attempt(outcome, where, resumed)
    finally:
        board.tell.remote(("stopped", cfg.run_id, None))


def _probe_shared(path: str, token: str) -> tuple[bool, str]:
    """On one node: can it read the driver's probe file, and write one the driver can read back?"""
    import ray

    probe = Path(path)
    try:
        seen = probe.read_text(encoding="utf-8") == token
        if seen:
            (probe.parent / f"{probe.name}.{ray.get_runtime_context().get_node_id()}").write_text(token)
    except OSError:
        seen = False
    return seen, _where_in_ray()


@contextlib.contextmanager
def _cluster_errors_logged(*, verbose: bool) -> Iterator[None]:
    """The errors a Ray cluster publishes to its driver ("Task failed because the node it was running on is
    dead", a dead raylet's last log lines) go to the "ray" logger, so to sweep.log, instead of stdout.

    Ray's driver prints them with a plain function of its worker module, not through a logger; it is
    replaced while the sweep runs, and left alone with ``verbose`` or where a Ray version lacks it. The
    sweep's own lines say what matters: the run's next start, on which node, resuming from its checkpoint.
    """
    import ray._private.worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if verbose or printer is None:
        yield
        return
    logger = logging.getLogger("ray.cluster")

    def to_log(data: dict[str, Any], *_: Any, **__: Any) -> None:
        for line in data.get("lines", []):
            logger.warning("(%s) %s", data.get("pid", "ray"), line)

    ray_worker.print_to_stdstream = to_log
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = printer


class RayExecutor:
    """Each pending run is a Ray task asking for ``resources.gpus_per_run`` GPUs and ``cpus_per_run`` CPUs.

    ``address`` is that of a running cluster (``auto`` finds the one on this machine); without it a
    private Ray instance is started for the sweep, on this machine's loopback address only. A task
    whose worker dies is retried up to ``resources.max_restarts`` times and resumes from the run's
    checkpoint, which is why the sweep folder must be on storage every node shares (checked first).
    """

    remote = True  # even a local instance: Ray, not this process, matches runs to GPUs

    def __init__(self, resources: ResourcesConfig, *, address: str | None = None, log: LogFn | None = None,
                 poll_s: float = 0.5, status_every_s: float = 30.0, verbose: bool = False) -> None:
        self.resources, self.address, self.log, self.poll_s = resources, address, log, poll_s
        self.status_every_s, self.verbose = status_every_s, verbose

    def execute(self, runs: list[RunConfig], sweep_dir: Path, context: SweepContext) -> Iterator[RunOutcome]:
        if not runs:
            return
        # Ray's messages (its start-up lines, its workers' output) go to sweep.log unless --verbose.
        with engine_log(sweep_dir, verbose=self.verbose):
            connected_here = self._connect()
            quiet_engines(verbose=self.verbose)  # ray.init installs its own handlers
            with _cluster_errors_logged(verbose=self.verbose):
                yield from self._execute(runs, sweep_dir, context, connected_here)

    def _execute(self, runs: list[RunConfig], sweep_dir: Path, context: SweepContext,
                 connected_here: bool) -> Iterator[RunOutcome]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        live = _LiveRuns(runs, context.reporter, self.log, sweep_dir=sweep_dir)
        refs: dict[Any, RunConfig] = {}
        pending: list[Any] = []
        board = None
        stop_file = sweep_dir / f".ray-stop-{uuid.uuid4().hex}"
        try:
            self._check_resources(runs)
            self._check_shared(sweep_dir)
            # On the driver's node, which lives as long as the sweep: Ray places an actor that asks for nothing
            # on any node (even with a soft affinity), and a worker node that died would take the sweep down.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            board = ray.remote(_Board).options(num_cpus=0, scheduling_strategy=here).remote()
            task = ray.remote(_train_in_ray)
            threads = max(1, math.floor(self.resources.cpus_per_run))
            for cfg in runs:
                ref = task.options(
                    num_cpus=self.resources.cpus_per_run, num_gpus=_gpus_for(cfg, self.resources),
                    max_retries=self.resources.max_restarts, retry_exceptions=False, name=cfg.run_id,
                ).remote(cfg, sweep_dir, context.flags, board, stop_file, threads)
                refs[ref] = cfg
                pending.append(ref)  # wound down below, even if a stop cuts this loop short
            with stopping.deferred():  # this loop stops the runs itself, so that each keeps its last step
                while pending:
                    if context.stop.is_set() and not stop_file.exists():
                        self._stop(stop_file, board, live, pending, refs)
                    ready, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll_s)
                    for event in ray.get(board.drain.remote()):
                        live.on(event)
                    yield from live.deliver(self._outcome(ref, refs[ref], sweep_dir, live) for ref in ready)
                    if pending:
                        live.status(every_s=self.status_every_s)
        finally:
            try:
                if board is not None:
                    self._wind_down(stop_file, board, live, pending, refs)
            finally:  # also after a second Ctrl-C
                stop_file.unlink(missing_ok=True)
                if connected_here:
                    ray.shutdown()

    def _connect(self) -> bool:
        """Connect to the cluster, or start a private instance; False when this process was connected already."""
        if self.address is None and "ray" not in sys.modules:
            # A private instance for this sweep: keep every Ray port on loopback. Ray only does that when
            # it believes multi-node clusters are off, a switch it reads when it is first imported.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            # Ray's C++ crash handler also catches SIGTERM while ray.init runs and aborts the process with a
            # stack dump; without it a stop there ends the sweep with its resume line like any other phase.
            os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        import ray

        quiet_engines(verbose=self.verbose)  # importing Ray set up its logger, which ray.init writes to

        if ray.is_initialized():
            return False  # a connection this process made itself (a library user, a test): use it as it is
        # Where the datasets live is the driver's choice; tasks on other nodes do not inherit its environment.
        env_vars = {key: os.environ[key] for key in ("DEPTHBENCH_DATA",) if key in os.environ}
        runtime_env = {"env_vars": env_vars} if env_vars else None
        # ray.init replaces the SIGTERM handler with one that exits at once, and leaves it there.
        handlers = {sig: signal.getsignal(sig) for sig in stopping.STOP_SIGNALS}
        try:
            # Workers' output stays in Ray's own logs unless --verbose: the sweep's lines say what runs where.
            if self.address is None:
                ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                         logging_level=logging.WARNING, runtime_env=runtime_env, log_to_driver=self.verbose)
            else:
                ray.init(address=self.address, logging_level=logging.WARNING, runtime_env=runtime_env,
                         log_to_driver=self.verbose)
        except ConnectionError as err:
            raise DepthbenchError(f"cannot connect to a Ray cluster at '{self.address}': {str(err).splitlines()[0]}; "
                                  "start one with `ray start --head`, or leave out --address for a local one") from None
        except (KeyboardInterrupt, SystemExit) as err:  # stopped while starting: leave no Ray process behind
            ray.shutdown()
            if isinstance(err, SystemExit) and err.code == signal.SIGTERM:  # what Ray's handler made of a SIGTERM
                raise stopping.StopRequested(signal.SIGTERM.name) from None
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return True

    def _check_resources(self, runs: list[RunConfig]) -> None:
        """Refuse up front what no node can ever run, instead of leaving the tasks pending forever."""
        import ray

        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        if not nodes:
            raise DepthbenchError("the Ray cluster has no live node; check `ray status`")
        gpus = max(_gpus_for(cfg, self.resources) for cfg in runs)
        cpus = self.resources.cpus_per_run
        most_gpus = max(node.get("GPU", 0) for node in nodes)
        most_cpus = max(node.get("CPU", 0) for node in nodes)
        if gpus > 0 and most_gpus == 0:
            total_cpus = sum(node.get("CPU", 0) for node in nodes)
            raise DepthbenchError(
                f"the Ray cluster has no GPU ({len(nodes)} node(s), {total_cpus:g} CPUs), but each run asks for "
                f"{gpus:g} (resources.gpus_per_run); add GPU nodes, or train on CPUs with --device cpu")
        if gpus > most_gpus:
            raise DepthbenchError(f"no Ray node has {gpus:g} GPUs (the most on one node is {most_gpus:g}); "
                                  "lower resources.gpus_per_run")
        if cpus > most_cpus:
            raise DepthbenchError(f"no Ray node has {cpus:g} CPUs (the most on one node is {most_cpus:g}); "
                                  "lower resources.cpus_per_run")

    @staticmethod
    def _check_shared(sweep_dir: Path, timeout_s: float = 120) -> None:
        """Every node must read and write the sweep folder: that is where runs resume and results land."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex
        probe = sweep_dir / f".ray-probe-{token}"
        probe.write_text(token, encoding="utf-8")
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        task = ray.remote(_probe_shared)
        refs = [task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(str(probe), token) for node in nodes]
        try:
            ready, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            if late:
                raise DepthbenchError(f"{len(late)} Ray node(s) ran no task within {timeout_s:g} s; "
                                      "check `ray status` for dead or busy nodes")
            try:
                answers = ray.get(ready)
            except ray.exceptions.RayError as err:
                last = str(err).strip().splitlines()[-1]
                raise DepthbenchError(f"a Ray worker cannot run depthbench ({last}); install the same depthbench "
                                      "in the same Python environment on every node") from None
            blind = [where for (seen, where), node in zip(answers, nodes, strict=True)
                     if not (seen and (probe.parent / f"{probe.name}.{node}").exists())]
            if blind:
                raise DepthbenchError(
                    f"the sweep folder {sweep_dir.resolve()} is not shared with Ray node(s) {', '.join(blind)}; "
                    "put --out on storage every node mounts at the same path (NFS, Lustre, ...)")
        finally:
            for path in sweep_dir.glob(f"{probe.name}*"):
                path.unlink(missing_ok=True)

    def _outcome(self, ref: Any, cfg: RunConfig, sweep_dir: Path, live: _LiveRuns) -> RunOutcome | None:
        import ray

        try:
            attempt = ray.get(ref)
            return live.returned(attempt) if attempt is not None else None
        except ray.exceptions.TaskCancelledError:
            return None
        except ray.exceptions.RayTaskError:
            raise  # execute_run records every failure inside a run, so this is a bug: keep its traceback
        except ray.exceptions.RayError as err:
            # The worker (or its node) died more often than max_restarts allows; the checkpoint is kept.
            reason = str(err).strip().splitlines()[0][:160]
            message = f"its Ray worker died {self.resources.max_restarts + 1} time(s) ({type(err).__name__}: {reason})"
            return _record_failure(cfg, sweep_dir, message, str(err))

    @staticmethod
    def _stop(stop_file: Path, board: Any, live: _LiveRuns, pending: list[Any], refs: dict[Any, RunConfig]) -> None:
        """Runs training see the stop file within a second, save a checkpoint and return; the rest are cancelled.

        A run that started after the last look at the board is cancelled too: it loses the steps since its
        last checkpoint, never more.
        """
        import ray

        try:
            stop_file.write_text("stop", encoding="utf-8")
        except OSError:
            # The sweep folder cannot be written (the fault that stopped the sweep, say), so neither can a
            # checkpoint: every task is cancelled, and its run keeps the checkpoint it last wrote.
            for ref in pending:
                ray.cancel(ref)
            return
        for event in ray.get(board.drain.remote()):
            live.on(event)
        for ref in pending:
            if refs[ref].run_id not in live.running:
                ray.cancel(ref)

    def _wind_down(self, stop_file: Path, board: Any, live: _LiveRuns, pending: list[Any],
                   refs: dict[Any, RunConfig], timeout_s: float = 120) -> None:
        """Leaving early (--fail-fast, an error): stop what still runs, so it checkpoints rather than dies."""
        import ray

        try:
            if pending:
                if not stop_file.exists():
                    self._stop(stop_file, board, live, pending, refs)
                ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
            ray.kill(board)
        except (ray.exceptions.RayError, OSError):
            pass  # best effort while the sweep is already ending
