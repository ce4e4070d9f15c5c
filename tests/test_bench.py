"""`depthbench bench`: the fast path learns what the usual one does, and its figures add up.

No timing is asserted (a shared machine makes timings flaky): the tests check that the trainer's
fast path computes the usual pipeline's losses, and the structure and arithmetic of what bench reports.
"""

from __future__ import annotations

import copy
import json
import re
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from depthbench import bench
from depthbench.bench import probes
from depthbench.augment import normalize
from depthbench.cli import app
from depthbench.config import DatasetConfig
from depthbench.data import load_dataset
from depthbench.models import build_model, count_params, forward_flops
from depthbench.train import resolve_precision, sgd_step

runner = CliRunner()
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))
TINY = ("--batch-size", "16", "--steps", "2", "--warmup", "1", "--data", "synthetic", "--train-subset", "64",
        "--workers", "1")


@pytest.fixture(autouse=True)
def _small_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real peak uses 2048-4096 square matrices (seconds on a CPU); the arithmetic is the same.
    monkeypatch.setattr(probes, "MATMUL_SIZES", {"cpu": (256,), "cuda": (256,)})


def invoke(*args: str):
    return runner.invoke(app, ["bench", *args], catch_exceptions=False)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fast_path_gives_the_usual_pipelines_losses(device: str) -> None:
    """uint8 batch on the device + normalize + channels_last + the trainer's sgd_step (fp32, no augmentation)
    against torchvision ToTensor + Normalize on PIL images through a DataLoader into an NCHW model: same
    init, same batches, same losses step after step."""
    data = load_dataset(DatasetConfig(name="synthetic", train_subset=96, test_subset=10))
    torch.manual_seed(0)
    fast = build_model("v2", 8).to(device=device, memory_format=torch.channels_last)
    plain = copy.deepcopy(fast).to(memory_format=torch.contiguous_format)
    assert fast.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.stem.conv.weight.is_contiguous()
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    opt_fast, opt_plain = torch.optim.SGD(fast.parameters(), **sgd), torch.optim.SGD(plain.parameters(), **sgd)
    batches = [torch.randperm(96, generator=torch.Generator().manual_seed(s))[:64].tolist() for s in range(4)]
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    usual = DataLoader(bench.PILImageSet(data.train_x, data.train_y, bench.usual_transform(data, augment=False)),
                       batch_sampler=batches)

    losses_fast, losses_plain = [], []
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 means fp32 on CUDA too
        for idx, (x_plain, y_plain) in zip(batches, usual, strict=True):
            x_plain, y_plain = x_plain.to(device), y_plain.to(device)
            x_fast = normalize(train_x[idx], mean, std).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(x_fast, x_plain, rtol=0, atol=1e-5)
            assert torch.equal(train_y[idx], y_plain)
            loss, _ = sgd_step(fast, opt_fast, x_fast, train_y[idx], nullcontext)
            losses_fast.append(loss.item())

            loss = F.cross_entropy(plain(x_plain), y_plain)
            opt_plain.zero_grad()
            loss.backward()
            opt_plain.step()
            losses_plain.append(loss.item())

    assert losses_fast == pytest.approx(losses_plain, rel=1e-4, abs=1e-5)
    assert losses_fast[-1] < losses_fast[0]  # and they are learning, not sitting still


