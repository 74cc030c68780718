"""Bad input, fuzzed: the config loader, the annotation readers and the label names reader.

Random bytes and structured mutations of valid files; every failure must be one line naming the
file and line (`AnnotationError`) or the key (`ConfigError`), never another exception, and the
command line must answer it with exit code 2 and one line. Example counts are kept modest so the
suite stays fast (MLML_FUZZ_EXAMPLES raises them); `FUZZ_COUNTS` records how many inputs each test tried (see the test report).
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlml.config import Config, ConfigError, flat, load_config, to_toml
from mlml.data.annotations import AnnotationError, read_annotations, read_label_names
from mlml.labels import LabelSpace

# MLML_FUZZ_EXAMPLES=2000 for a longer search than the suite's.
FUZZ = settings(max_examples=int(os.environ.get("MLML_FUZZ_EXAMPLES", 150)), deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SPACE = LabelSpace(("cat", "dog", "sofa", "red"))
ROOT = Path(__file__).resolve().parent.parent
VALID_TOML = (ROOT / "experiments" / "configs" / "quick.toml").read_text()
KEYS = sorted(flat(Config().to_dict()))
FUZZ_COUNTS: dict[str, int] = {}


def count(name: str) -> None:
    FUZZ_COUNTS[name] = FUZZ_COUNTS.get(name, 0) + 1


def one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text and "\r" not in text, text
    return text


# ------------------------------------------------------------------ config loader
values = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(-5, 5), st.text(max_size=4)), max_size=2),
)


def check_config_file(path: Path) -> Config | None:
    """Load `path`: a Config that survives a round trip through to_toml, or a one-line ConfigError naming the file."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        assert str(path) in one_line(err) or "config file not found" in str(err), str(err)
        return None
    path.write_text(to_toml(cfg.to_dict()))
    assert load_config(path) == cfg
    return cfg


@FUZZ
@given(data=st.binary(max_size=300))
def test_config_random_bytes(tmp_path, data):
    count("config random bytes")
    f = tmp_path / "c.toml"
    f.write_bytes(data)
    check_config_file(f)


@FUZZ
@given(cut=st.integers(0, len(VALID_TOML)), length=st.integers(0, 20), insert=st.text(string.printable, max_size=10))
def test_config_text_mutations(tmp_path, cut, length, insert):
    """Characters of a valid config deleted and inserted at a random place."""
    count("config text mutations")
    f = tmp_path / "c.toml"
    f.write_text(VALID_TOML[:cut] + insert + VALID_TOML[cut + length :])
    check_config_file(f)


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS + ["optim.nosuch", "nosuch.key", "data.synthetic.x"]), values), min_size=1, max_size=3),
       drop=st.sampled_from(KEYS))
def test_config_structured_mutations(tmp_path, changes, drop):
    """A valid config with values of wrong types, out of range or unknown keys: loads, or names the key."""
    count("config structured mutations")
    data = load_config(None, []).to_dict()
    for key, value in changes:
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):
            node[last] = value
    section, _, name = drop.partition(".")
    data.get(section, {}).pop(name, None)
    f = tmp_path / "c.toml"
    f.write_text(to_toml(data))
    try:
        load_config(f)
    except ConfigError as err:
        text = one_line(err)
        assert text.startswith(f"{f}: ") and err.key and err.key.split("[")[0].split(".")[0] in text, text
        return
    check_config_file(f)


@FUZZ
@given(overrides=st.lists(st.one_of(st.text(max_size=25), st.builds("{}={}".format, st.sampled_from(KEYS), st.text(max_size=10))), max_size=3))
def test_config_random_overrides(overrides):
    count("config random --set overrides")
    try:
        load_config(None, overrides)
    except ConfigError as err:
        one_line(err)


