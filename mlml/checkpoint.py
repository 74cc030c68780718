"""Reading checkpoints safely: `torch.load(..., weights_only=True)`, so loading one cannot run code.

A checkpoint is a dict of tensors, numbers, strings, None and lists/dicts of them. A file that is
missing, truncated or holds other objects (a pickled class) is reported by name.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


class CheckpointError(Exception):
    """A checkpoint file cannot be used (missing, corrupt, unsafe); the message names it."""


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at `path` as a dict, on the CPU, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot load checkpoint {path} safely (weights_only=True): {str(err).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not an mlml checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt
