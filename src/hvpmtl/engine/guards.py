"""Guards around non-finite steps.

A skipped step must leave no trace: its forward pass still updates buffers (BatchNorm running
statistics, ``num_batches_tracked``), so the loop snapshots every buffer before the step and puts
them back when the step is skipped (on every rank, since the skip decision is all-reduced).

A run must not end in success with weights it never trained or that are not finite: at the end
of :meth:`~hvpmtl.engine.loop.Trainer.fit`, before the final checkpoint and the exported weights,
:func:`untrained_reason` says why the run failed, or ``None``. A run where some steps were skipped
but at least one succeeded and every tensor is finite succeeds; the end-of-run table shows the
skipped count.
"""

from __future__ import annotations

import torch
from torch import nn

from hvpmtl.engine.distributed import DistEnv, all_reduce_sum

HINT = "lower optim.lr, use train.precision=fp32, or check the data"


class BufferSnapshot:
    """Copies of a module's buffers, taken at construction; :meth:`restore` writes them back.
    A submodule that keeps a host copy of a buffer (SwAV's queue fill count, read without a
    device sync) gets it back too: through its ``host_state()`` / ``set_host_state(state)``."""

    def __init__(self, module: nn.Module):
        self.saved = [(b, b.detach().clone()) for b in module.buffers()]
        self.host = [(m, m.host_state()) for m in module.modules() if hasattr(m, "host_state")]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, saved in self.saved:
            buffer.copy_(saved)
        for module, state in self.host:
            module.set_host_state(state)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def first_nonfinite(module: nn.Module, env: DistEnv) -> str | None:
    """Name of the first parameter or buffer holding a NaN or infinity on any rank, else ``None``.
    Collective under torchrun (one all-reduce); every rank gets the same answer."""
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    if not named:
        return None
    with torch.no_grad():
        flags = torch.stack([(~torch.isfinite(_local(t))).any() for _, t in named]).float()
    bad = all_reduce_sum(flags, env).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


def untrained_reason(
    module: nn.Module, steps: int, skipped: int, env: DistEnv,
    withheld: str = "nothing exported (no model.safetensors, backbone.safetensors or final checkpoint)",
) -> str | None:  # fmt: skip
    """Why the weights of a run of ``steps`` steps (``skipped`` of them skipped) must not be kept:
    no step succeeded, or some tensor is not finite. ``None`` when they are fine. Collective.
    ``withheld`` says what the run then does not write."""
    tensor = first_nonfinite(module, env)
    if tensor is None and steps - skipped > 0:
        return None
    counts = f"{skipped} of {steps} steps skipped for a non-finite loss or gradient"
    if tensor is not None:
        problem = f"non-finite weights ({counts}; first non-finite tensor: {tensor})"
    else:
        problem = f"no step succeeded ({counts}): the weights are untrained"
    return f"{problem}; {withheld}; {HINT}"