def test_bench_json_reports_consistent_figures() -> None:
    result = invoke("--depth", "8", *TINY, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for key in ("img_per_s", "baseline_img_per_s", "speedup", "mfu", "peak_mem_mb", "step_s", "baseline_step_s",
                "train_flops_per_img", "achieved_flops", "matmul_peak_flops", "eval_img_per_s", "setup_s",
                "first_step_s", "overhead_s", "data_load_s", "activation_mb"):
        assert out[key] > 0, key
    assert out["speedup"] == pytest.approx(out["img_per_s"] / out["baseline_img_per_s"])
    assert out["step_s"] == pytest.approx(16 / out["img_per_s"])
    assert out["baseline_step_s"] == pytest.approx(16 / out["baseline_img_per_s"])
    assert out["achieved_flops"] == pytest.approx(out["train_flops_per_img"] * out["img_per_s"])
    assert out["mfu"] == pytest.approx(out["achieved_flops"] / out["matmul_peak_flops"])
    assert out["overhead_s"] >= out["data_load_s"] + out["setup_s"]
    assert out["paper_run_h"] == pytest.approx(64_000 * out["step_s"] / 3600)
    net = build_model("v2", 8)
    assert out["train_flops_per_img"] == 3 * forward_flops(net) and out["params"] == count_params(net)
    assert (out["depth"], out["block"], out["units_per_stage"], out["workers"]) == (8, "basic", 1, 1)
    assert (out["device"], out["precision"], out["channels_last"], out["compile"]) == ("cpu", "float32", True, False)
    assert out["data"].startswith("synthetic") and out["matmul_peak_size"] == 256
    assert out["peak_mem_total_mb"] > out["peak_mem_mb"]


def test_bench_scaling_prints_a_row_per_depth_with_and_without_checkpointing() -> None:
    result = invoke("--depths", "8,11", *TINY)
    assert result.exit_code == 0, result.output
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^│\s*(\d+) │.*$", result.stdout, re.MULTILINE)}
    assert sorted(rows, key=int) == ["8", "11"]
    assert "basic (1)" in rows["8"] and "bottleneck (1)" in rows["11"]
    assert "1.00x" in rows["8"]  # time vs FLOPs is relative to the first depth
    assert all(len(re.findall(r"\d MB", row)) == 4 for row in rows.values())  # memory and activations, both ways
    assert "note: " in result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_bench_runs_bf16_and_reports_the_allocator_peak() -> None:
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    result = invoke("--depth", "8", *TINY, "--device", "cuda", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["device"], out["precision"]) == ("cuda", "bfloat16")
    assert out["peak_mem_mb"] > 0 and out["peak_mem_total_mb"] > out["peak_mem_mb"]
    assert out["speedup"] == pytest.approx(out["img_per_s"] / out["baseline_img_per_s"])
    assert out["mfu"] == pytest.approx(out["achieved_flops"] / out["matmul_peak_flops"])


def test_cpu_auto_precision_is_fp32_on_a_cpu_without_bf16_units() -> None:
    # bf16 autocast on a CPU without AVX512-BF16/AMX is emulated and slower than fp32 (BENCHMARKS.md).
    assert resolve_precision("auto", torch.device("cpu")) is None


def test_linearity_notes_say_where_cost_is_not_linear() -> None:
    rows = [
        {"depth": 20, "block": "basic", "units_per_stage": 3, "train_flops_per_img": 1.0, "step_s": 1.0,
         "activation_mb": 100.0},
        {"depth": 56, "block": "basic", "units_per_stage": 9, "train_flops_per_img": 3.0, "step_s": 3.3,
         "activation_mb": 280.0},
        {"depth": 110, "block": "basic", "units_per_stage": 18, "train_flops_per_img": 6.0, "step_s": 6.0,
         "activation_mb": 550.0},
        {"depth": 164, "block": "bottleneck", "units_per_stage": 18, "train_flops_per_img": 6.0, "step_s": 9.0,
         "activation_mb": 2000.0},
    ]
    bench._add_linearity(rows)
    assert [r["time_vs_flops"] for r in rows] == pytest.approx([1.0, 1.1, 1.0, 1.5])
    assert [r["activation_mb_per_unit"] for r in rows] == pytest.approx([None, 10.0, 10.0, None])
    assert bench.linearity_notes(rows) == [
        "depth 164 (bottleneck): a step takes 1.50x the time its FLOPs predict from depth 20",
        "basic units: each added unit keeps 10.0 MB up to depth 56, 10.0 MB up to depth 110 of activations: "
        "linear in depth",
    ]
    rows[2]["activation_mb"] = 1000.0
    bench._add_linearity(rows)
    assert bench.linearity_notes(rows)[-1].endswith("not linear in depth (2.67x spread)")


def test_activation_memory_counts_what_backward_keeps() -> None:
    """The basic V2 unit keeps 4 maps of its size for backward (BN input, ReLU output, and again); per-unit
    checkpointing keeps only the unit's input."""
    x = torch.randn(8, 3, 32, 32)
    plain, ckpt = (bench.activation_mb(build_model("v2", 14, checkpointing=k), x, nullcontext) for k in (0, 10**6))
    deeper = bench.activation_mb(build_model("v2", 20), x, nullcontext)
    stage_maps_mb = 8 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8) * 4 / 2**20  # one map per stage
    # One more unit per stage: 4 maps each, plus BN's per-channel batch statistics (a few kB).
    assert deeper - plain == pytest.approx(4 * stage_maps_mb, rel=1e-3)
    assert 2.5 * ckpt < plain


def test_peak_memory_sees_an_allocation_and_not_what_came_before() -> None:
    before = torch.ones(32 * 2**20)  # 128 MiB resident before the window: not counted
    peak = bench.PeakMemory(torch.device("cpu"))
    peak.start()
    inside = torch.ones(64 * 2**20)  # 256 MiB allocated and touched inside it
    del inside
    above, total = peak.stop()
    del before
    assert 250 < above < 400 and total > above


@pytest.mark.parametrize(("args", "message"), [
    (("--depth", "57"), "error: depth 57 fits no block type: depth must be 6n+2 (basic) or 9n+2 (bottleneck)"),
    (("--depths", "20,x"), "error: --depths '20,x' must be comma-separated whole numbers"),
    (("--data", "/no/such/folder"), "error: --data '/no/such/folder' is neither auto, synthetic nor an existing"),
    (("--precision", "fp16"), "error: --precision 'fp16' is unknown; auto, fp32 or bf16"),
    (("--checkpointing", "--compile"), "error: --checkpointing and --compile do not combine"),
    (("--segments", "4"), "error: --segments says how --checkpointing splits each stage; add --checkpointing"),
])
def test_bench_user_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2
    assert result.output.strip().startswith(message), result.output
    assert "Traceback" not in result.output