@FUZZ
@given(data=st.binary(max_size=200))
def test_cli_answers_a_bad_config_file_with_one_line(tmp_path, data, capsys):
    """`mlml train --config <random bytes>`: exit 2 and one line, or (a valid config) training is reached."""
    count("CLI train --config random bytes")
    import mlml.trainer
    from mlml.cli import main

    f = tmp_path / "c.toml"
    f.write_bytes(data)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlml.trainer, "train", lambda cfg, out, **kwargs: {"metrics": {}})
        code = main(["train", "--config", str(f), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("mlml train: error: ") and str(f) in err, err


# ------------------------------------------------------------------ annotation readers
def check_annotations(path: Path) -> None:
    try:
        rows = list(read_annotations(path, SPACE))
    except AnnotationError as err:
        assert one_line(err).startswith(f"{path}:"), str(err)
        return
    for row in rows:
        assert row.path and not set(row.positives) & set(row.negatives) and all(0 <= i < 4 for i in row.positives + row.negatives)
    assert len({row.path for row in rows}) == len(rows)


VALID_CSV = ["path,positives,negatives", "a/1.png,cat;sofa,dog", "a/2.png,,", '"a/3,b.png", dog , cat;red', "b/4.png,red,"]
VALID_JSONL = [json.dumps(d) for d in [{"path": "a/1.png", "positives": ["cat", "sofa"], "negatives": ["dog"]},
                                       {"path": "a/2.png", "positives": []}, {"path": "b/4.png", "positives": ["red"]}]]
fragments = st.sampled_from(["", ",", ";", '"', "\\", "\x00", "\r", "\n", "../", "/etc/x.png", "cat", "lion", "{", "}", "[", "]",
                             '"path"', '"positives"', ": ", "\ufeff", "é", "\\ud800", "null", "1e999"])


def mutate(lines: list[str], ops: list[tuple[int, int, int, str]]) -> str:
    """Each op: (line, position, characters deleted, text inserted); a negative line duplicates a line."""
    lines = list(lines)
    for line, pos, delete, insert in ops:
        i = abs(line) % len(lines)
        if line < 0:
            lines.insert(i, lines[i])
            continue
        p = pos % (len(lines[i]) + 1)
        lines[i] = lines[i][:p] + insert + lines[i][p + delete :]
    return "\n".join(lines) + "\n"


ops = st.lists(st.tuples(st.integers(-6, 6), st.integers(0, 60), st.integers(0, 8), fragments), min_size=1, max_size=4)


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".jsonl"]))
def test_annotations_random_bytes(tmp_path, data, suffix):
    count(f"annotations random bytes ({suffix})")
    f = tmp_path / f"a{suffix}"
    f.write_bytes(data)
    check_annotations(f)


@FUZZ
@given(ops=ops, suffix=st.sampled_from([".csv", ".jsonl"]))
def test_annotations_mutated_lines(tmp_path, ops, suffix):
    count(f"annotations mutated lines ({suffix})")
    f = tmp_path / f"a{suffix}"
    f.write_text(mutate(VALID_CSV if suffix == ".csv" else VALID_JSONL, ops), encoding="utf-8", errors="surrogatepass")
    check_annotations(f)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["name", "labels", "exclusive", "groups", "x"]), inner, max_size=3)),
                           max_leaves=12)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())), suffix=st.sampled_from([".txt", ".json"]))
def test_label_names_random_input(tmp_path, data, suffix):
    count(f"label names random input ({suffix})")
    f = tmp_path / f"l{suffix}"
    f.write_bytes(data)
    try:
        space = read_label_names(f)
    except AnnotationError as err:
        assert one_line(err).startswith(f"{f}:"), str(err)
        return
    assert space.num_labels >= 1 and all(isinstance(n, str) and n for n in space.names)


@FUZZ
@given(ops=ops)
def test_cli_data_index_answers_bad_annotations_with_one_line(tmp_path, ops, capsys):
    """`mlml data index` over a mutated annotation file: a summary, or exit 2 and one line naming the file."""
    count("CLI data index mutated annotations")
    from mlml.cli import main

    (tmp_path / "labels.txt").write_text("cat\ndog\nsofa\nred\n")
    f = tmp_path / "a.csv"
    f.write_text(mutate(VALID_CSV, ops), encoding="utf-8", errors="surrogatepass")
    capsys.readouterr()
    code = main(["data", "index", "--set", "data.source=annotations", "--set", f"data.annotations.file={f}",
                 "--set", f"data.annotations.label_names={tmp_path / 'labels.txt'}", "--set", f"data.store={tmp_path / 'store'}"])
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert err.count("\n") == 1 and f"{f}:" in err, err


def test_fuzz_counts_are_recorded():
    """Runs last in this file: prints how many inputs each fuzz test tried (pytest -s shows it)."""
    print("\nfuzz inputs tried:", json.dumps(FUZZ_COUNTS, indent=1))
