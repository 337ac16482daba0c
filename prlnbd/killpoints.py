"""Kill points: crash tests stop a crash-safe operation at a chosen step, as a power cut would.

An operation (compact, merge, an online snapshot) calls its KillPoints before
each step that changes a file; when the environment variable it was made with
says N, the Nth call kills the process with SIGKILL. Unset, a call only counts.
"""

from __future__ import annotations

import os
import signal


class KillPoints:
    """Counts the steps of one operation; kills the process at the step the environment variable VARIABLE names."""

    def __init__(self, variable: str) -> None:
        at = os.environ.get(variable, "")
        self.at = int(at) if at.isdigit() else -1
        self.steps = 0

    def __call__(self) -> None:
        self.steps += 1
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def no_kill() -> None:
    """The step hook of an operation no test stops."""
