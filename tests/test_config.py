import pytest

from mlml.config import Config, ConfigError, from_dict, load_config, parse_override, to_toml


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr=3e-4", "method.loss=an_ls", "data.synthetic.image_size=16", "method.loss_args={eps = 0.2}"])
    assert cfg.optim.lr == 3e-4 and cfg.method.loss == "an_ls"
    assert cfg.data.settings("synthetic").image_size == 16
    assert cfg.method.loss_args == {"eps": 0.2}


def test_int_accepted_for_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "override, key",
    [("optim.lrr=1", "optim.lrr"), ("optim.epochs=1.5", "optim.epochs"), ("data.synthetic.colours=3", "data.synthetic.colours"),
     ("model=3", "model"), ("run.progress=3", "run.progress"), ("nosuch.key=1", "nosuch")],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_file_errors_name_the_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(f)


def test_base_file_and_roundtrip(tmp_path):
    (tmp_path / "base.toml").write_text('[optim]\nlr = 0.5\nepochs = 7\n[method]\nloss = "an_ls"\nloss_args = {eps = 0.3}\n')
    (tmp_path / "c.toml").write_text('base = "base.toml"\n[optim]\nlr = 0.25\n')
    cfg = load_config(tmp_path / "c.toml")
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.method.loss_args) == (0.25, 7, {"eps": 0.3})
    (tmp_path / "out.toml").write_text(to_toml(cfg.to_dict()))
    assert load_config(tmp_path / "out.toml") == cfg


def test_parse_override_bare_word_is_string():
    assert parse_override("method.loss=an") == (["method", "loss"], "an")
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)


def test_from_dict_rejects_non_table():
    with pytest.raises(ConfigError, match="'optim'"):
        from_dict(Config, {"optim": 3})


