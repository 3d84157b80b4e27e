"""MOL: micro-action-aware multi-task network with the F5C block (expression + optical flow + 68 landmarks).

Eight greyscale 128x128 frames -> shared stem -> F5C (FCC + CCC, summed) per frame -> three heads:
  * MER: the 2(N-1) features of the consecutive pairs stacked along depth -> 3D conv (32 channels) -> local 3D
    max-pool 2 -> flatten -> FC 256 -> classes (the authors' MER_3dCNN: max-pool and flatten, not a global pool);
  * flow: FlowNetC-style correlation of consecutive frames' features + contracting/expanding decoder up to the input
    resolution, one flow per pair (pixels of the 128 frame);
  * landmarks: conv -> FC 512 -> 136 for frames 2..N.
Loss = CE + flow_weight * flow MSE (mean over pairs) + landmark_weight * L1 / inter-ocular distance (centres of
landmarks 36..41 and 42..47). The flow and landmark heads can be switched off; their targets are then not needed.
Not reproduced from the authors' code: random test crops, eval mode after the first evaluation, accumulating landmark
offsets, and CCC's double subtraction of f_i (here edge = W1 f_i + W2 (f_j - f_i), exactly once).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mer.model.errors import ConfigError
from mer.model.models.base import Batch, MERModel
from mer.model.models.registry import register_model


def _conv_bn(c_in: int, c_out: int, k: int, s: int, p: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, s, p, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class GlobalCircularConv(nn.Module):
    """Depthwise convolution whose kernel spans the whole map along one axis, with circular padding."""

    def __init__(self, channels: int, length: int, axis: int) -> None:
        super().__init__()
        self.axis = axis
        kernel = (length, 1) if axis == 2 else (1, length)
        self.pad = (0, 0, 0, length - 1) if axis == 2 else (0, length - 1, 0, 0)
        self.conv = nn.Conv2d(channels, channels, kernel, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.pad, mode="circular"))


class FCC(nn.Module):
    """Fully-connected convolution: half the channels H-then-W, half W-then-H global circular convs, each residual."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        half = channels // 2
        self.pos = nn.Parameter(torch.zeros(2, half, size, size))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.norm_a, self.norm_b = nn.BatchNorm2d(half), nn.BatchNorm2d(half)
        self.h_w = nn.Sequential(GlobalCircularConv(half, size, 2), GlobalCircularConv(half, size, 3))
        self.w_h = nn.Sequential(GlobalCircularConv(half, size, 3), GlobalCircularConv(half, size, 2))

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        a = a + self.h_w(self.norm_a(a + self.pos[0]))
        b = b + self.w_h(self.norm_b(b + self.pos[1]))
        return torch.cat([a, b], dim=1)


