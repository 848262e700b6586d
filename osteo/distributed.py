"""One training run shared by several processes (or GPUs) under ``torchrun``.

    torchrun --standalone --nproc_per_node 4 -m osteo train data/manifest.csv --out runs/big

For a data set too large for one GPU to train in time. Every process loads the whole data set and a
copy of the network, and the processes take the steps of ONE run together:

- every epoch the processes shuffle the training slices in the same order (the run's seed) and cut
  it into the same global batches as a single process would (:func:`osteo.training.epoch_batches`);
  each process takes one contiguous share of each batch (:meth:`World.share`);
- batch norm computes its statistics over the whole global batch, not over one share
  (:class:`GlobalBatchNorm`, a synchronised batch norm that also runs on the CPU);
- the loss each process back-propagates is its share of the single-process loss (:func:`share_loss`:
  Eq. 5's cross-entropies and L_dis weighted by the share's size, ACM's ``|batch mean|`` taken over
  the global batch), so the gradient that DistributedDataParallel averages is the gradient of Eq. 5
  on the global batch.

So N processes compute the steps one process computes, up to floating-point rounding (tested in
float64 with 2 CPU processes and the gloo backend: the same history, predictions and metrics). Only
the first process (rank 0) prints, shows progress and writes ``checkpoint.pt`` and ``result.json``;
every process resumes from that checkpoint. The eager engine runs (the grouped and compiled engines
are single-process); ``result.json`` records ``engine: "eager, N processes"``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GlobalBatchNorm", "World", "current_world", "data_parallel", "share_loss", "use_global_batchnorm"]


@dataclass(frozen=True)
class World:
    """This process's place among the ``size`` processes of one run (set by ``torchrun``)."""

    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        """The process that prints, checkpoints and writes the result (rank 0)."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This process's contiguous share of a batch of ``n`` slices: sizes differ by at most one,
        earlier ranks take the extra slices, and together the shares cover the batch once."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the processes (no gradient)."""
        x = x.detach().clone()
        dist.all_reduce(x)
        return x


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: not an integer (torchrun sets it)") from None


def current_world() -> World | None:
    """The :class:`World` of a run started by ``torchrun`` with two or more processes, else None.

    Starts the process group on first use: NCCL when this process has a GPU, else gloo (the CPU).
    """
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") <= 1:
        return None
    world = World(_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo")
    return world


class _SumOverProcesses(torch.autograd.Function):
    """``all_reduce(SUM)`` with a gradient: each process's output is the sum of every process's input,
    so the gradient of every process's input is the sum of every process's output gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GlobalBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics are those of the global batch (all processes' shares).

    Outside a multi-process run, or in evaluation, it is :class:`torch.nn.BatchNorm2d`. In training
    it sums each channel's values over the processes (the mean), then the squared deviations from
    that mean (the biased variance that normalises, as batch norm does), with a gradient that flows
    through both sums, and updates the running statistics with the unbiased variance. Statistics
    are computed in float32 at least (under bf16 autocast too).
    """

    process_group = None  # None: every process of the run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1):
            return super().forward(x)
        xs = x.to(torch.promote_types(x.dtype, torch.float32))
        c = xs.shape[1]
        count = xs.new_tensor([xs.numel() // c])
        total = _SumOverProcesses.apply(torch.cat([xs.sum((0, 2, 3)), count]), self.process_group)
        n = total[c]
        mean = total[:c] / n
        centred = xs - mean[None, :, None, None]
        var = _SumOverProcesses.apply((centred * centred).sum((0, 2, 3)), self.process_group) / n
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
        return y.to(x.dtype)


def use_global_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Turn every ``BatchNorm2d`` of ``model`` into a :class:`GlobalBatchNorm` in place, keeping the
    same parameter and buffer objects (an optimiser built before still updates them)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats, device="meta")
                bn.weight, bn.bias = child.weight, child.bias
                for buf in ("running_mean", "running_var", "num_batches_tracked"):
                    setattr(bn, buf, getattr(child, buf))
                bn.process_group = process_group
                bn.train(child.training)
                setattr(module, name, bn)
    return model


class _Forward(nn.Module):
    """A network's forward (``run(net, xs)``, its registry entry's) as a module call, which
    DistributedDataParallel needs to see to synchronise the gradients."""

    def __init__(self, net: nn.Module, run):
        super().__init__()
        self.net, self._run = net, run

    def forward(self, *xs):
        return self._run(self.net, xs)


def data_parallel(model: nn.Module, run, device: torch.device) -> nn.Module:
    """``model`` (its batch norms made global, in place) wrapped for DistributedDataParallel; calling
    the wrapper with the views runs ``run(model, views)`` and averages gradients over the processes
    in the backward pass. Buffers are not re-sent every step: :class:`GlobalBatchNorm` keeps every process's
    running statistics equal."""
    use_global_batchnorm(model, dist.new_group())  # its own channel, apart from the gradients'
    return nn.parallel.DistributedDataParallel(
        _Forward(model, run), device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)


def share_loss(terms: dict, out, y: torch.Tensor, acm_weight: float, world: World) -> tuple[torch.Tensor, dict]:
    """What this process back-propagates, and the loss terms of the whole global batch.

    ``terms`` are this share's terms of :func:`osteo.losses.model_loss` without ACM's term (means
    over the share's ``n`` slices). Over the processes, a share's term counts ``n / N`` of the
    global batch's mean (N slices); ACM's penalty ``acm_weight * |mean of out.aux["acm"]|`` takes the
    mean over the global batch. DistributedDataParallel AVERAGES the processes' gradients, so each
    process's objective is ``size *`` its share of the global loss: the average is then the gradient
    of the single-process loss. Returns ``(objective, global terms)``, the terms in
    :func:`model_loss`'s order (``total`` includes ACM's term).
    """
    acm = out.aux.get("acm") if acm_weight else None
    names = list(terms)
    n_local = torch.tensor(float(len(y)), dtype=terms["total"].dtype, device=y.device)
    local = [n_local, acm.sum().to(n_local.dtype) if acm is not None else torch.zeros_like(n_local)]
    local += [terms[k].detach() * n_local for k in names]
    summed = world.sum(torch.stack(local))
    n, acm_mean = summed[0], summed[1] / summed[0]
    objective = world.size * (n_local / n) * terms["total"]
    glob = {k: summed[2 + i] / n for i, k in enumerate(names)}
    if acm is not None:
        # d|m|/dm = sign(m), and this share's slices enter m = (sum over every share) / N
        objective = objective + world.size * acm_weight * torch.sign(acm_mean) * acm.sum() / n
        glob["total"] = glob["total"] + acm_weight * acm_mean.abs()
        glob["acm"] = acm_weight * acm_mean.abs()
    return objective, glob
