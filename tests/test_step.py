"""The training step: eager vs graphed, the graphed step's self-check and its fallback (forced on CPU),
and the per-step host work kept out of the loop (CPU augmentation draws, fused SGD, RNG only for dropout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from depthbench import step as step_module
from depthbench import storage
from depthbench.augment import augment_batch
from depthbench.data import load_dataset
from depthbench.seeds import Stream, seed_for
from depthbench.step import EagerStep, choose_step, compare
from depthbench.train import TrainingSetup, train_run
from tests.conftest import tiny_run

TIMING = ("img_per_s", "elapsed_s")


def setup_for(**sections: dict) -> TrainingSetup:
    cfg = tiny_run(**sections)
    return TrainingSetup.create(cfg, load_dataset(cfg.dataset))


def weights(setup: TrainingSetup) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*setup.model.parameters(), *setup.model.buffers())]


class TwiceTheRate(EagerStep):
    """A "graph" that trains at double the learning rate: what a capture that baked in a stale value does."""

    graphed = True

    def __call__(self, step: int, lr: float) -> torch.Tensor:
        return super().__call__(step, 2 * lr)


class NoUpdate(EagerStep):
    """A "graph" whose optimizer step was lost: the right loss, no update."""

    graphed = True

    def __call__(self, step: int, lr: float) -> torch.Tensor:
        return super().__call__(step, 0.0)


class StaleBatch(EagerStep):
    """A "graph" that replays the batch it was captured on (GraphedStep captures on step ``steps``, which a
    run never takes, so that this is caught at whatever step the check runs)."""

    graphed = True

    def __call__(self, step: int, lr: float) -> torch.Tensor:
        return super().__call__(self.setup.cfg.train.steps, lr)


class TrainsWhileCapturing(EagerStep):
    """A faithful "graph" whose capture, like CUDA's warmup, trains three steps first."""

    graphed = True

    def __init__(self, setup: TrainingSetup) -> None:
        super().__init__(setup)
        for s in range(3):
            EagerStep(setup)(s, 0.05)


def force_graph(monkeypatch: pytest.MonkeyPatch, capture: type) -> None:
    """Make the CPU take the CUDA path of choose_step, with ``capture`` standing in for GraphedStep."""
    monkeypatch.setattr(step_module, "wants_graph", lambda setup: True)
    monkeypatch.setattr(step_module, "GraphedStep", capture)


def test_cpu_trains_eager_without_a_note() -> None:
    setup, notes = setup_for(), []
    assert type(choose_step(setup, 0, 0.05, notes)) is EagerStep and notes == []


def test_a_faithful_graph_passes_and_the_check_leaves_the_state_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    force_graph(monkeypatch, TrainsWhileCapturing)
    setup, notes = setup_for(), []
    before = weights(setup)
    chosen = choose_step(setup, 0, 0.05, notes)
    assert isinstance(chosen, TrainsWhileCapturing) and notes == []
    assert all(torch.equal(a, b) for a, b in zip(before, weights(setup), strict=True))
    assert setup.loss_sum.item() == 0 and setup.correct.item() == 0


@pytest.mark.parametrize(("capture", "says"), [
    (TwiceTheRate, "weight update off by 100%"),
    (NoUpdate, "weight update off by 100%"),
    (StaleBatch, "vs eager"),
])
def test_a_graph_that_disagrees_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, capture: type, says: str) -> None:
    force_graph(monkeypatch, capture)
    setup, notes = setup_for(), []
    before = weights(setup)
    chosen = choose_step(setup, 0, 0.05, notes)
    assert type(chosen) is EagerStep
    assert len(notes) == 1 and "the CUDA-graph step disagreed with the eager step" in notes[0]
    assert says in notes[0] and notes[0].endswith("training eager")
    assert all(torch.equal(a, b) for a, b in zip(before, weights(setup), strict=True))


def test_a_failed_capture_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(setup: TrainingSetup) -> EagerStep:
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    force_graph(monkeypatch, broken)
    notes: list[str] = []
    assert type(choose_step(setup_for(), 0, 0.05, notes)) is EagerStep
    assert "capture failed (RuntimeError: operation not permitted when stream is capturing)" in notes[0]


def test_compare_measures_the_loss_and_the_update() -> None:
    setup = setup_for()
    assert compare(setup, EagerStep(setup), 0, 0.05) is None
    assert compare(setup, TwiceTheRate(setup), 0, 0.05) == "weight update off by 100% of the eager one"


def test_dropout_keeps_the_eager_step_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    force_graph(monkeypatch, TrainsWhileCapturing)
    setup, notes = setup_for(model={"shortcut_gate": "dropout"}), []
    assert setup.random_layers and type(choose_step(setup, 0, 0.05, notes)) is EagerStep
    assert "draws random numbers each step (dropout)" in notes[0]


