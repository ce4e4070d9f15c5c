"""The one trainer: every run of every sweep is trained by :func:`train_run`.

The recipe is the CIFAR one of He et al. (REFERENCE.md section 2): SGD with momentum and weight
decay, a step-based multi-step schedule (0.1, /10 at 32k and 48k of 64k steps) and an optional
constant warmup that hands back to that schedule. The speed techniques are those of the fastest
CIFAR trainers (section 5): the training split stays on the device as uint8, augmentation is a
batched tensor op, the model runs channels_last, bf16 autocast on CUDA.

A run is resumable at any step and resumes bit-exactly on CPU, because nothing random is carried
from step to step: the data order of epoch e is drawn from a generator seeded by (seed, e), and
the augmentation and dropout of step s from one seeded by (seed, s). A checkpoint therefore only
needs the model, the optimizer, the step and the running metric sums.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from depthbench import stopping, storage
from depthbench.architecture import resolve_block
from depthbench.augment import augment_batch, normalize
from depthbench.config import DEVICE_NAME, RunConfig, TrainConfig, dump_run_config
from depthbench.data import TensorData, load_dataset
from depthbench.errors import DepthbenchError
from depthbench.estimate import DataShape, check_fits
from depthbench.layout import CHECKPOINT, CONFIG, FINAL_WEIGHTS, METRICS, RESULT
from depthbench.models import count_params, model_from_config


class RunInterrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM); the run saved a checkpoint and can be resumed."""


@dataclass(frozen=True)
class Progress:
    """What the trainer reports to whoever shows progress; ``row`` is set at log points only."""

    step: int
    steps: int
    row: dict[str, Any] | None = None


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for a step: warmup rate first, then the base rate times gamma per milestone passed."""
    if step < cfg.warmup.steps:
        return cfg.warmup.lr
    drops = sum(step >= m for m in cfg.milestone_steps)
    return cfg.lr * cfg.gamma**drops


def resolve_device(name: str, option: str = "device") -> torch.device:
    """The device ``name`` means here; ``option`` is how the user gave it, for the error message."""
    if not DEVICE_NAME.fullmatch(name):
        raise DepthbenchError(f"{option} '{name}' is unknown; auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DepthbenchError(f"train.device is '{name}' but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DepthbenchError(f"train.device is '{name}' but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. ``auto`` means bf16 on CUDA, fp32 on CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """How a step's precision is recorded (result.json, checkpoints): float32 or bfloat16."""
    return str(amp_dtype or torch.float32).removeprefix("torch.")


def _mix(seed: int, counter: int, salt: int) -> int:
    # Distinct, well-spread generator seeds for (seed, counter) pairs; 63 bits keeps manual_seed happy.
    return (seed * 0x9E3779B97F4A7C15 + counter * 0xBF58476D1CE4E5B9 + salt) % (1 << 63)


class BatchOrder:
    """The training data order: a fresh permutation each epoch, a pure function of (seed, step)."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        if batch_size > n:
            raise DepthbenchError(
                f"train.batch_size ({batch_size}) is larger than the training set ({n} images); lower it"
            )
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.per_epoch = n // batch_size  # drop the ragged last batch, so every step sees batch_size images
        self._epoch, self._perm = -1, torch.empty(0)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch, 1))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).to(self.device)
        return self._perm[index * self.batch_size : (index + 1) * self.batch_size]


@torch.inference_mode()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
    batch_size: int, autocast: Callable[[], Any], channels_last: bool,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole uint8 set, in large batches."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for start in range(0, len(x), batch_size):
        xb = normalize(x[start : start + batch_size], mean, std)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = y[start : start + batch_size]
        with autocast():
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    return loss_sum.item() / len(x), correct.item() / len(x)


def sgd_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
    autocast: Callable[[], Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward, backward and optimizer step on a prepared batch; the loss and logits, detached.

    The trainer's step, shared with ``depthbench bench`` so that what is timed is what trains.
    """
    with autocast():
        logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


