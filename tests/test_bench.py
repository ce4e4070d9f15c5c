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
from depthbench.augment import normalize
from depthbench.bench import probes
from depthbench.cli import app
from depthbench.config import DatasetConfig
from depthbench.data import load_dataset
from depthbench.devices import precision_name
from depthbench.models import build_model, count_params, forward_flops, vit_forward_flops, vit_param_count
from depthbench.step import update_step
from depthbench.train import TrainingSetup, resolve_precision

runner = CliRunner()
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))
# --no-compile: on a CPU with AMX, compile auto would compile these nets as a 64,000-step run would (a minute).
TINY = ("--batch-size", "16", "--steps", "2", "--warmup", "1", "--data", "synthetic", "--train-subset", "64",
        "--workers", "1", "--no-compile")


@pytest.fixture(autouse=True)
def _small_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real peak uses 2048-4096 square matrices (seconds on a CPU); the arithmetic is the same.
    monkeypatch.setattr(probes, "MATMUL_SIZES", {"cpu": (256,), "cuda": (256,)})


def invoke(*args: str):
    return runner.invoke(app, ["bench", *args], catch_exceptions=False)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fast_path_gives_the_usual_pipelines_losses(device: str) -> None:
    """uint8 batch on the device + normalize + channels_last + the trainer's update_step (fp32, no augmentation)
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
            loss, _ = update_step(fast, opt_fast, x_fast, train_y[idx], nullcontext)
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
                "first_step_s", "overhead_s", "data_load_s", "activation_mb", "host_ms_per_step", "kernels_per_step"):
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
    auto = precision_name(resolve_precision("auto", torch.device("cpu")))
    assert (out["device"], out["precision"], out["channels_last"], out["compile"]) == ("cpu", auto, True, False)
    assert out["cuda_graph"] is True  # the default; a CPU step ignores it
    assert out["data"].startswith("synthetic") and out["matmul_peak_size"] == 256
    assert out["peak_mem_total_mb"] > out["peak_mem_mb"]
    # The host's cost: the tiny-batch step against the full one, and the kernels that step dispatched.
    assert out["host_share"] == pytest.approx(out["host_ms_per_step"] / (1000 * out["step_s"]))
    assert list(out["kernels_by_phase"]) == ["batch", "forward", "backward", "optimizer", "metrics"]
    assert out["kernels_per_step"] == sum(out["kernels_by_phase"].values())
    assert out["aten_calls_per_step"] > out["kernels_per_step"]  # views and allocations are not kernels


def test_bench_scaling_prints_a_row_per_depth_with_and_without_checkpointing() -> None:
    result = invoke("--depths", "8,11", *TINY)
    assert result.exit_code == 0, result.output
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^│\s*(\d+) │.*$", result.stdout, re.MULTILINE)}
    assert sorted(rows, key=int) == ["8", "11"]
    assert "basic (1)" in rows["8"] and "bottleneck (1)" in rows["11"]
    assert "1.00x" in rows["8"]  # time vs FLOPs is relative to the first depth
    assert all(len(re.findall(r"\d MB", row)) == 4 for row in rows.values())  # memory and activations, both ways
    assert "note: " in result.stdout and "host ms: a step on batches of 2 8x8 images" in result.stdout


def test_bench_scaling_json_has_host_cost_and_kernels_per_depth() -> None:
    result = invoke("--depths", "8,14", *TINY, "--device", "cpu", "--precision", "fp32", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [row["depth"] for row in rows] == [8, 14]
    assert all(row["host_ms_per_step"] > 0 for row in rows)
    # One more basic unit per stage: 3 x (9 forward + 7 backward) kernels (see the kernel-count test).
    assert rows[1]["kernels_per_step"] - rows[0]["kernels_per_step"] == 3 * (9 + 7)


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


def _kernels(version: str, depth: int) -> list[dict[str, int]]:
    """The kernels of two steady steps of the tiny fp32 CPU host setup of ResNet-``depth``, by phase."""
    dataset, _ = bench.spec.bench_dataset("synthetic", 64)
    cfg = bench.spec.host_config(bench.spec.run_config(
        bench.BenchSpec(version=version, depth=depth, device="cpu", precision="fp32"), dataset), 10)
    setup = TrainingSetup.create(cfg, load_dataset(cfg.dataset))
    bench.count_kernels(setup, 0)  # the first step also creates the momentum buffers
    return [bench.count_kernels(setup, step).by_phase for step in (1, 2)]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_kernel_count_is_deterministic_and_grows_by_the_units_kernels(version: str) -> None:
    """A basic unit is 9 forward kernels (two BN, ReLU and conv, the add, and each BN's step counter in
    training) and 7 backward (the gradients of those six, and their sum where the branches join); nothing
    else of a step depends on the depth."""
    (k8, again), (k14, _), (k20, _) = (_kernels(version, depth) for depth in (8, 14, 20))
    assert k8 == again  # deterministic: a function of the net and the code path
    for shallow, deep in ((k8, k14), (k14, k20)):  # one more unit per stage, 3 in all
        assert deep["forward"] - shallow["forward"] == 3 * 9
        assert deep["backward"] - shallow["backward"] == 3 * 7
        assert {p: deep[p] for p in ("batch", "optimizer", "metrics")} == {
            p: shallow[p] for p in ("batch", "optimizer", "metrics")}
    # foreach SGD on CPU (fused on CUDA): 4 calls for all 60-odd parameter tensors (decay, momentum scale and
    # add, update), not 4 per tensor
    assert k20["optimizer"] == 4
    assert 150 <= sum(k20.values()) <= 300, k20  # ResNet-20: about 200 (23 of them preparing the batch)


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
    (("--data", "/no/such/folder"), "error: --data '/no/such/folder' is neither auto, synthetic, digits nor an existing"),
    (("--precision", "fp16"), "error: --precision 'fp16' is unknown; auto, fp32 or bf16"),
    (("--checkpointing", "--compile"), "error: --checkpointing and --compile do not combine"),
    (("--segments", "4"), "error: --segments says how --checkpointing splits each stage; add --checkpointing"),
    (("--concurrent", "1,2", "--segments", "4"),
     "error: --segments says how --checkpointing splits each stage; add --checkpointing"),
    (("--depths", "8,14", "--checkpointing"),
     "error: --depths times every depth both without and with checkpointing; drop --checkpointing (--segments sets "
     "the checkpointed column's segments)"),
    (("--concurrent", "1,x"), "error: --concurrent '1,x' must be comma-separated whole numbers, e.g. 1,2,4"),
    (("--concurrent", "0,2"), "error: --concurrent '0,2': each count of runs at once must be at least 1"),
    (("--concurrent", "2", "--depths", "8,14"), "error: --depths and --concurrent are two separate measurements"),
    (("--family", "vits"), "error: --family 'vits' is unknown (did you mean 'vit'?); resnet or vit"),
    (("--family", "vit", "--width", "30", "--heads", "4"),
     "error: model.heads: width 30 is not divisible by 4 heads; nearest head counts that divide it: 3 or 5"),
])
def test_bench_user_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2
    assert result.output.strip().startswith(message), result.output
    assert "Traceback" not in result.output


def test_bench_times_a_vit_against_the_usual_loop_with_the_same_keys() -> None:
    result = invoke("--family", "vit", "--depth", "2", "--width", "16", "--heads", "2", "--patch", "2",
                    "--unit", "deepnorm", "--data", "digits", "--batch-size", "16", "--steps", "2", "--warmup", "1",
                    "--workers", "1", "--no-compile", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # 8x8 digits in patches of 2: 16 patches and a class token; parameters and FLOPs by formula.
    shape = {"width": 16, "heads": 2, "mlp_ratio": 4.0, "patch": 2, "pool": "cls", "image_size": 8,
             "in_channels": 1, "num_classes": 10}
    assert (out["family"], out["block"], out["units_per_stage"]) == ("vit", "deepnorm", 2)
    assert out["params"] == vit_param_count(2, unit="deepnorm", **shape)
    assert out["train_flops_per_img"] == 3 * vit_forward_flops(2, **shape)
    assert out["data"] == "scikit-learn's digits, 8x8, unaugmented, 1437 train images"
    assert out["speedup"] == pytest.approx(out["img_per_s"] / out["baseline_img_per_s"])
    for key in ("mfu", "peak_mem_mb", "activation_mb", "host_ms_per_step", "kernels_per_step"):
        assert out[key] > 0, key
    assert out["kernels_by_phase"]["optimizer"] > 0
    table = invoke("--family", "vit", "--depth", "2", "--width", "16", "--heads", "2", "--patch", "2",
                   "--data", "digits", "--batch-size", "16", "--steps", "2", "--warmup", "1", "--workers", "1",
                   "--no-compile")
    assert table.exit_code == 0 and "v2 ViT-2 (pre_ln, 2 blocks, " in table.stdout


def test_bench_scaling_of_a_vit_has_no_checkpointed_column_and_one_stage() -> None:
    result = invoke("--family", "vit", "--depths", "2,4", "--width", "16", "--heads", "2", "--patch", "8",
                    *TINY, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["depth"], r["block"], r["step_s_ckpt"], r["peak_mem_mb_ckpt"]) for r in rows] == [
        (2, "pre_ln", None, None), (4, "pre_ln", None, None)]
    # Every block adds the same activations: two blocks' worth from depth 2 to 4, in one stage.
    assert rows[1]["activation_mb_per_unit"] == pytest.approx((rows[1]["activation_mb"] - rows[0]["activation_mb"]) / 2)
