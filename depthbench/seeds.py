"""Named random streams: every generator of a run is seeded from (run seed, stream, counter).

A run carries no random state from step to step, so it resumes exactly: what step s draws depends on
(seed, s) alone. Each use of randomness has its own stream, so two uses never share draws. The
numbers are part of every result ever trained; changing one changes what runs learn.
"""

from __future__ import annotations

from enum import IntEnum


class Stream(IntEnum):
    DATA_ORDER = 1  # the permutation of epoch e: counter = e
    INIT = 2  # the model's initial weights: counter = 0
    AUGMENT = 3  # the crops and flips of step s: counter = s
    LAYERS = 4  # random layers (dropout shortcuts) at step s, through the global RNG: counter = s


def seed_for(seed: int, stream: Stream, counter: int = 0) -> int:
    """A well-spread generator seed for (seed, stream, counter); 63 bits keeps manual_seed happy."""
    return (seed * 0x9E3779B97F4A7C15 + counter * 0xBF58476D1CE4E5B9 + int(stream)) % (1 << 63)
