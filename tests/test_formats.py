"""Each standard format, written by hand, gives the same index (labels, paths, splits) as the CSV saying the same."""

import json

import numpy as np
import pytest

from mlml.data.annotations import AnnotationError
from mlml.data.formats import coco
from mlml.data.formats.voc import CLASSES
from mlml.data.pipeline import build_source
from tests.conftest import tiny_config


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def source(tmp_path, name, *overrides):
    cfg = tiny_config(f"data.source={name}", f"data.{name}.image_size=16", f"data.store={tmp_path / ('store-' + name)}", *overrides)
    return build_source(cfg.data)


def csv_source(tmp_path, names, rows, root):
    """The annotations source of a CSV (path, positives, negatives, split) over label names `names`."""
    write(tmp_path / "csv" / "labels.txt", "\n".join(names) + "\n")
    lines = ["path,positives,negatives,split"] + [f"{p},{';'.join(pos)},{';'.join(neg)},{split}" for p, pos, neg, split in rows]
    write(tmp_path / "csv" / "a.csv", "\n".join(lines) + "\n")
    return source(tmp_path, "annotations", f"data.annotations.file={tmp_path / 'csv' / 'a.csv'}",
                  f"data.annotations.label_names={tmp_path / 'csv' / 'labels.txt'}", f"data.annotations.root={root}")


def assert_same(a, b):
    n = len(a)
    assert a.label_space.names == b.label_space.names and len(b) == n and a.root == b.root
    assert [a.paths[i] for i in range(n)] == [b.paths[i] for i in range(n)]
    rows = np.arange(n)
    assert np.array_equal(a.labels.dense(rows).numpy(), b.labels.dense(rows).numpy())
    assert a.labels.has_negatives == b.labels.has_negatives
    assert np.array_equal(a.labels.dense_negatives(rows).numpy(), b.labels.dense_negatives(rows).numpy())
    fa, fb = a.fixed_splits, b.fixed_splits
    assert (fa is None) == (fb is None) and (fa is None or all(np.array_equal(fa[s], fb[s]) for s in fa))


def coco_file(images, annotations, categories):
    doc = {"info": {"year": 2014, "note": "[not, an, array]"}, "images": images, "licenses": [],
           "annotations": annotations, "categories": categories}
    return json.dumps(doc, indent=1)                               # several lines: errors name the element's line


CATEGORIES = [{"id": 7, "name": "sofa", "supercategory": "furniture"}, {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}]


def test_coco_matches_its_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(coco, "_CHUNK", 7)                          # values split across many reads
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    (root / "val2014").mkdir()
    train = [{"id": 10, "file_name": "a.jpg", "width": 4}, {"id": 11, "file_name": "b.jpg"}, {"id": 12, "file_name": "c.jpg"}]
    ann = [{"id": 1, "image_id": 10, "category_id": 3, "segmentation": [[1.5, 2.0, 3.25e1]], "iscrowd": 0},
           {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 1, 1]},
           {"id": 3, "image_id": 12, "category_id": 7, "iscrowd": 1}, {"id": 4, "image_id": 10, "category_id": 1}]
    write(root / "annotations" / "instances_train2014.json", coco_file(train, ann, CATEGORIES))
    write(root / "annotations" / "instances_val2014.json", coco_file([{"id": 5, "file_name": "d.jpg"}],
                                                                     [{"image_id": 5, "category_id": 1}], CATEGORIES))
    files = f'{{train = "{root}/annotations/instances_train2014.json", test = "{root}/annotations/instances_val2014.json"}}'
    got = source(tmp_path, "coco", f"data.coco.file={files}")
    names = ["person", "car", "sofa"]                              # category id order
    want = csv_source(tmp_path, names, [("train2014/a.jpg", ["person", "car"], [], "train"), ("train2014/b.jpg", [], [], "train"),
                                        ("train2014/c.jpg", ["sofa"], [], "train"), ("val2014/d.jpg", ["person"], [], "test")], root)
    assert_same(got, want)
    write(root / "annotations" / "instances_val2014.json", coco_file([{"id": 5, "file_name": "d.jpg"}],
                                                                     [{"image_id": 6, "category_id": 1}], CATEGORIES))
    with pytest.raises(AnnotationError, match=r"instances_val2014.json:\d+: annotation of image id 6, which is not in images"):
        source(tmp_path, "coco", f"data.coco.file={files}")
    write(root / "annotations" / "instances_val2014.json", '{"images": [{"id": 5, "file_name": "d.jpg"},\n {"id": 6 "file_name": "e.jpg"}]}')
    with pytest.raises(AnnotationError, match="instances_val2014.json:2: bad JSON"):
        source(tmp_path, "coco", f"data.coco.file={files}")


def voc_xml(objects):
    body = "".join(f"<object><name>{n}</name><pose>Left</pose><difficult>{d}</difficult></object>" for n, d in objects)
    return f"<annotation><folder>VOC2007</folder>\n{body}\n</annotation>"


