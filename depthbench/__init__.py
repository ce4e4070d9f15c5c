"""depthbench: ResNet V1 (post-activation) vs V2 (pre-activation) depth studies, and the same question for
Vision Transformers (Post-LN vs Pre-LN) and for ResNets without normalisation (Fixup, SkipInit).

The library is importable without the CLI: ``build_model`` builds a ResNet at any valid depth
(``depthbench.models`` also builds ViTs), ``load_sweep`` reads a sweep YAML, ``train_run`` trains one run,
``run_sweep`` runs a grid.

One module per concept, with no import cycles. Those marked (no torch) import no torch, so loading a
sweep, planning it and reading a runs/ folder answer fast. This map is the one list of the modules
(tests/test_layout_map.py keeps it whole)::

    depthbench/
      errors.py        the one user-facing error type (one line, exit 2) and "did you mean" (no torch)
      config/          typed, frozen sweep and run configs; YAML read strictly, --set overrides (no torch)
      architecture.py  the ResNet family as data: blocks, the depth rule, placements (no torch)
      transformer.py   the ViT family as data: where LayerNorm sits, DeepNorm's constants, sizes (no torch)
      families.py      the model families: what v1, v2 and each unit mean; family defaults (no torch)
      layout.py        the runs/ folder: file names, a run's state, the one run-folder reader (no torch)
      storage.py       atomic, fsynced writes; tolerant reads (no torch)
      faults.py        faults of the machine (a full disk, a vanished folder): stop the sweep, not the run (no torch)
      seeds.py         named random streams: (seed, stream, counter) -> generator seed (no torch)
      stopping.py      Ctrl-C and SIGTERM in every phase of a sweep (no torch)
      estimate.py      parameters and training memory from a config, before anything is built
      devices.py       device names, precisions (native bf16 detection), the C library's allocator settings
      data.py          datasets as uint8 tensors, subsets, the locked on-disk cache
      augment.py       crop/flip draws on the CPU, applied batched on the device; normalisation
      models/          the nets, one family per module; model_from_config picks the family
        resnet.py      ResNet V1 and V2: every placement and shortcut of the papers, Fixup, SkipInit
        vit.py         Vision Transformers: Post-LN, Pre-LN, DeepNorm, ReZero
      flow.py          per-unit gradient and signal measurements (train.diagnose_steps)
      step.py          the training step: eager, or one CUDA graph checked against eager (with fallback)
      train.py         the one trainer: setup, resume, the labelled step loop, result.json
      duration.py      a sweep's time before it runs: a few timed steps per distinct shape, cached
      sweep.py         plan, claim, train and record each run; preflight; the executor contract; results.csv
      executors/       where runs train besides one after another in this process; make_executor
        base.py        the options that choose an executor, and what the engines share
        local.py       --jobs N: a process pool on this machine
        ray.py         --executor ray
        slurm.py       --executor slurm (and --slurm-local)
        timelimit.py   how early a SLURM job is told to stop, and the job's own watch on its time limit
      results.py       results.csv: one row per run, rebuilt from the run folders (no torch)
      tuning.py        a tuned sweep's arms and candidates, ranked on validation metrics only (no torch)
      halving.py       successive halving: each arm's rungs decided from the run folders, pruned runs (no torch)
      statistics.py    a report's numbers: rows by depth or any axis, statistics over seeds, Welch tests (no torch)
      tuned.py         each arm at its selected value: verdict, edge of the range, V2 − V1 there (no torch)
      report.py        tables by family and unit, paper values beside ours, report.md (no torch)
      plots.py         the report's figures (no torch)
      diagnose.py      the `depthbench diagnose` command's driver
      bench/           `depthbench bench`, in the order a measurement uses its modules:
        spec.py        what to measure, checked and turned into the trainer's RunConfig
        probes.py      the instruments: step timing, peak memory, activation bytes, kernel counts, matmul peak
        trainer.py     the depthbench trainer's step, timed at full size and on tiny batches
        baseline.py    the usual torchvision + DataLoader pipeline, timed the same way
        concurrent.py  several runs of the trainer at once, each in its own process
        modes.py       the comparison, the growth with depth, the device shared: one JSON-able dict each
        render.py      those dicts as rich tables
      progress.py      the rich live display of a sweep
      tracking.py      optional TensorBoard event files
      cli.py           the `depthbench` command: thin, one error funnel (no torch)
      __main__.py      `python -m depthbench`
"""

from depthbench.errors import ConfigError, DepthbenchError


def __getattr__(name: str):
    # Lazy so that `import depthbench` (and the CLI's --help) does not pay for importing torch.
    if name == "__version__":
        # pyproject.toml's version, as installed; importlib.metadata is imported only when it is asked for.
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("depthbench")
        except PackageNotFoundError:  # a source tree on the path, never installed
            return "0+unknown"
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
