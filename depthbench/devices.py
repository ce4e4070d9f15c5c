"""Where and in what precision a run trains: device names resolved on this machine, autocast dtypes."""

from __future__ import annotations

import ctypes
import functools
import platform
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from depthbench.config import DEVICE_NAME, RunConfig
from depthbench.errors import DepthbenchError


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
    """The autocast dtype, or None for plain fp32.

    ``auto`` means bf16 where the hardware computes it natively: CUDA GPUs that support it, and CPUs
    whose oneDNN reports native bf16 (AMX or AVX512-BF16). Elsewhere bf16 is emulated and slower
    than fp32, so ``auto`` stays fp32 there.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (and so gains from bf16 autocast)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if platform.machine().lower() in ("x86_64", "amd64"):
        # oneDNN's own flag (torch.ops.mkldnn._is_mkldnn_bf16_supported) is also true on plain AVX-512,
        # where it emulates bf16; only AVX512-BF16 and AMX compute it in hardware.
        capabilities = getattr(torch.cpu, "get_capabilities", dict)()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_tile"))
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # Arm: true only with the BF16 extension


# torch.compile pays for itself on a CPU with AMX in bf16: there it fuses the normalisations, activations and
# additions that take most of a step once AMX has made the convolutions and matmuls cheap (v2 ResNet-20 and
# -56 and a 24-block ViT: 18-29% less per step, BENCHMARKS.md). On AVX512-BF16 without AMX it measured level
# with eager, and in fp32 on AVX2 slower, so ``auto`` compiles only with AMX. A compilation took 34-62 s
# (5-19 s again from PyTorch's on-disk cache), repaid after 2,000-4,000 steps; shorter runs stay eager.
COMPILE_MIN_STEPS = 5000


def resolve_compile(cfg: RunConfig, device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether ``cfg`` trains a compiled model on ``device`` in ``amp_dtype``: ``train.compile`` when set, else
    (``auto``) on a CPU with AMX, in bf16, for a run of at least :data:`COMPILE_MIN_STEPS` steps without
    activation checkpointing (which does not compile), where a C++ compiler for PyTorch's inductor is found."""
    setting = cfg.train.compile
    if setting != "auto":
        return bool(setting)
    return (device.type == "cpu" and amp_dtype == torch.bfloat16 and _amx()
            and cfg.train.steps >= COMPILE_MIN_STEPS and not cfg.model.checkpointing and cpp_compiler())


def _amx() -> bool:
    return bool(getattr(torch.cpu, "get_capabilities", dict)().get("amx_tile"))


@functools.cache
def cpp_compiler() -> bool:
    """Whether inductor finds the C++ compiler that a compiled CPU model needs (without one, its first step fails)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # not found, or an inductor that moved it: stay eager rather than fail at the first step
        return False
    return True


def attention_kernel(q: torch.Tensor) -> AbstractContextManager[None]:
    """The scaled dot-product attention kernel for queries ``q``: one rule per device type and dtype.

    On a CPU in bf16, PyTorch's fused (flash) attention has a backward far slower than the unfused math
    path (two matmuls and a softmax, which oneDNN runs on the bf16 units), slow enough that a bf16 ViT
    would train slower than in fp32; there the math path is used. Everywhere else PyTorch's own choice
    stands: the fused kernels win on CUDA, and in fp32 on a CPU the two are level (BENCHMARKS.md).
    Both compute softmax(q k^T / sqrt(d)) v, so the choice changes rounding only.
    """
    return sdpa_kernel(SDPBackend.MATH) if _math_attention(q.device.type, q.dtype) else nullcontext()


def attention_name(device: torch.device, amp_dtype: torch.dtype | None) -> str:
    """How a run's attention kernel is recorded (result.json): ``math`` or ``default`` (PyTorch's choice)."""
    return "math" if _math_attention(device.type, amp_dtype) else "default"


def _math_attention(device_type: str, dtype: torch.dtype | None) -> bool:
    return device_type == "cpu" and dtype == torch.bfloat16


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """How a step's precision is recorded (result.json, checkpoints): float32 or bfloat16."""
    return str(amp_dtype or torch.float32).removeprefix("torch.")


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library, when it is glibc, whose allocator the two functions below tune; else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Let this process reuse the memory a CPU training step frees, instead of returning it to the OS.

    glibc serves a large allocation with a fresh mmap and unmaps it when it is freed, so every step's
    activations arrive as new pages, each zeroed by the kernel on its first touch. Raising the mmap
    threshold to its maximum (32 MiB) and the trim threshold past a step's needs keeps those pages in the
    heap, so a steady step faults on none. Numbers are untouched; the resident set stays at the step's
    peak, which a training process reaches anyway. Once per process; False where the C library is not glibc.
    """
    libc = _glibc()
    try:
        return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except AttributeError:
        return False


def release_freed_memory() -> None:
    """Hand the heap this process has freed back to the OS (glibc's ``malloc_trim``), so that the OS counts
    it as available again; nothing where the C library is not glibc."""
    libc = _glibc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass
