"""The launchers in launch/: shell syntax, stated needs, the notebook's format, every config, variant, flag
and jax pin they use, and the start/stop/requeue logic of tpu_pod.sh and slurm.sbatch with stand-ins for
gcloud, srun and the trainer."""

import ast
import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT

LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
NOTEBOOK = LAUNCH / "colab.ipynb"
README = LAUNCH / "README.md"

# Where a command line hands its remaining arguments to trafl_jax.main.
MAIN_MARKERS = (
  re.compile(r"trafl_jax\.main\b"),
  re.compile(r"tpu_pod\.sh\s+run\b"),
  re.compile(r"\bsbatch\b[^`]*?launch/slurm\.sbatch\b"),
  re.compile(r"local_multiprocess\.sh\s.*?\s--(?=\s)"),
  re.compile(r"fake_devices\.sh\s+\d+"),
)
FLAG = re.compile(r"(?<![\w-])--([A-Za-z_][\w.]*)")
CONFIG_REF = re.compile(r"configs/(\w+)\.py(?::([\w,]+))?")
JAX_PIN = re.compile(r"\bjax(?:\[[\w,-]+\])?==([0-9][\w.]*)|JAX_VERSION\s*=\s*\"?([0-9][\w.]*)")


def _notebook():
  with open(NOTEBOOK, encoding="utf-8") as f:
    return json.load(f)


def _cell_text(cell) -> str:
  source = cell["source"]
  return source if isinstance(source, str) else "".join(source)


def _texts() -> dict[str, str]:
  """Every launcher's text: scripts, the README, the notebook's cells."""
  texts = {p.name: p.read_text(encoding="utf-8") for p in [*SCRIPTS, README]}
  texts[NOTEBOOK.name] = "\n".join(_cell_text(c) for c in _notebook()["cells"])
  return texts


def _logical_lines(text: str):
  """Lines with backslash continuations joined and comment markers removed (examples in comments count)."""
  joined = re.sub(r"\\\n\s*#?", " ", text)
  for line in joined.splitlines():
    yield line.lstrip().lstrip("#").strip()


def _main_commands():
  """(file, line, the part of the line that trafl_jax.main receives) for every command line."""
  for name, text in _texts().items():
    for line in _logical_lines(text):
      for marker in MAIN_MARKERS:
        match = marker.search(line)
        if match:
          yield name, line, line[match.end() :]
          break


def _config_path(line: str):
  match = CONFIG_REF.search(line)
  return (match.group(1), match.group(2) or "") if match else ("math", "")


def _config_keys(name: str, variant: str) -> set[str]:
  config = importlib.import_module(f"configs.{name}").get_config(variant)

  def walk(d, prefix):
    for k, v in d.items():
      yield prefix + k
      if isinstance(v, dict):
        yield from walk(v, prefix + k + ".")

  return set(walk(config.to_dict(), ""))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_parses_and_states_its_needs(path):
  result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  lines = path.read_text(encoding="utf-8").splitlines()
  assert lines[0].startswith("#!"), f"{path.name}: no shebang"
  header = []
  for line in lines[1:]:
    if not line.startswith("#"):
      break
    header.append(line)
  assert re.search(r"^#\s*Needs:", "\n".join(header), re.M), (
    f"{path.name}: its opening comment block does not start a 'Needs:' line"
  )
  if path.suffix == ".sh":
    assert "set -euo pipefail" in path.read_text(encoding="utf-8"), path.name


def test_notebook_is_nbformat4_without_outputs():
  nb = _notebook()
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert isinstance(nb["metadata"], dict) and nb["cells"]
  kinds = {c["cell_type"] for c in nb["cells"]}
  assert kinds <= {"markdown", "code", "raw"} and {"markdown", "code"} <= kinds
  for i, cell in enumerate(nb["cells"]):
    assert isinstance(cell["metadata"], dict), i
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, (
        f"cell {i} has stored outputs"
      )
      # Shell (!) and magic (%) lines aside, each code cell is valid Python.
      code = "\n".join(
        "pass" if line.lstrip().startswith(("!", "%")) else line
        for line in _cell_text(cell).splitlines()
      )
      ast.parse(code, filename=f"cell {i}")
  first_code = next(_cell_text(c) for c in nb["cells"] if c["cell_type"] == "code")
  assert re.search(r"^REPO_URL = ", first_code, re.M), "REPO_URL is not set in the first code cell"


