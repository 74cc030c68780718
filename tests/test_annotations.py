import json

import pytest
import torch

from mlml.data.annotations import AnnotationError, AnnotationSource, read_annotations, read_label_names
from mlml.labels import LabelSpace

SPACE = LabelSpace(("cat", "dog", "sofa", "red"))


def write(path, text):
    path.write_text(text)
    return path


def test_label_names_txt_and_json(tmp_path):
    space = read_label_names(write(tmp_path / "l.txt", "# labels\ncat\n\ndog\n"))
    assert space.names == ("cat", "dog") and len(space.groups) == 1
    groups = {"groups": [{"name": "colour", "labels": ["red", "blue"], "exclusive": True}, {"name": "object", "labels": ["cat"]}]}
    space = read_label_names(write(tmp_path / "l.json", json.dumps(groups)))
    assert space.names == ("red", "blue", "cat") and space.group("colour").exclusive and space.group("object").labels == (2,)
    assert read_label_names(write(tmp_path / "m.json", '["a", "b"]')).names == ("a", "b")
    with pytest.raises(AnnotationError, match=r"d\.txt:3: label 'cat' is named twice"):
        read_label_names(write(tmp_path / "d.txt", "cat\ndog\ncat\n"))


def test_csv_and_jsonl_give_the_same_rows(tmp_path):
    csv_file = write(tmp_path / "a.csv", "path,positives,negatives\nx/1.png,cat;sofa,dog\nx/2.png,,\n\n\"x/3,b.png\", dog , cat;red\n")
    jsonl = write(tmp_path / "a.jsonl", "\n".join(json.dumps(d) for d in [
        {"path": "x/1.png", "positives": ["sofa", "cat"], "negatives": ["dog"]},
        {"path": "x/2.png", "positives": []},
        {"path": "x/3,b.png", "positives": ["dog"], "negatives": ["cat", "red"]},
    ]) + "\n\n")
    expected = [("x/1.png", [0, 2], [1]), ("x/2.png", [], []), ("x/3,b.png", [1], [0, 3])]
    for f in (csv_file, jsonl):
        assert [(p, sorted(pos), sorted(neg)) for p, pos, neg, *_ in read_annotations(f, SPACE)] == expected


@pytest.mark.parametrize("name, text, where, reason", [
    ("a.csv", "path,positives\nx.png,cat\ny.png,cat;lion\n", "a.csv:3", "unknown label 'lion'"),
    ("a.csv", "path,positives\nx.png,cat,dog\n", "a.csv:2", "3 fields, the header has 2"),
    ("a.csv", "file,labels\nx.png,cat\n", "a.csv:1", "the header must name path, positives"),
    ("a.csv", "path,positives,negatives\nx.png,cat,cat\n", "a.csv:2", "'cat' is both positive and negative"),
    ("a.csv", "path,positives\nx.png,cat;cat\n", "a.csv:2", "listed twice"),
    ("a.csv", "path,positives\n,cat\n", "a.csv:2", "no image path"),
    ("a.jsonl", '{"path": "x.png", "positives": ["cat"]}\n{"path": "y.png", "positives": ["cat"\n', "a.jsonl:2", "bad JSON"),
    ("a.jsonl", '{"path": "x.png", "positive": ["cat"]}\n', "a.jsonl:1", "keys path, positives"),
    ("a.jsonl", '{"path": "x.png", "positives": "cat"}\n', "a.jsonl:1", "lists of label names"),
    ("a.jsonl", '\n{"path": "x.png", "negatives": ["tiger"]}\n', "a.jsonl:2", "unknown label 'tiger' \\(negative\\)"),
    ("a.txt", "x.png cat\n", "a.txt:1", "must end in .csv or .jsonl"),
    ("a.csv", "path,positives\nx.png,cat\ny.png,dog\n./x.png,sofa\n", "a.csv:4", "'./x.png' is listed twice, first on line 2"),
    ("a.jsonl", '{"path": "d/x.png"}\n{"path": "d//x.png", "positives": ["cat"]}\n', "a.jsonl:2", "listed twice, first on line 1"),
    ("a.csv", "path,positives\n../../etc/x.png,cat\n", "a.csv:2", "'../../etc/x.png' leads outside the root"),
    ("a.csv", "path,positives\nd/../../x.png,cat\n", "a.csv:2", "leads outside the root"),
    ("a.jsonl", '{"path": "/etc/x.png"}\n', "a.jsonl:1", "'/etc/x.png' leads outside the root .*allow_outside_root = true"),
    ("a.jsonl", '{"path": "."}\n', "a.jsonl:1", "leads outside the root"),
    ("a.jsonl", '{"path": "x\\u0000.png"}\n', "a.jsonl:1", "NUL character"),
    ("a.jsonl", '{"path": "x\\ud800.png"}\n', "a.jsonl:1", "not valid Unicode"),
    ("a.csv", "path,positives,path\nx.png,cat,y.png\n", "a.csv:1", "names a column twice"),
])
def test_bad_lines_name_file_line_and_reason(tmp_path, name, text, where, reason):
    f = write(tmp_path / name, text)
    with pytest.raises(AnnotationError, match=f"{where}: .*{reason}"):
        list(read_annotations(f, SPACE))


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    f = tmp_path / "a.csv"
    f.write_bytes(b"\xef\xbb\xbfpath,positives\nx.png,cat\ny\xff.png,dog\n")      # a BOM is fine, byte 0xff is not
    with pytest.raises(AnnotationError, match=r"a\.csv:3: not UTF-8 text"):
        list(read_annotations(f, SPACE))
    f.write_bytes(b"\xef\xbb\xbfpath,positives\nx.png,cat\n")
    assert [e[:3] for e in read_annotations(f, SPACE)] == [("x.png", [0], [])]


