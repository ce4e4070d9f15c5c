"""The one trainer: every run of every sweep is trained by :func:`train_run`.

Two recipes, chosen by the run's family (:mod:`depthbench.families`) and overridable setting by setting:
the CIFAR one of He et al. for ResNets ([V1] He, Zhang, Ren, Sun 2015, arXiv:1512.03385, Sec. 4.2; [V2]
He, Zhang, Ren, Sun 2016, arXiv:1603.05027, Sec. 5 and Appendix): SGD with momentum and weight decay, a
step-based multi-step schedule and an optional constant warmup that hands back to it; and the Transformer
one for ViTs: AdamW with decay on weight matrices only, a cosine schedule after a linear warmup. Either
may clip the gradients' global norm and train the units' scalar parameters at a lower rate (Fixup).
The speed techniques are those of the fastest CIFAR trainers (airbench: Jordan 2024, arXiv:2404.00498):
the training split stays on the device as uint8, augmentation is a batched tensor op, the model runs
channels_last, and under bf16 autocast wherever the device computes bf16 natively (CUDA GPUs, CPUs with
AMX or AVX512-BF16).

A run is resumable at any step and resumes bit-exactly on CPU, because nothing random is carried
from step to step: the data order of epoch e is drawn from a generator seeded by (seed, e), and
the augmentation and dropout of step s from one seeded by (seed, s). A checkpoint therefore only
needs the model, the optimizer, the step and the running metric sums.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from depthbench import stopping, storage
from depthbench.augment import apply_augmentation, draw_augmentation, normalize
from depthbench.config import RunConfig, TrainConfig, dump_run_config
from depthbench.data import TensorData, load_dataset
from depthbench.devices import (attention_name, cpp_compiler, keep_freed_memory, precision_name, resolve_compile,
                                resolve_device, resolve_precision)
from depthbench.errors import DepthbenchError
from depthbench.estimate import DataShape, check_fits
from depthbench.flow import record_step
from depthbench.layout import CHECKPOINT, CONFIG, FINAL_WEIGHTS, METRICS, RESULT
from depthbench.models import count_params, model_from_config
from depthbench.seeds import Stream, seed_for
from depthbench.step import Step, choose_step, set_lr


class RunInterrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM); the run saved a checkpoint and can be resumed."""


class RunPaused(Exception):
    """The run reached the step it was asked to pause at (a rung of successive halving): it evaluated there,
    saved a checkpoint, and waits for the sweep to decide whether it goes on. ``row`` is that step's log row,
    or None when the checkpoint was already at or past the step."""

    def __init__(self, step: int, row: dict[str, Any] | None = None) -> None:
        super().__init__(f"paused at step {step}, checkpoint saved")
        self.step, self.row = step, row


@dataclass(frozen=True)
class TrainingProgress:
    """What the trainer reports to whoever shows progress; ``row`` is set at log points only."""

    step: int
    steps: int
    row: dict[str, Any] | None = None


ProgressFn = Callable[[TrainingProgress], None]
StopFn = Callable[[], bool]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for a step (counted from 0).

    Warmup first: a constant ``warmup.lr``, or a linear ramp whose step ``i`` takes ``lr * (i + 1) / w``,
    so its last step reaches ``lr``. Then the schedule: ``multistep`` multiplies the base rate by
    ``gamma`` at each milestone passed; ``cosine`` falls from ``lr`` after warmup along half a cosine
    to 0 at step ``steps`` (one past the last step taken, so no step trains at rate 0).
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.warmup.lr if cfg.warmup.shape == "constant" else cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / (cfg.steps - warmup)))
    drops = sum(step >= m for m in cfg.milestone_steps)
    return cfg.lr * cfg.gamma**drops


