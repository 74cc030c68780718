"""The one module that writes and reads checkpoints: safe to load, checked, written atomically.

    save_checkpoint({"model": ..., "config": cfg.to_dict(), ...}, run / "checkpoints" / "last.pt", keep_previous=True)
    ckpt = load_checkpoint(path)          # a dict; ckpt["config"] is the config as a dict again

A checkpoint holds only tensors, numbers, strings, None and lists/tuples/dicts of them, and is read
with `torch.load(..., weights_only=True)`: loading one cannot run code (RNG states are stored as
tensors, the config as TOML text). The file is a one-line header and a torch payload:

    MLML-CHECKPOINT\\n{"format": 1, "bytes": <payload size>, "sha256": <payload hash>}\\n<torch.save payload>

so a truncated, empty or garbled file is recognised before anything is unpickled and reported by
name (`CheckpointError`), and the payload records the hash of the config that wrote it
(`mlml.config.config_hash`, over every key but `EXECUTION_KEYS`), which a resume checks.

Checkpoints of older mlml versions pickled numpy and Python objects and can only be read with
`weights_only=False`, which runs whatever code the file contains. `convert_legacy` (the command
`mlml checkpoint convert OLD NEW --trust`) is the one place that does so, for a file the user trusts.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlml.config import EXECUTION_KEYS, config_diff, config_hash, to_toml
from mlml.files import atomic_write_bytes

MAGIC = b"MLML-CHECKPOINT\n"
FORMAT = 1
LEGACY_MAGIC = b"PK\x03\x04"          # a plain torch.save file (zip)

class CheckpointError(Exception):
    """A checkpoint file cannot be used (missing, truncated, corrupt, unsafe); the message names it."""


# ------------------------------------------------------------------ config identity
def config_differences(saved: dict, wanted: dict) -> list[str]:
    """'key = <saved> in the checkpoint, <wanted> now' for each key that differs, execution keys aside."""
    return [f"{k} = {a!r} in the checkpoint, {b!r} now" for k, (a, b) in config_diff(saved, wanted, ignore=EXECUTION_KEYS).items()]


# ------------------------------------------------------------------ RNG states as tensors
def rng_state() -> dict:
    """This process's torch, CUDA, numpy and Python RNG states, as tensors and numbers."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),       # (624,) MT19937 words
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
        "python_version": int(version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),              # (625,)
        "python_gauss": py_gauss,
    }


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), rng["numpy_pos"],
                         rng["numpy_has_gauss"], rng["numpy_gauss"]))
    random.setstate((rng["python_version"], tuple(int(x) for x in rng["python_state"].tolist()), rng["python_gauss"]))


def _legacy_rng(rng: dict) -> dict:
    """An old checkpoint's {"torch", "cuda", "numpy": tuple, "python": tuple} in the tensor form."""
    _, keys, pos, has_gauss, gauss = rng["numpy"]
    version, py_state, py_gauss = rng["python"]
    return {"torch": rng["torch"], "cuda": list(rng["cuda"]),
            "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
            "python_version": int(version), "python_state": torch.tensor(py_state, dtype=torch.int64),
            "python_gauss": py_gauss}


# ------------------------------------------------------------------ checks
def first_non_finite(state: Any, where: str = "") -> str | None:
    """Dotted name of the first floating tensor in `state` with a NaN or infinity; None if all finite."""
    if isinstance(state, torch.Tensor):
        if (state.is_floating_point() or state.is_complex()) and not bool(torch.isfinite(state).all()):
            return where or "<tensor>"
        return None
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for k, v in items:
        found = first_non_finite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


