"""CVA + FPF + AU (ICLR 2024 submission, published as FaceSleuth): the main system of the platform.

Three changes to MMNet: continuous VERTICAL attention (CVA) blocks, a Swin Transformer facial position focalizer
(FPF, timm, shared between onset and apex: POS = Swin(onset) + Swin(apex)), and an AU vector concatenated to the
pooled feature. au_mode:
  * "predicted" (default): an AU head trained jointly with a multi-label BCE loss; its sigmoid output is what the
    classifier sees, so no ground-truth AU is read at inference;
  * "annotated": the dataset's FACS coding is an INPUT, as in the authors' code -- it leaks label information
    (emotions were partly assigned from AUs); such a model has `leaks_labels = True`;
  * "none": ablation without AUs.
Ablations by configuration alone: attention="ca"|"none" (no CVA), position="pc"|"none" (no FPF), au_mode="none".
motion="flow" runs it on flow-only data (the MEGC2019 composite): then position must be "none" or fed apex crops
(position_frames=("apex224",)).
"""

from __future__ import annotations

from mer.model.models.registry import register_model
from mer.model.models.two_frame import TwoFrameNet

# The authors' Swin keeps timm's default 1000-class head, which their forward never calls: counting it turns the
# FPF's 21,576,632 parameters into the 22,089,632 their code reports.
UNUSED_AUTHOR_PARAMETERS = 512 * 1000 + 1000

_PAPER = {"attention": "cva", "position": "fpf", "position_frames": ("onset224", "apex224"), "head": "au_mlp",
          "au_mode": "predicted", "dropout": 0.5}  # fmt: skip
_SMALL = {**_PAPER, "img_size": 64, "swin_window": 4, "act_channels": 16, "stage_channels": (16, 16, 32, 64),
          "swin_embed_dim": 16, "swin_depths": (1, 1, 1), "swin_heads": (1, 2, 4), "fc_dim": 64,
          "fc2_dim": 32}  # fmt: skip


@register_model(
    "cva_fpf",
    configs={
        "paper": _PAPER,
        "paper_annotated": {**_PAPER, "au_mode": "annotated"},
        "small": _SMALL,
        "small_annotated": {**_SMALL, "au_mode": "annotated"},
        "flow": {**_PAPER, "motion": "flow", "position": "none"},
        "flow_small": {**_SMALL, "motion": "flow", "position": "none"},
    },
    description="CVA+FPF+AU: vertical-attention residual branch + shared Swin position branch + AU-aware head",
)
class CVAFPF(TwoFrameNet):
    """Constructor defaults are MMNet's; the registered configurations carry the CVA+FPF+AU settings."""

    position_label = "FPF"
