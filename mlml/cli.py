"""The `mlml` command line: train, eval, predict, checkpoint, weights, data, reproduce, recommend, search, runs, table, list."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (defaults apply to every key it leaves out)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")


def cmd_train(args: argparse.Namespace) -> int:
    from mlml.config import load_config
    from mlml.trainer import PREEMPTED_EXIT_CODE, Preempted, train

    cfg = load_config(args.config, args.overrides)
    if args.strict:
        cfg.data.strict = True
    if args.allow_config_change and not args.resume:
        print("mlml train: error: --allow-config-change only applies with --resume", file=sys.stderr)
        return 2
    try:
        result = train(cfg, Path(args.out) if args.out else None, resume=args.resume,
                       allow_config_change=args.allow_config_change)
    except Preempted as stop:
        print(f"mlml train: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print(json.dumps({k: round(v, 4) for k, v in result["metrics"].items() if k.startswith("test/")}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mlml.inference import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.split, args.overrides, args.device, Path(args.predictions) if args.predictions else None)
    print(json.dumps({f"{args.split}/{k}": round(v, 6) for k, v in metrics.items()}, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mlml.inference import image_files, load_predictor, predict_files, write_predictions

    predictor = load_predictor(args.checkpoint, args.device)
    files = image_files(args.inputs)
    if not files:
        raise FileNotFoundError(f"no image files in {' '.join(args.inputs)}")
    records = predict_files(predictor, files, args.batch_size, args.workers, args.top, progress=bool(args.out))
    if args.out:
        count = write_predictions(records, Path(args.out), predictor.label_space)
        print(f"wrote {count} predictions to {args.out} ({'calibrated' if predictor.calibrated else 'fixed'} thresholds)")
        return 0
    results = list(records)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"] + (f"  unreadable: {r['error']}" if "error" in r else f"  labels: {', '.join(r['labels']) or '(none)'}"))
        for item in r.get("top", []):
            print(f"  {item['label']:<16} {item['probability']:.3f}")
        for name, g in r.get("groups", {}).items():
            print(f"  [{name}] {g['class']:<10} {g['probability']:.3f}")
    return 0


def cmd_checkpoint_convert(args: argparse.Namespace) -> int:
    from mlml.checkpoint import convert_legacy

    ckpt = convert_legacy(Path(args.old), Path(args.new), trust=args.trust)
    print(f"wrote {args.new} (safe format; keys: {', '.join(sorted(ckpt))})")
    return 0


def cmd_checkpoint_verify(args: argparse.Namespace) -> int:
    from mlml.checkpoint import load_checkpoint

    for path in args.paths:
        ckpt = load_checkpoint(path)
        where = f"epoch {ckpt.get('epoch', '?')}, step {ckpt.get('step_in_epoch', '?')}, global step {ckpt.get('global_step', '?')}"
        print(f"{path}: ok ({where}; config hash {ckpt.get('config_hash', 'none')})")
    return 0


def cmd_weights_convert(args: argparse.Namespace) -> int:
    from mlml.models.weights import convert, sha256_of

    obj = convert(args.backbone, Path(args.out), Path(args.source) if args.source else None)
    print(f"wrote {args.out} ({len(obj['state_dict'])} tensors for model.backbone = {args.backbone}; from "
          f"{obj['source']['package']}, {obj['source']['file']} sha256 {obj['source']['sha256'][:16]}...; "
          f"file sha256 {sha256_of(Path(args.out))})")
    print(f"train from it with: --set model.backbone={args.backbone} --set model.weights={args.out}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from mlml.config import load_config
    from mlml.data.export import export_synthetic

    cfg = load_config(args.config, args.overrides)
    files = export_synthetic(cfg.data, Path(args.out), args.n, args.format)
    size = cfg.data.settings("synthetic").image_size
    print(f"wrote {args.n} images to {files['folder']}; annotations {files['annotations']}; labels {files['label_names']}")
    print("train on them with, e.g.:")
    print(f"  mlml train --set data.source=annotations --set data.annotations.file={files['annotations']} "
          f"--set data.annotations.label_names={files['label_names']} --set data.annotations.image_size={size}")
    print(f"  mlml train --set data.source=folder --set data.folder.root={files['folder']} --set data.folder.image_size={size}")
    return 0


def cmd_data_index(args: argparse.Namespace) -> int:
    from mlml.config import load_config
    from mlml.data.pipeline import build_source

    cfg = load_config(args.config, args.overrides)
    source = build_source(cfg.data)
    labels = source.labels
    summary = {
        "source": cfg.data.source,
        "images": len(source),
        "labels": labels.num_labels,
        "groups": {g.name: len(g.labels) for g in source.label_space.groups},
        "positives": int(labels.indptr[-1]),
        "known_negatives": int(labels.neg_indptr[-1]) if labels.has_negatives else 0,
        "own_splits": {k: len(v) for k, v in fixed.items()} if (fixed := getattr(source, "fixed_splits", None)) else "none (random)",
        "store": str(getattr(source, "store", "(in memory)")),
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from mlml.config import ConfigError
    from mlml.experiments import ReproductionStopped, launcher_resources, list_tables, reproduce, status

    if args.list or not args.table:
        print(list_tables(Path(args.results_dir)))
        return 0
    if args.status:
        print(status(args.table, args.profile, seeds=args.seeds, runs_dir=Path(args.runs_dir)))
        return 0
    if args.jobs < 1 or args.torchrun < 0:
        raise ConfigError(f"--jobs must be >= 1 and --torchrun >= 0, got {args.jobs} and {args.torchrun}")
    launcher = slurm_launcher(args, launcher_resources(args.table, args.profile, args.slurm))
    try:
        print(reproduce(args.table, args.profile, seeds=args.seeds, jobs=args.jobs, runs_dir=Path(args.runs_dir),
                        results_dir=Path(args.results_dir), torchrun=args.torchrun, launcher=launcher, wait_lock=args.wait_lock,
                        only=args.only))
    except ReproductionStopped as stopped:
        from mlml.trainer import PREEMPTED_EXIT_CODE

        print(f"mlml reproduce: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from mlml.provenance import git_commit
    from mlml.recommend import recommend

    out = Path(args.out)
    command = " ".join(["mlml recommend", args.table, "--profiles", *args.profiles,
                        *(["--setting", args.setting] if args.setting else []), "--out", args.out])
    choice = recommend(args.table, args.profiles, args.setting, out, Path(args.results_dir), command, git_commit())
    worst = choice.worst(choice.method)
    print(f"recommended: {choice.method} (largest validation shortfall to a track's best: {worst:.4f}); wrote {out}")
    return 0


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launcher", default="local", choices=["local", "slurm"],
                   help="local: processes on this machine; slurm: one SLURM job each, through submitit (pip install 'mlml[cluster]')")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="SLURM resources over the [launcher.slurm] section (repeatable): partition, nodes, gpus_per_node, "
                        "cpus_per_task, mem_gb, time_min, account, job_name, sbatch.<option>, setup, checkpoint_every, "
                        "max_requeues, signal_delay_s")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="--launcher slurm: submit and return, do not wait for the jobs")
    p.add_argument("--poll", type=float, default=30.0, metavar="SECONDS", help="--launcher slurm: how often to read the jobs' states while waiting")


def slurm_launcher(args: argparse.Namespace, resources):
    """The SLURM launcher of `--launcher slurm`, else None (local processes)."""
    from mlml.config import ConfigError
    from mlml.launchers import SlurmLauncher

    if args.launcher == "local":
        if args.slurm:
            raise ConfigError("--slurm options need --launcher slurm")
        return None
    return SlurmLauncher(resources, wait=args.wait, poll=args.poll)


def cmd_search(args: argparse.Namespace) -> int:
    import os

    from mlml.config import ConfigError
    from mlml.launchers import launcher_section, slurm_resources
    from mlml.search import SearchSpec, SearchStopped, read_space, search
    from mlml.trainer import PREEMPTED_EXIT_CODE, Preempted

    if args.trials < 1 or args.workers < 1:
        raise ConfigError(f"--trials and --workers must be >= 1, got {args.trials} and {args.workers}")
    study = args.study or f"{Path(args.config).stem}-{Path(args.space).stem}"
    out = Path(args.out or Path("runs") / "search" / study).resolve()
    resources = slurm_resources([launcher_section(read_space(Path(args.space)))], args.slurm, f"{args.space}: launcher.slurm")
    launcher = slurm_launcher(args, resources)
    threads = resources.threads if launcher else max(1, (os.cpu_count() or 1) // args.workers)
    spec = SearchSpec(config=str(Path(args.config).resolve()), overrides=list(args.overrides), space=str(Path(args.space).resolve()),
                      storage=args.storage or f"sqlite:///{out / 'study.db'}", study=study, out=str(out), metric=args.metric,
                      pruner=args.pruner, startup_trials=args.startup_trials, seed=args.seed, threads=threads)
    try:
        print(search(spec, args.trials, args.workers, launcher))
    except (SearchStopped, Preempted) as stopped:     # several local workers / the one trial run here
        print(f"mlml search: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from mlml.experiments import table_from_runs

    print(table_from_runs(Path(args.runs_dir), Path(args.results_dir) if args.results_dir else None))
    return 0


def cmd_runs_export(args: argparse.Namespace) -> int:
    from mlml.archive import export_runs

    n = export_runs(Path(args.runs_dir), Path(args.out), replace=args.replace)
    print(f"{n} finished run{'s' * (n != 1)} of {args.runs_dir} written to {args.out}")
    return 0


def cmd_runs_import(args: argparse.Namespace) -> int:
    from mlml.archive import import_runs

    new, same = import_runs(Path(args.archive), Path(args.runs_dir))
    print(f"{new} run{'s' * (new != 1)} written below {args.runs_dir}, {same} already there")
    return 0


def registries() -> dict:
    """What `mlml list` shows: registry name -> (the registry, the config key that names an entry)."""
    from mlml.data.observation import OBSERVATIONS
    from mlml.data.pipeline import SOURCES
    from mlml.data.transforms import TRANSFORMS
    from mlml.losses import LOSSES
    from mlml.methods import METHODS
    from mlml.models import BACKBONES, HEADS

    return {"methods": (METHODS, "method.name"), "losses": (LOSSES, "method.loss"), "sources": (SOURCES, "data.source"),
            "observations": (OBSERVATIONS, "data.observation"), "backbones": (BACKBONES, "model.backbone"),
            "heads": (HEADS, "model.head"), "transforms": (TRANSFORMS, "method views, data.augment")}


def describe(name: str, component, settings_key: str, cls: type | None = None) -> list[str]:
    """Lines for one entry: its name, the first line of its docstring, its settings (`cls`, default
    the component's) with their types and defaults."""
    from mlml.settings import settings_class, settings_fields

    doc = (getattr(component, "__doc__", None) or "").strip().splitlines()
    lines = [f"  {name}" + (f"  - {doc[0].strip()}" if doc else "")]
    if not settings_key:
        return lines
    cls = cls or settings_class(component)
    if cls is None:
        return lines + [f"      {settings_key}: untyped (passed as a dict)"]
    fields = settings_fields(cls)
    if not fields:
        return lines + [f"      {settings_key}: none"]
    lines.append(f"      {settings_key}:")
    return lines + [f"        {n}: {tp} = {'(required)' if d is ... else repr(d)}" for n, tp, d in fields]


def cmd_list(args: argparse.Namespace) -> int:
    from mlml.methods.domain import DomainBranchSettings
    from mlml.methods.teacher import TeacherSettings
    from mlml.settings import source_settings_class

    keys = {"methods": "method.args", "losses": "method.loss_args", "observations": "data.observation_args",
            "backbones": "model.backbone_args"}
    chosen = list(registries()) if args.what == "all" else [args.what]
    lines: list[str] = []
    for what in chosen:
        registry, key = registries()[what]
        lines.append(f"{what} ({key}):")
        for name in registry.names():
            if what == "sources":          # a source's settings: the dataclass of its factory, table [data.<name>]
                cls = source_settings_class(registry.get(name))
                lines += describe(name, registry.get(name), f"data.{name}", cls) if cls else (
                    describe(name, registry.get(name), "") + [f"      data.{name}: untyped (passed as a dict)"])
                continue
            lines += describe(name, registry.get(name), keys.get(what, ""))
        if what == "methods":
            lines.append("  parts any method switches on:")
            lines += describe("teacher", TeacherSettings, "method.teacher", TeacherSettings)[1:]
            lines += describe("domain_branch", DomainBranchSettings, "method.domain_branch", DomainBranchSettings)[1:]
        lines.append("")
    print("\n".join(lines).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlml", description="Multi-label learning with missing labels.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run")
    add_config_args(p)
    p.add_argument("--out", help="run directory (default runs/<experiment>/<setting>/<method>/seed<k>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <run dir>/checkpoints/last.pt (last.prev.pt if last.pt is unreadable); "
                        "starts the run if there is none")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue a checkpoint written by another config (refused by default)")
    p.add_argument("--strict", action="store_true", help="stop on an unreadable image (= data.strict); default: skip and count it")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("checkpoint", help="checkpoint tools")
    ck_sub = p.add_subparsers(dest="checkpoint_command", required=True)
    q = ck_sub.add_parser("convert", help="rewrite a checkpoint of an older mlml in the safe format (runs its code: "
                                          "only for files you trust)")
    q.add_argument("old")
    q.add_argument("new")
    q.add_argument("--trust", action="store_true", help="I trust where OLD came from (it is unpickled with weights_only=False)")
    q.set_defaults(fn=cmd_checkpoint_convert)
    q = ck_sub.add_parser("verify", help="check checkpoint files (header, size, checksum, safe load)")
    q.add_argument("paths", nargs="+")
    q.set_defaults(fn=cmd_checkpoint_verify)

    p = sub.add_parser("weights", help="pretrained backbone weights")
    w_sub = p.add_subparsers(dest="weights_command", required=True)
    q = w_sub.add_parser("convert", help="convert a package's ImageNet weights once to mlml's safe weight file (model.weights)")
    q.add_argument("backbone", help="registered backbone, e.g. efficientnet_lite0")
    q.add_argument("out", help="weight file to write, e.g. weights/efficientnet_lite0.pt")
    q.add_argument("--source", help="the package's .pth file (default: found in the installed package)")
    q.set_defaults(fn=cmd_weights_convert)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("synth", help="write the synthetic data as an image folder plus an annotation file")
    add_config_args(q)
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--n", type=int, required=True, help="number of images")
    q.add_argument("--format", default="jsonl", choices=["jsonl", "csv"], help="annotation file format")
    q.set_defaults(fn=cmd_data_synth)
    q = data_sub.add_parser("index", help="check and index the configured source (annotation errors show here); print a summary")
    add_config_args(q)
    q.set_defaults(fn=cmd_data_index)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its run's data (complete or annotated labels, as the run)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a key of the run's config, e.g. where its data is here: --set data.coco.root=/data/coco")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 | auto")
    p.add_argument("--predictions", help="also write each image's predictions (.jsonl or .csv), as mlml predict does")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("predict", help="labels of image files from a checkpoint alone (no data, no config)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", help="image files and folders (their images, recursively)")
    p.add_argument("--out", help="write predictions.jsonl or predictions.csv (with a progress bar) instead of printing")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--top", type=int, default=5, help="labels with probabilities per image")
    p.add_argument("--json", action="store_true", help="print JSON (without --out)")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("reproduce", help="run a table's settings x methods x seeds and write results/<table>.md")
    p.add_argument("table", nargs="?")
    p.add_argument("--list", action="store_true", help="list the tables and what each profile costs")
    p.add_argument("--profile", default="quick", help="a profile of the table: quick, full, real (the real-image track), ...")
    p.add_argument("--seeds", type=int, help="number of seeds (default: the profile's)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each a subprocess)")
    p.add_argument("--torchrun", type=int, default=0, metavar="N",
                   help="launch each run as `torchrun --standalone --nproc_per_node=N -m mlml train ...`")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--results-dir", default="results", help="where tables and measured costs (<table>.timing.json) go")
    p.add_argument("--status", action="store_true", help="show each run as done, running, pending, failed (with its log), stopped or missing")
    p.add_argument("--wait-lock", action="store_true", help="if another reproduction of the table runs, wait for it (default: refuse)")
    p.add_argument("--only", action="append", metavar="SETTING/METHOD",
                   help="train only the missing runs of these cells (shell wildcards, repeatable), e.g. a new row; "
                        "the table is written once every run is done")
    add_launcher_args(p)
    p.set_defaults(fn=cmd_reproduce)

    p = sub.add_parser("recommend", help="choose one starting recipe from a table's runs on several tracks, on validation data only")
    p.add_argument("table")
    p.add_argument("--profiles", nargs="+", required=True, help="one profile per track, e.g. quick real (their results/*.runs.csv)")
    p.add_argument("--setting", help="the table's setting (default: its only one)")
    p.add_argument("--out", default="experiments/configs/recommended.toml")
    p.add_argument("--results-dir", default="results")
    p.set_defaults(fn=cmd_recommend)

    p = sub.add_parser("search", help="hyper-parameter search on validation metrics (Optuna; pip install 'mlml[cluster]')")
    p.add_argument("config", help="TOML config the trials start from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every trial (repeatable)")
    p.add_argument("--space", required=True, help="search space TOML ([params], [[enqueue]], [launcher.slurm]; see mlml/search.py)")
    p.add_argument("--trials", type=int, required=True, help="trials the study holds when done (complete, pruned or failed)")
    p.add_argument("--workers", type=int, default=1, help="local processes, or SLURM jobs with --launcher slurm, sharing the study")
    p.add_argument("--metric", default="val/mAP_macro", help="validation metric to maximise")
    p.add_argument("--pruner", default="median", choices=["median", "halving", "none"],
                   help="median: stop a trial below the median of finished ones at the same epoch; halving: successive halving")
    p.add_argument("--startup-trials", type=int, default=5, help="finished trials before the median rule prunes and TPE models")
    p.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://user@host/db (default: sqlite:///<out>/study.db)")
    p.add_argument("--study", help="study name (default: <config>-<space>)")
    p.add_argument("--out", help="trial runs, trials.md and best.toml (default: runs/search/<study>)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    add_launcher_args(p)
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("runs", help="carry finished runs (metrics.json, config.toml) between machines in one archive")
    r_sub = p.add_subparsers(dest="runs_command", required=True)
    q = r_sub.add_parser("export", help="write every finished run below RUNS_DIR into one archive (.jsonl.gz)")
    q.add_argument("runs_dir")
    q.add_argument("--out", required=True, help="archive to write, e.g. semi_study.real.runs.jsonl.gz")
    q.add_argument("--replace", action="store_true",
                   help="replace an existing --out even where it holds runs that RUNS_DIR lacks (refused without it)")
    q.set_defaults(fn=cmd_runs_export)
    q = r_sub.add_parser("import", help="write an archive's runs below --runs-dir (never replacing a different one); "
                                        "mlml reproduce then counts them as done")
    q.add_argument("archive")
    q.add_argument("--runs-dir", required=True, help="where the exported directory was, e.g. runs/real/semi_study")
    q.set_defaults(fn=cmd_runs_import)

    p = sub.add_parser("table", help="rebuild a table from the metrics.json files under a runs directory")
    p.add_argument("runs_dir")
    p.add_argument("--results-dir", help="also write <results-dir>/<experiment>.md and .csv")
    p.set_defaults(fn=cmd_table)

    p = sub.add_parser("list", help="the registered components with their settings and defaults")
    p.add_argument("what", nargs="?", default="all", choices=["methods", "losses", "sources", "observations", "backbones",
                                                              "heads", "transforms", "all"])
    p.set_defaults(fn=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = run_command(argv)
        sys.stdout.flush()           # here, where a closed pipe can be caught, not at the interpreter's exit
        return code
    except BrokenPipeError:          # `mlml ... | head` read what it wanted: stop quietly, as Unix tools do
        closed_stdout_quietly()
        return BROKEN_PIPE_EXIT_CODE


BROKEN_PIPE_EXIT_CODE = 141          # what a shell reports for a command killed by SIGPIPE (128 + 13)


def closed_stdout_quietly() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit does not print a second error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from mlml.archive import ArchiveError
    from mlml.checkpoint import CheckpointError
    from mlml.config import ConfigError
    from mlml.data.annotations import AnnotationError
    from mlml.data.image_files import UnreadableImageError
    from mlml.files import WriteError
    from mlml.registry import PluginError, UnknownNameError

    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, FileExistsError, UnknownNameError, PluginError, AnnotationError, UnreadableImageError,
            CheckpointError, WriteError, ArchiveError) as err:
        print(f"mlml {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
