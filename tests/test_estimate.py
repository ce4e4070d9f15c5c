"""Sizes known before building: exact parameter counts, activations as bench measures them, and runs that
cannot fit refused up front in one line that says what would fit, with nothing built or written."""

from __future__ import annotations

import itertools
import json
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import depthbench.devices
import depthbench.estimate
from depthbench.bench import activation_mb
from depthbench.cli import app
from depthbench.config import DatasetConfig, ModelConfig, RunConfig
from depthbench.data import load_dataset
from depthbench.errors import DepthbenchError
from depthbench.estimate import (
    DataShape,
    activation_bytes,
    best_segments,
    check_fits,
    device_capacity,
    estimate_memory,
    known_shape,
    parameter_count,
)
from depthbench.models import PLACEMENTS, SHORTCUT_GATES, count_params, model_from_config
from depthbench.sweep import execute_run
from depthbench.train import TrainingSetup
from tests.conftest import tiny_run

runner = CliRunner()
CIFAR10 = DataShape(3, 32, 10, 50_000, 10_000)
MiB, GiB = 2**20, 2**30
ALL_UNITS = 1_000_000  # `checkpointing: true`


@pytest.fixture(autouse=True)
def _cpu_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    # The figures below are fp32 ones: `precision: auto` resolves to fp32 on a CPU without native bf16,
    # whatever CPU runs the tests. A test that needs the other CPU patches it again.
    native = depthbench.devices.native_bf16
    monkeypatch.setattr(depthbench.devices, "native_bf16", lambda device: device.type != "cpu" and native(device))


def _meta_params(version: str, depth: int, model: ModelConfig, num_classes: int = 10, in_channels: int = 3) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init
        return count_params(model_from_config(version, depth, model, num_classes, in_channels))


def run_config(version: str = "v2", depth: int = 1001, *, dataset: DatasetConfig | None = None, **sections: dict,
               ) -> RunConfig:
    return RunConfig(name="t", version=version, depth=depth, seed=0, dataset=dataset or DatasetConfig(),
                     **{key: value for key, value in sections.items()})


# ---- parameters: exact -------------------------------------------------------------------------------

@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_parameter_count_equals_the_built_net_for_every_variant(block: str) -> None:
    """Every version x placement x shortcut x gate, at one unit per stage (all the cases a unit can be);
    the placements include the normalisation-free fixup and skipinit, whose scalars count one each."""
    depth = {"basic": 8, "bottleneck": 11}[block]
    checked = 0
    for version, unit, shortcut, gate in itertools.product(("v1", "v2"), (None, *PLACEMENTS), ("auto", "A", "B"),
                                                         SHORTCUT_GATES):
        model = ModelConfig(block=block, unit=unit, shortcut=shortcut, shortcut_gate=gate, width=2)
        assert parameter_count(version, depth, model) == _meta_params(version, depth, model), (version, model)
        checked += 1
    assert checked == 2 * 8 * 3 * 6  # no unit, the 5 placements of [V2] Fig. 4, fixup and skipinit


@pytest.mark.parametrize(("unit", "gate"), list(zip(PLACEMENTS, itertools.cycle(SHORTCUT_GATES))))
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_parameter_count_extrapolates_exactly_to_more_units(block: str, unit: str, gate: str) -> None:
    """From two units per stage on, each unit adds the same: counted on 1-3 units, exact at 4 and 5, for
    other widths, class counts and input channels too."""
    for n, width, classes, channels in ((4, 3, 7, 1), (5, 5, 100, 3)):
        depth = {"basic": 6, "bottleneck": 9}[block] * n + 2
        model = ModelConfig(block=block, unit=unit, shortcut_gate=gate, width=width)
        assert parameter_count("v1", depth, model, classes, channels) == _meta_params("v1", depth, model, classes,
                                                                                      channels)


