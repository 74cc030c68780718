"""The multi-label model: normalise -> backbone -> features (B, D) -> head -> dict of outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlml.config import ModelConfig
from mlml.groups import label_logits_from_softmax
from mlml.labels import LabelSpace
from mlml.models.backbones import BACKBONES, feature_map, load_backbone_weights
from mlml.registry import Registry

HEADS: Registry = Registry("head", entry_point_group="mlml.heads")

# Per-channel statistics used to normalise images (those of ImageNet, which pretrained weights expect).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def boostlu(cam: torch.Tensor, alpha: float) -> torch.Tensor:
    """BoostLU (Kim et al., "Bridging the gap between model explanations in partially annotated
    multi-label classification", CVPR 2023): the positive entries of a class activation map times
    alpha, the others unchanged, alpha * max(z, 0) + min(z, 0) elementwise; the logit is the mean of
    the boosted map over locations, in training and at test (as in the authors' models.py; they
    use alpha = 5)."""
    return torch.where(cam > 0, alpha * cam, cam)


@HEADS.register("linear")
class LinearHead(nn.Module):
    """Independent sigmoid per label: features (B, D) -> {"logits": (B, C)}."""

    def __init__(self, in_dim: int, label_space: LabelSpace, cfg: ModelConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(in_dim, label_space.num_labels)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.dropout(features))}

    def forward_map(self, fmap: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
        """BoostLU logits from spatial features (B, D, h, w): the mean over locations of
        `boostlu(CAM, alpha)`, CAM = this layer applied at every location (B, C, h, w).

        At alpha = 1 it equals `forward` on the pooled features (the layer is linear); dropout, if
        any, drops entries of the map.
        """
        cam = F.conv2d(self.dropout(fmap), self.fc.weight[:, :, None, None], self.fc.bias)   # (B, C, h, w)
        return {"logits": boostlu(cam, alpha).mean(dim=(2, 3))}


@HEADS.register("grouped")
class GroupedHead(nn.Module):
    """One softmax per exclusive group (K outputs, K + 1 with an unknown class), sigmoids for the
    labels of non-exclusive groups: features (B, D) -> {"logits": (B, C), "group_logits": {g: (B, K_g [+1])}}.

    `logits` holds per-label scores with sigmoid(logits) = the label's probability (for exclusive
    groups its softmax probability, `label_logits_from_softmax`), so every multi-label loss,
    metric and table works unchanged; `group_logits` holds the raw softmax scores of the exclusive
    groups only (the unknown class last).
    """

    def __init__(self, in_dim: int, label_space: LabelSpace, cfg: ModelConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.groups = label_space.groups
        #: exclusive (softmax) group name -> whether it has an unknown output (see `mlml.groups.decode_groups`)
        self.softmax_groups = {g.name: g.has_unknown for g in self.groups if g.exclusive}
        for g in self.groups:
            if g.exclusive and len(g.labels) + g.has_unknown < 2:
                raise ValueError(f"group '{g.name}' is exclusive with one label and no unknown class; "
                                 "a softmax over one output is constant: set has_unknown or exclusive = false")
        self.fc = nn.ModuleDict({
            g.name: nn.Linear(in_dim, len(g.labels) + int(g.exclusive and g.has_unknown)) for g in self.groups
        })
        order = torch.tensor([i for g in self.groups for i in g.labels])       # column j of the concat is label order[j]
        self.register_buffer("column", torch.argsort(order), persistent=False)  # label c is column column[c]

    def forward(self, features: torch.Tensor) -> dict:
        x = self.dropout(features)
        parts, group_logits = [], {}
        for g in self.groups:
            z = self.fc[g.name](x)                                              # (B, K [+1])
            if g.exclusive:
                group_logits[g.name] = z
                z = label_logits_from_softmax(z, len(g.labels))                 # (B, K)
            parts.append(z)
        logits = torch.cat(parts, 1)[:, self.column]                            # (B, C) in label order
        return {"logits": logits, "group_logits": group_logits}


class MultiLabelModel(nn.Module):
    """Takes uint8 or float images (B, 3, H, W); uint8 is scaled to [0, 1] before normalising."""

    def __init__(self, backbone: nn.Module, head: nn.Module, boostlu: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.boostlu = float(boostlu)      # 1 = off; else logits = mean_hw BoostLU(CAM) (`LinearHead.forward_map`)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = image.float().div_(255.0) if image.dtype == torch.uint8 else image
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        if self.boostlu == 1.0:
            features = self.backbone(x)                   # (B, D)
            out = self.head(features)                     # {"logits": (B, C), ...extras}
        else:
            fmap = feature_map(self.backbone, x)          # (B, D, h, w)
            features = fmap.mean(dim=(2, 3))              # (B, D), what the backbone's pooling gives
            out = self.head.forward_map(fmap, self.boostlu)
        out["features"] = features
        return out


def build_model(cfg: ModelConfig, label_space: LabelSpace) -> MultiLabelModel:
    backbone = BACKBONES.get(cfg.backbone)(cfg)
    if cfg.weights:
        load_backbone_weights(backbone, cfg.weights, cfg.backbone)
    head = HEADS.get(cfg.head)(backbone.out_dim, label_space, cfg)
    if cfg.boostlu != 1.0 and not hasattr(head, "forward_map"):
        raise ValueError(f"model.boostlu = {cfg.boostlu} needs a head that scores every location (forward_map), "
                         f"such as model.head = 'linear'; model.head = '{cfg.head}' has none")
    return MultiLabelModel(backbone, head, cfg.boostlu).to(memory_format=torch.channels_last)