@pytest.mark.parametrize("capture", [TwiceTheRate, TrainsWhileCapturing])
def test_a_run_with_a_forced_graph_check_trains_exactly_as_an_eager_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capture: type,
) -> None:
    cfg = tiny_run()
    plain = train_run(cfg, tmp_path / "plain")
    force_graph(monkeypatch, capture)
    notes: list[str] = []
    checked = train_run(cfg, tmp_path / "checked", notes=notes)
    rows = [storage.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("plain", "checked")]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows[0]] == \
           [{k: v for k, v in r.items() if k not in TIMING} for r in rows[1]]
    assert checked["test_acc"] == plain["test_acc"] and checked["train_loss"] == plain["train_loss"]
    assert checked["cuda_graph"] is (capture is TrainsWhileCapturing) and plain["cuda_graph"] is False
    assert len(notes) == (1 if capture is TwiceTheRate else 0)


def test_augmentation_draws_come_from_a_cpu_generator_seeded_by_seed_and_step() -> None:
    setup = setup_for(dataset={"augment": True})
    idx, shift, flipped = setup.draws(5)
    assert shift.device.type == "cpu" and flipped.device.type == "cpu" and shift.shape == (2, 16, 1)
    # Same numbers as augmenting with a generator of (seed, step): a CPU run's batches did not change.
    gen = torch.Generator().manual_seed(seed_for(setup.cfg.seed, Stream.AUGMENT, 5))
    expected = augment_batch(setup.train_x[idx], gen)
    xb, yb = setup.batch(5)
    assert torch.equal(xb, setup.assemble(idx, shift, flipped)[0])
    assert torch.equal(yb, setup.train_y[idx])
    from depthbench.augment import normalize
    assert torch.equal(xb, normalize(expected, setup.mean, setup.std).contiguous(memory_format=setup.memory_format))


def test_the_global_rng_is_left_alone_without_dropout() -> None:
    setup = setup_for()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    EagerStep(setup)(0, 0.05)
    assert torch.equal(torch.get_rng_state(), state)
    dropout = setup_for(model={"shortcut_gate": "dropout"})
    EagerStep(dropout)(0, 0.05)
    assert not torch.equal(torch.get_rng_state(), state)


def test_cpu_sgd_keeps_the_numbers_of_the_foreach_sgd() -> None:
    # The fused CPU kernel differs in the last bits (FMA): it would change every CPU result made so far.
    setup = setup_for(train={"nesterov": True})
    assert setup.optimizer.defaults["foreach"] and not setup.optimizer.defaults["fused"]
    twin = setup_for(train={"nesterov": True})  # PyTorch's default on CPU: a Python loop over the tensors
    twin.optimizer = torch.optim.SGD(twin.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4,
                                     nesterov=True, foreach=False)
    for s in range(4):
        EagerStep(setup)(s, 0.05)
        EagerStep(twin)(s, 0.05)
    assert all(torch.equal(a, b) for a, b in zip(weights(setup), weights(twin), strict=True))