@pytest.mark.parametrize(("version", "depth", "classes", "params"), [
    ("v1", 20, 10, 269_722),  # [V1] Table 6: 0.27M
    ("v1", 110, 10, 1_727_962),  # 1.7M
    ("v1", 1202, 10, 19_421_274),  # 19.4M
    ("v2", 164, 10, 1_703_258),  # [V2] Table 3: 1.7M
    ("v2", 164, 100, 1_726_388),
    ("v2", 1001, 10, 10_327_706),  # printed 10.2M; every conv, BN and FC parameter gives 10.33M
    ("v2", 1001, 100, 10_350_836),
])
def test_parameter_count_of_the_paper_nets(version: str, depth: int, classes: int, params: int) -> None:
    assert parameter_count(version, depth, num_classes=classes) == params
    if depth <= 164:  # the deeper ones take a second to build even on the meta device; test_models has them
        assert _meta_params(version, depth, ModelConfig(), classes) == params


# ---- activations: what bench.activation_mb measures ----------------------------------------------------

@pytest.mark.parametrize(("version", "depth", "model", "side", "precision"), [
    ("v1", 14, {"width": 4}, 8, "fp32"),
    ("v2", 14, {"width": 6}, 9, "fp32"),  # odd side: stride-2 maps round up
    ("v2", 20, {"width": 4, "block": "bottleneck"}, 8, "fp32"),
    ("v1", 20, {"width": 4, "block": "bottleneck"}, 12, "fp32"),
    ("v2", 20, {"width": 4, "checkpointing": True}, 8, "fp32"),
    ("v1", 29, {"width": 4, "checkpointing": 2}, 8, "fp32"),  # bottleneck, 3 units in 2 segments
    ("v1", 14, {"width": 4, "shortcut_gate": "exclusive_gating", "shortcut": "B"}, 8, "fp32"),
    ("v1", 14, {"width": 4, "shortcut_gate": "dropout", "unit": "bn_after_add"}, 8, "fp32"),
    ("v2", 20, {"width": 4, "block": "bottleneck", "unit": "relu_only_preact"}, 8, "bf16"),
    ("v2", 14, {"width": 4, "checkpointing": True}, 8, "bf16"),
    # no BN: scalar biases save nothing, the scale and gate multipliers save their input map
    ("v1", 14, {"width": 4, "unit": "fixup"}, 8, "fp32"),
    ("v1", 20, {"width": 4, "unit": "fixup", "block": "bottleneck"}, 8, "bf16"),  # B projections on x + a1
    ("v2", 14, {"width": 4, "unit": "skipinit", "shortcut": "B"}, 9, "fp32"),
    ("v2", 20, {"width": 4, "unit": "skipinit", "block": "bottleneck"}, 8, "bf16"),
    ("v1", 29, {"width": 4, "unit": "fixup", "checkpointing": 2}, 8, "fp32"),
])
def test_activation_estimate_matches_bench_activation_mb(version: str, depth: int, model: dict, side: int,
                                                         precision: str) -> None:
    """The traced saved-for-backward bytes against the exact count of a real forward pass (channels_last,
    as the trainer runs it); bf16 autocast keeps maps in bf16 and a bf16 copy of each weight."""
    cfg = run_config(version, depth, model=ModelConfig(**model), train={"batch_size": 4, "precision": precision})
    torch.manual_seed(0)
    net = model_from_config(version, depth, cfg.model, 10).to(memory_format=torch.channels_last).train()
    xb = torch.randn(4, 3, side, side).contiguous(memory_format=torch.channels_last)
    bf16 = precision == "bf16"
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    measured = activation_mb(net, xb, autocast) * MiB
    assert activation_bytes(cfg, DataShape(3, side, 10, 100, 10)) == pytest.approx(measured, rel=0.02)


def test_resnet_1001_activations_match_the_measured_benchmarks() -> None:
    """BENCHMARKS.md measures v2 ResNet-1001 at batch 128 (fp32): 18,675 MiB without checkpointing,
    6,232 MiB with one segment per unit and 802 MiB with 14 segments per stage."""
    def activations(checkpointing: int) -> float:
        return activation_bytes(run_config(model=ModelConfig(checkpointing=checkpointing)), CIFAR10) / MiB

    assert activations(0) == pytest.approx(18_675, rel=0.01)
    assert activations(ALL_UNITS) == pytest.approx(6_232, rel=0.01)
    assert activations(14) == pytest.approx(802, rel=0.01)


