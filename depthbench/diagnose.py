"""The ``depthbench diagnose`` command: nets measured at initialisation and after a few steps of the
one trainer, side by side (the measurements themselves are :mod:`depthbench.flow`'s). The nets are
ResNets (residual units) or ViTs (Transformer blocks), one family per diagnosis run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from depthbench import storage
from depthbench.config import DatasetConfig, ModelConfig, RunConfig, TrainConfig, WarmupConfig, dump_run_config
from depthbench.config.rules import unread_setting
from depthbench.data import load_dataset
from depthbench.errors import ConfigError
from depthbench.families import FAMILIES, version_label
from depthbench.flow import measure, read_diagnostics, record_step, summarize_row
from depthbench.layout import CONFIG, DIAGNOSE_JSON, DIAGNOSTICS
from depthbench.plots import unit_flow
from depthbench.train import TrainingSetup, train_run

# Depth when none is given, by family.
DEFAULT_DEPTHS: dict[str, int] = {name: family.default_depth for name, family in FAMILIES.items()}


@dataclass(frozen=True)
class Diagnosis:
    """The measurements of one net: its run config, where its run folder is, and one row per step."""

    cfg: RunConfig
    run_dir: Path
    rows: list[dict[str, Any]]
    seconds: float

    @property
    def label(self) -> str:
        """The version ('v1' for a ResNet, 'Post-LN' for a ViT), with the unit and gate when they are not
        the version's own. ResNets keep the version names their earlier diagnose.json files and
        docs/diagnose.md show."""
        family = self.cfg.model.family
        parts = [self.cfg.version if family == "resnet" else version_label(family, self.cfg.version)]
        if self.cfg.unit != FAMILIES[family].version_unit[self.cfg.version]:
            parts.append(self.cfg.unit)
        if self.cfg.model.shortcut_gate != "identity":
            parts.append(self.cfg.model.shortcut_gate)
        return " ".join(parts)


def diagnosis_config(
    version: str, depth: int, *, dataset: DatasetConfig, model: ModelConfig, batch_size: int, steps: int,
    seed: int = 0, lr: float | None = None, device: str = "auto",
) -> RunConfig:
    """The run that ``diagnose`` measures: measured before its first optimizer step (initialisation) and,
    when ``steps > 0``, again after ``steps`` updates at a constant learning rate on un-augmented batches.
    The trainer measures before a step, so the run has ``steps + 1`` steps; its test evaluation is one batch.

    The optimizer and everything else not set here are the family's (SGD for a ResNet, AdamW with its
    weight decay for a ViT); so is ``lr`` when it is None. The family's schedule and warmup
    are not: a diagnosis compares nets at one constant rate."""
    constant_rate = {"schedule": "multistep", "milestones": (), "warmup": WarmupConfig(steps=0)}
    return RunConfig(
        name="diagnose", version=version, depth=depth, seed=seed,
        dataset=dataset.model_copy(update={"augment": False, "test_subset": dataset.test_subset or batch_size}),
        model=model,
        # Only what is set on this TrainConfig counts as written: the family's defaults fill the rest.
        train=TrainConfig(
            steps=steps + 1, batch_size=batch_size, **constant_rate, **({} if lr is None else {"lr": lr}),
            eval_every=steps + 1, log_every=max(1, steps), checkpoint_every=steps + 1, keep_checkpoint="none",
            device=device, diagnose_steps=tuple(sorted({0, steps})),
        ),
    )


def build_configs(
    *, versions: Sequence[str], depths: Sequence[int] | None, units: Sequence[str | None], model: dict[str, Any],
    dataset: dict[str, Any], batch_size: int, steps: int, seed: int = 0, lr: float | None = None,
    device: str = "auto",
) -> list[RunConfig]:
    """The diagnosis runs for every (depth, version, unit), validated: a bad value is one ConfigError line
    naming the setting. ``model`` holds the settings given (``family`` among them); those left out are
    the family's defaults, as are ``depths`` (:data:`DEFAULT_DEPTHS`) and ``lr`` when None."""
    dataset_cfg = _validated(DatasetConfig, dataset)
    model_cfgs = [_validated(ModelConfig, {**model, "unit": unit}) for unit in units]
    depths = depths or [DEFAULT_DEPTHS[model_cfgs[0].family]]
    configs = [
        _validated(diagnosis_config, {
            "version": version, "depth": depth, "dataset": dataset_cfg, "model": model_cfg, "batch_size": batch_size,
            "steps": steps, "seed": seed, "lr": lr, "device": device,
        })
        for depth in depths for version in versions for model_cfg in model_cfgs
    ]
    for cfg in configs:
        if problem := unread_setting(cfg):
            raise ConfigError(problem)
    return configs