def test_checkpoint_segments_are_built_once() -> None:
    setup = setup_for(model={"checkpointing": 1})
    model = setup.model
    EagerStep(setup)(0, 0.05)
    plan = model._segment_plan()
    EagerStep(setup)(1, 0.05)
    assert model._segment_plan() is plan and len(plan) == 3
    assert not any(k.startswith("_segments") for k in model.state_dict())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_every_relu_backward_gets_a_channels_last_gradient(version: str) -> None:
    """Option A's subsampling and the pooling hand back plain NCHW gradients; where one met a channels_last
    ReLU output, the CPU ReLU backward ran 30x slower. The grad_format layers keep every gradient aligned."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from depthbench.models import build_model

    formats = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.threshold_backward.default:
                formats.append([a.is_contiguous(memory_format=torch.channels_last) for a in args[:2]])
            return func(*args, **(kwargs or {}))

    model = build_model(version, 14, width=4).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    loss = model(x).square().sum()
    with Watch():
        loss.backward()
    assert len(formats) == 13  # 2 per unit, 6 units, and the stem's (v1) or the final one (v2)
    assert all(grad_cl and out_cl for grad_cl, out_cl in formats), formats


def _resumed_under_another_pick(
    cfg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: torch.dtype | None,
    now: torch.dtype | None, notes: list[str] | None = None,
) -> tuple[dict, dict]:
    """``cfg`` trained whole with ``auto`` picking ``started``, and again stopped after 5 steps and resumed
    once ``auto`` picks ``now``: the two result.json dicts."""
    import depthbench.train as train_module
    from depthbench.train import RunInterrupted

    monkeypatch.setattr(train_module, "resolve_precision", lambda precision, device: started)
    whole = train_run(cfg, tmp_path / "whole")
    calls = iter(range(100))
    with pytest.raises(RunInterrupted):
        train_run(cfg, tmp_path / "split", should_stop=lambda: next(calls) >= 5)
    monkeypatch.setattr(train_module, "resolve_precision", lambda precision, device: now)
    return whole, train_run(cfg, tmp_path / "split", notes=notes)


@pytest.mark.parametrize(("started", "now"), [(torch.bfloat16, None), (None, torch.bfloat16)])
def test_precision_auto_resumes_in_the_precision_the_run_started_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: torch.dtype | None, now: torch.dtype | None,
) -> None:
    """`auto` changed its CPU pick (bf16 where the CPU has it natively): a run started under the old pick
    finishes in it, and says so, instead of being refused or mixing two precisions."""
    cfg = tiny_run(train={"steps": 8, "checkpoint_every": 100})
    assert cfg.train.precision == "auto"
    notes: list[str] = []
    whole, resumed = _resumed_under_another_pick(cfg, tmp_path, monkeypatch, started, now, notes)
    name = "bfloat16" if started else "float32"
    assert resumed["precision"] == whole["precision"] == name
    assert resumed["train_loss"] == whole["train_loss"] and resumed["test_acc"] == whole["test_acc"]
    assert any(f"continues in {name}, the precision it started in" in note for note in notes), notes


@pytest.mark.parametrize(("started", "now"), [(torch.bfloat16, None), (None, torch.bfloat16)])
def test_a_vit_resumes_with_the_attention_kernel_it_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: torch.dtype | None, now: torch.dtype | None,
) -> None:
    """The attention kernel follows the precision (math on a CPU in bf16), which a resumed run keeps: the
    resumed run records the same kernel and learns exactly what the uninterrupted one did."""
    cfg = tiny_run(model={"family": "vit", "width": 16, "heads": 2, "patch": 4}, train={
        "steps": 8, "checkpoint_every": 100, "lr": 0.003})
    whole, resumed = _resumed_under_another_pick(cfg, tmp_path, monkeypatch, started, now)
    kernel = "math" if started else "default"
    assert resumed["attention"] == whole["attention"] == kernel
    assert resumed["train_loss"] == whole["train_loss"] and resumed["test_acc"] == whole["test_acc"]


@pytest.mark.parametrize(("machine", "capabilities", "onednn", "expected"), [
    ("x86_64", {"avx512_f": True}, True, None),  # AVX-512 alone: oneDNN emulates bf16, slower than fp32
    ("x86_64", {"avx512_f": True, "avx512_bf16": True}, True, torch.bfloat16),  # e.g. AMD Zen 4
    ("x86_64", {"avx512_f": True, "amx_tile": True}, True, torch.bfloat16),  # Intel Sapphire Rapids on
    ("x86_64", {"avx2": True}, False, None),
    ("aarch64", {}, True, torch.bfloat16),  # Arm: oneDNN's flag means the BF16 extension
    ("aarch64", {}, False, None),
])
def test_precision_auto_on_cpu_is_bf16_only_where_the_cpu_computes_it_natively(
    monkeypatch: pytest.MonkeyPatch, machine: str, capabilities: dict, onednn: bool, expected: torch.dtype | None,
) -> None:
    import platform

    from depthbench.devices import resolve_precision

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("fp32", cpu) is None and resolve_precision("bf16", cpu) == torch.bfloat16


def test_adamw_keeps_the_eager_step_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    force_graph(monkeypatch, TwiceTheRate)
    setup, notes = setup_for(train={"optimizer": "adamw", "lr": 1e-3}), []
    assert type(choose_step(setup, 0, 1e-3, notes)) is EagerStep
    assert notes == [f"{setup.cfg.run_id}: CUDA graphs are used with SGD only; adamw trains eager (fused)"]


class _FakeCompile:
    """torch.compile stood in for by the model itself: which models were compiled, without a compiler's minute."""

    def __init__(self) -> None:
        self.models: list[torch.nn.Module] = []

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        self.models.append(model)
        return model


def _stopped_after_5_steps(cfg: Any, run_dir: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool | None = None,
                           ) -> None:
    """``cfg`` trained until a stop after 5 steps (its checkpoint saved there), with compile ``auto`` resolving to
    ``compiled`` when given."""
    import depthbench.train as train_module
    from depthbench.train import RunInterrupted

    if compiled is not None:
        monkeypatch.setattr(train_module, "resolve_compile", lambda cfg, device, amp_dtype: compiled)
    calls = iter(range(100))
    with pytest.raises(RunInterrupted):
        train_run(cfg, run_dir, should_stop=lambda: next(calls) >= 5)


