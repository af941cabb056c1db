"""Every config and variant loads and builds; bad input stops with one clear message."""

import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

from trafl_jax import config_lib, pipeline, sharding

from .conftest import ROOT, subprocess_env

CONFIG_FILES = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(str(ROOT / "configs" / "*.py"))
  if not p.endswith(("__init__.py", "common.py"))
)


def _variants():
  for name in CONFIG_FILES:
    module = importlib.import_module(f"configs.{name}")
    yield name, ""
    for variant in module.VARIANTS:
      yield name, variant


@pytest.mark.parametrize("name,variant", list(_variants()))
def test_every_config_and_variant_loads(name, variant):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(variant)
  assert config.is_locked
  config_lib.check_config(config)  # every key of every section is one something reads
  settings = config_lib.model_settings(config)
  if config.model.preset != "checkpoint":
    assert config_lib.model_config(config).vocab_size == config.model.vocab_size
  assert settings.dtype == config.model.dtype and settings.remat == config.model.remat
  assert config_lib.layout(config).rules == sharding.rules_from_config(config.rules.to_dict())
  assert module.__doc__ and "python -m trafl_jax.main" in module.__doc__
  with pytest.raises(AttributeError):
    config.train.not_a_key = 1  # locked: a typo cannot add a key


def _run_main(*args, timeout=120):
  env = subprocess_env()
  return subprocess.run(
    [sys.executable, "-m", "trafl_jax.main", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize(
  "args,named",
  [
    (["--config.train.num_stepz=7"], "num_stepz"),
    (["--config.trian.num_steps=7"], "trian"),
    (["--config.train.num_steps=seven"], "seven"),
    (["--config=configs/nope.py"], "nope.py"),
  ],
)
def test_mistyped_config_keys_and_files_give_one_clear_line(tmp_path, args, named):
  result = _run_main("--config=configs/math.py:tiny", f"--workdir={tmp_path}", *args)
  assert result.returncode == 2
  assert "error:" in result.stderr and named in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_variant_is_named():
  from configs import math

  with pytest.raises(ValueError, match="tinny"):
    math.get_config("tinny")


def _config(**overrides):
  from configs import math

  config = math.get_config("tiny")
  with config.unlocked():
    config.train.progress = False
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
  return config


def test_missing_data_file_is_named(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    pipeline.reference_stage(
      _config(**{"data.source": "jsonl", "data.train_path": missing}), str(tmp_path / "w")
    )
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_malformed_jsonl_line_is_named(tmp_path):
  path = tmp_path / "bad.jsonl"
  good = json.dumps({"prompt": "1+1=", "answer": "2"})
  path.write_text(good + "\n" + good + "\n{not json\n")
  with pytest.raises(ValueError, match=r"bad.jsonl.*3|3.*bad.jsonl"):
    pipeline.reference_stage(
      _config(**{"data.source": "jsonl", "data.train_path": str(path)}), str(tmp_path / "w")
    )


@pytest.mark.parametrize(
  "mesh,message",
  [
    ({"data": 3, "fsdp": -1}, "does not divide"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices"),
    ({"data": -1, "fsdp": -1}, "at most one axis"),
    ({"pipeline": 2}, "unknown mesh axes"),
  ],
)
def test_bad_mesh_is_named(mesh, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(mesh)


def test_batch_not_dividing_mesh_is_named(tmp_path):
  config = _config(**{"data.batch_size": 12})
  with config.unlocked():
    config.mesh.data = 8
  with pytest.raises(ValueError, match="batch_size 12"):
    pipeline.reference_stage(config, str(tmp_path / "w"))


def test_main_prints_one_clear_line_for_bad_input(tmp_path):
  result = _run_main(
    "--config=configs/math.py:tiny",
    f"--workdir={tmp_path / 'w'}",
    "--config.data.source=jsonl",
    f"--config.data.train_path={tmp_path / 'missing.jsonl'}",
  )
  assert result.returncode == 1
  assert "error:" in result.stderr and "missing.jsonl" in result.stderr
  assert "Traceback" not in result.stderr


def test_post_training_without_a_reference_is_named(tmp_path):
  from configs import code
  from trafl_jax import pipeline

  with pytest.raises(ValueError, match="rl.reference"):
    pipeline.run(code.get_config("cpu"), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_library_info_chatter_is_filtered_but_warnings_and_our_logs_are_not():
  import logging as std_logging

  from trafl_jax import cli

  quiet = cli._QuietLibraries()

  def record(path, level):
    return std_logging.LogRecord("x", level, path, 1, "message", None, None)

  orbax = "/site-packages/orbax/checkpoint/_src/checkpoint_manager.py"
  assert not quiet.filter(record(orbax, std_logging.INFO))
  assert quiet.filter(record(orbax, std_logging.WARNING))
  assert quiet.filter(
    record(os.path.join(os.path.dirname(cli.__file__), "train.py"), std_logging.INFO)
  )
