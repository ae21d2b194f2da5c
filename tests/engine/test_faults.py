"""Test-only fault injection (engine/faults.py): environment variables, not config keys."""

from __future__ import annotations

import math
import os

import pytest
import torch

import hvpmtl
from hvpmtl.config import ConfigError
from hvpmtl.engine.faults import NAN_AT_STEP, STOP_AFTER, Faults, SimulatedCrash, inject


def test_faults_come_from_the_environment_and_default_to_none():
    assert Faults.from_env({}) == Faults(stop_after=0, nan_at_step=-1)
    assert Faults.from_env({STOP_AFTER: "3", NAN_AT_STEP: " 0 "}) == Faults(stop_after=3, nan_at_step=0)
    with pytest.raises(ValueError, match="HVPMTL_FAULT_STOP_AFTER='two': expected an integer"):
        Faults.from_env({STOP_AFTER: "two"})


def test_inject_sets_the_variables_for_its_block_only(monkeypatch):
    monkeypatch.setenv(NAN_AT_STEP, "7")
    monkeypatch.delenv(STOP_AFTER, raising=False)
    with inject(stop_after=2):
        assert Faults.from_env() == Faults(stop_after=2, nan_at_step=7)
    assert STOP_AFTER not in os.environ and os.environ[NAN_AT_STEP] == "7"


def test_poison_and_crash_act_from_their_step_on():
    out = {"loss": torch.tensor(1.0), "loss_mim": torch.tensor(2.0), "logits": torch.ones(2)}
    faults = Faults(stop_after=2, nan_at_step=1)
    assert faults.poison(out, 0) is out
    poisoned = faults.poison(out, 1)
    assert math.isnan(poisoned["loss"]) and math.isnan(poisoned["loss_mim"])
    assert torch.equal(poisoned["logits"], out["logits"])
    faults.crash_after(1, done=False)
    faults.crash_after(2, done=True)  # a finished run does not crash
    with pytest.raises(SimulatedCrash, match="simulated crash after step 2"):
        faults.crash_after(2, done=False)


@pytest.mark.parametrize("key, default, variable", [("stop_after", 0, STOP_AFTER), ("nan_at_step", -1, NAN_AT_STEP)])
def test_the_retired_config_keys(key, default, variable):
    # an earlier run's saved config holds the old default: it still loads
    assert not hasattr(hvpmtl.load_config(None, [f"train.{key}={default}"]).train, key)
    message = f"'train.{key}' is no longer a config key: use the environment variable {variable}"
    with pytest.raises(ConfigError, match=message):
        hvpmtl.load_config(None, [f"train.{key}=2"])