# ------------------------------------------------------------------ validation at load time
BAD_VALUES = [
    ("optim.epochs=0", "optim.epochs"), ("optim.epochs=-3", "optim.epochs"), ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.lr=inf", "optim.lr"),
    ("data.batch_size=0", "data.batch_size"), ("data.batch_size=-8", "data.batch_size"), ("eval.every=0", "eval.every"),
    ("optim.schedule=linear", "optim.schedule"), ("optim.name=adam", "optim.name"), ("optim.amp=maybe", "optim.amp"),
    ("eval.select=val/accuracy", "eval.select"), ("eval.select=test/mAP_macro", "eval.select"),
    ("eval.select=mAP_macro", "eval.select"), ("data.n_val=0", "data.n_val"), ("data.n_train=0", "data.n_train"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"), ("optim.accumulate=0", "optim.accumulate"),
    ("optim.momentum=1.5", "optim.momentum"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("model.dropout=1.0", "model.dropout"), ("eval.threshold=2", "eval.threshold"), ("run.seed=-1", "run.seed"),
    ("run.device=gpu", "run.device"), ("run.experiment=../../etc", "run.experiment"), ("run.setting=", "run.setting"),
    ("data.val_labels=some", "data.val_labels"), ("method.loss=nope", "method.loss"), ("method.name=nope", "method.name"),
    ("model.backbone=vgg", "model.backbone"), ("data.source=nope", "data.source"), ("data.augment=heavy", "data.augment"),
    ("data.observation=most", "data.observation"), ("data.recolour.colours=9", "data.recolour.colours"),
    ("data.synthetic.image_size=4", "data.synthetic.image_size"), ("run.dist_timeout=0", "run.dist_timeout"), ("run.checkpoint_minutes=-1", "run.checkpoint_minutes"),
    ("data.unlabelled_ratio=-1", "data.unlabelled_ratio"), ('run.out_dir="a\\u0000b"', "run.out_dir"),
]


@pytest.mark.parametrize("override, key", BAD_VALUES)
def test_bad_values_are_refused_at_load_naming_the_key_and_override(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'") as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"--set {override}:") and "\n" not in str(err.value)
    assert err.value.key == key


def test_batch_size_must_divide_into_micro_batches():
    with pytest.raises(ConfigError, match="'data.batch_size' = 10 must be divisible by optim.accumulate = 3"):
        load_config(None, ["data.batch_size=10", "optim.accumulate=3"])


def test_group_metric_selection_needs_full_validation_labels():
    assert load_config(None, ["eval.select=val/group_acc/colour"]).eval.select == "val/group_acc/colour"
    assert load_config(None, ["eval.select=val_teacher/f1_micro"]).eval.select == "val_teacher/f1_micro"
    with pytest.raises(ConfigError, match="need data.val_labels = 'full'"):
        load_config(None, ["eval.select=val/group_acc/colour", "data.val_labels=observed"])


def test_errors_name_the_file_that_set_the_value(tmp_path):
    (tmp_path / "base.toml").write_text("[optim]\nepochs = 0\n")
    (tmp_path / "c.toml").write_text('base = "base.toml"\n[optim]\nlr = -1.0\n')
    with pytest.raises(ConfigError, match=r"c\.toml: config key 'optim.lr' = -1.0 must be > 0"):
        load_config(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match=r"base\.toml: config key 'optim.epochs' = 0 must be >= 1"):
        load_config(tmp_path / "c.toml", ["optim.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"^--set optim.epochs=-2: "):
        load_config(tmp_path / "c.toml", ["optim.lr=1e-3", "optim.epochs=-2"])


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe[optim]", "not UTF-8"), (b'base = 3\n', "'base' must be the path"), (b'base = "c.toml"\n', "cycle"),
    (b'base = "."\n', "cannot read config file"), (b"[optim\n", "c.toml: "), (b"x = [" * 2000, "c.toml: "),
])
def test_unreadable_config_files_give_one_line_errors(tmp_path, content, match):
    (tmp_path / "c.toml").write_bytes(content)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(tmp_path / "c.toml")
    assert "\n" not in str(err.value)


def test_to_toml_writes_strings_and_keys_that_read_back(tmp_path):
    from mlml.config import read_toml_with_bases

    cfg = load_config(None, ['run.experiment="a\\nb\\"c\\u007f"'])
    cfg.method.loss_args = {"a b": 1, "é": "x\ty"}     # free-form keys (an untyped plug-in loss's settings)
    (tmp_path / "c.toml").write_text(to_toml(cfg.to_dict()))
    assert from_dict(Config, read_toml_with_bases(tmp_path / "c.toml")).to_dict() == cfg.to_dict()


def test_config_hash_is_stable_and_ignores_execution_keys():
    from mlml.config import config_diff, config_hash

    a = load_config(None, ["optim.lr=1e-3"])
    assert config_hash(a) == config_hash(load_config(None, ["optim.lr=0.001", "run.threads=3", "run.progress=false"]))
    assert config_hash(a) != config_hash(load_config(None, ["optim.lr=2e-3"]))
    an_ls = load_config(None, ["method.loss=an_ls"])
    assert config_hash(an_ls) != config_hash(load_config(None, ["method.loss=an_ls", "method.loss_args={eps = 0.2}"]))
    assert len(config_hash(a)) == 16 and config_hash(a) == config_hash(load_config(None, ["optim.lr=1e-3"]))
    assert config_diff(a, load_config(None, ["optim.lr=2e-3", "run.threads=2"]), ignore=("run.threads",)) == {"optim.lr": (1e-3, 2e-3)}


@pytest.mark.parametrize("override", ["optim.epochs=0", "optim.lr=-1", "data.batch_size=0", "optim.schedule=linear",
                                      "eval.select=val/nope", "eval.every=0", "data.n_val=0"])
def test_cli_reports_a_bad_value_in_one_line_before_building_data(tmp_path, monkeypatch, capsys, override):
    import mlml.data.pipeline
    import mlml.trainer
    from mlml.cli import main

    def no_data(*args, **kwargs):
        raise AssertionError("data built before the config was validated")

    for module in (mlml.data.pipeline, mlml.trainer):
        monkeypatch.setattr(module, "build_data", no_data)
    assert main(["train", "--out", str(tmp_path / "run"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and override.split("=")[0] in err and err.startswith("mlml train: error: --set")
    assert not (tmp_path / "run").exists()
