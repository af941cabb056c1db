"""What a user sees on the console: our own messages, not the libraries' INFO chatter.

The tiny main job runs once for the module (all three stages read our own params checkpoints); sample and
convert then read its reference checkpoint. Every absl log line in their output must be ours unless it is a
warning or an error, and none may be orbax's `_CHECKPOINT_METADATA` warning; `--log_libraries` brings the
library lines back.
"""

import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT, subprocess_env

# absl's console format: "I1204 18:42:30.491866 140340226907008 checkpoint.py:202] message".
_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^:\s]+):\d+\]", re.MULTILINE)
_OUR_FILES = {
  name
  for folder in (ROOT / "trafl_jax", ROOT / "trafl_jax" / "tasks", ROOT / "scripts")
  for name in os.listdir(folder)
  if name.endswith(".py")
}
_ORBAX_NOISE = (
  "_CHECKPOINT_METADATA",
  "Metadata file does not exist",
  "gbytes_per_sec",
  "Read ratio",
)


def _run(*args, timeout=600) -> subprocess.CompletedProcess:
  env = subprocess_env(devices=1)
  result = subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _library_info_lines(output: str) -> list[str]:
  """The INFO/DEBUG log lines that did not come from our code."""
  return [
    line
    for line in output.splitlines()
    if (m := _LOG_LINE.match(line)) and m.group(1) == "I" and m.group(2) not in _OUR_FILES
  ]


def _assert_quiet(result: subprocess.CompletedProcess) -> None:
  output = result.stdout + result.stderr
  assert not _library_info_lines(output), _library_info_lines(output)
  for noise in _ORBAX_NOISE:
    assert noise not in output


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  result = _run("-m", "trafl_jax.main", "--config=configs/math.py:tiny", f"--workdir={workdir}")
  return workdir, result


def test_log_line_pattern_matches_absl_output():
  line = "I1204 18:42:30.491866 140340226907008 abstract_checkpointer.py:35] orbax-checkpoint"
  assert _library_info_lines(line) == [line]
  ours = "I1204 18:42:03.454063 140418643946368 pipeline.py:47] stage 2: trafl post-training"
  warning = "W1204 18:42:03.727167 140418643946368 checkpoint.py:202] Metadata file does not exist"
  assert _library_info_lines(f"{ours}\n{warning}") == []


def test_main_shows_only_our_messages(main_run):
  _, result = main_run
  _assert_quiet(result)
  assert "stage 2:" in result.stderr and "stage 3:" in result.stderr  # our INFO lines still show
  assert "# Evaluation" in result.stdout


def test_sample_prints_the_answer_without_library_logs(main_run):
  workdir, _ = main_run
  args = (
    "-m",
    "trafl_jax.sample",
    f"--checkpoint={workdir}/reference",
    "--prompt=Numbers: 3 7 2. Target: 17.",
    "--gen_length=16",
    "--steps=16",
    "--block_length=16",
  )
  result = _run(*args)
  _assert_quiet(result)
  assert result.stdout.startswith("=== 0: Numbers: 3 7 2. Target: 17.")
  # Asked for, the libraries' lines come back (and our checkpoint read still does not warn).
  loud = _run(*args, "--log_libraries")
  assert _library_info_lines(loud.stderr) and "gbytes_per_sec" in loud.stderr
  assert "_CHECKPOINT_METADATA" not in loud.stderr
  assert loud.stdout == result.stdout


def test_convert_to_hf_without_library_logs(main_run, tmp_path):
  workdir, _ = main_run
  result = _run(
    "-m", "trafl_jax.convert", f"--src={workdir}/reference", f"--dst={tmp_path / 'hf'}", "--to=hf"
  )
  _assert_quiet(result)
  assert result.stdout.startswith(f"wrote {tmp_path / 'hf'}")
