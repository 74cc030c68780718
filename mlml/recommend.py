"""`mlml recommend`: one starting recipe, chosen from a table's runs on validation data only.

For each profile given (one per track: the synthetic data, the real scans, ...), the table's
`results/<results>.runs.csv` (written by `mlml reproduce`) holds every run's validation value of its
selection metric. Rows whose overrides change the data (a `data.*` key, such as the full-label
reference) are references, not recipes a user with the table's labels could run: they are left out.
The recipe is the method whose mean validation value falls least short of the best method's on its
worst track (smallest largest shortfall; a tie goes to the higher mean over tracks). It is written as
a config file that takes the first profile's config as `base` and sets the setting's and the
method's overrides; its comment block shows the validation table it was chosen from and, beside it,
the test values of the same runs, which are reported and never used to choose.
"""

from __future__ import annotations

import csv
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from mlml.config import ConfigError, load_config, merge, parse_override, to_toml
from mlml.experiments import methods_overriding, profile_spec, read_table


@dataclass(frozen=True)
class Track:
    """One profile's runs of one setting: method -> the per-seed validation and test values."""
    profile: str
    results: str                       # results name: <table> or <table>.<track>
    val: dict[str, list[float]]
    test: dict[str, list[float]]

    def mean(self, method: str, split: str = "val") -> float:
        return statistics.fmean((self.val if split == "val" else self.test)[method])

    def best(self, split: str = "val") -> str:
        values = self.val if split == "val" else self.test
        return max(values, key=lambda m: statistics.fmean(values[m]))


@dataclass(frozen=True)
class Choice:
    method: str
    tracks: list[Track]
    candidates: list[str]              # methods run on every track, in the table's order

    def shortfall(self, method: str, track: Track, split: str = "val") -> float:
        return track.mean(track.best(split), split) - track.mean(method, split)

    def worst(self, method: str) -> float:
        return max(self.shortfall(method, t) for t in self.tracks)


def recipe_methods(spec: dict) -> list[str]:
    """The table's methods a user with its labels can run: those whose overrides change no `data.*` key."""
    data = methods_overriding(spec, "data.")
    return [m for m in spec["methods"] if m not in data]


def read_track(table: str, profile: str, setting: str, results_dir: Path) -> Track:
    spec = profile_spec(read_table(table), profile)
    path = results_dir / f"{spec['results']}.runs.csv"
    if not path.is_file():
        raise ConfigError(f"{path} not found: run `mlml reproduce {table} --profile {profile}` first")
    metric = spec["metrics"][0]
    allowed = set(recipe_methods(spec))
    val: dict[str, list[float]] = {}
    test: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["setting"] != setting or row["method"] not in allowed or not row["select_value"]:
                continue
            if not row["select"].startswith("val/"):
                raise ConfigError(f"{path}: run {row['method']} seed {row['seed']} was selected on {row['select']!r}, "
                                  "not a validation metric; a recipe is chosen on validation data only")
            val.setdefault(row["method"], []).append(float(row["select_value"]))
            if row.get(metric):
                test.setdefault(row["method"], []).append(float(row[metric]))
    if not val:
        raise ConfigError(f"{path}: no runs of setting '{setting}' with a method that leaves the data as it is")
    return Track(profile, spec["results"], val, test)


def choose(tracks: list[Track], order: list[str]) -> Choice:
    """The method with the smallest largest validation shortfall to each track's best (ties: higher mean)."""
    candidates = [m for m in order if all(m in t.val for t in tracks)]
    if not candidates:
        raise ConfigError("no method was run on every track given")
    probe = Choice(candidates[0], tracks, candidates)
    method = min(candidates, key=lambda m: (probe.worst(m), -statistics.fmean(t.mean(m) for t in tracks)))
    return Choice(method, tracks, candidates)


def recipe(table: str, profiles: list[str], setting: str, choice: Choice, out: Path, command: str, commit: str) -> str:
    """The config file text: comments (how it was chosen, the validation and test tables), `base`, overrides."""
    spec = read_table(table)
    first = profile_spec(spec, profiles[0])
    config = (spec["path"].parent / first["profiles"][profiles[0]]["config"]).resolve()
    overrides = [*first["settings"][setting], *first["methods"][choice.method]]
    data: dict = {"base": os.path.relpath(config, out.resolve().parent)}
    for text in overrides:
        merge(data, *parse_override(text))
    metric = spec["metrics"][0]
    select = "validation mAP"
    lines = [f"# Recommended starting recipe for the '{setting}' setting: {choice.method}.",
             f"# Written by `{command}` at commit {commit}; do not edit by hand, re-run the command.",
             f"# Chosen on {select} only (the `select_value` of results/<table>.runs.csv): the method whose mean over seeds",
             "# falls least short of each track's best method on its worst track. Rows that change the data (the",
             "# full-label reference) are not candidates. Test values of the same runs are shown, never used to choose.",
             "#",
             "# | method | " + " | ".join(f"{t.profile}: validation (short of best) | {t.profile}: {metric}" for t in choice.tracks) + " |",
             "# |---|" + "---|---|" * len(choice.tracks)]
    for m in choice.candidates:
        cells = []
        for t in choice.tracks:
            test = f"{t.mean(m, 'test'):.4f}" if m in t.test else "-"
            short = choice.shortfall(m, t)
            cells += [f"{t.mean(m):.4f} (-{short:.4f})" if short > 0 else f"{t.mean(m):.4f} (best)", test]
        mark = " **(chosen)**" if m == choice.method else ""
        lines.append(f"# | {m}{mark} | " + " | ".join(cells) + " |")
    lines.append("#")
    for t in choice.tracks:
        if choice.method in t.test and t.test:
            gap = choice.shortfall(choice.method, t, "test")
            lines.append(f"# On {t.profile} ({t.results}), the recipe's {metric} is {100 * gap:.2f} points below the "
                         f"best method's by that test metric ({t.best('test')}).")
    for p in profiles[1:]:
        other = profile_spec(spec, p)["methods"][choice.method]
        if list(other) != list(first["methods"][choice.method]):
            lines.append(f"# Profile {p} runs it with: {', '.join(other)} (set such data statistics for your data).")
    return "\n".join(lines) + "\n" + to_toml(data)


def recommend(table: str, profiles: list[str], setting: str | None, out: Path, results_dir: Path = Path("results"),
              command: str = "mlml recommend", commit: str = "unknown") -> Choice:
    spec = read_table(table)
    if setting is None:
        if len(spec["settings"]) != 1:
            raise ConfigError(f"table '{table}' has settings {', '.join(spec['settings'])}: name one with --setting")
        setting = next(iter(spec["settings"]))
    if setting not in spec["settings"]:
        raise ConfigError(f"table '{table}' has no setting '{setting}'; known: {', '.join(spec['settings'])}")
    tracks = [read_track(table, p, setting, results_dir) for p in profiles]
    choice = choose(tracks, recipe_methods(spec))
    text = recipe(table, profiles, setting, choice, out, command, commit)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    load_config(out)                   # the recipe must be a config `mlml train` takes
    return choice