def make_optimizer(model: nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum (the ResNet recipe) or AdamW (the Transformer recipe) at the first step's rate.

    ``train.decay_all`` decays every parameter, as the ResNet papers do; without it only weight
    matrices and kernels are decayed: norms' gains and biases, biases, scalar gates and a ViT's
    position embedding and class token (its ``no_weight_decay()``) are not, as ViT recipes do.

    Fused on CUDA: one kernel updates every tensor, weight decay included, allocates nothing per step
    (the foreach path makes a decayed copy of each gradient) and reads the learning rate from a device
    tensor, as a captured graph needs. The CPU takes foreach: 4 calls a step instead of 4 per tensor,
    with the arithmetic of PyTorch's default CPU loop, so CPU results are those of earlier versions to
    the bit; the fused CPU kernel rounds differently (FMA) and would change every one of them.
    """
    params: Any = model.parameters()
    named = list(model.named_parameters())
    scalar = {name for name, p in named if p.ndim == 0}  # the units' one-number biases, multipliers and gates
    if not tc.decay_all or (scalar and tc.scalar_lr != 1):
        skip = set(getattr(model, "no_weight_decay", set)())
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in named:
            decayed = tc.decay_all or (p.ndim >= 2 and name not in skip)
            groups.setdefault((decayed, name in scalar), []).append(p)
        # "lr_factor" scales the schedule's rate for a group: each step sets lr = rate * factor (step.py).
        params = [{"params": ps, **({"lr_factor": tc.scalar_lr} if is_scalar and tc.scalar_lr != 1 else {}),
                   **({} if decayed else {"weight_decay": 0.0})}
                  for (decayed, is_scalar), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if tc.optimizer == "adamw":
        assert tc.betas is not None and tc.eps is not None  # filled in by the config for adamw
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            params, lr=lr_at(0, tc), betas=tc.betas, eps=tc.eps, weight_decay=tc.weight_decay, **kernel)
    else:
        optimizer = torch.optim.SGD(params, lr=lr_at(0, tc), momentum=tc.momentum, weight_decay=tc.weight_decay,
                                    nesterov=tc.nesterov and tc.momentum > 0, **kernel)
    set_lr(optimizer, lr_at(0, tc))
    return optimizer


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
            gen = torch.Generator().manual_seed(seed_for(self.seed, Stream.DATA_ORDER, epoch))
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


@dataclass
class TrainingSetup:
    """A run ready to train on its device: the uint8 data, the seeded model, its optimizer, the batch recipe.

    Shared by :func:`train_run` and ``depthbench bench``, so the benchmark times exactly the trainer.
    """

    cfg: RunConfig
    device: torch.device
    model: nn.Module
    step_model: nn.Module  # the model, compiled when `compiled`
    compiled: bool  # train.compile resolved (devices.resolve_compile); a resume keeps the run's first choice
    optimizer: torch.optim.Optimizer
    order: BatchOrder
    train_x: torch.Tensor
    train_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    memory_format: torch.memory_format
    amp_dtype: torch.dtype | None  # None: plain fp32
    random_layers: bool  # some layer draws random numbers each step (dropout): the global RNG is seeded per step
    # The open log window's sums, on the device so that a step never waits for the GPU; a graphed
    # step adds to them inside its graph.
    loss_sum: torch.Tensor
    correct: torch.Tensor

    @classmethod
    def create(cls, cfg: RunConfig, data: TensorData) -> TrainingSetup:
        tc = cfg.train
        device = resolve_device(tc.device)
        check_fits(cfg, DataShape.of(data), device)  # refuse a run that cannot fit before building its model
        amp_dtype = resolve_precision(tc.precision, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            if device.index is not None:
                torch.cuda.set_device(device)  # one process, one GPU: a CUDA graph captures and replays there
        if device.type == "cpu":
            keep_freed_memory()
        # Data: uint8 on the device; normalisation and augmentation happen per batch.
        train_x, train_y = data.train_x.to(device), data.train_y.to(device)
        # Model and optimizer; the init is seeded so a run is reproducible from its seed alone.
        torch.manual_seed(seed_for(cfg.seed, Stream.INIT))
        model = model_from_config(cfg.version, cfg.depth, cfg.model, data.num_classes, data.in_channels,
                                  data.image_size)
        memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        model = model.to(device=device, memory_format=memory_format)
        optimizer = make_optimizer(model, tc, device)
        compiled = resolve_compile(cfg, device, amp_dtype)
        return cls(
            cfg, device, model, torch.compile(model) if compiled else model, compiled, optimizer,
            BatchOrder(len(train_x), tc.batch_size, cfg.seed, device), train_x, train_y,
            torch.tensor(data.mean, device=device).view(1, -1, 1, 1),
            torch.tensor(data.std, device=device).view(1, -1, 1, 1),
            memory_format, amp_dtype,
            random_layers=any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()),
            loss_sum=torch.zeros((), device=device, dtype=torch.float64),
            correct=torch.zeros((), device=device, dtype=torch.int64),
        )

    @property
    def precision(self) -> str:
        return precision_name(self.amp_dtype)

    def compile_as(self, compiled: bool) -> None:
        """Train the model compiled or eager, whatever ``train.compile`` resolved to: a resume's recorded choice."""
        self.compiled = compiled
        self.step_model = torch.compile(self.model) if compiled else self.model

    def autocast(self, cache_enabled: bool = True) -> Any:
        """The context a forward pass runs in: autocast to ``amp_dtype``, or nothing for fp32."""
        if not self.amp_dtype:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache_enabled)

    def draws(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What makes the step's batch: its image indices (on the device) and its augmentation draws
        (shift and flip, on the CPU; None without augmentation, flip None without flips), all functions of
        (seed, step). The shifts are drawn first, so turning flips off leaves them as they were."""
        idx = self.order(step)
        if not self.cfg.dataset.augment:
            return idx, None, None
        gen = torch.Generator().manual_seed(seed_for(self.cfg.seed, Stream.AUGMENT, step))
        shift, flipped = draw_augmentation(len(idx), gen, flip=self.cfg.dataset.flip)
        return idx, shift, flipped

    def assemble(self, idx: torch.Tensor, shift: torch.Tensor | None, flipped: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented, normalised batch from :meth:`draws`' output moved to the device: device work only."""
        xb = self.train_x[idx]
        if shift is not None:
            xb = apply_augmentation(xb, shift, flipped)
        return normalize(xb, self.mean, self.std).contiguous(memory_format=self.memory_format), self.train_y[idx]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's augmented, normalised batch: a function of (seed, step)."""
        idx, shift, flipped = self.draws(step)
        if shift is not None and self.device.type != "cpu":
            shift = shift.to(self.device, non_blocking=True)
            flipped = flipped.to(self.device, non_blocking=True) if flipped is not None else None
        return self.assemble(idx, shift, flipped)

    def seed_layers(self, step: int) -> None:
        """Seed the global RNG for the step's dropout masks; nothing to do (and no host work) without dropout."""
        if self.random_layers:
            torch.manual_seed(seed_for(self.cfg.seed, Stream.LAYERS, step))

    def add_to_sums(self, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor) -> None:
        """Add a step's summed loss and correct predictions to the log window, without a sync."""
        self.loss_sum += loss.double() * len(yb)
        self.correct += (logits.argmax(1) == yb).sum()


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


def checkpoint_step(run_dir: Path) -> int:
    """The step a run's checkpoint holds: how much of the run is done and kept; 0 without a readable one."""
    state = _load_checkpoint(run_dir / CHECKPOINT, mmap=True)
    return int(state["step"]) if state else 0


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


@dataclass
class LogWindow:
    """The metrics summed since the last log point: loss (summed over images), correct predictions,
    images and seconds of training."""

    loss_sum: float = 0.0
    correct: int = 0
    images: int = 0
    seconds: float = 0.0


@dataclass
class TrainState:
    """Where a run stands, besides its weights and optimizer: what a checkpoint saves, by name."""

    step: int = 0  # steps done
    best_test_acc: float = math.nan
    best_val_acc: float = math.nan  # NaN without a validation split
    # test_loss and test_acc of the last evaluation, and val_loss and val_acc with a validation split
    last_eval: dict[str, float] = field(default_factory=dict)
    final: dict[str, Any] | None = None  # the last step's log row, once the run has trained all its steps
    rows: int = 0  # rows written to metrics.jsonl
    window: LogWindow = field(default_factory=LogWindow)  # the log window open at the checkpoint
    elapsed_s: float = 0.0  # training wall time before this process took the run over

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        window = saved["window"]
        if not isinstance(window, dict):  # checkpoints written before the window was saved by name
            window = dict(zip(("loss_sum", "correct", "images", "seconds"), window, strict=True))
        # Checkpoints written before validation splits existed have no best_val_acc; their runs have no split.
        return cls(step=saved["step"], best_test_acc=saved["best_test_acc"],
                   best_val_acc=saved.get("best_val_acc", math.nan), last_eval=saved["last_eval"],
                   final=saved["final"], rows=saved["rows"], window=LogWindow(**window), elapsed_s=saved["elapsed_s"])


def _resume(cfg: RunConfig, run_dir: Path, setup: TrainingSetup, notes: list[str], allow_device_change: bool
            ) -> TrainState:
    """The state to train from: the checkpoint's, with its weights loaded and metrics.jsonl cut back to
    the rows it had seen (none repeat), or a fresh start when there is no usable checkpoint."""
    checkpoint_path, metrics_path = run_dir / CHECKPOINT, run_dir / METRICS
    saved = _load_checkpoint(checkpoint_path)
    if saved is None and checkpoint_path.exists():
        notes.append(f"{cfg.run_id}: checkpoint is unreadable or holds more than tensors and plain data; "
                     "not loaded, starting the run over")
        checkpoint_path.unlink()
    if saved is not None:
        origin = _origin(saved)
        if (cfg.train.precision == "auto" and origin and origin[0] == setup.device.type
                and origin[1] != setup.precision):
            # `auto` picks by hardware, so a run resumed on another CPU (or GPU) may find it picking otherwise:
            # the run keeps the precision it started in rather than mix two in one result.
            setup.amp_dtype = torch.bfloat16 if origin[1] == "bfloat16" else None
            notes.append(f"{cfg.run_id}: continues in {origin[1]}, the precision it started in "
                         "(precision auto would now choose another here)")
        if not allow_device_change:
            check_resume_origin(cfg, origin, setup.device, setup.precision)
        if cfg.train.compile == "auto" and (origin is None or origin[0] == setup.device.type):
            _keep_compile_choice(cfg, saved, setup, notes)
        state = TrainState.from_checkpoint(saved)
        kept = [row for row in storage.read_jsonl(metrics_path) if row.get("step", 0) <= state.step]
        if len(kept) == state.rows:
            setup.model.load_state_dict(saved["model"])
            setup.optimizer.load_state_dict(saved["optimizer"])
            storage.write_jsonl(metrics_path, kept)
            notes.append(f"{cfg.run_id}: resumed from its checkpoint at step {state.step}")
            return state
        # The log lost rows the checkpoint had seen (a damaged file): only a fresh start restores them.
        notes.append(f"{cfg.run_id}: metrics.jsonl is damaged ({len(kept)} of {state.rows} rows), starting over")
        checkpoint_path.unlink()
    metrics_path.unlink(missing_ok=True)
    return TrainState()


def _keep_compile_choice(cfg: RunConfig, saved: dict[str, Any], setup: TrainingSetup, notes: list[str]) -> None:
    """Like precision, compile `auto` may now choose otherwise (another CPU of the same type of device, a run
    resumed with another step count): the run keeps its first choice, unless it was compiled and this machine
    has no C++ compiler to compile it again. Checkpoints from before the choice was recorded trained eager."""
    was_compiled = bool(saved.get("compiled", False))
    if was_compiled == setup.compiled:
        return
    if was_compiled and not cpp_compiler():
        notes.append(f"{cfg.run_id}: started compiled, continues eager: no C++ compiler for torch.compile here")
        return
    setup.compile_as(was_compiled)
    notes.append(f"{cfg.run_id}: continues {'compiled' if was_compiled else 'eager'}, as it started "
                 "(compile auto would now choose otherwise here)")


def train_run(
    cfg: RunConfig,
    run_dir: Path,
    *,
    data: TensorData | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    notes: list[str] | None = None,
    allow_device_change: bool = False,
    pause_at: int | None = None,
    eval_at: Sequence[int] = (),
) -> dict[str, Any]:
    """Train one run into ``run_dir`` (resuming from its checkpoint if any) and return its result.

    Writes ``config.yaml``, ``metrics.jsonl`` (a row per log point), ``result.json`` at the end, and
    ``checkpoint.pt`` every ``train.checkpoint_every`` steps. Each evaluation measures the test split and,
    where the run holds one out (``dataset.val_split``), the validation split. A non-finite loss ends the run with status
    ``diverged``. When ``should_stop()`` turns true the run checkpoints and raises :class:`RunInterrupted`.
    Messages worth showing the user (a corrupt checkpoint discarded, say) are appended to ``notes``.
    A checkpoint made on another device type or in another precision is refused unless ``allow_device_change``.

    ``eval_at`` adds evaluations at those steps (successive halving's rungs, compared there whatever the
    run's schedule). With ``pause_at`` the run evaluates at that step, checkpoints and raises
    :class:`RunPaused` without writing result.json; one whose checkpoint is already there pauses at once.
    """
    t_start = time.perf_counter()
    tc = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text(run_dir / CONFIG, dump_run_config(cfg))
    notes = notes if notes is not None else []
    data = data or load_dataset(cfg.dataset)
    setup = TrainingSetup.create(cfg, data)
    device, model, optimizer, autocast = setup.device, setup.model, setup.optimizer, setup.autocast
    # What each evaluation measures: the test split, then the validation split where the run holds one out.
    evaluated = {"test": (data.test_x.to(device), data.test_y.to(device))}
    if len(data.val_y):
        evaluated["val"] = (data.val_x.to(device), data.val_y.to(device))
    metrics_path = run_dir / METRICS
    state = _resume(cfg, run_dir, setup, notes, allow_device_change)

    # The open log window's sums stay on the device between log points: no sync per step.
    loss_sum, correct = setup.loss_sum, setup.correct
    loss_sum.fill_(state.window.loss_sum), correct.fill_(state.window.correct)
    images, window_s = state.window.images, state.window.seconds
    train_step: Step | None = None  # chosen at the first step: graphed or eager (step.choose_step)
    compile_s = 0.0
    t_resume = t_window = time.perf_counter()
    status = "completed"
    extra_evals = {*eval_at, *((pause_at,) if pause_at is not None else ())}

    def checkpoint(open_window_s: float = 0.0) -> None:
        state.window = LogWindow(loss_sum.item(), correct.item(), images, open_window_s)
        elapsed_s = state.elapsed_s + time.perf_counter() - t_resume
        storage.save_torch(run_dir / CHECKPOINT, {
            **asdict(state), "elapsed_s": elapsed_s, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": cfg.model_dump(mode="json"), "device_type": device.type, "precision": setup.precision,
            "compiled": setup.compiled,
        })

    model.train()
    # A stop signal here only sets the event should_stop reads (see stopping); outside this loop (loading
    # data, building the model) it stops the run at once, as there is no progress to save.
    with stopping.deferred():
        while state.final is None and state.step < tc.steps:
            if pause_at is not None and state.step >= pause_at:  # resumed at or past it: nothing to train
                raise RunPaused(state.step)
            # Stop: honoured between steps, where the checkpoint is exact.
            if should_stop and should_stop():
                checkpoint(window_s + time.perf_counter() - t_window)
                raise RunInterrupted(f"stopped at step {state.step}/{tc.steps}, checkpoint saved")

            lr = lr_at(state.step, tc)
            if state.step in tc.diagnose_steps:
                xb, yb = setup.batch(state.step)
                record_step(model, xb, yb, state.step, run_dir)  # leaves weights, BN statistics and RNG untouched
            if train_step is None:
                train_step = choose_step(setup, state.step, lr, notes)

            # Step: the batch of (seed, step), augmented and normalised; forward, backward, SGD update at the
            # schedule's learning rate; loss and correct predictions added to the window's sums.
            t_step = time.perf_counter()
            train_step(state.step, lr)
            images += tc.batch_size
            state.step += 1
            step = state.step
            if setup.compiled and compile_s == 0.0:
                compile_s = time.perf_counter() - t_step  # the first compiled step is mostly compilation
                t_window = time.perf_counter()
            if on_progress:
                on_progress(TrainingProgress(step, tc.steps))

            # Log point: running train metrics, evaluation when due, divergence check.
            evaluate_now = step % tc.eval_every == 0 or step == tc.steps or step in extra_evals
            if not (step % tc.log_every == 0 or evaluate_now):
                continue
            train_loss = loss_sum.item() / images
            window_s += time.perf_counter() - t_window
            row = {"step": step, "lr": lr_at(step - 1, tc), "train_loss": train_loss,
                   "train_acc": correct.item() / images}
            if not math.isfinite(train_loss):
                status = "diverged"
            elif evaluate_now:
                state.last_eval = {}
                for split, (x, y) in evaluated.items():
                    loss, acc = evaluate(model, x, y, setup.mean, setup.std, tc.eval_batch_size, autocast,
                                         tc.channels_last)
                    state.last_eval.update({f"{split}_loss": loss, f"{split}_acc": acc})
                state.best_test_acc = _best(state.best_test_acc, state.last_eval["test_acc"])
                if "val_acc" in state.last_eval:
                    state.best_val_acc = _best(state.best_val_acc, state.last_eval["val_acc"])
                row.update(state.last_eval)
            row["img_per_s"] = images / window_s if window_s > 0 else float("nan")
            row["elapsed_s"] = round(state.elapsed_s + time.perf_counter() - t_resume, 3)
            storage.append_jsonl(metrics_path, row)
            state.rows += 1
            if on_progress:
                on_progress(TrainingProgress(step, tc.steps, row))
            loss_sum.zero_(), correct.zero_()
            images, window_s = 0, 0.0
            if status == "diverged":
                break

            # Checkpoint: at log points, every checkpoint_every steps, at a pause and after the last step.
            if step == tc.steps:
                state.final = {**row}
            if step % tc.checkpoint_every == 0 or state.final is not None or step == pause_at:
                checkpoint()
            if step == pause_at and state.final is None:
                raise RunPaused(step, row)
            t_window = time.perf_counter()

    # Finish: the weights to keep, then result.json, which marks the run as done.
    rows = storage.read_jsonl(metrics_path)
    last_row = rows[-1] if rows else {}
    last_eval = state.last_eval
    if tc.keep_checkpoint == "weights" and status == "completed":
        storage.save_torch(run_dir / FINAL_WEIGHTS, {"model": model.state_dict(), "config": cfg.model_dump(mode="json")})
    block, n = cfg.blocks
    completed = status == "completed"
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
        "steps": last_row.get("step", state.step),
        "train_loss": last_row.get("train_loss", float("nan")),
        "train_acc": last_row.get("train_acc", float("nan")),
        "test_loss": last_eval.get("test_loss", float("nan")) if completed else float("nan"),
        "test_acc": last_eval.get("test_acc", float("nan")) if completed else float("nan"),
        "best_test_acc": state.best_test_acc,
        # Only runs that hold out a validation split have these: the result.json of any other stays as it was.
        **({"val_loss": last_eval.get("val_loss", float("nan")) if completed else float("nan"),
            "val_acc": last_eval.get("val_acc", float("nan")) if completed else float("nan"),
            "best_val_acc": state.best_val_acc} if "val" in evaluated else {}),
        "img_per_s": sum(train_rates) / len(train_rates) if train_rates else float("nan"),
        "compile_s": round(compile_s, 3),
        "wall_s": round(state.elapsed_s + time.perf_counter() - t_resume, 3),
        "setup_s": round(t_resume - t_start, 3),
        "device": str(device),
        "precision": setup.precision,
        "compiled": setup.compiled,  # train.compile resolved; a resume keeps it
        "cuda_graph": bool(train_step and train_step.graphed),  # the step was one replayed CUDA graph
        # The attention kernel follows the device type and precision, which a resume keeps.
        **({"attention": attention_name(device, setup.amp_dtype)} if cfg.model.family == "vit" else {}),
    }
    result["success"] = status == "completed" and cfg.success(result)
    storage.write_json(run_dir / RESULT, _json_safe(result))
    if tc.keep_checkpoint != "full":
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return result


def _best(best: float, acc: float) -> float:
    """The best accuracy so far, ``acc`` included (NaN until the first evaluation)."""
    return acc if math.isnan(best) else max(best, acc)


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN; null is what a reader of result.json (pandas included) expects for "no value".
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}
