"""train.loggers (engine/loggers.py, engine/metrics.py): W&B and MLflow receive metrics.csv's values
and the config, continue their run on resume, and are never imported unless chosen."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec

import pytest

from hvpmtl.engine.config import TrainConfig
from hvpmtl.engine.loggers import IDS_FILE, check_loggers
from hvpmtl.engine.metrics import MetricsLogger, read_metrics

from .conftest import TINY, env_with_src

KEYS = ("loss", "loss_mlc")
CONFIG = {"optim": {"lr": 1e-4, "betas": [0.9, 0.999]}, "train": {"seed": 0, "loggers": ["wandb"]}}


def fake_module(name: str, calls: list, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = ModuleSpec(name, None)
    for attr, value in attrs.items():
        setattr(module, attr, value)
    module.calls = calls
    return module


@pytest.fixture
def fake_wandb(monkeypatch):
    calls: list = []

    class Run:
        id = "run-7"

        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", calls, init=init))
    return calls


@pytest.fixture
def fake_mlflow(monkeypatch):
    calls: list = []

    def record(name, result=None):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result

        return call

    active = types.SimpleNamespace(info=types.SimpleNamespace(run_id="ml-3"))
    names = ("set_tracking_uri", "set_experiment", "log_params", "log_dict", "log_metrics", "end_run")
    module = fake_module("mlflow", calls, start_run=record("start_run", active), **{n: record(n) for n in names})
    monkeypatch.setitem(sys.modules, "mlflow", module)
    return calls


def rows(start: int, n: int) -> list[dict]:
    out = []
    for step in range(start + 1, start + n + 1):
        out.append({"step": step, "epoch": step / 4, "lr": 1e-3 * step, "wd": 0.05, "loss": 2.0 / step,
                    "loss_mlc": math.nan if step == 2 else 0.5 * step, "grad_norm": 1.5, "img_per_s": 100.0,
                    "skipped_steps": 0})  # fmt: skip
    return out


def run_logger(run_dir, loggers, settings, start=0, n=3):
    run_dir.mkdir(exist_ok=True)
    logger = MetricsLogger(run_dir, KEYS, 10, start, 8, progress=False, loggers=loggers, settings=settings,
                           config=CONFIG)  # fmt: skip
    logger.log(rows(start, n))
    logger.close()
    return logger


def test_wandb_gets_config_and_every_csv_value_then_resumes_its_run(tmp_path, fake_wandb):
    settings = TrainConfig()
    settings.wandb.project, settings.wandb.tags = "hvp", ("a",)
    logger = run_logger(tmp_path / "run", ("wandb",), settings)
    assert logger.tb is None and not (tmp_path / "run" / "tb").exists()  # tensorboard not chosen
    init = fake_wandb[0]
    assert init == ("init", {"project": "hvp", "entity": None, "name": "run", "dir": str(tmp_path / "run"),
                             "config": CONFIG, "id": None, "resume": None, "mode": None, "tags": ["a"]})  # fmt: skip
    logged = [c for c in fake_wandb if c[0] == "log"]
    csv = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [step for _, _, step in logged] == [1, 2, 3] == [int(r["step"]) for r in csv]
    for (_, data, _), row in zip(logged, csv):
        expected = {f"train/{k}": v for k, v in row.items() if k != "step" and math.isfinite(v)}
        assert data == pytest.approx(expected, rel=1e-5)
    assert "train/loss_mlc" not in logged[1][1] and logged[2][1]["train/loss_mlc"] == 1.5
    assert fake_wandb[-1] == ("finish",)
    assert json.loads((tmp_path / "run" / IDS_FILE).read_text()) == {"wandb": "run-7"}

    fake_wandb.clear()
    run_logger(tmp_path / "run", ("wandb",), settings, start=3, n=1)
    assert fake_wandb[0][1]["id"] == "run-7" and fake_wandb[0][1]["resume"] == "allow"
    assert [c[2] for c in fake_wandb if c[0] == "log"] == [4]


def test_mlflow_gets_params_config_and_metrics_then_resumes_its_run(tmp_path, fake_mlflow):
    settings = TrainConfig()
    settings.mlflow.tracking_uri, settings.mlflow.run_name = "file:///tmp/mlruns", "first"
    run_logger(tmp_path / "run", ("tensorboard", "mlflow"), settings)
    assert (tmp_path / "run" / "tb").is_dir()
    names = [c[0] for c in fake_mlflow]
    assert names == ["set_tracking_uri", "set_experiment", "start_run", "log_params", "log_dict",
                     "log_metrics", "log_metrics", "log_metrics", "end_run"]  # fmt: skip
    assert fake_mlflow[0][1] == ("file:///tmp/mlruns",) and fake_mlflow[1][1] == ("hvpmtl",)
    assert fake_mlflow[2][2] == {"run_id": None, "run_name": "first"}
    assert fake_mlflow[3][1] == ({"optim.lr": "0.0001", "optim.betas": "[0.9, 0.999]", "train.seed": "0",
                                  "train.loggers": "['wandb']"},)  # fmt: skip
    assert fake_mlflow[4][1] == (CONFIG, "config.json")
    first = fake_mlflow[5]
    assert first[2] == {"step": 1} and first[1][0]["train/loss"] == 2.0 and first[1][0]["train/lr"] == 1e-3
    assert "train/step" not in first[1][0]

    fake_mlflow.clear()
    run_logger(tmp_path / "run", ("mlflow",), settings, start=3, n=1)
    assert [c[0] for c in fake_mlflow] == ["set_tracking_uri", "start_run", "log_metrics", "end_run"]
    assert fake_mlflow[1][2] == {"run_id": "ml-3", "run_name": None}  # no parameters logged twice


def test_disabled_logger_writes_no_trackers(tmp_path, fake_wandb):
    logger = MetricsLogger(tmp_path, KEYS, 10, 0, 8, enabled=False, loggers=("wandb",), settings=TrainConfig())
    logger.log(rows(0, 2))
    logger.close()
    assert fake_wandb == [] and not (tmp_path / IDS_FILE).exists()  # ranks other than 0 log nothing


def test_missing_package_names_the_extra(monkeypatch, run_cli, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # an import of it fails: not installed
    with pytest.raises(ValueError, match=r"train\.loggers: 'mlflow' needs the mlflow package: pip install "
                       r"'hvpmtl\[mlflow\]'"):  # fmt: skip
        check_loggers(["tensorboard", "mlflow"])
    rc, _, err = run_cli("pretrain", *TINY, "train.loggers=[mlflow]", f"train.output_dir={tmp_path / 'run'}")
    assert rc == 2 and "pip install 'hvpmtl[mlflow]'" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("value, message", [("[neptune]", "unknown"), ("[wandb, wandb]", "lists a logger twice")])
def test_bad_logger_lists_are_config_errors(value, message):
    from hvpmtl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"train\.loggers=.*{message}"):
        load_config("cpu-tiny", [f"train.loggers={value}"])


@pytest.mark.slow
def test_trackers_are_not_imported_unless_chosen(tmp_path):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("wandb", "mlflow"):
            raise ImportError("imported " + name)
sys.meta_path.insert(0, Block())
import hvpmtl, hvpmtl.cli, hvpmtl.engine.loop
from hvpmtl.config import load_config
from hvpmtl.engine.metrics import MetricsLogger
cfg = load_config("cpu-tiny")
logger = MetricsLogger({str(tmp_path)!r}, ("loss",), 4, 0, 8, progress=False, loggers=cfg.train.loggers,
                       settings=cfg.train, config={{}})
logger.log([{{"step": 1, "epoch": 0.1, "lr": 0.1, "wd": 0.0, "loss": 1.0, "grad_norm": 1.0, "img_per_s": 1.0,
             "skipped_steps": 0}}])
logger.close()
assert not {{"wandb", "mlflow"}} & set(sys.modules), sorted(sys.modules)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], env=env_with_src(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert (tmp_path / "tb").is_dir()


@pytest.mark.slow
def test_pretrain_sends_its_rows_to_the_chosen_tracker(run_cli, tmp_path, fake_wandb):
    out = tmp_path / "run"
    rc, _, _ = run_cli("pretrain", *TINY, "train.max_steps=4", "train.log_every=2", "train.loggers=[wandb]",
                       f"train.output_dir={out}")  # fmt: skip
    assert rc == 0
    init = fake_wandb[0][1]
    assert init["config"]["train"]["loggers"] == ["wandb"] and init["config"]["train"]["max_steps"] == 4
    logged = {step: data for name, *rest in fake_wandb if name == "log" for data, step in [rest]}
    csv = read_metrics(out / "metrics.csv")
    assert sorted(logged) == [int(r["step"]) for r in csv] == [1, 2, 3, 4]
    for r in csv:
        assert logged[int(r["step"])]["train/loss"] == pytest.approx(r["loss"], rel=1e-5)
    assert not (out / "tb").exists() and json.loads((out / IDS_FILE).read_text()) == {"wandb": "run-7"}
