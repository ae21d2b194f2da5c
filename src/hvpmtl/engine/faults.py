"""Fault injection for the tests of the training loop: a crash after a step, NaN losses from a step on.

Not part of any config. Environment variables, so that in-process, subprocess and torchrun tests
can all use them; the loop reads them once when it starts::

    HVPMTL_FAULT_STOP_AFTER=2 hvpmtl pretrain ...   # SimulatedCrash after step 2 (no final checkpoint)
    HVPMTL_FAULT_NAN_AT_STEP=1 hvpmtl pretrain ...  # every loss is NaN from step 1 (0-based) on

>>> with inject(stop_after=2):
...     main(["pretrain", ...])  # exits 1: simulated crash after step 2
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

STOP_AFTER = "HVPMTL_FAULT_STOP_AFTER"
NAN_AT_STEP = "HVPMTL_FAULT_NAN_AT_STEP"


class SimulatedCrash(RuntimeError):
    """Raised after ``HVPMTL_FAULT_STOP_AFTER`` steps (a crash without a final checkpoint)."""


def _read_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None


@dataclass(frozen=True)
class Faults:
    """The faults to inject; the defaults inject none."""

    stop_after: int = 0  # > 0: SimulatedCrash once this many steps are done (unless the run is done)
    nan_at_step: int = -1  # >= 0: every loss is NaN from this (0-based) step on

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Faults:
        env = os.environ if env is None else env
        return cls(_read_int(env, STOP_AFTER, 0), _read_int(env, NAN_AT_STEP, -1))

    def poison(self, out: dict, step: int) -> dict:
        """``out`` with every ``loss*`` value NaN once ``step`` reaches ``nan_at_step``."""
        if 0 <= self.nan_at_step <= step:
            return {k: v * math.nan if k.startswith("loss") else v for k, v in out.items()}
        return out

    def crash_after(self, step: int, done: bool) -> None:
        """Raise :class:`SimulatedCrash` once ``step`` steps are done, unless the run is done."""
        if self.stop_after and step >= self.stop_after and not done:
            raise SimulatedCrash(f"simulated crash after step {step} ({STOP_AFTER}={self.stop_after})")


class FaultHook:
    """:class:`Faults` as a loop step hook (:class:`~hvpmtl.engine.task.StepHook`): the losses
    poisoned after each forward, the crash after a step's checkpoint."""

    keys: tuple[str, ...] = ()

    def __init__(self, faults: Faults):
        self.faults = faults

    def start(self, loop) -> None:
        return None

    def after_forward(self, out: dict, step: int, micro: int, loop) -> dict:
        return self.faults.poison(out, step)

    def after_step(self, step: int, done: bool, loop) -> None:
        return None

    def after_checkpoint(self, step: int, done: bool, loop) -> None:
        self.faults.crash_after(step, done)


@contextmanager
def inject(stop_after: int | None = None, nan_at_step: int | None = None) -> Iterator[None]:
    """Set the variables for the ``with`` block (child processes inherit them), then restore them."""
    wanted = {STOP_AFTER: stop_after, NAN_AT_STEP: nan_at_step}
    saved = {name: os.environ.get(name) for name in wanted}
    try:
        for name, value in wanted.items():
            if value is not None:
                os.environ[name] = str(value)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
