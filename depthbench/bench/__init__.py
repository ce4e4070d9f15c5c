"""How fast the one trainer runs and how much memory it needs, measured against the usual CIFAR script.

``depthbench bench`` answers, on the machine at hand (REFERENCE.md sections 4 and 5):

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

Timings are steady-state steps after a warmup; data loading, setup and compilation are reported
apart as per-run overhead. Training memory is the peak above what was resident once the data and the
model were in place: CUDA's ``max_memory_allocated``, or on CPU the peak resident set (Linux VmHWM,
reset through /proc/self/clear_refs after returning freed heap to the OS), so the gradients, momentum
buffers, activations and batch of the steps, not the interpreter, the data or the weights. Beside it,
the activations alone: the bytes one forward pass saves for backward, exact whatever the allocator.

The modules, in the order a measurement uses them:

- :mod:`~depthbench.bench.spec`: what to measure (:class:`BenchSpec`), checked and turned into the
  trainer's :class:`~depthbench.config.RunConfig`.
- :mod:`~depthbench.bench.probes`: the instruments: step timing, peak memory, activation bytes,
  the matmul peak, facts about the host.
- :mod:`~depthbench.bench.trainer`: the depthbench trainer's step, timed and measured.
- :mod:`~depthbench.bench.baseline`: the usual pipeline, timed the same way.
- :mod:`~depthbench.bench.modes`: the comparison (:func:`run_bench`) and the growth with depth
  (:func:`run_scaling`) with its linearity analysis, each returning one JSON-able dict.
- :mod:`~depthbench.bench.render`: those dicts as rich tables; the measuring modules never import rich.
"""

from depthbench.bench.baseline import PILImageSet, measure_usual, usual_transform
from depthbench.bench.modes import _add_linearity  # noqa: F401  tests check the analysis on hand-made rows
from depthbench.bench.modes import linearity_notes, run_bench, run_scaling
from depthbench.bench.probes import PeakMemory, activation_mb, matmul_peak
from depthbench.bench.render import render_bench, render_scaling
from depthbench.bench.spec import BenchSpec, parse_depths
from depthbench.bench.trainer import measure_trainer

__all__ = [
    "BenchSpec",
    "PILImageSet",
    "PeakMemory",
    "activation_mb",
    "linearity_notes",
    "matmul_peak",
    "measure_trainer",
    "measure_usual",
    "parse_depths",
    "render_bench",
    "render_scaling",
    "run_bench",
    "run_scaling",
    "usual_transform",
]