def test_voc_matches_its_csv_and_difficult_only_classes_are_unknown(tmp_path):
    root = tmp_path / "VOC2007"
    write(root / "ImageSets" / "Main" / "trainval.txt", "000005\n000007\n")
    write(root / "ImageSets" / "Main" / "test.txt", "000001\n")
    write(root / "Annotations" / "000005.xml", voc_xml([("chair", 0), ("chair", 1), ("sofa", 1)]))      # sofa: difficult only
    write(root / "Annotations" / "000007.xml", voc_xml([("car", 0)]))
    write(root / "Annotations" / "000001.xml", voc_xml([("dog", 1), ("person", 0), ("dog", 0)]))      # dog: also easy
    got = source(tmp_path, "voc", f"data.voc.root={root}", 'data.voc.image_sets={train = "trainval", test = "test"}')

    def row(image, pos, unknown, split):
        return (f"JPEGImages/{image}.jpg", pos, [c for c in CLASSES if c not in pos and c not in unknown], split)

    want = csv_source(tmp_path, CLASSES, [row("000005", ["chair"], ["sofa"], "train"), row("000007", ["car"], [], "train"),
                                          row("000001", ["dog", "person"], [], "test")], root)
    assert_same(got, want)
    sofa = CLASSES.index("sofa")
    assert not got.labels.dense([0])[0, sofa] and not got.labels.dense_negatives([0])[0, sofa]
    write(root / "Annotations" / "000007.xml", voc_xml([("car", 0), ("unicorn", 0)]))
    with pytest.raises(AnnotationError, match=r"000007.xml:2: unknown class 'unicorn'"):     # (an edited XML: a new store)
        source(tmp_path, "voc", f"data.voc.root={root}", 'data.voc.image_sets={train = "trainval", test = "test"}', f"data.store={tmp_path / 's2'}")


def test_openimages_matches_its_csv(tmp_path):
    write(tmp_path / "oi" / "classes.csv", "/m/01,Cat\n/m/02,Dog\n/m/03,Cat\n")      # a repeated display name
    write(tmp_path / "oi" / "train.csv", "ImageID,Source,LabelName,Confidence\n"
          "000a,verification,/m/01,1\n000a,verification,/m/02,0\n000a,crowdsource-verification,/m/01,1\n"
          "000b,verification,/m/03,0\n")
    write(tmp_path / "oi" / "test.csv", "ImageID,Source,LabelName,Confidence\n000c,verification,/m/02,1\n")
    files = f'{{train = "{tmp_path}/oi/train.csv", test = "{tmp_path}/oi/test.csv"}}'
    got = source(tmp_path, "openimages", f"data.openimages.file={files}", f"data.openimages.label_names={tmp_path / 'oi' / 'classes.csv'}")
    names = ["Cat (/m/01)", "Dog", "Cat (/m/03)"]
    want = csv_source(tmp_path, names, [("000a.jpg", [names[0]], ["Dog"], "train"), ("000b.jpg", [], [names[2]], "train"),
                                        ("000c.jpg", ["Dog"], [], "test")], tmp_path / "oi")
    assert_same(got, want)
    write(tmp_path / "oi" / "test.csv", "ImageID,Source,LabelName,Confidence\n000c,v,/m/02,1\n000d,v,/m/02,1\n000c,v,/m/01,1\n")
    with pytest.raises(AnnotationError, match="test.csv:4: image '000c' again after other images"):
        source(tmp_path, "openimages", f"data.openimages.file={files}", f"data.openimages.label_names={tmp_path / 'oi' / 'classes.csv'}")
    write(tmp_path / "oi" / "test.csv", "ImageID,Source,LabelName,Confidence\n000c,v,/m/02,1\n000c,v,/m/02,0\n")
    with pytest.raises(AnnotationError, match="test.csv:3: label '/m/02' is both positive and negative"):
        source(tmp_path, "openimages", f"data.openimages.file={files}", f"data.openimages.label_names={tmp_path / 'oi' / 'classes.csv'}")


def test_tencent_matches_its_csv_and_keeps_confidences(tmp_path):
    write(tmp_path / "ml" / "dictionary.txt", "category_index\tcategory_id\tindex_of_parent\tcategory_name\n"
          "0\tn001\t-1\tthing\n1\tn002\t0\tanimal\n2\tn003\t1\tdog\n")
    write(tmp_path / "ml" / "train_im_list.txt", "images/0.jpg 0:1 1:0.8 2:0.3\nimages/1.jpg 2:1\n\nimages/2.jpg\n")
    got = source(tmp_path, "tencent", f"data.tencent.file={tmp_path / 'ml' / 'train_im_list.txt'}",
                 f"data.tencent.label_names={tmp_path / 'ml' / 'dictionary.txt'}", "data.tencent.confidence_threshold=0.5")
    want = csv_source(tmp_path, ["thing", "animal", "dog"], [("images/0.jpg", ["thing", "animal"], [], ""),
                                                             ("images/1.jpg", ["dog"], [], ""), ("images/2.jpg", [], [], "")],
                      tmp_path / "ml")
    assert_same(got, want)
    labels, conf = got.confidences(0)
    assert labels.tolist() == [0, 1, 2] and np.allclose(conf, [1.0, 0.8, 0.3]) and got.confidences(2)[0].tolist() == []
    write(tmp_path / "ml" / "train_im_list.txt", "images/0.jpg 0:1\nimages/1.jpg 2:1.5\n")
    with pytest.raises(AnnotationError, match="train_im_list.txt:2: '2:1.5': the index must be in"):
        source(tmp_path, "tencent", f"data.tencent.file={tmp_path / 'ml' / 'train_im_list.txt'}",
               f"data.tencent.label_names={tmp_path / 'ml' / 'dictionary.txt'}")
