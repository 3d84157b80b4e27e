"""The two-branch onset/apex network shared by MMNet and CVA+FPF+AU (one code path, configured per paper).

Main branch: motion (apex - onset of the normalised crops, or the 28x28 flow centred on its zero-motion level and
upsampled) -> 3x3 conv stride 2 -> a
ResNet-18-like stack of one residual block per stage whose output is re-weighted by a chained attention map:
  * "ca"  (MMNet): spatial map from channel mean and max -> 1x1 conv -> BN -> sigmoid, times the previous block's map
           (max-pooled 3/2/1), applied to the features;
  * "cva" (CVA+FPF): coordinate-attention style vertical map a_h (B,C,H,1), times the previous stage's map (max-pooled
           along H, projected across channels with a 1x1 conv where the width changes); only a_h is applied;
  * "none": plain residual blocks (ablation).
Position branch, added to the main-branch output: "pc" (MMNet's ViT on the frame resized to the feature size),
"fpf" (timm Swin Transformer, shared weights, summed over the configured frames) or "none".
Head: "linear" (MMNet: flatten -> dropout -> FC) or "au_mlp" (CVA+FPF: flatten -> FC -> [concat AU] -> BN -> FC -> FC).
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mer.model.errors import ConfigError
from mer.model.models.base import (Batch, MERModel, OptionalInput, choice, default_num_aus, imagenet_normalise,
                                   masked_au_bce)

FACE_KEYS = ("onset224", "apex224")


class ResidualUnit(nn.Module):
    """MMNet's basic block: 3x3 conv (stride), BN, ReLU, 1x1 conv, BN, + (projected) identity, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ContinuousAttention(nn.Module):
    """MMNet CA: spatial map from channel mean/max, chained with the previous block's (max-pooled) map."""

    def __init__(self, channels: int, prev_channels: int | None) -> None:
        super().__init__()
        self.attn = nn.Sequential(nn.Conv2d(2, 1, 1, bias=False), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, x: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
        stats = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        a = self.attn(stats)
        if prev is not None:
            a = a * F.max_pool2d(prev, 3, 2, 1)
        return x * a, a


class ContinuousVerticalAttention(nn.Module):
    """CVA: per-channel vertical map a_h from coordinate-attention pooling, chained across stages.

    The authors also compute a horizontal map a_w and discard it; it is not built here (it would never get a gradient).
    """

    def __init__(self, channels: int, prev_channels: int | None, reduction: int = 32, min_mid: int = 8) -> None:
        super().__init__()
        mid = max(min_mid, channels // reduction)
        self.squeeze = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.Hardswish())
        self.to_h = nn.Conv2d(mid, channels, 1)
        self.project = (
            nn.Conv2d(prev_channels, channels, 1, bias=False)
            if prev_channels is not None and prev_channels != channels
            else None
        )
        if self.project is not None:
            # Start as the channel average of the previous map: the chained map is then a product of (0, 1) maps, as
            # in MMNet's CA chain. A default (signed, zero-mean) init turns it into a random signed mixture near 0 that
            # scales the last stages' features down ~20x and flips their signs at random (measured on flow_small).
            nn.init.constant_(self.project.weight, 1.0 / prev_channels)

    def forward(self, x: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
        h = x.shape[2]
        pooled = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)
        a = torch.sigmoid(self.to_h(self.squeeze(pooled)[:, :, :h]))  # (B,C,H,1)
        if prev is not None:
            if prev.shape[2] != h:
                prev = F.max_pool2d(prev, (3, 1), (2, 1), (1, 0))
            if self.project is not None:
                prev = self.project(prev)
            a = a * prev
        return x * a, a


_ATTENTION: dict[str, type[nn.Module]] = {"ca": ContinuousAttention, "cva": ContinuousVerticalAttention}


class MainBranch(nn.Module):
    """Motion map -> conv stride 2 -> stages of (residual unit + chained attention) -> (B, C_last, S/16, S/16)."""

    def __init__(self, in_channels: int, act_channels: int, stage_channels: tuple[int, ...], attention: str) -> None:
        super().__init__()
        self.conv_act = nn.Sequential(
            nn.Conv2d(in_channels, act_channels, 3, 2, 1, bias=False), nn.BatchNorm2d(act_channels), nn.ReLU(True)
        )
        first = stage_channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(act_channels, first, 3, 1, 1, bias=False), nn.BatchNorm2d(first), nn.ReLU(True)
        )
        self.units = nn.ModuleList()
        self.attentions = nn.ModuleList()
        c_in, prev = first, None
        for i, c_out in enumerate(stage_channels):
            self.units.append(ResidualUnit(c_in, c_out, 1 if i == 0 else 2))
            self.attentions.append(_ATTENTION[attention](c_out, prev) if attention in _ATTENTION else nn.Identity())
            c_in = prev = c_out

    def forward(self, motion: Tensor) -> Tensor:
        x = self.stem(self.conv_act(motion))
        amap = None
        for unit, attention in zip(self.units, self.attentions, strict=True):
            x = unit(x)
            if not isinstance(attention, nn.Identity):
                x, amap = attention(x, amap)
        return x


