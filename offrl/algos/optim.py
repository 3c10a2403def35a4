"""The optimizer step every learner shares: refuse a non-finite loss, backprop, clip, step.

Inside :func:`data_parallel` (the training function of a Ray Train worker, where ``torch.distributed`` is set
up), the step averages the gradients of all workers first, which is what DistributedDataParallel does: every
worker takes an equal share of the global batch, so the mean of the workers' gradients of their mean losses
is the gradient of the mean loss over the global batch. offrl's learners compute losses through methods other
than ``forward`` (log-likelihoods, noise-prediction losses, critic losses), which a DDP wrapper does not hook,
so the average is one explicit ``all_reduce`` here, in the one place every learner steps.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from offrl.errors import OffrlError


_DATA_PARALLEL = False


@contextlib.contextmanager
def data_parallel() -> Iterator[None]:
    """Average gradients over the ``torch.distributed`` process group in every :func:`guarded_step`."""
    global _DATA_PARALLEL
    before = _DATA_PARALLEL
    _DATA_PARALLEL = True
    try:
        yield
    finally:
        _DATA_PARALLEL = before


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _DATA_PARALLEL and dist.is_available() and dist.is_initialized() else 1


def guarded_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: Any, grad_clip: float, error: str) -> None:
    """One step on ``loss``; a NaN/Inf loss raises OffrlError(``error`` formatted with ``loss=``) first.

    ``grad_clip`` is the max gradient norm (0 disables clipping). Data-parallel (see :func:`data_parallel`):
    ``g <- (1/W) sum_w g_w`` before clipping, and a non-finite loss on any worker raises on every worker.
    """
    world = _world()
    if world > 1:
        import torch.distributed as dist

        params = list(params)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # even when not finite: every worker must reach the all_reduce
        ps = [p for p in params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in ps] + [loss.detach().reshape(1).to(ps[0].grad if ps else loss)])
        dist.all_reduce(flat)
        flat /= world
        if not torch.isfinite(flat[-1]):
            raise OffrlError(error.format(loss=float(flat[-1])))
        i = 0
        for p in ps:
            k = p.grad.numel()
            p.grad.copy_(flat[i:i + k].view_as(p.grad))
            i += k
        if grad_clip:
            nn.utils.clip_grad_norm_(ps, grad_clip)
        opt.step()
        return
    if not torch.isfinite(loss):
        raise OffrlError(error.format(loss=float(loss.detach())))  # detach: no autograd warning line
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
