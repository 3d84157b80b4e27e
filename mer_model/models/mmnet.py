"""MMNet (Li et al., IJCAI 2022): continuous attention (CA) main branch + position calibration (PC) ViT.

Paper configuration: 5 classes -> 9,438,841 trainable parameters: main branch 3,025,429 (stem conv 180->128 through
the classifier), motion conv 5,220, PC ViT 6,408,192. The authors' PC module also holds a class token, a 5-class head
and a mask layer that its forward never uses (3,590 parameters); counting them gives the 9,442,431 their code reports.
"""

from __future__ import annotations

from mer.model.models.registry import register_model
from mer.model.models.two_frame import TwoFrameNet

UNUSED_AUTHOR_PARAMETERS = 512 + (512 * 5 + 5) + (512 + 1)  # cls_token, head Linear(512,5), to_Mask Linear(512,1)


@register_model(
    "mmnet",
    configs={
        "paper": {},
        "small": {"img_size": 64, "act_channels": 16, "stage_channels": (16, 16, 32, 64), "pc_depth": 1,
                  "pc_heads": 2, "pc_mlp_ratio": 2.0},
        "flow": {"motion": "flow", "position": "none"},
        "flow_small": {"motion": "flow", "position": "none", "img_size": 64, "act_channels": 16,
                       "stage_channels": (16, 16, 32, 64)},
    },  # fmt: skip
    description="MMNet: apex-onset CA residual branch + ViT position calibration on the onset crop",
)
class MMNet(TwoFrameNet):
    """Defaults = paper configuration (attention='ca', position='pc' on the onset, linear head)."""