@pytest.mark.parametrize(("started", "now"), [(True, False), (False, True)])
def test_compile_auto_resumes_as_the_run_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: bool, now: bool,
) -> None:
    """`auto` would now choose otherwise (another CPU, a missing compiler): the run finishes as it started,
    records that in its checkpoint and result.json, and says so."""
    import depthbench.train as train_module

    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    cfg = tiny_run(train={"steps": 8, "checkpoint_every": 100})
    assert cfg.train.compile == "auto"
    _stopped_after_5_steps(cfg, tmp_path, monkeypatch, compiled=started)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["compiled"] is started
    monkeypatch.setattr(train_module, "resolve_compile", lambda cfg, device, amp_dtype: now)
    monkeypatch.setattr(train_module, "cpp_compiler", lambda: True)
    notes: list[str] = []
    result = train_run(cfg, tmp_path, notes=notes)
    assert result["compiled"] is started and result["steps"] == 8
    assert f"{cfg.run_id}: continues {'compiled' if started else 'eager'}, as it started " \
           "(compile auto would now choose otherwise here)" in notes
    # Compiled at each start that compiles: both starts when it began compiled; when it began eager, the resume's
    # own pick built a compiled wrapper (never called) before the kept choice replaced it.
    assert len(fake.models) == (2 if started else 1)


@pytest.mark.parametrize("unrecorded", [("compiled",), ("compiled", "device_type", "precision")])
def test_a_checkpoint_from_before_compile_was_recorded_resumes_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unrecorded: tuple[str, ...],
) -> None:
    """Runs trained before `auto` existed were eager (compile was off by default): they continue eager, the
    oldest checkpoints, which did not record their device and precision either, too."""
    import depthbench.train as train_module

    monkeypatch.setattr(torch, "compile", _FakeCompile())
    cfg = tiny_run(train={"steps": 8, "checkpoint_every": 100})
    _stopped_after_5_steps(cfg, tmp_path, monkeypatch, compiled=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key in unrecorded:
        del state[key]
    torch.save(state, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(train_module, "resolve_compile", lambda cfg, device, amp_dtype: True)
    assert train_run(cfg, tmp_path)["compiled"] is False


def test_a_compiled_run_resumed_where_nothing_can_compile_continues_eager_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import depthbench.train as train_module

    monkeypatch.setattr(torch, "compile", _FakeCompile())
    cfg = tiny_run(train={"steps": 8, "checkpoint_every": 100})
    _stopped_after_5_steps(cfg, tmp_path, monkeypatch, compiled=True)
    monkeypatch.setattr(train_module, "resolve_compile", lambda cfg, device, amp_dtype: False)
    monkeypatch.setattr(train_module, "cpp_compiler", lambda: False)
    notes: list[str] = []
    assert train_run(cfg, tmp_path, notes=notes)["compiled"] is False
    assert f"{cfg.run_id}: started compiled, continues eager: no C++ compiler for torch.compile here" in notes


def test_an_explicit_compile_setting_wins_over_the_recorded_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    compiled = tiny_run(train={"steps": 8, "checkpoint_every": 100, "compile": True})
    _stopped_after_5_steps(compiled, tmp_path, monkeypatch)
    eager = compiled.model_copy(update={"train": compiled.train.model_copy(update={"compile": False})})
    assert eager.run_id == compiled.run_id  # compile is how a run trains, not what: the same run
    notes: list[str] = []
    assert train_run(eager, tmp_path, notes=notes)["compiled"] is False
    assert len(fake.models) == 1 and not any("continues" in note for note in notes)


@pytest.mark.parametrize(("change", "expected"), [
    ({}, True),  # a CPU with AMX, bf16, a long run, no checkpointing, a C++ compiler
    ({"capabilities": {"avx512_bf16": True}}, False),  # AVX512-BF16 without AMX: compiled measured level with eager
    ({"amp_dtype": None}, False),  # fp32
    ({"device": "cuda"}, False),  # CUDA keeps its graphed step
    ({"train": {"steps": 4999}}, False),  # too short to repay the compilation
    ({"model": {"checkpointing": 2}}, False),  # checkpointing does not compile
    ({"compiler": False}, False),  # inductor would fail at the first step
    ({"train": {"steps": 4999, "compile": True}}, True),  # an explicit setting always wins
    ({"train": {"compile": False}}, False),
])
def test_compile_auto_compiles_long_bf16_runs_on_cpus_with_amx(
    monkeypatch: pytest.MonkeyPatch, change: dict, expected: bool,
) -> None:
    from depthbench import devices

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: change.get("capabilities", {"amx_tile": True}))
    monkeypatch.setattr(devices, "cpp_compiler", lambda: change.get("compiler", True))
    cfg = tiny_run(model=change.get("model", {}), train={"steps": devices.COMPILE_MIN_STEPS, **change.get("train", {})})
    amp_dtype = change.get("amp_dtype", torch.bfloat16)
    assert devices.resolve_compile(cfg, torch.device(change.get("device", "cpu")), amp_dtype) is expected
