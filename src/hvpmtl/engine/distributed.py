"""Data parallelism under torchrun: process group, global BatchNorm, DDP or FSDP2 wrapping.

N processes with a local batch of B/N reproduce one process with batch B: the sampler splits
each global batch, gradients are averaged, BatchNorm statistics and the Sinkhorn sums run over
the global batch, and losses summed over images (``model.summed_losses``) are rescaled by the
caller (``loop.py``). The EMA teacher has ``requires_grad=False``, so DDP never syncs it; under
FSDP it is sharded like the student so that the EMA update is a local op on matching shards.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass
class DistEnv:
    """Where this process runs: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` gets the local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto", timeout_min: int = 30) -> DistEnv:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and start the process group
    (NCCL on CUDA, gloo on CPU with ``backend=auto``). A plain ``python`` run is world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise ValueError("dist.backend=nccl needs CUDA; use dist.backend=gloo (or auto) on CPU")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    return DistEnv(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# BatchNorm over the global batch (torch's SyncBatchNorm is CUDA-only)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics run over all processes' samples (any device).

    Two differentiable all-reduces (sum and count, then the centred sum of squares) give the
    exact mean and biased variance of the global batch; running statistics use the unbiased
    variance as ``nn.BatchNorm`` does, so all ranks keep identical buffers and a 1-process run
    with the union of the batches gives the same outputs. Same state-dict keys as BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.new_tensor([x.numel() / x.shape[1]])
        s = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n = s[-1]
        mean = s[:-1] / n
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm*d`` by :class:`GlobalBatchNorm` that shares its parameters and
    buffers (so optimiser groups built before the conversion still point at the trained tensors)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        m = module
        new = GlobalBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if m.affine:
            new.weight, new.bias = m.weight, m.bias
        if m.track_running_stats:
            new.running_mean, new.running_var, new.num_batches_tracked = (
                m.running_mean,
                m.running_var,
                m.num_batches_tracked,
            )
        new.train(m.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_global_batchnorm(child))
    return module


# ----------------------------------------------------------------------------------------------
# wrapping


def _block_modules(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks: the children of every ``blocks`` container (ViT, and each Swin stage)."""
    found = []
    for name, mod in model.named_modules():
        if name.split(".")[-1] == "blocks" and isinstance(mod, (nn.Sequential, nn.ModuleList)):
            found.extend(mod.children())
    return found


def wrap_model(model: nn.Module, env: DistEnv, strategy: str = "ddp", sync_bn: bool = True) -> nn.Module:
    """DDP or FSDP2 around ``model`` when the world size is > 1; the model itself otherwise.

    DDP searches for unused parameters only when the model has some (``has_unused_parameters``:
    the MLC read-out when only MD uses the decoder). FSDP2
    (``fully_shard``) shards each Transformer block (student and teacher alike), then the rest.
    """
    if not env.distributed:
        return model
    if sync_bn:
        model = convert_global_batchnorm(model)
    if strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        unused = getattr(model, "has_unused_parameters", True)
        return ddp_without_buffer_sync(model, device_ids=ids, find_unused_parameters=unused)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _block_modules(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"dist.strategy: unknown '{strategy}' (choose ddp or fsdp)")


def ddp_has_forward_sync_buffers() -> bool:
    """Whether this torch's DDP takes ``forward_sync_buffers`` (torch >= 2.13)."""
    return "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters


def ddp_without_buffer_sync(model: nn.Module, **kwargs) -> nn.parallel.DistributedDataParallel:
    """DDP that syncs buffers once, from rank 0 at wrap time, and never in ``forward``.

    The buffers (global BatchNorm statistics, SwAV's queue) stay equal on every process through
    their own collectives, so a broadcast before every forward would be a wasted one. torch >= 2.13
    says this with ``forward_sync_buffers=False``; earlier releases only have
    ``broadcast_buffers=False``, which also skips the wrap-time sync, so that sync is done here:
    the same behaviour on every release the package accepts.
    """
    ddp_cls = nn.parallel.DistributedDataParallel
    if ddp_has_forward_sync_buffers():
        return ddp_cls(model, forward_sync_buffers=False, **kwargs)
    wrapped = ddp_cls(model, broadcast_buffers=False, **kwargs)
    for buf in model.buffers():  # parameters were synced by DDP itself
        dist.broadcast(buf.data, src=0)
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The HVPMTL inside a DDP wrapper (FSDP2 and plain models are returned as they are)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, enabled: bool):
    """Context that turns gradient sync off for the non-final micro-batches of an accumulation."""
    import contextlib

    if enabled:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if is_fsdp(model):

        @contextlib.contextmanager
        def _no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return _no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t)
    return t


def all_gather_object(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
