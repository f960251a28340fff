"""Vision-transformer building blocks under timm's parameter names.

Dasheng, M2D (timm ``VisionTransformer`` blocks) and EAT (data2vec 2.0 ``AltBlock``) store
their transformer layers under the same names: ``norm1``, ``attn.qkv``, ``attn.proj``,
``norm2``, ``mlp.fc1``, ``mlp.fc2`` and, with layer scale, ``ls1.gamma`` / ``ls2.gamma``.
One implementation serves all three, so each released checkpoint loads into it key for key;
what differs between them (norm placement, layer scale, widths, LayerNorm eps) is an argument.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head = dim // self.num_heads
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q * head**-0.5) @ k.transpose(-2, -1), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """fc1, exact GELU, fc2 (timm's ``Mlp`` at inference, dropout being the identity)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """A learned per-channel gain on a residual branch (CaiT's layer scale, parameter ``gamma``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Transformer block: attention then MLP, each a residual branch.

    ``norm_first`` (timm, Dasheng, M2D): ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.
    Otherwise post-norm (data2vec 2.0 ``AltBlock`` with ``layer_norm_first=False``, EAT):
    ``norm1(x + attn(x))``, then ``norm2(x + mlp(x))``. ``layer_scale`` multiplies each branch
    by its ``gamma`` before the sum; without it the branches are left as they are and the
    block holds no ``ls*`` parameters.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, qkv_bias: bool = True,
                 layer_scale: bool = False, norm_first: bool = True) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.ls1(self.attn(x)))
        return self.norm2(x + self.ls2(self.mlp(x)))


class PatchEmbed(nn.Module):
    """Spectrogram [B, C, mels, frames] -> patch grid [B, dim, mel patches, time patches] by one
    strided convolution (``proj``)."""

    def __init__(self, in_chans: int, dim: int, patch: tuple[int, int], stride: tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