_SECTIONS = {"DatasetConfig": "dataset.", "ModelConfig": "model.", "TrainConfig": "train."}


def _validated(build: Any, values: dict[str, Any]) -> Any:
    """``build(**values)`` (a config class or function), its first validation error as one ConfigError line
    naming the dotted setting."""
    try:
        return build.model_validate(values) if hasattr(build, "model_validate") else build(**values)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a check across fields (depth against block): its message says it all
            raise ConfigError(message) from None
        key = _SECTIONS.get(err.title, "") + ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{key}: {message[0].lower()}{message[1:]} (got {first.get('input')!r})") from None


def diagnose(configs: Sequence[RunConfig], out: Path) -> list[Diagnosis]:
    """Measure each config (see :func:`diagnosis_config`) in ``out/<run id>`` and read the measurements back.

    With a measurement at step 0 only, the net is built and measured without training (half the time of
    a trained step, which matters at depth 1001 on a CPU); otherwise the one trainer runs it."""
    found = []
    for cfg in configs:
        run_dir = Path(out) / cfg.run_id
        load_dataset(cfg.dataset)  # loaded once and kept in memory: the time below is the net's own
        t0 = time.perf_counter()
        if cfg.train.diagnose_steps == (0,):
            measure_at_init(cfg, run_dir)
        else:
            train_run(cfg, run_dir)
        rows = [r for r in read_diagnostics(run_dir) if r["step"] in cfg.train.diagnose_steps]
        found.append(Diagnosis(cfg, run_dir, rows, time.perf_counter() - t0))
    return found


def measure_at_init(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Record what :func:`depthbench.train.train_run` records at step 0 of ``cfg``, without training: the
    trainer's own setup (its seeded initial weights) and its first batch. tests/test_diagnose.py checks
    that the two rows agree."""
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text(run_dir / CONFIG, dump_run_config(cfg))
    setup = TrainingSetup.create(cfg, load_dataset(cfg.dataset))
    setup.model.train()
    xb, yb = setup.batch(0)
    return record_step(setup.model, xb, yb, 0, run_dir)


def tidy(diagnoses: Sequence[Diagnosis]) -> list[dict[str, Any]]:
    """One row per (net, step, unit): the CSV that ``diagnose`` writes (a ViT's rows have one more
    column, ``identity_gain``)."""
    return [
        {"net": d.label, "version": d.cfg.version, "depth": d.cfg.depth, "step": row["step"], "loss": row["loss"], **unit}
        for d in diagnoses for row in d.rows for unit in row["units"]
    ]


def write_outputs(diagnoses: Sequence[Diagnosis], out: Path) -> dict[str, Path]:
    """``diagnose.json`` (per net and step: the summary and every unit), ``diagnose.csv`` (one row per unit)
    and ``diagnose.png`` in ``out``: per unit, the gradient norm, the cosine and the zeroed shortcut energy
    of a ResNet; the gradient norms at the input and of the weights and the identity-path gain of a ViT
    (whose zeroed fractions are None)."""
    out = Path(out)
    records = [
        {"net": d.label, "family": d.cfg.model.family, "version": d.cfg.version, "depth": d.cfg.depth,
         "seed": d.cfg.seed, "run_id": d.cfg.run_id, "batch": row["batch"], "seconds": round(d.seconds, 2),
         **summarize_row(row), "per_unit": row["units"]}
        for d in diagnoses for row in d.rows
    ]
    files = {"json": out / DIAGNOSE_JSON, "csv": out / "diagnose.csv", "png": out / "diagnose.png"}
    storage.write_json(files["json"], records)
    storage.write_text(files["csv"], pd.DataFrame(tidy(diagnoses)).to_csv(index=False))
    entries = [{"series": d.label, "depth": d.cfg.depth, "step": row["step"], "units": row["units"]}
               for d in diagnoses for row in d.rows]
    batch = diagnoses[0].cfg.train.batch_size if diagnoses else 0
    if any(d.cfg.model.family == "vit" for d in diagnoses):
        measures, units = ("grad_input", "grad_params", "identity_gain"), "Transformer block"
    else:
        measures, units = ("grad_input", "cosine", "shortcut_zeroed"), "residual unit"
    unit_flow(entries, files["png"], measures=measures,
              title=f"Gradient and signal flow per {units} (one batch of {batch} images)")
    return files


__all__ = [
    "DEFAULT_DEPTHS", "DIAGNOSE_JSON", "DIAGNOSTICS", "Diagnosis", "build_configs", "diagnose", "diagnosis_config",
    "measure", "measure_at_init", "read_diagnostics", "record_step", "summarize_row", "tidy", "write_outputs",
]
