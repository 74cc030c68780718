"""The multi-label model: normalise -> backbone -> features (B, D) -> head -> dict of outputs."""

from __future__ import annotations

import torch
from torch import nn

from mlml.config import ModelConfig
from mlml.groups import label_logits_from_softmax
from mlml.labels import LabelSpace
from mlml.models.backbones import BACKBONES, load_backbone_weights
from mlml.registry import Registry

HEADS: Registry = Registry("head", entry_point_group="mlml.heads")

# Per-channel statistics used to normalise images (those of ImageNet, which pretrained weights expect).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@HEADS.register("linear")
class LinearHead(nn.Module):
    """Independent sigmoid per label: features (B, D) -> {"logits": (B, C)}."""

    def __init__(self, in_dim: int, label_space: LabelSpace, cfg: ModelConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(in_dim, label_space.num_labels)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.dropout(features))}


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

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = image.float().div_(255.0) if image.dtype == torch.uint8 else image
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)                       # (B, D)
        out = self.head(features)                         # {"logits": (B, C), ...extras}
        out["features"] = features
        return out


def build_model(cfg: ModelConfig, label_space: LabelSpace) -> MultiLabelModel:
    backbone = BACKBONES.get(cfg.backbone)(cfg)
    if cfg.weights:
        load_backbone_weights(backbone, cfg.weights, cfg.backbone)
    head = HEADS.get(cfg.head)(backbone.out_dim, label_space, cfg)
    return MultiLabelModel(backbone, head).to(memory_format=torch.channels_last)
