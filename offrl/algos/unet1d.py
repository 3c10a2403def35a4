"""The conditional 1-D temporal U-Net of Diffusion Policy (Chi et al., RSS 2023, Sec. III-B), pure torch.

It predicts the noise ``eps_theta(x_k, k, c)`` added to an action sequence ``x_k [B, T, act_dim]`` at
diffusion step ``k``, conditioned on ``c`` (the flattened observation history). Convolutions run over the
time axis; every residual block is FiLM-conditioned (Perez et al. 2018) on ``[embed(k), c]``:

    h = Block(x);  (gamma, beta) = Linear(Mish(cond));  h = gamma * h + beta;  out = Block(h) + skip(x)

Down path: for each width ``w_i``, two residual blocks (their output is kept as a skip) then a stride-2
convolution (except at the last level); a middle pair; each up block joins the current features with the
skip of the same resolution, applies two residual blocks and a stride-2 transposed convolution; a final
1x1 convolution back to ``act_dim`` channels. As in the reference, the finest skip is not used. ``T`` must be divisible by ``2 ** (len(widths) - 1)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class SinusoidalStepEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the (integer) diffusion step: ``[B] -> [B, dim]``."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"step embedding size must be even, got {dim}")
        self.dim = dim

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        # frequencies 1 / 10000^(i / (half - 1)), i = 0..half-1
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=k.device) / max(half - 1, 1))
        x = k.float()[:, None] * freq[None, :]
        return torch.cat([x.sin(), x.cos()], dim=-1)


class ConvBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish on ``[B, C, T]``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2),
                                 nn.GroupNorm(groups, c_out), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FiLMResidualBlock(nn.Module):
    """Two conv blocks; the first one's output is scaled and shifted per channel from the condition."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int):
        super().__init__()
        self.block1 = ConvBlock(c_in, c_out, kernel, groups)
        self.block2 = ConvBlock(c_out, c_out, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.c_out = c_out

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        gamma, beta = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # [B, C, 1] each
        h = gamma * h + beta
        return self.block2(h) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """Noise-prediction network ``forward(x [B, T, a], k [B], cond [B, cond_dim]) -> eps [B, T, a]``."""

    def __init__(self, act_dim: int, cond_dim: int, widths: Sequence[int] = (64, 128, 256),
                 step_embed_dim: int = 64, kernel_size: int = 5, groups: int = 8):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths:
            raise ValueError("the U-Net needs at least one width")
        for w in widths:
            if w % groups:
                raise ValueError(f"U-Net width {w} is not divisible by the GroupNorm groups ({groups})")
        self.levels = len(widths)
        self.step_embed = nn.Sequential(SinusoidalStepEmbedding(step_embed_dim),
                                        nn.Linear(step_embed_dim, 4 * step_embed_dim), nn.Mish(),
                                        nn.Linear(4 * step_embed_dim, step_embed_dim))
        c = step_embed_dim + cond_dim
        chans = [act_dim] + widths
        self.down = nn.ModuleList()
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            last = i == len(widths) - 1
            self.down.append(nn.ModuleList([
                FiLMResidualBlock(a, b, c, kernel_size, groups), FiLMResidualBlock(b, b, c, kernel_size, groups),
                nn.Conv1d(b, b, 3, stride=2, padding=1) if not last else nn.Identity()]))
        mid = widths[-1]
        self.mid = nn.ModuleList([FiLMResidualBlock(mid, mid, c, kernel_size, groups),
                                  FiLMResidualBlock(mid, mid, c, kernel_size, groups)])
        self.up = nn.ModuleList()
        for a, b in reversed(list(zip(widths[:-1], widths[1:]))):
            # input: the deeper level's output (b channels) joined with the skip of that level (b) -> a channels
            self.up.append(nn.ModuleList([
                FiLMResidualBlock(2 * b, a, c, kernel_size, groups), FiLMResidualBlock(a, a, c, kernel_size, groups),
                nn.ConvTranspose1d(a, a, 4, stride=2, padding=1)]))
        self.final = nn.Sequential(ConvBlock(widths[0], widths[0], kernel_size, groups),
                                   nn.Conv1d(widths[0], act_dim, 1))

    def forward(self, x: torch.Tensor, k: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, T, act_dim], got {tuple(x.shape)}")
        T = x.shape[1]
        if T % (2 ** (self.levels - 1)):
            raise ValueError(f"sequence length {T} must be divisible by {2 ** (self.levels - 1)} "
                             f"for a {self.levels}-level U-Net")
        if k.dim() == 0:
            k = k.expand(x.shape[0])
        c = torch.cat([self.step_embed(k), cond], dim=-1)
        h = x.transpose(1, 2)  # [B, a, T]
        skips = []
        for res1, res2, down in self.down:
            h = res2(res1(h, c), c)
            skips.append(h)
            h = down(h)
        for res in self.mid:
            h = res(h, c)
        for res1, res2, up in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(res2(res1(h, c), c))
        return self.final(h).transpose(1, 2)