def test_every_config_and_variant_named_exists():
  refs = {
    (name, m.group(1), m.group(2) or "")
    for name, text in _texts().items()
    for m in CONFIG_REF.finditer(text)
  }
  named_in = {name for name, _, _ in refs}
  assert {"tpu_pod.sh", "slurm.sbatch", "colab.ipynb", "README.md"} <= named_in, named_in
  for where, config, variant in sorted(refs):
    assert (ROOT / "configs" / f"{config}.py").is_file(), f"{where}: no configs/{config}.py"
    module = importlib.import_module(f"configs.{config}")
    unknown = [v for v in variant.split(",") if v and v not in module.VARIANTS]
    assert not unknown, f"{where}: configs/{config}.py has no variant(s) {unknown}"
    module.get_config(variant)


def test_every_flag_passed_to_main_exists():
  script = (
    "import json, trafl_jax.main; from absl import flags; print(json.dumps(sorted(flags.FLAGS)))"
  )
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
  )
  main_flags = set(json.loads(out.stdout.strip().splitlines()[-1]))
  commands = list(_main_commands())
  assert {name for name, _, _ in commands} >= {
    "tpu_pod.sh",
    "slurm.sbatch",
    "colab.ipynb",
    "README.md",
  }
  problems = []
  for name, line, args in commands:
    for flag in FLAG.findall(args):
      if flag.startswith("config."):
        continue  # checked below with every other --config.KEY
      if flag not in main_flags and not (flag.startswith("no") and flag[2:] in main_flags):
        problems.append(f"{name}: --{flag} is not a flag of trafl_jax.main ({line})")
  # --config.KEY overrides, wherever they appear in the launchers, against the config they go with.
  for name, text in _texts().items():
    for line in _logical_lines(text):
      # (All-capital names are placeholders: --config.SECTION.KEY=VALUE.)
      overrides = [k for k in re.findall(r"--config\.([\w.]+)", line) if not k.isupper()]
      if overrides:
        keys = _config_keys(*_config_path(line))
        problems += [f"{name}: no config key {k!r} ({line})" for k in overrides if k not in keys]
  assert not problems, "\n".join(problems)


def test_jax_pin_matches_requirements():
  requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8")
  pins = dict(re.findall(r"^(jax|jaxlib)==(\S+)\s*$", requirements, re.M))
  assert pins.get("jax") and pins.get("jax") == pins.get("jaxlib"), pins
  found = {}
  for name, text in _texts().items():
    for m in JAX_PIN.finditer(text):
      found.setdefault(name, set()).add(m.group(1) or m.group(2))
  assert {"tpu_pod.sh", "slurm.sbatch", "colab.ipynb", "README.md"} <= set(found), found
  wrong = {name: versions for name, versions in found.items() if versions != {pins["jax"]}}
  assert not wrong, f"requirements.txt pins jax=={pins['jax']}; the launchers say {wrong}"


def _stand_in(path, body: str) -> None:
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


# A stand-in for `python -m trafl_jax.main`: runs until SIGTERM, then "saves" and exits 0.
FAKE_TRAINER = (
  "exec python3 -c 'import os, signal, sys, time\n"
  'signal.signal(signal.SIGTERM, lambda *a: (print("saved at SIGTERM", flush=True), sys.exit(0)))\n'
  'print("started", sys.argv[1:], flush=True)\n'
  'print("local devices", os.environ.get("JAX_LOCAL_DEVICE_IDS"), flush=True)\n'
  'time.sleep(60)\' "$@"\n'
)