def test_checkpointing_keeps_segment_inputs_and_recomputes_one_segment() -> None:
    plain, per_unit, sqrt_n = (estimate_memory(run_config(model=ModelConfig(checkpointing=k)), CIFAR10)
                               for k in (0, ALL_UNITS, best_segments(111)))
    assert best_segments(111) == 11 and best_segments(18) == 4
    assert plain.recompute_bytes == 0 and plain.segments == 0
    assert (per_unit.segments, sqrt_n.segments) == (111, 11)
    # One segment per unit recomputes one unit: a stage-1 unit keeps 12 x 16 channels of 32x32 maps per image.
    assert per_unit.recompute_bytes == 128 * 12 * 16 * 32 * 32 * 4
    # 11 segments of about 10 units: far fewer inputs kept, ten units recomputed at a time.
    assert sqrt_n.activation_bytes < per_unit.activation_bytes / 7
    assert sqrt_n.recompute_bytes == pytest.approx(10 * per_unit.recompute_bytes, rel=0.1)
    assert sqrt_n.total < per_unit.total < plain.total
    assert plain.model_bytes == 12 * 10_327_706  # fp32 weights, gradients and momentum


def test_data_counts_on_a_gpu_but_not_on_the_cpu_that_already_holds_it() -> None:
    cfg = run_config("v1", 20, train={"precision": "fp32"})
    cpu, cuda = estimate_memory(cfg, CIFAR10, "cpu"), estimate_memory(cfg, CIFAR10, "cuda")
    assert cpu.data_bytes == 50_000 * 8  # only the epoch's permutation
    assert cuda.data_bytes == 60_000 * (3 * 32 * 32 + 8) + 50_000 * 8
    assert cuda.activation_bytes == cpu.activation_bytes
    assert estimate_memory(run_config("v1", 20), CIFAR10, "cuda").activation_bytes < cpu.activation_bytes * 0.51


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_sized_as_the_trainer_resolves_it(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """`precision: auto` is bf16 on a CPU that computes it natively and fp32 on one that does not: the estimate
    (and the refusal's check) sizes activations in whatever the trainer resolves on this machine."""
    monkeypatch.setattr(depthbench.devices, "native_bf16", lambda device: native)
    cfg = tiny_run(train={"precision": "auto"})
    setup = TrainingSetup.create(cfg, load_dataset(cfg.dataset))
    assert setup.amp_dtype == (torch.bfloat16 if native else None)
    shape = known_shape(cfg.dataset)
    assert shape is not None
    sized = {precision: activation_bytes(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"precision": precision})}), shape) for precision in ("fp32", "bf16")}
    assert sized["bf16"] < sized["fp32"]
    expected = sized["bf16" if native else "fp32"]
    assert activation_bytes(cfg, shape) == expected
    assert estimate_memory(cfg, shape).activation_bytes == expected
    assert check_fits(cfg, shape, torch.device("cpu"), free=2**60).activation_bytes == expected


def test_known_shape_is_the_loaded_shape() -> None:
    for dataset in (DatasetConfig(name="synthetic", train_subset=40, test_subset=20, image_size=8, num_classes=4),
                    DatasetConfig(name="synthetic"), DatasetConfig(name="digits", image_size=16, test_subset=50)):
        assert known_shape(dataset) == DataShape.of(load_dataset(dataset))
    assert known_shape(DatasetConfig(name="cifar100", train_subset=5000)) == DataShape(3, 32, 100, 5000, 10_000)
    assert known_shape(DatasetConfig(name="imagefolder", root="x")) is None


def test_cpu_capacity_is_what_the_machine_has_left() -> None:
    total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    assert 0 < device_capacity(torch.device("cpu")) <= total


# ---- refusal: one line with the estimate and what fits ------------------------------------------------

