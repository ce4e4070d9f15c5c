"""Where a sweep's runs train: this process, several local processes, a Ray cluster, or a SLURM cluster.

Every executor hands each pending run to :func:`depthbench.sweep.execute_run`, so wherever a run
trains it is claimed by the lock in its folder, resumes from its ``checkpoint.pt`` and records its own
failure; every executor yields the same :class:`RunOutcome` objects to ``run_sweep``, so
``results.csv`` and the sweep's exit code do not depend on where the runs trained. The schedulers
are real ones (``concurrent.futures``, Ray, SLURM through submitit); this package only maps a run onto
them and reports what they do. Ray and submitit are optional extras, imported only when used. The
package's modules are in the map of :mod:`depthbench`.

The contract (:class:`Executor`, :class:`SweepContext`) and the one-run-after-another
:class:`SerialExecutor` are in :mod:`depthbench.sweep`, whose ``run_sweep`` defaults to it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from depthbench.config import ResourcesConfig
from depthbench.errors import DepthbenchError
from depthbench.executors.base import EXECUTORS, ExecutorOptions, LogFn
from depthbench.executors.local import ParallelExecutor
from depthbench.executors.ray import RayExecutor
from depthbench.executors.slurm import SlurmExecutor
from depthbench.sweep import Executor, SerialExecutor, SweepContext

__all__ = [
    "EXECUTORS", "Executor", "ExecutorOptions", "ParallelExecutor", "RayExecutor", "SerialExecutor", "SlurmExecutor",
    "SweepContext", "make_executor",
]


def make_executor(options: ExecutorOptions | str, resources: ResourcesConfig, *, log: LogFn | None = None,
                  **fields: Any) -> Executor:
    """The executor ``options`` describe; the options given replace ``resources`` fields.

    ``options`` may also be an executor's name, its options then given as keywords (which otherwise
    replace fields of ``options``): ``make_executor("ray", sweep.resources, address="auto")``. A missing
    optional package is reported here, before the sweep writes anything.
    """
    if isinstance(options, str):
        options = ExecutorOptions(options, **fields)
    elif fields:
        options = dataclasses.replace(options, **fields)
    resources = options.resources(resources)
    if options.executor == "local":
        return ParallelExecutor(options.jobs, log=log) if options.jobs > 1 else SerialExecutor()
    if options.executor == "ray":
        _require("ray", "ray")
        return RayExecutor(resources, address=options.address, log=log, verbose=options.verbose)
    _require("submitit", "slurm")
    return SlurmExecutor(resources, local=options.slurm_local, log=log, verbose=options.verbose)


def _require(module: str, extra: str) -> None:
    # Found, not imported: importing Ray here would freeze settings the ray executor sets first.
    if importlib.util.find_spec(module) is None:
        raise DepthbenchError(f"--executor {extra} needs the '{module}' package: pip install 'depthbench[{extra}]'")
