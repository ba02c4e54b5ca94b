"""Config: paper defaults, TOML + --set overrides, validation errors that quote the bad value."""

from pathlib import Path

import pytest

from csmf.errors import ConfigError
from trainer.config import RunConfig, apply_override, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_paper_defaults():
    cfg = RunConfig()
    assert cfg.objectives == ("exposure", "click", "conversion")
    assert cfg.cascade.tau == 0.75 and cfg.cascade.pruning == "cpp"
    assert cfg.cascade.accuracy_recovery and cfg.loss.aml and cfg.loss.log_q
    assert cfg.loss.eta == 1.8
    assert cfg.eval.weights == (1.0, 1.8, 1.2) and cfg.eval.n == 50
    assert cfg.model.num_objectives == 3 and cfg.model.out_dim == 64


@pytest.mark.parametrize("name", ["ml-100k.toml", "synthetic.toml"])
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(CONFIGS / name)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_parse_toml_values():
    cfg = load_config(
        CONFIGS / "ml-100k.toml",
        ["cascade.tau=0.5", "train.epochs=[4, 3, 2]", "loss.aml=false", "cascade.pruning=fixed"],
    )
    assert cfg.cascade.tau == 0.5 and cfg.train.epochs == (4, 3, 2)
    assert cfg.loss.aml is False and cfg.cascade.pruning == "fixed"
    assert cfg.train.stage_epochs(2) == 2


def test_two_objective_cascade_sets_model_objectives():
    cfg = load_config(None, ["cascade.objectives=['click','conversion']", "eval.weights=[1, 1]"])
    assert cfg.model.num_objectives == 2


@pytest.mark.parametrize(
    ("override", "quoted"),
    [
        ("cascade.tau=1.5", "1.5"),
        ("cascade.pruning='magnitude'", "'magnitude'"),
        ("cascade.objectives=['click','exposure']", "'click', 'exposure'"),
        ("loss.temperature=0", "0"),
        ("train.epochs=[1, 2]", "[1, 2]"),
        ("cascade.bogus=1", "bogus"),
        ("train.threads=-1", "-1"),
    ],
)
def test_bad_values_are_config_errors_quoting_the_value(override, quoted):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert quoted in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=2.5", "train.batch_size must be an integer, got 2.5 (float)"),
        ("train.batch_size=lots", "train.batch_size must be an integer, got 'lots' (a string)"),
        ("train.lr=[0.1, 'x']", "train.lr must be a number or a list of them, got [0.1, 'x']"),
        ("cascade.accuracy_recovery=1", "cascade.accuracy_recovery must be a boolean, got 1"),
        ("model.hidden=[64, 2.5]", "model.hidden must be an integer or a list of them"),
        ("model.activation=3", "model.activation must be a string, got 3 (int)"),
        ("eval.n=true", "eval.n must be an integer, got True (bool)"),
    ],
)
def test_config_values_are_type_checked_against_the_dataclass_fields(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message)
    # what the types allow still passes: an int where a number goes, one value for a list
    cfg = load_config(None, ["loss.sigma=1", "train.lr=0.01", "model.hidden=[64, 32]"])
    assert cfg.loss.sigma == 1 and cfg.train.lr == (0.01,) and cfg.model.hidden == (64, 32)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "tau=0.5")
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.toml")


def test_threads_setting_sets_torch_threads(tmp_path):
    """train.threads reaches torch (prepare() applies it before any work)."""
    import torch

    from csmf.errors import DataError
    from trainer.pipeline import prepare

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs with 1 (tests/conftest.py): 1 must come from cfg
    cfg = load_config(CONFIGS / "ml-100k.toml", ["train.threads=1"])
    try:
        with pytest.raises(DataError):  # no dataset there; the threads are set before loading
            prepare(cfg, tmp_path / "missing")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
