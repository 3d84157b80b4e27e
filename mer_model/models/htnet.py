"""HTNet (Wang et al., Neurocomputing 2024): a hierarchical transformer on four facial regions of the 28x28 flow map.

Paper compatibility (regions="paper", input_format="bgr255") reproduces the authors' input exactly: every five-point
coordinate is rounded and clamped to [7, 21]; patch k = flow[x_k-7 : x_k+7, y_k-7 : y_k+7] with x used as the ROW index;
tiles [p0 | p1] over [p3 | p4]; raw 0-255 floats in cv2.imread's BGR order. Because x and y are swapped the top row
holds the image-left eye and image-left mouth. regions="corrected" cuts the same four regions with x as the column, so
the top row is left eye | right eye and the bottom row left | right mouth corner; regions="none" feeds the whole map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mer.model.models.base import Batch, ChannelLayerNorm, MERModel, choice
from mer.model.models.registry import register_model


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class _ConvAttention(nn.Module):
    """Multi-head self-attention over the pixels of a map; qkv and output are 1x1 convs (dim_head = dim // heads)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim // heads
        inner = self.dim_head * heads
        self.to_qkv = nn.Conv2d(dim, inner * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner, dim, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = (
            t.reshape(b, self.heads, self.dim_head, h * w).transpose(-1, -2) for t in self.to_qkv(x).chunk(3, dim=1)
        )
        # softmax(q k^T / sqrt(dim_head)) v as the authors write it: for these 16-token maps the plain products cost
        # no more than a fused attention kernel, and unlike those kernels they have torch.func batching rules, so a
        # fold-batched group (vmap) runs them as one batched product instead of a loop over folds.
        attn = torch.softmax((q @ k.transpose(-1, -2)) * self.dim_head**-0.5, dim=-1)
        return self.to_out((attn @ v).transpose(-1, -2).reshape(b, self.heads * self.dim_head, h, w))


class _Transformer(nn.Module):
    def __init__(self, dim: int, seq_len: int, depth: int, heads: int, mlp_mult: int, dropout: float) -> None:
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(seq_len))
        self.layers = nn.ModuleList()
        for _ in range(depth):
            ff = nn.Sequential(
                nn.Conv2d(dim, dim * mlp_mult, 1),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Conv2d(dim * mlp_mult, dim, 1),
                nn.Dropout(dropout),
            )
            self.layers.append(nn.ModuleList([_PreNorm(dim, _ConvAttention(dim, heads, dropout)), _PreNorm(dim, ff)]))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = x + self.pos_emb[: h * w].view(1, 1, h, w)
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


def _to_blocks(x: Tensor, n: int) -> Tensor:
    """(B,C,n*h,n*w) -> (B*n*n,C,h,w): local attention inside each of the n x n blocks."""
    b, c, hh, ww = x.shape
    x = x.view(b, c, n, hh // n, n, ww // n).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * n * n, c, hh // n, ww // n)


def _from_blocks(x: Tensor, n: int) -> Tensor:
    bnn, c, h, w = x.shape
    b = bnn // (n * n)
    return x.view(b, n, n, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, n * h, n * w)


def tile_regions(flow: Tensor, points: Tensor, mode: str) -> Tensor:
    """Cut four (size/2)^2 regions around eyes and mouth corners and tile them into a size x size map.

    `flow` (B,C,S,S), `points` (B,5,2) x,y in the S-pixel frame, MTCNN order. mode "paper" indexes rows by x (the
    authors' convention), "corrected" rows by y. Tiles: [p0 | p1] over [p3 | p4].
    """
    b, c, size, _ = flow.shape
    half = size // 4
    pts = points.round().long().clamp(half, size - half)[:, [0, 1, 3, 4]]  # (B,4,2)
    rows, cols = (pts[..., 0], pts[..., 1]) if mode == "paper" else (pts[..., 1], pts[..., 0])
    offs = torch.arange(-half, half, device=flow.device)
    r = (rows[..., None] + offs)[:, :, :, None]  # (B,4,2h,1)
    cl = (cols[..., None] + offs)[:, :, None, :]  # (B,4,1,2h)
    bi = torch.arange(b, device=flow.device)[:, None, None, None]
    patches = flow.permute(0, 2, 3, 1)[bi, r, cl]  # (B,4,2h,2h,C)
    top = torch.cat([patches[:, 0], patches[:, 1]], dim=2)
    bottom = torch.cat([patches[:, 2], patches[:, 3]], dim=2)
    return torch.cat([top, bottom], dim=1).permute(0, 3, 1, 2).contiguous()


@register_model(
    "htnet",
    configs={
        "paper": {},
        "small": {"dim": 32, "heads": 2, "block_repeats": (1, 1, 2), "mlp_mult": 2},
    },
    description="HTNet: hierarchical transformer on four tiled facial regions of the 28x28 flow (u, v, strain)",
)
class HTNet(MERModel):
    """Defaults = paper configuration: 139,582,982 parameters for 3 classes."""

    fold_batching = True  # no BatchNorm, no data-dependent control flow

    def __init__(
        self,
        num_classes: int,
        image_size: int = 28,
        patch_size: int = 7,
        dim: int = 256,
        heads: int = 3,
        num_hierarchies: int = 3,
        block_repeats: tuple[int, ...] = (2, 2, 10),
        mlp_mult: int = 4,
        dropout: float = 0.0,
        regions: str = "paper",
        input_format: str = "bgr255",
    ) -> None:
        super().__init__(num_classes)
        self.regions = choice("htnet", "regions", regions, ("paper", "corrected", "none"))
        self.input_format = choice("htnet", "input_format", input_format, ("bgr255", "unit"))
        self._set_io(regions=regions)
        fmap = image_size // patch_size
        blocks = 2 ** (num_hierarchies - 1)
        seq_len = (fmap // blocks) ** 2
        mults = [2**i for i in range(num_hierarchies)]
        dims = [dim * m for m in mults]
        self.patch_size = patch_size
        self.patch_embed = nn.Conv2d(3 * patch_size**2, dims[0], 1)
        self.levels = nn.ModuleList()
        for i, (level_dim, depth) in enumerate(zip(dims, tuple(block_repeats), strict=True)):
            last = i == num_hierarchies - 1
            aggregate: nn.Module = nn.Identity() if last else nn.Sequential(
                nn.Conv2d(level_dim, dims[i + 1], 3, padding=1),
                ChannelLayerNorm(dims[i + 1]),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
            transformer = _Transformer(level_dim, seq_len, depth, heads * mults[i], mlp_mult, dropout)
            self.levels.append(nn.ModuleList([transformer, aggregate]))
        self.head = nn.Sequential(ChannelLayerNorm(dims[-1]), nn.Flatten(2))
        self.fc = nn.Linear(dims[-1], num_classes)

    @classmethod
    def io_keys(cls, regions: str = "paper", **_: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (("flow28",) if regions == "none" else ("flow28", "points5")), ("label",)

    def prepare_input(self, batch: Batch) -> Tensor:
        """flow28 in [0,1] (u,v,strain) -> the tensor the network sees (tiled, scaled as configured)."""
        x = self.get(batch, "flow28")
        if self.regions != "none":
            x = tile_regions(x, self.get(batch, "points5"), self.regions)
        if self.input_format == "bgr255":
            x = x.flip(1) * 255.0
        return x

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.prepare_input(batch)
        b, c, hh, ww = x.shape
        p = self.patch_size
        x = x.view(b, c, hh // p, p, ww // p, p).permute(0, 3, 5, 1, 2, 4).reshape(b, p * p * c, hh // p, ww // p)
        x = self.patch_embed(x)
        n_levels = len(self.levels)
        for i, (transformer, aggregate) in enumerate(self.levels):
            n = 2 ** (n_levels - 1 - i)
            x = aggregate(_from_blocks(transformer(_to_blocks(x, n)), n))
        return {"logits": self.fc(self.head(x).mean(-1))}
