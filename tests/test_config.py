"""Config composition and validation: typed values, overrides, and errors that name the key."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from podium.config import CONF_DIR, compose, group_options, load_run_config
from podium.errors import UserError


def _error(overrides: list[str]) -> str:
    with pytest.raises(UserError) as info:
        compose(overrides)
    return str(info.value)


# ---------------------------------------------------------------------------- compose


# the value the shipped experiment file sets, read from the file itself
EXPERIMENT_EPOCHS = OmegaConf.load(CONF_DIR / "experiment" / "digits.yaml").trainer.max_epochs


def test_compose_experiment_digits_is_typed_and_struct():
    cfg = compose(["experiment=digits"])
    assert cfg.name == "digits"
    assert cfg.seed == 0 and isinstance(cfg.seed, int)
    assert cfg.optim.name == "adamw"
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(3e-3)
    assert isinstance(cfg.trainer.max_epochs, int) and cfg.trainer.max_epochs == EXPERIMENT_EPOCHS
    assert cfg.trainer.batch_size == 64
    assert isinstance(cfg.sched.warmup_epochs, float) and cfg.sched.warmup_epochs == 1.0
    assert cfg.task.name == "classification"
    assert cfg.data.name == "digits" and cfg.model.name == "small_cnn" and cfg.loss.name == "cross_entropy"
    # Schema defaults fill keys the YAML does not set.
    assert cfg.trainer.grad_clip_norm == 0.0
    assert cfg.trainer.ema.enabled is False
    assert cfg.model.blocks == 3
    assert cfg.run.root == "runs"
    assert OmegaConf.is_struct(cfg)
    with pytest.raises(Exception):
        cfg.trainer.not_a_key  # noqa: B018


def test_overrides_apply_with_types():
    cfg = compose(["experiment=digits", "optim.lr=1e-3", "trainer.max_epochs=3", "seed=7"])
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float
    assert cfg.trainer.max_epochs == 3 and type(cfg.trainer.max_epochs) is int
    assert cfg.seed == 7


def test_command_line_values_win_over_the_experiment_in_any_order():
    for overrides in (["experiment=digits", "trainer.max_epochs=3"], ["trainer.max_epochs=3", "experiment=digits"]):
        cfg = compose(overrides)
        assert cfg.trainer.max_epochs == 3 and cfg.name == "digits"


def test_group_selection_changes_the_group():
    cfg = compose(["optim=sgd", "sched=step", "model=timm", "tracking=none"])
    assert cfg.optim.name == "sgd" and cfg.optim.nesterov is True
    assert cfg.sched.name == "step" and cfg.sched.interval == "epoch"
    assert cfg.model.name == "timm" and cfg.model.arch == "resnet18"
    assert cfg.tracking.backend == "none"


def test_unknown_key_names_the_key_and_lists_valid_keys():
    message = _error(["trainer.max_epochz=3"])
    assert "trainer.max_epochz" in message
    assert "max_epochs" in message


def test_unknown_key_after_experiment_names_the_key():
    message = _error(["experiment=digits", "trainer.max_epochz=3"])
    assert "trainer.max_epochz" in message and "max_epochs" in message


def test_wrong_type_names_the_key():
    message = _error(["trainer.max_epochs=abc"])
    assert "trainer.max_epochs" in message
    assert "abc" in message


def test_wrong_type_message_names_the_expected_type():
    message = _error(["trainer.max_epochs=abc"])
    assert "typing.Any" not in message
    assert "int" in message.lower()


def test_unknown_group_option_lists_choices():
    message = _error(["optim=foo"])
    assert "foo" in message
    for option in ("adamw", "sgd", "nadam"):
        assert option in message
    assert group_options("optim") == ["adamw", "nadam", "sgd"]


@pytest.mark.parametrize(
    "overrides, choices",
    [
        (["sched=step", "sched.interval=hour"], ("epoch", "step")),
        (["sched=exponential", "sched.interval=hour"], ("epoch", "step")),
        (["tracking.backend=x"], ("mlflow", "none")),
        (["trainer.accelerator=tpu"], ("cpu", "cuda")),
        (["optim.name=foo"], ("adamw", "sgd", "nadam")),
    ],
)
def test_closed_choices_are_checked(overrides, choices):
    message = _error(overrides)
    key = overrides[-1].split("=")[0]
    assert key in message
    for choice in choices:
        assert choice in message


def test_sched_interval_under_default_cosine_lists_choices():
    # cosine.yaml does not set `interval`; the schema, not the YAML, decides what is valid.
    message = _error(["sched.interval=hour"])
    assert "sched.interval" in message
    assert "unknown config key" not in message
    assert "epoch" in message and "step" in message


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("trainer.grad_clip_norm=1.0", "trainer.grad_clip_norm", 1.0),
        ("trainer.ema.enabled=true", "trainer.ema.enabled", True),
        ("optim.momentum=0.5", "optim.momentum", 0.5),
        ("sched.interval=step", "sched.interval", "step"),
        ("model.blocks=4", "model.blocks", 4),
    ],
)
def test_schema_keys_missing_from_yaml_can_be_overridden(override, key, expected):
    # e.g. trainer/default.yaml does not set grad_clip_norm, yet it is a TrainerConfig key.
    cfg = compose([override])
    assert OmegaConf.select(cfg, key) == expected


def test_unknown_key_hint_lists_schema_keys():
    # The hint lists the schema's keys, not only those the YAML happens to set.
    message = _error(["trainer.max_epochz=3"])
    assert "grad_clip_norm" in message and "early_stopping" in message


@pytest.mark.parametrize("overrides", [["model.widht=3"], ["experiment=digits", "model.widht=3"]])
def test_task_group_key_unknown_to_registered_schema(overrides):
    message = _error(overrides)
    assert "model.widht" in message
    assert "width" in message


def test_unknown_registered_name_is_a_user_error():
    message = _error(["model.name=no_such_model"])
    assert "no_such_model" in message and "small_cnn" in message


def test_top_level_unknown_key_and_bad_seed():
    assert "foo" in _error(["foo=3"])
    assert "seed" in _error(["seed=abc"])


# ---------------------------------------------------------------------------- run configs


@pytest.fixture
def run_dir(tmp_path):
    cfg = compose(["experiment=digits"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return tmp_path


def test_load_run_config_applies_overrides(run_dir):
    cfg = load_run_config(run_dir, ["optim.lr=1e-4", "trainer.max_epochs=2", "sched.interval=step",
                                    "trainer.grad_clip_norm=0.5"])
    assert cfg.name == "digits"
    assert cfg.optim.lr == pytest.approx(1e-4) and type(cfg.optim.lr) is float
    assert cfg.trainer.max_epochs == 2 and type(cfg.trainer.max_epochs) is int
    assert cfg.sched.interval == "step"
    assert cfg.trainer.grad_clip_norm == 0.5
    assert OmegaConf.is_struct(cfg)
    assert load_run_config(run_dir).trainer.max_epochs == EXPERIMENT_EPOCHS


def test_load_run_config_errors(run_dir, tmp_path_factory):
    with pytest.raises(UserError, match="trainer.max_epochz") as info:
        load_run_config(run_dir, ["trainer.max_epochz=3"])
    assert "max_epochs" in str(info.value)
    with pytest.raises(UserError, match="trainer.max_epochs"):
        load_run_config(run_dir, ["trainer.max_epochs=abc"])
    with pytest.raises(UserError, match="sched.interval"):
        load_run_config(run_dir, ["sched.interval=hour"])
    with pytest.raises(UserError, match="key=value"):
        load_run_config(run_dir, ["optim.lr"])
    empty = tmp_path_factory.mktemp("not_a_run")
    with pytest.raises(UserError, match="not a podium run folder"):
        load_run_config(empty)


def test_the_engine_reads_run_configs_without_importing_podium_config():
    """The arrows point cli -> config -> engine: the engine's inference modules load a run's
    config from `podium.engine.runconfig`; `podium.config` re-exports the same function."""
    code = ("import sys, podium.engine.session, podium.engine.runcard, podium.engine.runconfig\n"
            "assert 'podium.config' not in sys.modules, 'the engine imported podium.config'\n"
            "import podium.config, podium.engine.runconfig as r\n"
            "assert podium.config.load_run_config is r.load_run_config\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- CLI


def _podium(*args: str, cwd) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.Popen([sys.executable, "-m", "podium", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_config_errors_exit_2_without_traceback(tmp_path):
    # Both commands run in parallel to keep the test fast.
    procs = {
        "unknown_key": _podium("train", "trainer.max_epochz=3", cwd=tmp_path),
        "unknown_option": _podium("train", "optim=foo", cwd=tmp_path),
    }
    results = {name: (p.wait(timeout=120), *p.communicate()) for name, p in procs.items()}

    code, out, err = results["unknown_key"]
    assert code == 2, out + err
    assert "trainer.max_epochz" in out + err
    assert "Traceback" not in out + err

    code, out, err = results["unknown_option"]
    assert code == 2, out + err
    assert "foo" in out + err and "adamw" in out + err
    assert "Traceback" not in out + err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_cli_help_is_fast_and_cli_does_not_import_torch(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "podium", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout
    assert elapsed < 10

    code = "import podium.cli, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_an_older_run_accepts_overrides_of_keys_its_groups_gained_since(tmp_path, digits_run):
    """A run made before a key existed (its config.yaml lacks it) takes the key as an override,
    from an engine group's schema or its own registered task's; an unknown key is still refused."""
    import shutil

    import yaml

    from podium.engine.runconfig import load_run_config
    from podium.errors import UserError

    run = tmp_path / "old"
    shutil.copytree(digits_run, run)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    del raw["trainer"]["checkpoint_every_n_epochs"]
    raw.pop("sweep", None)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_run_config(run, ["trainer.checkpoint_every_n_epochs=2", "sweep.trials=3"])
    assert cfg.trainer.checkpoint_every_n_epochs == 2 and cfg.sweep.trials == 3
    with pytest.raises(UserError, match="unknown config key 'trainer.no_such_key'"):
        load_run_config(run, ["trainer.no_such_key=1"])
