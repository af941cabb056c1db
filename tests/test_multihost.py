"""Multi-process runs on localhost (launch/local_multiprocess.sh): 2 processes x 4 CPU devices post-train
with the same losses as 1 process x 8 devices, and a 2-process run stopped by SIGTERM resumes exactly."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from configs import math as math_config
from trafl_jax import distributed, pipeline

from .conftest import ROOT, subprocess_env

LAUNCHER = str(ROOT / "launch" / "local_multiprocess.sh")
STEPS = 10
# Countdown over two numbers in 1..5: a 300-step tiny reference solves some of the post-training part's
# 10 problems (it trained on the SFT part's 20), so rewards vary and each process's scoring of its own rows
# is part of what is compared.
DATA = {"countdown_numbers": 2, "countdown_max_number": 5}


def _flags(reference: str, workdir: str, **rl) -> list[str]:
  flags = [
    "--config=configs/math.py:tiny",
    "--config.stages=('posttrain',)",
    f"--config.rl.reference={reference}",
    f"--config.rl.num_steps={STEPS}",
    "--config.rl.eval_every=0",
    "--config.rl.train_limit=0",
    "--config.train.progress=False",
    f"--workdir={workdir}",
  ]
  flags += [f"--config.data.{k}={v}" for k, v in DATA.items()]
  return flags + [f"--config.rl.{k}={v}" for k, v in rl.items()]


def _launch(processes: int, devices: int, flags: list[str], log_dir) -> subprocess.Popen:
  env = subprocess_env(devices=None)  # the launcher sets the devices
  env["LOG_DIR"] = str(log_dir)
  return subprocess.Popen(
    [LAUNCHER, str(processes), str(devices), "--", *flags],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(proc: subprocess.Popen, log_dir, timeout: float = 600) -> str:
  out, _ = proc.communicate(timeout=timeout)
  logs = "".join(p.read_text() for p in sorted(log_dir.glob("process_*.log")))
  assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{logs[-3000:]}"
  return out


def _metrics_of(run_dir) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "step" in r and ("rl/loss" in r or "train/loss" in r)]


def _metrics(workdir: str) -> list[dict]:
  return _metrics_of(os.path.join(workdir, "trafl"))


def _by_step(records: list[dict]) -> dict[int, dict]:
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), f"a step was logged twice (more than one writer?): {steps}"
  return {r["step"]: r for r in records}


COMPARED = ("rl/loss", "rl/reward_mean", "rl/kl_estimate", "trafl/log_z_mean", "rl/grad_norm")


def _assert_same(a: dict[int, dict], b: dict[int, dict], steps, tol: float) -> None:
  for step in steps:
    for key in COMPARED:
      # The gradient norm sums every parameter's squared gradient in a layout-dependent order, and the
      # steps compound it: 1 x 8 vs 2 x 4 measured up to 1.4e-5 relative by step 10 (losses 3e-7).
      bound = tol * (10 if key == "rl/grad_norm" else 1)
      assert abs(a[step][key] - b[step][key]) <= bound * max(1.0, abs(a[step][key])), (
        f"step {step} {key}: {a[step][key]} vs {b[step][key]}"
      )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  config = math_config.get_config("tiny")
  with config.unlocked():
    config.train.progress = False
    config.train.num_steps = 300
    config.optim.lr = 3e-3
    config.data.update(DATA)
  path = str(tmp_path_factory.mktemp("multihost") / "reference")
  pipeline.reference_stage(config, path)
  return path


@pytest.fixture(scope="module")
def two_process_run(reference, tmp_path_factory):
  root = tmp_path_factory.mktemp("two")
  _finish(_launch(2, 4, _flags(reference, str(root / "run")), root), root)
  return _by_step(_metrics(str(root / "run")))


def test_two_processes_log_the_losses_of_one(reference, two_process_run, tmp_path):
  _finish(_launch(1, 8, _flags(reference, str(tmp_path / "run")), tmp_path), tmp_path)
  one = _by_step(_metrics(str(tmp_path / "run")))
  assert sorted(one) == sorted(two_process_run) == list(range(1, STEPS + 1))
  assert any(r["rl/reward_mean"] > 0 for r in one.values()), "no reward: scoring is not exercised"
  _assert_same(one, two_process_run, range(1, STEPS + 1), 1e-5)


def test_sigterm_stops_two_processes_and_the_rerun_resumes(reference, two_process_run, tmp_path):
  workdir = str(tmp_path / "run")
  flags = _flags(reference, workdir, ckpt_every=1000)  # saves only when stopped or done
  proc = _launch(2, 4, flags, tmp_path)
  metrics_file = os.path.join(workdir, "trafl", "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics_file):
      with open(metrics_file) as f:
        if '"rl/loss"' in f.read():
          break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be stopped"
  proc.send_signal(signal.SIGTERM)  # the launcher passes it to both processes
  _finish(proc, tmp_path)
  saved = sorted(
    int(d) for d in os.listdir(os.path.join(workdir, "trafl", "checkpoints")) if d.isdigit()
  )
  assert len(saved) == 1 and 1 <= saved[0] < STEPS, (
    f"expected one mid-run checkpoint, found {saved}"
  )
  first = _by_step(_metrics(workdir))
  assert max(first) == saved[0]

  out = _finish(_launch(2, 4, flags, tmp_path), tmp_path)
  assert "resuming post-training" in out
  resumed = _by_step(_metrics(workdir))  # both invocations' records, each step once
  assert sorted(resumed) == list(range(1, STEPS + 1))
  _assert_same(resumed, two_process_run, range(1, STEPS + 1), 1e-6)


def test_distributed_settings_come_from_flags_then_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
  assert distributed.settings(environ=env, tpu_vm=False) == {
    "coordinator_address": "h:1",
    "num_processes": 4,
    "process_id": 2,
  }
  assert distributed.settings("auto", "x:9", 2, 1, environ=env, tpu_vm=False) == {
    "coordinator_address": "x:9",
    "num_processes": 2,
    "process_id": 1,
  }
  assert distributed.settings("no", environ=env, tpu_vm=False) is None
  assert distributed.settings(environ={}, tpu_vm=False) is None
  assert distributed.settings(num_processes=1, environ={}, tpu_vm=False) is None


def test_distributed_detects_slurm_and_tpu_vms():
  slurm = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
  }
  assert distributed.settings(environ=slurm, tpu_vm=False) == {}
  assert distributed.settings(environ={**slurm, "SLURM_NTASKS": "1"}, tpu_vm=False) is None
  assert distributed.settings(environ={}, tpu_vm=True) == {}
  assert distributed.settings("yes", environ={}, tpu_vm=False) == {}


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(num_processes=2, process_id=0), "--coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2), "--process_id"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "not in [0, 2)"),
    (dict(environ={"JAX_NUM_PROCESSES": "two"}), "JAX_NUM_PROCESSES must be an integer"),
    (dict(mode="maybe"), "--distributed"),
  ],
)
def test_distributed_settings_name_what_is_wrong(kwargs, message):
  kwargs = {"environ": {}, "tpu_vm": False, **kwargs}
  with pytest.raises(ValueError, match=re.escape(message)):
    distributed.settings(**kwargs)


def test_the_whole_main_job_runs_on_two_processes(tmp_path):
  """Reference training (each process reads its rows), post-training and evaluation; one writer."""
  workdir = tmp_path / "run"
  flags = ["--config=configs/math.py:tiny", "--config.train.progress=False", f"--workdir={workdir}"]
  out = _finish(_launch(2, 4, flags, tmp_path), tmp_path)
  assert "reports:" in out
  summary = json.loads((workdir / "eval" / "eval.json").read_text())
  rows = {r["checkpoint"] for r in summary["results"]}
  # The target row (the reference tilted at the run's beta) comes with the reference.
  assert rows == {"reference", "target (beta=2)", "trafl"}
  records = [json.loads(line) for line in (workdir / "eval" / "eval_records.jsonl").open()]
  keys = [(r["checkpoint"], r["task"], r["gen_length"], r["id"]) for r in records]
  assert len(keys) == len(set(keys)) == 2 * 6  # two checkpoints x 6 problems, each written once
  for stage in ("reference", "trafl"):
    assert _by_step(_metrics_of(workdir / stage))


def test_scoring_work_is_split_over_processes_and_gathered_in_order(tmp_path):
  proc = subprocess.Popen(
    [LAUNCHER, "2", "1", "--"],
    cwd=ROOT,
    env={**os.environ, "LOG_DIR": str(tmp_path), "MODULE": "tests.multiprocess_worker"},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  out = _finish(proc, tmp_path, timeout=120) + (tmp_path / "process_1.log").read_text()
  results = {
    r["process"]: r
    for r in (json.loads(line[len("RESULT ") :]) for line in out.splitlines() if "RESULT " in line)
  }
  items = ["x" * i for i in range(11)]
  assert sorted(results) == [0, 1]
  for process, result in results.items():
    assert result["seen"] == items[process::2]  # each process scored only its share
    assert result["out"] == [
      len(item) * 0.5 for item in items
    ]  # and every process has all, in order


def test_main_names_missing_multi_process_settings(tmp_path):
  out = subprocess.run(
    [
      "python3",
      "-m",
      "trafl_jax.main",
      "--config=configs/math.py:tiny",
      f"--workdir={tmp_path}",
      "--num_processes=2",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"},
  )
  assert out.returncode == 1
  assert "error: a multi-process run also needs --coordinator_address" in out.stderr
  assert "--process_id" in out.stderr
  assert not any(tmp_path.iterdir())  # nothing was started or written
