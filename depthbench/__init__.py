"""depthbench: ResNet V1 (post-activation) vs V2 (pre-activation) depth studies.

The library is importable without the CLI: ``build_model`` builds either family at any valid depth,
``load_sweep`` reads a sweep YAML, ``train_run`` trains one run, ``run_sweep`` runs a grid.
"""

from depthbench.errors import ConfigError, DepthbenchError

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import depthbench` (and the CLI's --help) does not pay for importing torch.
    if name == "build_model":
        from depthbench.models import build_model

        return build_model
    if name in ("load_sweep", "RunConfig", "SweepConfig"):
        from depthbench import config

        return getattr(config, name)
    if name == "train_run":
        from depthbench.train import train_run

        return train_run
    if name == "run_sweep":
        from depthbench.sweep import run_sweep

        return run_sweep
    raise AttributeError(f"module 'depthbench' has no attribute {name!r}")


__all__ = ["ConfigError", "DepthbenchError", "build_model", "load_sweep", "run_sweep", "train_run"]
