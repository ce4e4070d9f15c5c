"""Typed sweep and run configs, validated once when the YAML is loaded; torch-free.

A sweep YAML holds the shared settings (``dataset``, ``model``, ``train``, ``success``, ``resources``) and a
``grid`` of lists; every combination of the grid is one run. Each run is resolved into a frozen
:class:`RunConfig` up front, so a bad value anywhere in the grid is reported before anything trains. The
defaults are the CIFAR recipe of He et al. (V1: "Deep Residual Learning for Image Recognition", 2015,
arXiv:1512.03385, Sec. 4.2; kept by V2: "Identity Mappings in Deep Residual Networks", 2016, arXiv:1603.05027).

Each module imports only those above it::

    schema.py     the sections, each field checked on its own
    messages.py   pydantic's errors as one line naming the dotted key
    yamlfile.py   YAML read strictly
    grid.py       the grid's axes
    rules.py      rules across fields: settings that cannot work together, or that nothing would read
    run.py        one resolved run, and the run id that names it by content
    reference.py  published results reported beside a sweep's own
    tune.py       a tuned sweep: the axes tried per arm, the metric that chooses, successive halving
    sweep.py      the sweep: shared sections, grid and reference; its runs
    overrides.py  ``--set KEY=VALUE`` merged into a file's data
    loading.py    load_sweep, load_run_config, dump_run_config
"""

from depthbench.config.grid import GRID_RUN_KEYS, Grid
from depthbench.config.loading import MAX_RUNS, dump_run_config, load_run_config, load_sweep, parse_sweep
from depthbench.config.overrides import apply_overrides
from depthbench.config.reference import ReferenceRow
from depthbench.config.run import ADDED_SETTINGS, EXECUTION_KEYS, RunConfig
from depthbench.config.schema import (
    DEVICE_NAME,
    METRICS,
    DatasetConfig,
    Family,
    ModelConfig,
    ResourcesConfig,
    ShortcutGate,
    SuccessConfig,
    TrainConfig,
    Unit,
    Version,
    WarmupConfig,
)
from depthbench.config.sweep import SweepConfig
from depthbench.config.tune import HIGHER_IS_BETTER, HalvingConfig, TuneConfig
from depthbench.config.yamlfile import read_yaml
from depthbench.errors import ConfigError

__all__ = [
    "ADDED_SETTINGS",
    "DEVICE_NAME",
    "EXECUTION_KEYS",
    "GRID_RUN_KEYS",
    "HIGHER_IS_BETTER",
    "HalvingConfig",
    "METRICS",
    "ConfigError",
    "DatasetConfig",
    "Family",
    "Grid",
    "MAX_RUNS",
    "ModelConfig",
    "ReferenceRow",
    "ResourcesConfig",
    "RunConfig",
    "ShortcutGate",
    "SuccessConfig",
    "SweepConfig",
    "TuneConfig",
    "TrainConfig",
    "Unit",
    "Version",
    "WarmupConfig",
    "apply_overrides",
    "dump_run_config",
    "load_run_config",
    "load_sweep",
    "parse_sweep",
    "read_yaml",
]
