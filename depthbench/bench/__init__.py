"""How fast the one trainer runs and how much memory it needs, measured against the usual CIFAR script.

``depthbench bench`` answers, on the machine at hand, how the speed techniques of the fastest CIFAR
trainers (airbench: Jordan 2024, arXiv:2404.00498) pay off for the nets of depth studies:

- Speed against the usual pipeline. Both run in this process, on the same model (same config, same
  seeded init) and the same training images: (a) the trainer step of :mod:`depthbench.train`, with the
  uint8 set on the device, batched augmentation, channels_last and its precision, and (b) the script
  most CIFAR code starts from: a torchvision-style dataset that makes a PIL image of every sample,
  ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` in DataLoader
  workers, and an NCHW fp32 eager model.
- Distance from the machine: the model's training FLOPs per second (3x the forward FLOPs of
  :func:`depthbench.models.forward_flops`; checkpointing's recomputation is not counted) against the
  dense matmul peak of the same device, measured in the same run: model FLOPs utilisation (MFU).
- Growth with depth (``depths``): time per step and training memory with and without activation
  checkpointing, one row per depth.
- The host's share (every mode's net, and each depth of ``depths``):

  - ``host_ms_per_step``: what one trainer step costs the host, whatever the arithmetic. The trainer's own
    step (:class:`~depthbench.train.TrainingSetup` and its step: the same net, precision, channels_last,
    optimizer, checkpointing and compilation) is timed on tiny synthetic batches (``HOST_BATCH`` images
    of ``HOST_IMAGE_SIZE`` pixels in :mod:`~depthbench.bench.spec`), where the kernels are the same as at
    full size but their arithmetic is negligible: the median wall time of single steps after a warmup,
    each from the host's call to the device's last kernel. On CUDA it is
    the launch cost that a step pays even with an idle GPU; the share of a full step it takes
    (``host_share``) says how much faster the step could get from fewer launches (a CUDA graph, fusion)
    rather than from faster arithmetic. On a CPU it is the dispatch overhead plus tiny arithmetic.
  - ``kernels_per_step``: the aten operator calls that one steady-state step (batch preparation, forward
    with the loss, backward, optimizer, the loop's running sums) hands to a backend kernel on the device,
    counted with a ``TorchDispatchMode`` (:class:`~depthbench.bench.probes.KernelCount`) on the eager
    model; views, other metadata changes and bare allocations compute nothing and are left out. On CUDA
    each is roughly one kernel launch (a foreach op launches one per chunk of tensors); a CUDA graph
    replays the same kernels with one launch, and ``--compile`` fuses them. The count is deterministic: a
    function of the net and the code path. ``kernels_by_phase`` splits it into ``batch``, ``forward``,
    ``backward``, ``optimizer`` and ``metrics``; ``aten_calls_per_step`` is every aten call, views included.
- Sharing the device (``concurrent``): the total images/s of 1, 2, ... runs of the net training at once,
  each in its own spawned process as ``sweep --jobs N`` trains them (on a CPU each with cores // N torch
  threads, on CUDA all on the same GPU), released together by a barrier after their warmup, each timing its
  own steady-state steps; per count of runs the total, per-run and slowest rates, the gain over one run
  alone, the runs' memory, and a sentence on whether sharing pays beyond the timing noise.

Timings are steady-state steps after a warmup; data loading, setup and compilation are reported
apart as per-run overhead. Training memory is the peak above what was resident once the data and the
model were in place: CUDA's ``max_memory_allocated``, or on CPU the peak resident set (Linux VmHWM,
reset through /proc/self/clear_refs after returning freed heap to the OS), so the gradients, momentum
buffers, activations and batch of the steps, not the interpreter, the data or the weights. Beside it,
the activations alone: the bytes one forward pass saves for backward, exact whatever the allocator.

The measuring modules never import rich; :mod:`~depthbench.bench.render` turns their JSON-able dicts
into tables. The package's modules are in the map of :mod:`depthbench`.
"""

from depthbench.bench.baseline import PILImageSet, measure_usual, usual_transform
from depthbench.bench.modes import _add_linearity  # noqa: F401  tests check the analysis on hand-made rows
from depthbench.bench.modes import linearity_notes, run_bench, run_concurrent, run_scaling, sharing_verdict
from depthbench.bench.probes import KernelCount, PeakMemory, activation_mb, matmul_peak
from depthbench.bench.render import render_bench, render_concurrent, render_scaling
from depthbench.bench.spec import BenchSpec, parse_counts, parse_depths
from depthbench.bench.trainer import count_kernels, measure_host, measure_trainer

__all__ = [
    "BenchSpec",
    "KernelCount",
    "PILImageSet",
    "PeakMemory",
    "activation_mb",
    "count_kernels",
    "linearity_notes",
    "matmul_peak",
    "measure_host",
    "measure_trainer",
    "measure_usual",
    "parse_counts",
    "parse_depths",
    "render_bench",
    "render_concurrent",
    "render_scaling",
    "run_bench",
    "run_concurrent",
    "run_scaling",
    "sharing_verdict",
    "usual_transform",
]
