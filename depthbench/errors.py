"""The one error type users see: caught at the CLI edge and printed as a single line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DepthbenchError(Exception):
    """Bad input or an unusable environment; the message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(DepthbenchError):
    """A sweep config that cannot be used, naming the dotted key at fault."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