def test_tpu_pod_run_and_stop(tmp_path):
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  (home / "trafl_venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  _stand_in(bin_dir / "gcloud", f'printf "%s\\n" "$@" > {tmp_path}/gcloud_args\n')
  _stand_in(bin_dir / "mountpoint", "exit 0\n")  # the bucket counts as mounted
  _stand_in(home / "trafl_venv" / "bin" / "python", FAKE_TRAINER)
  env = dict(
    os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home), ZONE="z", BUCKET="bk"
  )
  env.pop("WORKDIR", None)
  script = str(LAUNCH / "tpu_pod.sh")

  # `run` (local side): one ssh to all workers; gs://BUCKET paths become the gcsfuse mount.
  tasks = '--config.eval.tasks=("gsm8k=gs://bk/test.jsonl","math=gs://bk/math.jsonl")'
  subprocess.run(
    ["bash", script, "run", "--config.rl.reference=gs://bk/ckpt", tasks],
    env=dict(env, WORKDIR="gs://bk/runs/x"),
    check=True,
    capture_output=True,
  )
  gcloud_args = (tmp_path / "gcloud_args").read_text().splitlines()
  assert gcloud_args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "trafl"]
  assert "--worker=all" in gcloud_args and "--zone=z" in gcloud_args
  remote = next(a[len("--command=") :] for a in gcloud_args if a.startswith("--command="))
  assert "_worker_start" in remote and "gs://" not in remote
  bad = subprocess.run(
    ["bash", script, "run", "--config.rl.reference=gs://elsewhere/ckpt"],
    env=env,
    capture_output=True,
  )
  assert bad.returncode != 0 and b"only gs://bk" in bad.stderr

  # The worker side of that same command line: started in the background, SIGTERM'd by `stop`.
  worker = remote.split("; ", 1)[1].replace("~/trafl_jax/launch/tpu_pod.sh", script)
  subprocess.run(["bash", "-c", worker], env=env, check=True, capture_output=True, timeout=30)
  pid = int((home / "trafl_run.pid").read_text())
  try:
    again = subprocess.run(["bash", "-c", worker], env=env, capture_output=True, timeout=30)
    assert again.returncode != 0 and b"already going" in again.stderr
    log = (home / "trafl_run.log").read_text()
    assert "--workdir=/gcs/bk/runs/x" in log and '"gsm8k=/gcs/bk/test.jsonl"' in log
    stop = subprocess.run(
      ["bash", script, "_worker_stop"], env=env, capture_output=True, text=True, timeout=30
    )
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    assert "saved at SIGTERM" in (home / "trafl_run.log").read_text()
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)


def test_slurm_requeues_after_checkpoint_at_time_limit(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # srun runs the one task locally; scancel --signal=TERM reaches it; scontrol records the requeue.
  _stand_in(
    bin_dir / "srun",
    f'while [[ "$1" == --* ]]; do shift; done\n"$@" &\necho $! > {tmp_path}/task\nwait $!\n',
  )
  _stand_in(bin_dir / "scancel", f'kill -TERM "$(cat {tmp_path}/task)"\n')
  _stand_in(bin_dir / "scontrol", f'echo "$@" >> {tmp_path}/scontrol\n')
  _stand_in(bin_dir / "python", FAKE_TRAINER)
  env = dict(
    os.environ,
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    SLURM_SUBMIT_DIR=str(ROOT),
    SLURM_JOB_ID="42",
    SLURM_NNODES="2",
    SLURM_NTASKS="2",
    SLURM_JOB_NODELIST="node[1-2]",
    SLURM_GPUS_ON_NODE="4",
    VENV=str(tmp_path / "no_venv"),
    CONFIG="configs/math.py:tiny",
  )
  job = subprocess.Popen(
    ["bash", str(LAUNCH / "slurm.sbatch"), "--config.rl.num_steps=5"],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    deadline = time.time() + 20
    while not (tmp_path / "task").exists() and time.time() < deadline:
      time.sleep(0.1)
    time.sleep(1.0)  # the stand-in trainer installs its SIGTERM handler
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
    out, _ = job.communicate(timeout=20)
  finally:
    job.kill()
  assert job.returncode == 0, out
  assert (
    "started ['-m', 'trafl_jax.main', '--config=configs/math.py:tiny', '--config.rl.num_steps=5']"
    in out
  )
  assert "local devices 0,1,2,3" in out  # one process per node keeps all of its node's GPUs
  assert "saved at SIGTERM" in out
  assert (tmp_path / "scontrol").read_text().split() == ["requeue", "42"]