def test_paths_inside_the_root_are_accepted_and_outside_ones_only_when_allowed(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    f = write(tmp_path / "a.jsonl", "\n".join(json.dumps({"path": p}) for p in [f"{root}/a.png", "b/../c.png", "../root/d.png", "../x.png"]))
    with pytest.raises(AnnotationError, match="a.jsonl:4: image path '../x.png' leads outside"):
        list(read_annotations(f, SPACE, root))
    rows = list(read_annotations(f, SPACE, root, allow_outside_root=True))
    assert [p for p, *_ in rows] == [f"{root}/a.png", "b/../c.png", "../root/d.png", "../x.png"]


def test_allow_outside_root_is_part_of_the_cached_index(tmp_path):
    from mlml.config import load_config
    from mlml.data.pipeline import build_source

    labels = write(tmp_path / "labels.txt", "cat\n")
    (tmp_path / "root").mkdir()
    ann = write(tmp_path / "a.csv", "path,positives\n../elsewhere/1.png,cat\n")
    over = ["data.source=annotations", f"data.annotations.file={ann}", f"data.annotations.label_names={labels}", f"data.annotations.root={tmp_path / 'root'}", f"data.store={tmp_path / 's'}"]
    source = build_source(load_config(None, [*over, "data.annotations.allow_outside_root=true"]).data)
    assert source.path(0) == tmp_path / "root" / "../elsewhere/1.png"
    with pytest.raises(AnnotationError, match="leads outside the root"):      # the index built with the opt-in is not reused
        build_source(load_config(None, over).data)


@pytest.mark.parametrize("text, reason", [
    ('[1, 2]', "non-empty list of names"), ('{"groups": [{"name": "g", "labels": "ab"}]}', "non-empty list of names"),
    ('{"groups": [{"name": 3, "labels": ["a"]}]}', "name must be a string"), ('["a", "a"]', "not unique"),
    ('{"groups": [{"name": "g", "labels": ["a"], "exclusive": "yes"}]}', "exclusive true or false"), ('[" a"]', "surrounding spaces"),
])
def test_bad_label_names_json(tmp_path, text, reason):
    with pytest.raises(AnnotationError, match=f"l.json:1: not a label names file: .*{reason}"):
        read_label_names(write(tmp_path / "l.json", text))


def test_annotation_source_store_and_cache(tmp_path):
    labels = write(tmp_path / "labels.txt", "cat\ndog\nsofa\nred\n")
    ann = write(tmp_path / "a.csv", "path,positives,negatives\n1.png,cat;sofa,dog\n2.png,,\n3.png,dog,cat;red\n")
    source = AnnotationSource(ann, labels, None, 16, store=tmp_path / "store")
    assert len(source) == 3 and source.path(2) == tmp_path / "3.png"
    assert torch.equal(source.labels.dense([0, 1, 2]), torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool))
    assert torch.equal(source.labels.dense_negatives([0, 2]), torch.tensor([[0, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool))
    built = (tmp_path / "store" / "source.json").stat().st_mtime_ns
    again = AnnotationSource(ann, labels, None, 16, store=tmp_path / "store")         # unchanged inputs: reused
    assert (tmp_path / "store" / "source.json").stat().st_mtime_ns == built and len(again) == 3
    write(ann, "path,positives\n1.png,red\n")                                           # changed: rebuilt
    assert len(AnnotationSource(ann, labels, None, 16, store=tmp_path / "store")) == 1
    write(ann, "path,positives\n1.png,red\n2.png,blue\n")                               # a bad line: no store left behind
    with pytest.raises(AnnotationError, match="a.csv:3: unknown label 'blue'"):
        AnnotationSource(ann, labels, None, 16, store=tmp_path / "store")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".store")] == []