@dataclass
class TrainingSetup:
    """A run ready to train on its device: the uint8 data, the seeded model, its optimizer, the batch recipe.

    Shared by :func:`train_run` and ``depthbench bench``, so the benchmark times exactly the trainer.
    """

    cfg: RunConfig
    device: torch.device
    model: nn.Module
    step_model: nn.Module  # the model, compiled when train.compile is set
    optimizer: torch.optim.Optimizer
    order: BatchOrder
    train_x: torch.Tensor
    train_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    memory_format: torch.memory_format
    amp_dtype: torch.dtype | None  # None: plain fp32

    @classmethod
    def create(cls, cfg: RunConfig, data: TensorData) -> TrainingSetup:
        tc = cfg.train
        device = resolve_device(tc.device)
        check_fits(cfg, DataShape.of(data), device)  # refuse a run that cannot fit before building its model
        amp_dtype = resolve_precision(tc.precision, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # Data: uint8 on the device; normalisation and augmentation happen per batch.
        train_x, train_y = data.train_x.to(device), data.train_y.to(device)
        # Model and optimizer; the init is seeded so a run is reproducible from its seed alone.
        torch.manual_seed(_mix(cfg.seed, 0, 2))
        model = model_from_config(cfg.version, cfg.depth, cfg.model, data.num_classes, data.in_channels)
        memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        model = model.to(device=device, memory_format=memory_format)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=lr_at(0, tc), momentum=tc.momentum,
            weight_decay=tc.weight_decay, nesterov=tc.nesterov and tc.momentum > 0,
        )
        return cls(
            cfg, device, model, torch.compile(model) if tc.compile else model, optimizer,
            BatchOrder(len(train_x), tc.batch_size, cfg.seed, device), train_x, train_y,
            torch.tensor(data.mean, device=device).view(1, -1, 1, 1),
            torch.tensor(data.std, device=device).view(1, -1, 1, 1),
            memory_format, amp_dtype,
        )

    @property
    def precision(self) -> str:
        return precision_name(self.amp_dtype)

    def autocast(self) -> Any:
        """The context a forward pass runs in: autocast to ``amp_dtype``, or nothing for fp32."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the step's learning rate and draw its augmented, normalised batch: a function of (seed, step)."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.train)
        idx = self.order(step)
        gen = torch.Generator(device=self.device).manual_seed(_mix(cfg.seed, step, 3))
        torch.manual_seed(_mix(cfg.seed, step, 4))  # dropout-style layers draw from the global RNG
        xb = self.train_x[idx]
        if cfg.dataset.augment:
            xb = augment_batch(xb, gen)
        return normalize(xb, self.mean, self.std).contiguous(memory_format=self.memory_format), self.train_y[idx]


def _load_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any] | None:
    """A checkpoint's content, or None when it is missing, torn, or holds anything but tensors and plain data.

    ``weights_only`` refuses any pickled object other than tensors, containers and numbers, so a file planted
    in a run folder (a shared filesystem, a folder copied from a colleague) cannot run code when it is resumed.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # torn, corrupt or foreign: the run starts over rather than crash the sweep or trust it
        return None
    return state if isinstance(state, dict) and "step" in state and "model" in state else None


def checkpoint_origin(run_dir: Path) -> tuple[str, str] | None:
    """The (device type, precision) a run's checkpoint was trained with; None without a readable one,
    or for a checkpoint written before they were recorded."""
    return _origin(_load_checkpoint(run_dir / CHECKPOINT, mmap=True))  # mapped: only two small fields are read


def _origin(state: dict[str, Any] | None) -> tuple[str, str] | None:
    return (state["device_type"], state["precision"]) if state and "device_type" in state else None


def check_resume_origin(cfg: RunConfig, origin: tuple[str, str] | None, device: torch.device,
                        precision: str) -> None:
    """Refuse to resume a run on another device type or in another precision than it trained with.

    Its numbers would change mid-run (another kernel set, another rounding), and the result would mix
    two setups without saying so. ``--allow-device-change`` lets the user ask for it.
    """
    if origin is None or origin == (device.type, precision):
        return
    was_device, was_precision = origin
    raise DepthbenchError(
        f"{cfg.run_id}: its checkpoint was trained on {was_device} in {was_precision}, this resume would run on "
        f"{device.type} in {precision}; resume it where it started (--device {was_device}, train.precision "
        f"{'bf16' if was_precision == 'bfloat16' else 'fp32'}) or pass --allow-device-change to continue here"
    )