class CCC(nn.Module):
    """Channel correspondence convolution: channels are graph nodes (features = their maps), kNN by cosine similarity,
    edge feature max_j ReLU(W1 f_i + W2 (f_j - f_i)). Batched: one matmul for the similarities, one gather."""

    def __init__(self, channels: int, size: int, k: int) -> None:
        super().__init__()
        if not 0 < k < channels:
            raise ConfigError(f"model.kwargs.ccc_k: must be in [1, {channels - 1}], got {k}")
        d = size * size
        self.k = k
        self.w1 = nn.Linear(d, d, bias=False)
        self.w2 = nn.Linear(d, d, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        f = x.flatten(2)  # (B, C, D)
        with torch.no_grad():  # neighbour selection is discrete
            fn = F.normalize(f.float(), dim=-1)
            sim = fn @ fn.transpose(1, 2)
            sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
            idx = sim.topk(self.k, dim=-1).indices  # (B, C, k)
        w2f = self.w2(f)
        centre = self.w1(f) - w2f  # W1 f_i - W2 f_i
        neighbours = w2f[torch.arange(b, device=x.device)[:, None, None], idx]  # W2 f_j, (B, C, k, D)
        edge = F.relu(centre.unsqueeze(2) + neighbours).amax(dim=2)
        return self.norm(edge.view(b, c, h, w))


class F5C(nn.Module):
    def __init__(self, channels: int, size: int, k: int) -> None:
        super().__init__()
        self.fcc = FCC(channels, size)
        self.ccc = CCC(channels, size, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.fcc(x) + self.ccc(x)


def correlation(f1: Tensor, f2: Tensor, max_disp: int) -> Tensor:
    """FlowNetC correlation (kernel 1, stride 1): mean over channels of f1 * shifted f2 -> (B, (2d+1)^2, H, W)."""
    h, w = f1.shape[-2:]
    f2p = F.pad(f2, (max_disp,) * 4)
    span = 2 * max_disp + 1
    return torch.stack(
        [(f1 * f2p[:, :, dy : dy + h, dx : dx + w]).mean(1) for dy in range(span) for dx in range(span)], dim=1
    )


def _leaky(c_in: int, c_out: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, (k - 1) // 2), nn.LeakyReLU(0.1, inplace=True))


def _deconv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.1, inplace=True))


class FlowHead(nn.Module):
    """Correlation + FlowNetC contracting part (from conv3_1) + expanding part continued to full resolution."""

    def __init__(self, channels: int, max_disp: int, redir: int, enc: tuple[int, ...], dec: tuple[int, ...],
                 up_levels: int) -> None:  # fmt: skip
        super().__init__()
        if len(dec) != len(enc) - 1 + up_levels:
            raise ConfigError(f"model.kwargs.flow_dec: needs {len(enc) - 1 + up_levels} widths, got {len(dec)}")
        self.max_disp = max_disp
        self.redir = _leaky(channels, redir, 1)
        self.enc = nn.ModuleList([nn.Sequential(_leaky((2 * max_disp + 1) ** 2 + redir, enc[0]))])
        for c_in, c_out in zip(enc[:-1], enc[1:], strict=True):
            self.enc.append(nn.Sequential(_leaky(c_in, c_out, 3, 2), _leaky(c_out, c_out)))
        skips = list(reversed(enc[:-1])) + [0] * up_levels
        self.predict = nn.ModuleList([nn.Conv2d(enc[-1], 2, 3, 1, 1)])
        self.up = nn.ModuleList()
        self.up_flow = nn.ModuleList()
        c_in = enc[-1]
        for skip, c_out in zip(skips, dec, strict=True):
            self.up.append(_deconv(c_in, c_out))
            self.up_flow.append(nn.ConvTranspose2d(2, 2, 4, 2, 1, bias=False))
            c_in = skip + c_out + 2
            self.predict.append(nn.Conv2d(c_in, 2, 3, 1, 1))

    def forward(self, f1: Tensor, f2: Tensor) -> Tensor:
        x = torch.cat([correlation(f1, f2, self.max_disp), self.redir(f1)], dim=1)
        feats = []
        for layer in self.enc:
            x = layer(x)
            feats.append(x)
        skips = list(reversed(feats[:-1]))
        flow = self.predict[0](x)
        for i, (up, up_flow, predict) in enumerate(zip(self.up, self.up_flow, self.predict[1:], strict=True)):
            parts = [up(x), up_flow(flow)]
            x = torch.cat(([skips[i]] if i < len(skips) else []) + parts, dim=1)
            flow = predict(x)
        return flow


@register_model(
    "mol",
    configs={
        "paper": {},
        "small": {"frame_size": 64, "stem_channels": (4, 8, 16, 32), "mer_channels": 32, "mer_fc": 64, "dropout": 0.2,
                  "flow_max_disp": 2, "flow_redir": 8, "flow_enc": (32, 48, 64, 96), "flow_dec": (64, 32, 16, 8, 8, 8),
                  "landmark_channels": 8, "landmark_fc": 64},
        "mer_only": {"use_flow": False, "use_landmarks": False},
    },  # fmt: skip
    description="MOL: F5C (FCC + CCC) multi-task network: expression + optical flow + 68 landmarks from 8 frames",
)
class MOL(MERModel):
    """Defaults = paper configuration (8 frames of 128x128, stem to 128x16x16, FlowNetC-sized flow decoder)."""

    prefers_channels_last = False  # circular padding and the correlation loop gain nothing from NHWC

    def __init__(
        self,
        num_classes: int,
        frames: int = 8,
        frame_size: int = 128,
        stem_channels: tuple[int, ...] = (8, 32, 64, 128),
        ccc_k: int = 4,
        mer_channels: int = 32,
        mer_fc: int = 256,
        dropout: float = 0.5,
        use_flow: bool = True,
        flow_max_disp: int = 4,
        flow_redir: int = 32,
        flow_enc: tuple[int, ...] = (256, 512, 512, 1024),
        flow_dec: tuple[int, ...] = (512, 256, 128, 64, 32, 16),
        flow_weight: float = 10.0,
        use_landmarks: bool = True,
        landmark_channels: int = 64,
        landmark_fc: int = 512,
        landmark_weight: float = 0.3,
    ) -> None:
        super().__init__(num_classes)
        if frames < 2:
            raise ConfigError(f"model.kwargs.frames: MOL needs at least 2 frames, got {frames}")
        if frame_size % 8:
            raise ConfigError(f"model.kwargs.frame_size: MOL needs a multiple of 8, got {frame_size}")
        self._set_io(use_flow=use_flow, use_landmarks=use_landmarks)
        self.frames, self.frame_size = frames, frame_size
        self.flow_weight, self.landmark_weight = flow_weight, landmark_weight
        s1, s2, s3, c = stem_channels
        self.stem = nn.Sequential(
            *_conv_bn(1, s1, 4, 2, 0), *_conv_bn(s1, s2, 3, 2, 0), *_conv_bn(s2, s3, 2, 2, 1), *_conv_bn(s3, c, 1, 1, 0)
        )
        with torch.no_grad():
            size = self.stem(torch.zeros(1, 1, frame_size, frame_size)).shape[-1]
        self.f5c = F5C(c, size, ccc_k)
        # Local max-pooling, then flatten: the FC sees WHERE and WHEN a pair moved (a global average over the
        # 2(N-1) x H x W volume washed the few moving positions out; the small config fitted 24 clips to UF1 0.79).
        depth, side = (2 * (frames - 1) + 1) // 2, (size + 1) // 2  # after the stride-2 3D conv
        pool = (min(2, depth), min(2, side), min(2, side))
        flat = mer_channels * (depth // pool[0]) * (side // pool[1]) ** 2
        self.mer_head = nn.Sequential(
            nn.Conv3d(c, mer_channels, 3, 2, 1, bias=False), nn.BatchNorm3d(mer_channels), nn.ReLU(inplace=True),
            nn.MaxPool3d(pool), nn.Flatten(), nn.Linear(flat, mer_fc), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(mer_fc, num_classes),
        )  # fmt: skip
        up_levels = (frame_size // size).bit_length() - 1
        self.flow_head = (
            FlowHead(c, flow_max_disp, flow_redir, tuple(flow_enc), tuple(flow_dec), up_levels) if use_flow else None
        )
        self.landmark_head = (
            nn.Sequential(
                *_conv_bn(c, landmark_channels, 3, 2, 1), nn.Flatten(),
                nn.Linear(landmark_channels * ((size + 1) // 2) ** 2, landmark_fc), nn.ReLU(inplace=True),
                nn.Linear(landmark_fc, 68 * 2),
            )  # fmt: skip
            if use_landmarks
            else None
        )

    @classmethod
    def io_keys(
        cls, use_flow: bool = True, use_landmarks: bool = True, **_: Any
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        targets = ("label",) + (("flows128",) if use_flow else ()) + (("landmarks68",) if use_landmarks else ())
        return ("frames128",), targets

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        frames = self.get(batch, "frames128")
        b, n, h, w = frames.shape
        if n != self.frames:
            raise ConfigError(f"model.kwargs.frames: MOL built for {self.frames} frames, batch has {n}")
        x = frames.reshape(b * n, 1, h, w)
        if h != self.frame_size or w != self.frame_size:  # a reduced working resolution (small configs)
            x = F.interpolate(x, size=(self.frame_size, self.frame_size), mode="bilinear", antialias=True)
        feats = self.f5c(self.stem(x))
        c, fh, fw = feats.shape[1:]
        feats = feats.view(b, n, c, fh, fw)
        first, second = feats[:, :-1], feats[:, 1:]
        pairs = torch.stack([first, second], dim=2).reshape(b, 2 * (n - 1), c, fh, fw).transpose(1, 2)
        out = {"logits": self.mer_head(pairs)}
        if self.flow_head is not None:
            flow = self.flow_head(first.reshape(-1, c, fh, fw), second.reshape(-1, c, fh, fw))
            if flow.shape[-2:] != (h, w):  # back to the batch's frame size, in its pixels
                flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
                flow = flow * flow.new_tensor([w / self.frame_size, h / self.frame_size]).view(1, 2, 1, 1)
            out["flow"] = flow.view(b, n - 1, 2, h, w)
        if self.landmark_head is not None:
            pts = self.landmark_head(second.reshape(-1, c, fh, fw)).view(b, n - 1, 68, 2)
            out["landmarks"] = (pts + 0.5) * pts.new_tensor([w, h])  # pixels of the batch's frames, from the centre
        return out

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        total, parts = self.classification_loss(outputs, batch)
        if "flow" in outputs:
            mse = F.mse_loss(outputs["flow"].float(), self.get(batch, "flows128").float())
            total = total + self.flow_weight * mse
            parts["flow_mse"] = mse.detach()
        if "landmarks" in outputs:
            l1 = landmark_l1_loss(outputs["landmarks"].float(), self.get(batch, "landmarks68")[:, 1:].float())
            total = total + self.landmark_weight * l1
            parts["landmark_l1"] = l1.detach()
        parts["loss"] = total.detach()
        return total, parts


def landmark_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """MOL's landmark loss: the mean L1 point error (|dx|+|dy|) normalised by the target's inter-ocular distance (eye
    centres). Not the field's NME metric (Euclidean point error; training.metrics.landmark_nme), hence its own name:
    logged as the loss part `landmark_l1`, never under the metric's name."""
    iod = (target[..., 36:42, :].mean(-2) - target[..., 42:48, :].mean(-2)).norm(dim=-1).clamp_min(1.0)
    return ((pred - target).abs().sum(-1).mean(-1) / iod).mean()