def test_refusal_gives_the_estimate_and_what_would_fit() -> None:
    cfg = run_config(train={"device": "cpu"})
    estimate = estimate_memory(cfg, CIFAR10)
    with pytest.raises(DepthbenchError) as err:
        check_fits(cfg, CIFAR10, torch.device("cpu"), free=12 * GiB)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{cfg.run_id} needs about {estimate.total / GiB:.1f} GiB on cpu "
                              "(18.2 GiB of activations at batch 128) but 12.0 GiB is free; what fits: ")
    batch = int(message.split("train.batch_size: ")[1].split(",")[0])
    smaller = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch})})
    larger = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch + 1})})
    assert estimate_memory(smaller, CIFAR10).total <= 12 * GiB < estimate_memory(larger, CIFAR10).total
    assert "model.checkpointing: 11 (about 2.2 GiB)" in message
    assert message.endswith(f"or a device with {estimate.total / GiB:.1f} GiB free")
    assert check_fits(cfg, CIFAR10, torch.device("cpu"), free=estimate.total) == estimate


def test_refusal_when_the_parameters_alone_cannot_fit() -> None:
    cfg = run_config("v2", 100_000_001, train={"device": "cpu"})
    with pytest.raises(DepthbenchError, match=r"1,030,400,023,706 parameters alone need 11\.2 TiB for weights, "
                                              r"gradients and momentum, and 1\.0 GiB is free; no batch size or "
                                              r"checkpointing helps"):
        check_fits(cfg, CIFAR10, torch.device("cpu"), free=GiB)


def test_refusal_names_the_evaluation_pass_when_not_even_batch_1_fits() -> None:
    cfg = run_config(train={"device": "cpu"})
    with pytest.raises(DepthbenchError, match=r"not even train.batch_size: 1 fits \([\d.]+ MiB, mostly the "
                                              r"evaluation pass: lower train.eval_batch_size\); use a device with"):
        check_fits(cfg, CIFAR10, torch.device("cpu"), free=300 * MiB)


