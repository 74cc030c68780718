"""Standard annotation formats as sources: each a small reader of `Entry` rows into the one index.

    coco        COCO instances JSON: an image's positives are the categories of its annotations
    voc         Pascal VOC: ImageSets/Main lists + Annotations/*.xml; `difficult`-only classes unknown
    openimages  Open Images image-level CSV: verified positives (Confidence 1) and negatives (0)
    tencent     Tencent ML-Images lists, `path idx:conf ...`; confidences kept, a threshold makes positives

Every reader streams its files (COCO's one JSON document element by element), stops with
`AnnotationError` (`file:line: reason`) on a line it cannot use, and writes through
`mlml.data.annotations.write_index`, so a format's source is the same label store, paths and splits
as the CSV that says the same (tested). Each format's own split files are its splits
(`data.<format>.file = {train = ..., val = ..., test = ...}`; VOC: `data.voc.image_sets`, ImageSets names).
"""
