import pytest

from mlml.config import Config, ConfigError, from_dict, load_config, parse_override, to_toml


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr=3e-4", "method.loss=an_ls", "data.synthetic.image_size=16", "method.loss_args={eps = 0.2}"])
    assert cfg.optim.lr == 3e-4 and cfg.method.loss == "an_ls"
    assert cfg.data.synthetic.image_size == 16
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