def _discard_progress(run_dir: Path) -> Path:
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    (run_dir / METRICS).unlink(missing_ok=True)
    return run_dir


def train_run(
    cfg: RunConfig,
    run_dir: Path,
    *,
    data: TensorData | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    notes: list[str] | None = None,
    allow_device_change: bool = False,
) -> dict[str, Any]:
    """Train one run into ``run_dir`` (resuming from its checkpoint if any) and return its result.

    Writes ``config.yaml``, ``metrics.jsonl`` (a row per log point), ``result.json`` at the end, and
    ``checkpoint.pt`` every ``train.checkpoint_every`` steps. A non-finite loss ends the run with status
    ``diverged``. When ``should_stop()`` turns true the run checkpoints and raises :class:`RunInterrupted`.
    Messages worth showing the user (a corrupt checkpoint discarded, say) are appended to ``notes``.
    A checkpoint made on another device type or in another precision is refused unless ``allow_device_change``.
    """
    t_start = time.perf_counter()
    tc = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text(run_dir / CONFIG, dump_run_config(cfg))
    notes = notes if notes is not None else []
    data = data or load_dataset(cfg.dataset)
    setup = TrainingSetup.create(cfg, data)
    device, model, optimizer, autocast = setup.device, setup.model, setup.optimizer, setup.autocast
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)

    # Resume: the checkpoint decides where we are; metrics rows past it are dropped so none repeat.
    metrics_path = run_dir / METRICS
    state = _load_checkpoint(run_dir / CHECKPOINT)
    if state is None and (run_dir / CHECKPOINT).exists():
        notes.append(f"{cfg.run_id}: checkpoint is unreadable or holds more than tensors and plain data; "
                     "not loaded, starting the run over")
        (run_dir / CHECKPOINT).unlink()
    if state is None:
        step, best, elapsed_before, window, rows_written = 0, float("nan"), 0.0, (0.0, 0, 0, 0.0), 0
        last_eval: dict[str, float] = {}
        metrics_path.unlink(missing_ok=True)
    else:
        if not allow_device_change:
            check_resume_origin(cfg, _origin(state), device, setup.precision)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best, elapsed_before = state["step"], state["best_test_acc"], state["elapsed_s"]
        rows_written = state["rows"]
        window, last_eval = tuple(state["window"]), state["last_eval"]
        kept = [row for row in storage.read_jsonl(metrics_path) if row.get("step", 0) <= step]
        if len(kept) != state["rows"]:
            # The log lost rows the checkpoint had seen (a damaged file): only a fresh start restores them.
            notes.append(f"{cfg.run_id}: metrics.jsonl is damaged ({len(kept)} of {state['rows']} rows), starting over")
            return train_run(cfg, _discard_progress(run_dir), data=data, on_progress=on_progress,
                             should_stop=should_stop, notes=notes, allow_device_change=allow_device_change)
        storage.write_jsonl(metrics_path, kept)
        notes.append(f"{cfg.run_id}: resumed from its checkpoint at step {step}")

    loss_sum = torch.tensor(window[0], device=device, dtype=torch.float64)
    correct = torch.tensor(window[1], device=device, dtype=torch.int64)
    seen, train_s_window = window[2], window[3]  # the open log window: sums, images, seconds
    compile_s = 0.0
    t_resume = time.perf_counter()
    t_window = time.perf_counter()
    status = "completed"

    def checkpoint(final: dict[str, Any] | None = None, window_s: float = 0.0) -> None:
        storage.save_torch(run_dir / CHECKPOINT, {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "best_test_acc": best, "last_eval": last_eval, "final": final, "rows": rows_written,
            "window": (loss_sum.item(), correct.item(), seen, window_s),
            "elapsed_s": elapsed_before + time.perf_counter() - t_resume, "config": cfg.model_dump(mode="json"),
            "device_type": device.type, "precision": setup.precision,
        })

    final = state.get("final") if state else None
    model.train()
    # A stop signal here only sets the event should_stop reads (see stopping); outside this loop (loading
    # data, building the model) it stops the run at once, as there is no progress to save.
    with stopping.deferred():
        while final is None and step < tc.steps:
            # Stop requests are honoured between steps, after which the checkpoint is exact.
            if should_stop and should_stop():
                checkpoint(window_s=train_s_window + time.perf_counter() - t_window)
                raise RunInterrupted(f"stopped at step {step}/{tc.steps}, checkpoint saved")

            # One SGD step on an augmented batch.
            xb, yb = setup.batch(step)
            if step in tc.diagnose_steps:
                from depthbench.diagnose import record_step  # leaves weights, BN statistics and RNG untouched

                record_step(model, xb, yb, step, run_dir)
            t_step = time.perf_counter()
            loss, logits = sgd_step(setup.step_model, optimizer, xb, yb, autocast)
            loss_sum += loss.double() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
            step += 1
            if tc.compile and compile_s == 0.0:
                compile_s = time.perf_counter() - t_step  # the first compiled step is mostly compilation
                t_window = time.perf_counter()
            if on_progress:
                on_progress(Progress(step, tc.steps))

            # Log point: running train metrics, evaluation when due, divergence check, checkpoint.
            evaluate_now = step % tc.eval_every == 0 or step == tc.steps
            if step % tc.log_every == 0 or evaluate_now:
                train_loss = loss_sum.item() / seen
                train_s_window += time.perf_counter() - t_window
                row = {"step": step, "lr": lr_at(step - 1, tc), "train_loss": train_loss,
                       "train_acc": correct.item() / seen}
                if not math.isfinite(train_loss):
                    status = "diverged"
                elif evaluate_now:
                    last_eval = dict(zip(("test_loss", "test_acc"), evaluate(
                        model, test_x, test_y, setup.mean, setup.std, tc.eval_batch_size, autocast, tc.channels_last),
                        strict=True))
                    best = last_eval["test_acc"] if math.isnan(best) else max(best, last_eval["test_acc"])
                    row.update(last_eval)
                row["img_per_s"] = seen / train_s_window if train_s_window > 0 else float("nan")
                row["elapsed_s"] = round(elapsed_before + time.perf_counter() - t_resume, 3)
                storage.append_jsonl(metrics_path, row)
                rows_written += 1
                if on_progress:
                    on_progress(Progress(step, tc.steps, row))
                loss_sum.zero_(), correct.zero_()
                seen, train_s_window = 0, 0.0
                if status == "diverged":
                    break
                if step == tc.steps:
                    final = {**row}
                if step % tc.checkpoint_every == 0 or final is not None:
                    checkpoint(final)
                t_window = time.perf_counter()

    # Finish: the weights to keep, then result.json, which marks the run as done.
    rows = storage.read_jsonl(metrics_path)
    last_row = rows[-1] if rows else {}
    if tc.keep_checkpoint == "weights" and status == "completed":
        storage.save_torch(run_dir / FINAL_WEIGHTS, {"model": model.state_dict(), "config": cfg.model_dump(mode="json")})
    block, n = resolve_block(cfg.depth, cfg.model.block)
    train_rates = [r["img_per_s"] for r in rows if math.isfinite(r.get("img_per_s", float("nan")))]
    result = {
        "run_id": cfg.run_id,
        "status": status,
        "version": cfg.version,
        "depth": cfg.depth,
        "seed": cfg.seed,
        "block": block,
        "units_per_stage": n,
        "params": count_params(model),
        "steps": last_row.get("step", step),
        "train_loss": last_row.get("train_loss", float("nan")),
        "train_acc": last_row.get("train_acc", float("nan")),
        "test_loss": last_eval.get("test_loss", float("nan")) if status == "completed" else float("nan"),
        "test_acc": last_eval.get("test_acc", float("nan")) if status == "completed" else float("nan"),
        "best_test_acc": best,
        "img_per_s": sum(train_rates) / len(train_rates) if train_rates else float("nan"),
        "compile_s": round(compile_s, 3),
        "wall_s": round(elapsed_before + time.perf_counter() - t_resume, 3),
        "setup_s": round(t_resume - t_start, 3),
        "device": str(device),
        "precision": setup.precision,
    }
    result["success"] = status == "completed" and cfg.success(result)
    storage.write_json(run_dir / RESULT, _json_safe(result))
    if tc.keep_checkpoint != "full":
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return result


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN; null is what a reader of result.json (pandas included) expects for "no value".
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}