def test_the_trainer_refuses_before_building_and_the_run_fails_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a worker (Ray, SLURM) only the trainer sees the device the run got: a run too big for it is a
    failed run whose message is the refusal, and no model is built."""
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr(depthbench.estimate, "device_capacity", lambda device: 200 * 2**10)
    monkeypatch.setattr("depthbench.train.model_from_config", never)
    cfg = tiny_run()
    outcome = execute_run(cfg, tmp_path)
    assert outcome.status == "failed"
    assert outcome.message.startswith(f"{cfg.run_id} needs about ") and "200.0 KiB is free" in outcome.message
    assert json.loads((tmp_path / cfg.run_id / "result.json").read_text())["error"] == outcome.message


# ---- the CLI: refused up front, nothing written; --dry-run shows the estimate --------------------------

def _config(folder: Path, *, depth: list[int] | None = None, **sections: dict) -> Path:
    data = {
        "name": "est",
        "dataset": {"name": "synthetic", "train_subset": 128, "test_subset": 64, "image_size": 8},
        "model": {"width": 4},
        "train": {"steps": 4, "batch_size": 16, "eval_every": 4, "device": "cpu"},
        "grid": {"version": ["v1", "v2"], "depth": depth or [8]},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    path = folder / "est.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sweep(*args: object):
    return runner.invoke(app, ["sweep", *(str(a) for a in args)])


def test_an_absurd_depth_is_refused_fast_with_nothing_built_or_written(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = sweep(_config(tmp_path, depth=[100_000_001]), "--out", tmp_path / "runs")
    assert time.perf_counter() - start < 5
    assert result.exit_code == 2
    assert result.output.startswith("error: v1-d100000001-s0-") and result.output.count("\n") == 1
    assert "parameters alone need" in result.output and "no batch size or checkpointing helps" in result.output
    assert not (tmp_path / "runs").exists()


def test_an_absurd_width_is_refused_up_front(tmp_path: Path) -> None:
    result = sweep(_config(tmp_path, model={"width": 200_000}), "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert "error: v1-d8-s0-" in result.output and "11,520,019,400,010 parameters alone need" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_size_the_config_tells_is_refused_before_any_data_is_read_or_fetched(tmp_path: Path) -> None:
    empty = tmp_path / "no-cifar-here"
    empty.mkdir()
    config = _config(tmp_path, dataset={"name": "cifar10", "root": str(empty)}, model={"width": 200_000})
    result = sweep(config, "--out", tmp_path / "runs")
    assert result.exit_code == 2 and "parameters alone need" in result.output  # not "CIFAR-10 is not in ..."
    assert list(empty.iterdir()) == [] and not (tmp_path / "runs").exists()


def test_a_batch_larger_than_the_training_set_is_refused_at_preflight(tmp_path: Path) -> None:
    result = sweep(_config(tmp_path, train={"batch_size": 200}), "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert "train.batch_size (200) is larger than the training set (128 images); lower it" in result.output
    assert not (tmp_path / "runs").exists()


def test_dry_run_shows_parameters_and_estimated_memory(tmp_path: Path) -> None:
    result = sweep(_config(tmp_path, depth=[8, 110], model={"width": 4}, grid={"model.width": [4, 200_000]}),
                   "--out", tmp_path / "runs", "--dry-run")
    assert result.exit_code == 0, result.output
    cfg = run_config("v2", 110, dataset=DatasetConfig(name="synthetic", train_subset=128, test_subset=64,
                                                      image_size=8),
                     model=ModelConfig(width=4), train={"steps": 4, "batch_size": 16, "eval_every": 4, "device": "cpu"})
    shape = known_shape(cfg.dataset)
    row = next(line for line in result.output.splitlines() if "v2-d110-s0-" in line and "109,726" in line)
    assert f"{estimate_memory(cfg, shape).total / MiB:.1f} MiB" in row
    assert "11,520,019,400,010" in result.output and "TiB (too big)" in result.output
    assert "memory: estimated training peak on the run's device; free now: cpu " in result.output
    assert not (tmp_path / "runs").exists()


def test_with_jobs_each_run_is_checked_against_its_share_of_the_memory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import depthbench.estimate as estimate
    from depthbench.cli import app
    from tests.conftest import tiny_sweep, write_config

    cfg = tiny_sweep()
    run = cfg.runs()[0]
    need = estimate.estimate_memory(run, estimate.known_shape(run.dataset), "cpu").total
    monkeypatch.setattr(estimate, "device_capacity", lambda device: 3 * need)  # room for three such runs
    config = write_config(tmp_path / "tiny.yaml", cfg)
    refused = CliRunner().invoke(app, ["sweep", str(config), "--out", str(tmp_path), "--jobs", "4"])
    assert refused.exit_code == 2 and not (tmp_path / "tiny").exists()
    share = estimate.format_bytes(3 * need // 4)
    assert refused.output.startswith(f"error: {run.run_id} needs about {estimate.format_bytes(need)} on cpu (")
    assert f"but {share} is free for each of the 4 runs training on it at once; " in refused.output
    assert refused.output.endswith(f"free per run, or fewer runs at once (--jobs)\n")
    assert refused.output.count("\n") == 1
    from depthbench.executors import ParallelExecutor

    assert ParallelExecutor(4, gpus=["0", "1"]).runs_per_device(torch.device("cuda")) == 2
    assert ParallelExecutor(3).runs_per_device(torch.device("cpu")) == 3


def test_a_cuda_graphed_step_counts_its_private_memory_pool() -> None:
    # The graph's pool holds a second copy of the step's activations and in-flight tensors, and the
    # gradients it writes; the eager step (cuda_graph off, a compiled model, AdamW, dropout) has none.
    from tests.conftest import tiny_run

    run = tiny_run(train={"eval_batch_size": 4})  # so that training's in-flight tensors are the transient ones
    shape = depthbench.estimate.known_shape(run.dataset)
    graphed = estimate_memory(run, shape, "cuda", bf16=False)
    eager = estimate_memory(run.model_copy(update={"train": run.train.model_copy(update={"cuda_graph": False})}),
                            shape, "cuda", bf16=False)
    assert eager.graph_bytes == 0 and estimate_memory(run, shape, "cpu").graph_bytes == 0
    assert graphed.graph_bytes == (graphed.activation_bytes + graphed.recompute_bytes + graphed.transient_bytes
                                   + 4 * graphed.params) == 305_272
    assert graphed.total == eager.total + graphed.graph_bytes
    for update in ({"compile": True}, {"optimizer": "adamw"}):
        other = run.model_copy(update={"train": run.train.model_copy(update=update)})
        assert estimate_memory(other, shape, "cuda", bf16=False).graph_bytes == 0
