"""Preemption: SIGTERM stops training at a step boundary, after a checkpoint of that step.

One process: a Python SIGTERM handler records the signal and does nothing else. It runs in the main thread
between two bytecodes, possibly in the middle of an Orbax save or a progress-bar write to stderr, so printing
or saving from it could fail or re-enter a half-done write; the loop asks ``should_stop(step)`` after every
step, saves that step and returns. Further SIGTERMs (a scheduler repeating its notice) are only counted, also
after the guard is left: a run that has been told to stop is shutting down, and the default action would kill
it half-way through writing its summary.

Several processes: every save is collective, so all of them must stop at the same step, while SIGTERM reaches
each at a different moment (or only one of them). ``jax.distributed.initialize`` starts JAX's preemption
service, whose own SIGTERM handler notifies every process; ``multihost_utils.reached_preemption_sync_point``
then becomes true on all of them at the same step. A Python handler would replace JAX's (processes would stop
at different steps and wait forever in each other's collectives), so none is installed there.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

# What a shell reports for a process ended by SIGTERM (128 + 15); ``ditto-jax train`` exits with it after
# checkpointing, so a scheduler or wrapper script sees the same status whether the notice came before or
# after training started.
PREEMPTED_EXIT_CODE = 128 + int(signal.SIGTERM)


class PreemptionGuard:
    """Context manager turning SIGTERM into ``should_stop(step) == True`` at a step every process agrees on."""

    def __init__(self) -> None:
        self.signals = 0
        self.mode = "off"  # "signal" (one process) | "jax" (JAX's preemption service) | "off"
        self.warning: str | None = None
        self._previous: Any = None

    def __enter__(self) -> "PreemptionGuard":
        if jax.process_count() > 1:
            if jax.config.jax_enable_preemption_service:
                self.mode = "jax"
            else:
                self.warning = ("warning: JAX's preemption service is off (jax_enable_preemption_service=False): "
                                "SIGTERM will end the run without a checkpoint")
        elif threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._record)
            self.mode = "signal"
        else:
            self.warning = "warning: training runs outside the main thread: SIGTERM will not save a checkpoint"
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.signals += 1

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint ``step`` (just completed, or the start step) and stop; every process gets the
        same answer. Call it once per step, on every process, with increasing steps."""
        if self.mode == "signal":
            return self.signals > 0
        if self.mode == "jax":
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return False

    def __exit__(self, *exc: Any) -> None:
        if self.mode == "signal" and self.signals == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