# ------------------------------------------------------------------ writing
def encode(obj: dict) -> bytes:
    """Header + payload of `obj`; `obj["config"]` (a dict) is stored as TOML text with its hash."""
    obj = dict(obj)
    if isinstance(obj.get("config"), dict):
        obj["config_hash"] = config_hash(obj["config"])
        obj["config"] = to_toml(obj["config"])
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    header = json.dumps({"format": FORMAT, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
    return MAGIC + header.encode() + b"\n" + payload


def previous_path(path: Path) -> Path:
    """checkpoints/last.pt -> checkpoints/last.prev.pt."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(obj: dict, path: Path, keep_previous: bool = False) -> None:
    """Write `obj` to `path` atomically and durably (fsync of the file and the directory).

    The new file is complete on disk before it takes `path`'s name. With `keep_previous`, the file
    it replaces becomes `<stem>.prev<suffix>` (last.pt -> last.prev.pt), so a crash at any moment
    leaves at least one complete checkpoint. Errors (disk full, no permission) remove the partial
    file and raise `mlml.files.WriteError` naming `path`.
    """
    path = Path(path)
    atomic_write_bytes(path, encode(obj), keep_previous=previous_path(path) if keep_previous else None)


# ------------------------------------------------------------------ reading
UNSAFE = ("holds Python objects beyond tensors and plain values, and loading it could run code it contains, "
          "so it is refused. If you trust where it came from, convert it once: "
          "mlml checkpoint convert {path} NEW.pt --trust")


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at `path` as a dict (config as a dict), after checking header, size and checksum.

    Raises `CheckpointError`, naming the file and what to do, if it is missing, empty, truncated,
    garbled, not an mlml checkpoint, or needs more than `weights_only=True` to load.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write or copy was cut off; "
                              "use the previous checkpoint (last.prev.pt) or copy the file again")
    if data.startswith(LEGACY_MAGIC):
        raise CheckpointError(f"checkpoint {path} is a plain torch file without mlml's header and checksum "
                              "(written by mlml before 0.2 or by another program); it "
                              + UNSAFE.format(path=path))
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an mlml checkpoint (no MLML-CHECKPOINT header): the file is garbled "
                              "or of another kind; use the previous checkpoint (last.prev.pt) or copy it again")
    end = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC):end]) if end > 0 else None
        size, digest = int(header["bytes"]), str(header["sha256"])
    except (ValueError, TypeError, KeyError):
        raise CheckpointError(f"checkpoint {path} has a garbled header (truncated or overwritten); "
                              "use the previous checkpoint (last.prev.pt) or copy it again") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {header.get('format')!r}; this mlml reads format {FORMAT}")
    payload = memoryview(data)[end + 1:]
    if len(payload) != size:
        raise CheckpointError(f"checkpoint {path} is truncated: {len(payload)} of {size} payload bytes "
                              f"(an interrupted write or copy); use the previous checkpoint (last.prev.pt) or copy it again")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum does not match its content; "
                              "use the previous checkpoint (last.prev.pt) or copy it again")
    try:
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(err))                 # the refused Python object
        if unsafe:
            raise CheckpointError(f"checkpoint {path} (it refers to {unsafe.group(1)}) " + UNSAFE.format(path=path)) from None
        raise CheckpointError(f"checkpoint {path} cannot be read (its payload is not a valid torch file, although its "
                              "checksum matches: written garbled); "
                              "use the previous checkpoint (last.prev.pt) or copy it again") from None
    except Exception as err:                                             # noqa: BLE001 - any reader error
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                              "use the previous checkpoint (last.prev.pt) or copy it again") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return _decode_config(obj, path)


def _decode_config(obj: dict, path: Path) -> dict:
    if isinstance(obj.get("config"), str):
        try:
            obj["config"] = tomllib.loads(obj["config"])
        except tomllib.TOMLDecodeError as err:
            raise CheckpointError(f"checkpoint {path}: its config is not valid TOML ({err})") from None
        if obj.get("config_hash") != config_hash(obj["config"]):
            raise CheckpointError(f"checkpoint {path}: its config does not match the config hash it records")
    return obj


def _plain(obj: Any) -> Any:
    """numpy arrays -> tensors, numpy scalars -> Python numbers, recursively (tuples kept)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def convert_legacy(old: Path, new: Path, trust: bool) -> dict:
    """Rewrite a checkpoint of an older mlml (pickled numpy/Python objects) in the safe format.

    This is the ONLY place mlml calls `torch.load(..., weights_only=False)`, which executes any code
    the file contains: `trust` must be True, i.e. the user vouches for the file's origin. Returns
    the converted content.
    """
    if not trust:
        raise CheckpointError(f"converting {old} unpickles it with weights_only=False, which runs any code it "
                              "contains; pass --trust only if you trust where the file came from")
    try:
        obj = torch.load(old, map_location="cpu", weights_only=False)   # trusted by the user, see above
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {old} does not exist") from None
    except Exception as err:                                           # noqa: BLE001
        raise CheckpointError(f"cannot read {old} ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{old} holds a {type(obj).__name__}, not a checkpoint dict")
    obj = _plain(obj)
    if "rng" in obj:
        rngs = obj["rng"] if isinstance(obj["rng"], list) else [obj["rng"]]
        obj["rng"] = [r if "numpy_keys" in r else _legacy_rng(r) for r in rngs]
    save_checkpoint(obj, new)
    return load_checkpoint(new)                                        # the safe loader accepts it
