"""The optimizer step every learner shares: refuse a non-finite loss, backprop, clip, step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from offrl.errors import OffrlError


def guarded_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: Any, grad_clip: float, error: str) -> None:
    """One step on ``loss``; a NaN/Inf loss raises OffrlError(``error`` formatted with ``loss=``) first.

    ``grad_clip`` is the max gradient norm (0 disables clipping).
    """
    if not torch.isfinite(loss):
        raise OffrlError(error.format(loss=float(loss.detach())))  # detach: no autograd warning line
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
