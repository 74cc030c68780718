"""Finished runs carried between machines: `mlml runs export` / `mlml runs import`.

A table's runs are trained where there are cores (a cluster's scratch disk, a lent machine, a
laptop over several sittings) and tabled where the results are kept. What a finished run holds
that a table or a later `mlml reproduce` reads is two small text files: `metrics.json` (the
metrics, the history, the provenance) and `config.toml` (what `reproduce` checks a finished run
against). `export_runs` writes those of every finished run below a runs directory into one
gzipped JSON-lines file (one line per run: its directory relative to the runs directory and the
two texts); `import_runs` writes them back below another runs directory, where `mlml reproduce`
then counts them as done and `mlml table` tables them. Checkpoints and TensorBoard events stay
behind: a finished run needs neither to be tabled.

An archive is data, never code: it is read as JSON, each run's directory must stay below the
runs directory (no absolute path, no `..`), and a run already there with other content is never
overwritten.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path, PurePosixPath

from mlml.files import atomic_write_text

RUN_FILES = ("metrics.json", "config.toml")


class ArchiveError(ValueError):
    """An archive that cannot be imported: unreadable, a path outside the runs directory, or a run
    that differs from the one already there."""


def finished_runs(root: Path) -> list[Path]:
    """The directories below `root` that hold a finished run (`metrics.json`), sorted."""
    return sorted(p.parent for p in Path(root).rglob("metrics.json"))


def export_runs(root: Path, out: Path, replace: bool = False) -> int:
    """Write every finished run below `root` into the archive `out`; the number of runs.

    Refused, with nothing written: a `root` that is not a directory or holds no finished run (a typo
    would otherwise leave an empty archive), and, unless `replace`, an existing archive `out` that
    holds a run `root` lacks: exporting at the end of a sitting whose runs directory did not import
    the last archive would otherwise drop every run carried so far."""
    root = Path(root)
    if not root.is_dir():
        raise ArchiveError(f"{root}: no such runs directory; nothing was exported")
    lines, names = [], set()
    for d in finished_runs(root):
        files = {name: (d / name).read_text() for name in RUN_FILES if (d / name).is_file()}
        try:
            json.loads(files["metrics.json"])                      # a damaged file is not carried on
        except json.JSONDecodeError as err:
            raise ArchiveError(f"{d / 'metrics.json'}: unreadable ({err}); nothing was exported") from None
        rel = d.relative_to(root).as_posix()
        names.add(rel)
        lines.append(json.dumps({"run": rel, "files": files}, sort_keys=True))
    if not lines:
        raise ArchiveError(f"{root}: no finished run (metrics.json) below it; nothing was exported")
    if Path(out).exists() and not replace:
        dropped = sorted({rel.as_posix() for rel, _ in read_archive(Path(out))} - names)
        if dropped:
            raise ArchiveError(f"{out} holds {len(dropped)} run{'s' * (len(dropped) != 1)} that {root} lacks (e.g. "
                               f"{dropped[0]}): import it first (mlml runs import {out} --runs-dir {root}), or pass "
                               f"--replace to drop them; nothing was exported")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write("".join(line + "\n" for line in lines))
    tmp.replace(out)
    return len(lines)


def read_archive(path: Path) -> list[tuple[PurePosixPath, dict[str, str]]]:
    """(run directory relative to the runs directory, {file name: text}) of each run in the archive."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArchiveError(f"{path}: not an archive of runs ({err})") from None
    runs = []
    for i, rec in enumerate(records, 1):
        if not (isinstance(rec, dict) and isinstance(rec.get("run"), str) and isinstance(rec.get("files"), dict)):
            raise ArchiveError(f"{path}, line {i}: not a run (wants 'run' and 'files')")
        rel = PurePosixPath(rec["run"])
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in rec["run"]:
            raise ArchiveError(f"{path}, line {i}: run directory {rec['run']!r} is not below the runs directory")
        files = rec["files"]
        if set(files) - set(RUN_FILES) or "metrics.json" not in files or not all(isinstance(t, str) for t in files.values()):
            raise ArchiveError(f"{path}, line {i}: a run's files are {', '.join(RUN_FILES)} (metrics.json required)")
        try:
            metrics = json.loads(files["metrics.json"])
        except json.JSONDecodeError as err:
            raise ArchiveError(f"{path}, line {i}: unreadable metrics.json ({err})") from None
        if not isinstance(metrics, dict) or "metrics" not in metrics:
            raise ArchiveError(f"{path}, line {i}: not the metrics.json of a run")
        runs.append((rel, files))
    return runs


def import_runs(path: Path, root: Path) -> tuple[int, int]:
    """Write the archive's runs below `root`: (runs written, runs already there with the same files).

    Nothing is written if any run of the archive is already there with other content (`ArchiveError`
    names it): a finished run is never replaced, and an unfinished one (a checkpoint, no metrics.json)
    is left to be resumed rather than declared done.
    """
    root = Path(root)
    runs = read_archive(path)
    new, same = [], 0
    for rel, files in runs:
        d = root.joinpath(*rel.parts)
        if (d / "metrics.json").exists():
            if any((d / n).read_text() != t for n, t in files.items() if (d / n).is_file()):
                raise ArchiveError(f"{d} holds a finished run that differs from the archive's; nothing was imported")
            same += 1
        elif (d / "checkpoints").exists() or (d / "run.lock").exists():
            raise ArchiveError(f"{d} holds an unfinished run; finish or remove it first; nothing was imported")
        else:
            new.append((d, files))
    for d, files in new:
        d.mkdir(parents=True, exist_ok=True)
        for name in ("config.toml", "metrics.json"):            # metrics.json last: it marks the run done
            if name in files:
                atomic_write_text(d / name, files[name])
    return len(new), same
