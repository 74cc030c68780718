"""Models: backbone -> features (B, D) -> heads, returning a dict with `logits` (B, C)."""

from mlml.models import efficientnet  # noqa: F401 - registers efficientnet_lite0
from mlml.models.backbones import BACKBONES
from mlml.models.model import HEADS, MultiLabelModel, build_model

__all__ = ["BACKBONES", "HEADS", "MultiLabelModel", "build_model"]
