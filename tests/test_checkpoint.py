"""mlml/checkpoint.py: safe loading in every load path, corrupt files named, atomic saves, legacy conversion."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mlml import files
from mlml.checkpoint import MAGIC, CheckpointError, encode, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mlml.cli import main
from mlml.config import config_hash
from mlml.files import WriteError
from mlml.trainer import train
from tests.conftest import tiny_config
from tests.test_files import in_read_only_dir

CFG = ("optim.epochs=2", "model.dropout=0.2")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """A finished tiny run: last.pt (end of epoch 2), last.prev.pt (end of epoch 1), best.pt; and its result."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("ckpt") / "run"
    return run, train(tiny_config(*CFG), run)


def copy_run(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    return run


class Evil:
    """Unpickled, it creates the file `marker` (what a malicious checkpoint could do with any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def wrap(payload: bytes) -> bytes:
    """An mlml header with a correct size and checksum around any payload."""
    header = json.dumps({"format": 1, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
    return MAGIC + header.encode() + b"\n" + payload


def evil_files(marker: Path) -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save({"model": Evil(marker), "config": {}}, buffer)
    plain = buffer.getvalue()
    return {"legacy torch file": plain, "mlml header around a malicious pickle": wrap(plain)}


def test_the_crafted_files_do_run_code_when_unpickled_unsafely(tmp_path):
    """The malicious files below are real: the unsafe loader this module replaced runs them."""
    marker = tmp_path / "pwned"
    torch.load(io.BytesIO(evil_files(marker)["legacy torch file"]), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["legacy torch file", "mlml header around a malicious pickle"])
def test_a_malicious_checkpoint_runs_in_no_load_path(finished, tmp_path, kind, capsys):
    marker = tmp_path / "pwned"
    evil = evil_files(marker)[kind]
    file = tmp_path / "evil.pt"
    file.write_bytes(evil)
    with pytest.raises(CheckpointError, match=f"{file} .*could run code.*mlml checkpoint convert"):
        load_checkpoint(file)
    for command in (["eval", "--checkpoint", str(file)], ["predict", "--checkpoint", str(file), str(file)],
                    ["checkpoint", "verify", str(file)], ["checkpoint", "convert", str(file), str(tmp_path / "n.pt")]):
        assert main(command) == 2, command
        assert "could run code" in capsys.readouterr().err or command[1] == "convert"
    resume = copy_run(finished, tmp_path / "resume")                       # resume: last.pt and last.prev.pt
    for name in ("last.pt", "last.prev.pt"):
        (resume / "checkpoints" / name).write_bytes(evil)
    with pytest.raises(CheckpointError, match="no usable checkpoint.*last.pt.*could run code.*last.prev.pt"):
        train(tiny_config(*CFG), resume, resume=True)
    best = copy_run(finished, tmp_path / "best")                           # the reload of best.pt at the end
    (best / "checkpoints" / "best.pt").write_bytes(evil)
    with pytest.raises(CheckpointError, match="best.pt .*could run code"):
        train(tiny_config(*CFG), best, resume=True)
    assert not marker.exists()


def test_a_checkpoint_holds_only_safe_types_and_restores_rng_and_config(finished):
    run, _ = finished
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")               # weights_only=True inside
    assert ckpt["config"] == tiny_config(*CFG).to_dict() and ckpt["config_hash"] == config_hash(ckpt["config"])
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (2, 0) and ckpt["label_space"]["names"]
    raw = (run / "checkpoints" / "last.pt").read_bytes()
    payload = torch.load(io.BytesIO(raw[raw.index(b"\n", len(MAGIC)) + 1:]), weights_only=True)
    assert isinstance(payload["config"], str) and "[optim]" in payload["config"]   # the config is TOML text
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    save_checkpoint({"rng": [saved]}, run.parent / "rng.pt")
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(load_checkpoint(run.parent / "rng.pt")["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def header_end(data: bytes) -> int:
    return data.index(b"\n", len(MAGIC)) + 1


def garbled_payload(data: bytes) -> bytes:
    return wrap(random.Random(0).randbytes(len(data) - header_end(data)))


def forged_config(data: bytes) -> bytes:
    """A payload whose config was edited after writing, re-checksummed (the config hash no longer fits)."""
    obj = torch.load(io.BytesIO(data[header_end(data):]), weights_only=True)
    obj["config"] = obj["config"].replace("lr = 0.005", "lr = 0.5")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return wrap(buffer.getvalue())


def legacy(data: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save({"rng": np.random.get_state()}, buffer)
    return buffer.getvalue()


# name -> (how the good file is damaged, what the message says)
DAMAGE = {
    "empty": (lambda d: b"", "is empty \\(0 bytes\\)"),
    "cut in the magic": (lambda d: d[:5], "not an mlml checkpoint"),
    "cut in the header": (lambda d: d[: len(MAGIC) + 10], "garbled header"),
    "cut after the header": (lambda d: d[: header_end(d)], "truncated: 0 of"),
    "cut in half": (lambda d: d[: len(d) // 2], "truncated: "),
    "last byte missing": (lambda d: d[:-1], "truncated: "),
    "trailing bytes": (lambda d: d + b"\0" * 7, "truncated: \\d+ of"),
    "a flipped payload byte": (lambda d: flip(d, len(d) - 100), "corrupt: its checksum does not match"),
    "a flipped header byte": (lambda d: flip(d, len(MAGIC) + 3), "garbled header"),
    "random bytes": (lambda d: random.Random(1).randbytes(4096), "not an mlml checkpoint"),
    "a text file": (lambda d: b"model weights: see the paper\n", "not an mlml checkpoint"),
    "another format version": (lambda d: d.replace(b'"format": 1', b'"format": 9', 1), "has format 9"),
    "garbled payload, valid checksum": (garbled_payload, "cannot be read"),
    "config edited after writing": (forged_config, "does not match the config hash"),
    "a legacy torch file": (legacy, "plain torch file .*could run code"),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_each_damaged_checkpoint_is_named_with_its_fault(finished, tmp_path, name):
    damage, message = DAMAGE[name]
    file = tmp_path / "last.pt"
    file.write_bytes(damage((finished[0] / "checkpoints" / "last.pt").read_bytes()))
    with pytest.raises(CheckpointError, match=f"{file}.*{message}"):
        load_checkpoint(file)


def test_resume_falls_back_to_the_previous_checkpoint_and_names_the_damaged_one(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])                           # truncated in transfer
    resumed = train(tiny_config(*CFG), run, resume=True)                 # continues from the end of epoch 1
    err = capsys.readouterr().err
    assert f"{last} is truncated" in err and "resuming from the previous checkpoint" in err
    assert resumed["metrics"] == finished[1]["metrics"] and resumed["history"] == finished[1]["history"]
    for name in ("last.pt", "last.prev.pt"):
        (run / "checkpoints" / name).write_bytes(b"")
    code = main(["train", *[a for o in (*__import__("tests.conftest").conftest.TINY, *CFG) for a in ("--set", o)],
                 "--out", str(run), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "no usable checkpoint" in err and "last.prev.pt is empty" in err and "Traceback" not in err


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_names_the_path(finished, tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    shutil.copytree(finished[0] / "checkpoints", path.parent)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    ckpt = load_checkpoint(path)

    def half_then_full(fd, data):
        os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "_write_all", half_then_full)            # the one writer under save_checkpoint
    with pytest.raises(WriteError, match=f"cannot write {path}: No space left on device"):
        save_checkpoint(ckpt, path, keep_previous=True)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before   # no partial file, nothing rotated


def test_a_read_only_checkpoint_directory_names_the_path(finished, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(finished[0] / "checkpoints", directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    ckpt = load_checkpoint(directory / "last.pt")
    message = in_read_only_dir(directory, lambda: save_checkpoint(ckpt, directory / "last.pt", keep_previous=True))
    assert message.startswith(f"cannot write {directory / 'last.pt'}: Permission denied"), message
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_a_legacy_checkpoint_is_converted_only_when_trusted_and_then_resumes_exactly(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    ckpt = load_checkpoint(run / "checkpoints" / "last.prev.pt")          # end of epoch 1, in the old format:
    ckpt.pop("config_hash")
    for r in ckpt["rng"]:                                                  # numpy and Python RNG states as tuples
        r["numpy"] = ("MT19937", r.pop("numpy_keys").numpy().astype(np.uint32), r.pop("numpy_pos"),
                      r.pop("numpy_has_gauss"), r.pop("numpy_gauss"))
        r["python"] = (r.pop("python_version"), tuple(r.pop("python_state").tolist()), r.pop("python_gauss"))
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    with pytest.raises(CheckpointError, match="plain torch file"):
        load_checkpoint(old)
    new = run / "checkpoints" / "last.pt"
    (run / "checkpoints" / "last.prev.pt").unlink()
    assert main(["checkpoint", "convert", str(old), str(new)]) == 2
    assert "pass --trust only if you trust" in capsys.readouterr().err
    assert main(["checkpoint", "convert", str(old), str(new), "--trust"]) == 0
    assert main(["checkpoint", "verify", str(new)]) == 0 and "ok (epoch 1, step 0" in capsys.readouterr().out
    resumed = train(tiny_config(*CFG), run, resume=True)
    assert resumed["metrics"] == finished[1]["metrics"]


def test_encode_stores_the_config_as_toml_with_its_hash():
    cfg = tiny_config().to_dict()
    data = encode({"config": cfg, "x": torch.ones(2)})
    obj = torch.load(io.BytesIO(data[header_end(data):]), weights_only=True)
    assert obj["config_hash"] == config_hash(cfg) and obj["config"].startswith("[run]")
    other = tiny_config("optim.lr=0.1").to_dict()
    assert config_hash(other) != config_hash(cfg)
    assert config_hash(tiny_config("run.threads=3", "run.progress=true").to_dict()) == config_hash(cfg)   # execution keys