class PositionCalibration(nn.Module):
    """MMNet PC module: a small ViT (patch 1) on the frame resized to the feature size, as a (B,C,S,S) map."""

    def __init__(self, size: int, dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.size = size
        self.vit = VisionTransformer(
            img_size=size, patch_size=1, in_chans=3, num_classes=0, global_pool="", embed_dim=dim, depth=depth,
            num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True, class_token=False,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=drop_path,
        )  # fmt: skip

    def forward(self, frame: Tensor) -> Tensor:
        x = F.interpolate(frame, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        tokens = self.vit.forward_features(x)  # (B, S*S, C)
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, self.size, self.size)


class FacialPositionFocalizer(nn.Module):
    """FPF: timm Swin Transformer truncated to its stages (no head) -> (B, C, S/16, S/16) for one face crop (S px).

    The paper's Swin ends with as many channels as the main branch (512); a Swin of another width (a CPU-scale FPF
    whose embed dim is searched on its own) is mapped to the main branch's `out_channels` by a 1x1 convolution.
    """

    def __init__(self, img_size: int, embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int,
                 drop_path: float, out_channels: int) -> None:  # fmt: skip
        super().__init__()
        if len(depths) != 3:
            raise ConfigError(f"model.kwargs.swin_depths: FPF needs 3 Swin stages (patch 4, two merges: S/16, the main "
                              f"branch's grid), got {tuple(depths)}")
        self.swin = SwinTransformer(
            img_size=img_size, patch_size=4, in_chans=3, num_classes=0, embed_dim=embed_dim, depths=tuple(depths),
            num_heads=tuple(heads), window_size=window, drop_path_rate=drop_path,
        )  # fmt: skip
        width = embed_dim * 2 ** (len(depths) - 1)
        self.proj = nn.Conv2d(width, out_channels, 1) if width != out_channels else nn.Identity()

    def forward(self, frame: Tensor) -> Tensor:
        return self.proj(self.swin.forward_features(frame).permute(0, 3, 1, 2))  # timm returns NHWC


class TwoFrameNet(MERModel):
    """Configurable onset/apex network; MMNet and CVAFPF subclass it with their paper defaults."""

    prefers_channels_last = True
    #: how notes name the position branch (CVA+FPF: its Swin focaliser "FPF"; MMNet: position calibration "PC")
    position_label: ClassVar[str] = "PC"

    @classmethod
    def optional_inputs(cls) -> tuple[OptionalInput, ...]:
        """The position branch reads face crops (`position`, off = "none"); the AU part reads the AU coding
        (`au_mode`, off = "none": annotated = input, predicted = targets of the AU head)."""
        return (OptionalInput(cls.position_label, "position", "none", "faces"),
                OptionalInput("AUs", "au_mode", "none", "au_coded",
                              {"annotated": "input (leaks labels)",
                               "predicted": "targets of a jointly trained AU head"},
                              column="au"))

    def __init__(
        self,
        num_classes: int,
        motion: str = "diff",
        flow_center: str = "median",
        img_size: int = 224,
        act_channels: int = 180,
        stage_channels: tuple[int, ...] = (128, 128, 256, 512),
        attention: str = "ca",
        position: str = "pc",
        position_frames: tuple[str, ...] = ("onset224",),
        pc_depth: int = 2,
        pc_heads: int = 4,
        pc_mlp_ratio: float = 4.0,
        swin_embed_dim: int = 128,
        swin_depths: tuple[int, ...] = (2, 2, 6),
        swin_heads: tuple[int, ...] = (4, 8, 16),
        swin_window: int = 7,
        drop_path: float = 0.0,
        position_scale: float = 0.01,
        head: str = "linear",
        dropout: float = 0.1,
        fc_dim: int = 512,
        fc2_dim: int = 128,
        au_mode: str = "none",
        num_aus: int | None = None,
        au_weight: float = 1.0,
    ) -> None:
        super().__init__(num_classes)
        choice(self.name, "motion", motion, ("diff", "flow"))
        self.flow_center = choice(self.name, "flow_center", flow_center, ("median", "none"))
        choice(self.name, "attention", attention, ("ca", "cva", "none"))
        choice(self.name, "position", position, ("pc", "fpf", "none"))
        choice(self.name, "head", head, ("linear", "au_mlp"))
        choice(self.name, "au_mode", au_mode, ("none", "annotated", "predicted"))
        position_frames = tuple(position_frames)
        if img_size % 16:
            raise ConfigError(f"model.kwargs.img_size: {self.name} needs a multiple of 16, got {img_size}")
        if position != "none" and (not position_frames or set(position_frames) - set(FACE_KEYS)):
            raise ConfigError(
                f"model.kwargs.position_frames: {self.name} position={position!r} needs face crops from "
                f"{FACE_KEYS}, got {position_frames!r}; use position='none' for flow-only data"
            )
        if head == "linear" and au_mode != "none":
            raise ConfigError(f"model.kwargs.au_mode: {self.name} head='linear' has no AU input; use head='au_mlp'")
        self.motion, self.position, self.position_frames, self.au_mode = motion, position, position_frames, au_mode
        self.img_size = img_size
        self.leaks_labels = au_mode == "annotated"
        self._set_io(motion=motion, position=position, position_frames=position_frames, au_mode=au_mode)
        stage_channels = tuple(stage_channels)
        c_last, fsize = stage_channels[-1], img_size // 16
        self.main = MainBranch(3, act_channels, stage_channels, attention)
        self.pos_branch: nn.Module | None = None
        if position == "pc":
            self.pos_branch = PositionCalibration(fsize, c_last, pc_depth, pc_heads, pc_mlp_ratio, drop_path)
        elif position == "fpf":
            self.pos_branch = FacialPositionFocalizer(img_size, swin_embed_dim, swin_depths, swin_heads, swin_window,
                                                      drop_path, c_last)  # fmt: skip
        # A learnable per-channel scale on the position features (LayerScale, Touvron et al. 2021, "Going deeper with
        # image transformers"): the position branch ends in a LayerNorm (features of unit scale) while the motion
        # features come out of chained attention maps in (0, 1) (about a tenth of that scale), so an unscaled sum lets
        # the face's appearance drown the motion at initialisation (measured: motion std 0.11-0.17, position 1.0 in
        # every small and paper configuration). Starting the position stream at a tenth of the motion's scale
        # (0.01) let CVA+FPF fit 24 synthetic clips by epoch 12; unscaled (1.0) it reached train UF1 0.45 by epoch 16
        # (tests/test_learning.py).
        self.pos_scale = (nn.Parameter(torch.full((c_last, 1, 1), float(position_scale)))
                          if self.pos_branch is not None else None)
        flat = c_last * fsize * fsize
        self.num_aus = num_aus if num_aus is not None else default_num_aus()
        self.au_weight = au_weight
        self.au_head: nn.Module | None = None
        if head == "linear":
            self.classifier: nn.Module = nn.Sequential(nn.Dropout(dropout), nn.Linear(flat, num_classes))
            self.fc1: nn.Module | None = None
        else:
            extra = self.num_aus if au_mode != "none" else 0
            self.fc1 = nn.Linear(flat, fc_dim)
            if au_mode == "predicted":
                self.au_head = nn.Linear(fc_dim, self.num_aus)
            self.classifier = nn.Sequential(
                nn.BatchNorm1d(fc_dim + extra), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(fc_dim + extra, fc2_dim), nn.ReLU(True), nn.Linear(fc2_dim, num_classes),
            )  # fmt: skip

    @classmethod
    def io_keys(cls, motion: str = "diff", position: str = "pc", position_frames: tuple[str, ...] = ("onset224",),
                au_mode: str = "none", **_: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:  # fmt: skip
        keys: list[str] = ["onset224", "apex224"] if motion == "diff" else ["flow28"]
        if position != "none":
            keys += [k for k in position_frames if k not in keys]
        if au_mode == "annotated":
            keys.append("aus")
        targets = ("label", "aus") if au_mode == "predicted" else ("label",)
        return tuple(keys), targets

    def _resized(self, x: Tensor) -> Tensor:
        """Bring a 224 crop or the 28 flow map to the model's input size (a reduced size is part of small configs)."""
        if x.shape[-1] == self.img_size and x.shape[-2] == self.img_size:
            return x
        return F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                             antialias=x.shape[-1] > self.img_size)  # fmt: skip

    def face(self, batch: Batch, key: str) -> Tensor:
        return imagenet_normalise(self._resized(self.get(batch, key)))

    def motion_input(self, batch: Batch) -> Tensor:
        """The main branch's input (B,3,S,S): apex - onset of the normalised crops (the papers), or the flow map.

        The papers' difference image is 0 where nothing moves. A min-max normalised flow map (the MEGC2019 convention,
        mer.model.preprocess.flow) puts zero motion at an arbitrary level per map and channel (u/v medians span about
        40..200 of 255 across the composite); with flow_center="median" each channel's median -- the zero-motion
        level, since most of a face does not move in a micro-expression -- is subtracted, restoring that convention.
        """
        if self.motion == "diff":
            return self.face(batch, "apex224") - self.face(batch, "onset224")
        flow = self.get(batch, "flow28")
        if self.flow_center == "median":
            flow = flow - flow.flatten(2).median(dim=2).values[..., None, None]
        return self._resized(flow)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.main(self.motion_input(batch))
        if self.pos_branch is not None:
            for key in self.position_frames:
                x = x + self.pos_scale * self.pos_branch(self.face(batch, key))
        x = x.flatten(1)
        if self.fc1 is None:
            return {"logits": self.classifier(x)}
        feat = self.fc1(x)
        out: dict[str, Tensor] = {}
        if self.au_mode == "annotated":
            feat = torch.cat([feat, self.get(batch, "aus").to(feat.dtype)], dim=1)
        elif self.au_head is not None:
            out["au_logits"] = self.au_head(feat)
            feat = torch.cat([feat, torch.sigmoid(out["au_logits"])], dim=1)
        out["logits"] = self.classifier(feat)
        return out

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        total, parts = self.classification_loss(outputs, batch)
        if "au_logits" in outputs:
            au = masked_au_bce(outputs["au_logits"], self.get(batch, "aus"), batch.get("aus_mask"))
            total = total + self.au_weight * au
            parts["au_bce"] = au.detach()
        parts["loss"] = total.detach()
        return total, parts
