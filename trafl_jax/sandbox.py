"""Runs untrusted programs against their tests, for the rewards of code tasks (HumanEval, MBPP).

Isolation. Every run is its own session/process group under a wall-clock timeout, after which all of it
is SIGKILLed. `isolation() == "bwrap"`: bubblewrap with new pid, net, ipc and uts namespaces, `/` bound
read-only, fresh `/dev` and `/proc`, tmpfs `/run` and `/tmp` (size-capped; `/tmp/work` is the working
directory and vanishes with the sandbox), `--die-with-parent`, no capabilities, no_new_privs, and only
PATH/LANG/HOME/TMPDIR in the environment; killing it kills the namespace's init and so everything
inside. `"rlimits"` (no usable bwrap; warned once): the same limits, uid and environment, under
`unshare --net --pid --mount-proc` when that works, in a `mkdtemp` directory removed afterwards.
As root, the program runs as a fresh uid (unique per concurrent run; `setpriv`): the kernel ignores
RLIMIT_NPROC for uid 0, that uid cannot write root's files, and after the run every process it owns is
found and killed. A Python under a directory others cannot enter (`/root`) is re-exposed to it by a
tmpfs over that directory holding read-only binds of the interpreter's prefixes (bwrap), or replaced by
the system's same-version Python (rlimits). The harness sets RLIMIT_AS/CPU/FSIZE, CORE=0 and NPROC
(the processes already running as its uid plus `max_processes`) before any program code runs.

Pass detection. The parent hands the harness three fds: a memfd with the job (program, tests, limits), a
pipe holding a random per-run nonce (write end closed), and a record pipe. The harness reads the job,
closes every other fd, sets the limits, snapshots `builtins`, writes `S`, compiles the program and each
top-level test statement, runs the program, then each test statement in a namespace with the program's
names but a pristine copy of the builtins (patching `builtins` cannot change what tests compute). After
the last one it ends the way `python prog.py` ends: `threading._shutdown()` runs the
`concurrent.futures` exit hooks and joins every non-daemon thread (daemon ones are abandoned), so a
thread that never ends times out as a top-level endless loop does. Then it checks that stdout/stderr are
still the original pipes and that no other process is alive (in the pid namespace, else of its uid or
session), and only then reads the nonce and writes `P <nonce> <statements run>`; failures write
`F`/`E`/`L`/`T` and a reason. The parent passes a run only if (a) the sandbox exited 0, (b) the records
are exactly `S` and that `P` line with its nonce, (c) the count equals the number of top-level
statements in `tests` (HumanEval's last is `check(...)`, so it returned; each MBPP assert counts), (d)
nothing of the run is alive afterwards, (e) neither timeout nor output limit was hit. So early exits
(`sys.exit`, `os._exit`, `SystemExit`), printed or forged markers, closed or replaced stdout/stderr,
patched `print`/`sys.exit`/`builtins`, killing the parent (out of reach: EPERM or ignored) and
background processes all fail.

Statuses: passed | failed (a test statement raised) | error (the program raised or does not compile, or
the tests do not parse) | timeout (also a non-daemon thread that never ends) | output_limit (over
`output_bytes` of stdout+stderr, which are kept up to that bound) | killed (a signal, e.g. SIGXCPU) |
exited (ended before its tests completed) | leftover (a process outlived the tests) | tampered (forged,
repeated or missing records, stdout/stderr closed or replaced, the nonce taken) | sandbox_error (the
sandbox did not start).

NOT protected: code written against this harness can forge a pass (read the nonce fd first, or reach
the harness's frames via `sys._getframe`, tracing or `gc`); objects whose `__eq__` is always True pass
`==` asserts; modules the tests import (`math`) can be patched; RLIMIT_AS and RLIMIT_CPU are per process
(NPROC bounds the product) and the fallback's disk use is bounded per file only; without bwrap the
program can write world-writable host paths (`/tmp`, `/dev/shm`), and without root as well it runs as
the caller's uid (it could signal the caller; `setsid` escapes the leftover check). The program's
`__name__` is `__sandbox__`, so `if __name__ == "__main__":` blocks do not run.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from absl import logging


@dataclasses.dataclass(frozen=True)
class Limits:
  timeout_s: float = 10.0  # wall clock; then the whole process group is killed
  cpu_s: int = 10  # RLIMIT_CPU
  memory_bytes: int = 1 << 30  # RLIMIT_AS
  max_processes: int = 64  # RLIMIT_NPROC, on top of the sandbox's own processes
  file_bytes: int = 1 << 20  # RLIMIT_FSIZE
  output_bytes: int = 1 << 16  # stdout+stderr kept; more fails the run
  tmp_bytes: int = 64 << 20  # size of the sandbox's /tmp tmpfs (bwrap)


@dataclasses.dataclass(frozen=True)
class Result:
  passed: bool
  status: str  # see the module docstring
  detail: str  # short reason: the failing statement's exception, the limit hit, ...
  seconds: float
  output: str = ""  # captured stdout+stderr, at most `output_bytes`


_DEFAULT_LIMITS = Limits()
_DETAIL_CHARS = 300
_RECORD_BYTES = 1 << 16
_UID_BASE = 2_000_000_000  # far above system and login uids; see _fresh_uid
_uid_counter = itertools.count()
_PATH = "/usr/local/bin:/usr/bin:/bin"
# A shell as the namespace's init: pid 1 ignores default-action signals (SIGXCPU, kill from inside).
_UNSHARE = ("unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--")
_UNSHARE += ("sh", "-c", '"$@"; exit $?', "sh")

# Runs inside the sandbox as `python -I -u -c`; trusted only until the program starts, so everything it
# uses afterwards is bound to a local first (later patching of os/builtins cannot reach those).
_HARNESS = r"""# trafl_jax.sandbox harness
import _ast, builtins, json, os, resource, sys, types
def main():
  read, write, close, exit_, stat, fstat = os.read, os.write, os.close, os._exit, os.stat, os.fstat
  listdir, getuid, settrace, setprofile = os.listdir, os.getuid, sys.settrace, sys.setprofile
  module_named = sys.modules.get  # the interpreter's own table, as finalization reads it
  compile_, exec_, dict_, int_, len_, open_, type_, str_, Base = (
    compile, exec, dict, int, len, open, type, str, BaseException)
  in_fd, nonce_fd, rec_fd, scope = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  del sys.argv[1:]
  for name in listdir("/proc/self/fd"):
    if int(name) not in (0, 1, 2, in_fd, nonce_fd, rec_fd):
      try: close(int(name))
      except OSError: pass
  data = b""
  while chunk := read(in_fd, 1 << 20): data += chunk
  close(in_fd)
  job = json.loads(data)
  def say(kind, text=""):
    line = kind + (" " + str_(text).replace("\n", " ")[:2000] if text else "") + "\n"
    try: write(rec_fd, line.encode("utf-8", "replace"))
    except Base: pass
  def describe(e):
    try:
      msg = str_(e)
      return type_(e).__name__ + (": " + msg if msg else "")
    except Base: return "an exception that cannot be printed"
  def fields(pid):
    with open_("/proc/%d/stat" % pid, "rb") as f: return f.read().rsplit(b")", 1)[1].split()
  me, my_uid, my_sid, ancestors = os.getpid(), getuid(), os.getsid(0), set()
  parent = int_(fields(me)[1])
  while parent > 0 and parent not in ancestors:
    ancestors.add(parent)
    try: parent = int_(fields(parent)[1])
    except OSError: break
  def uid_of(name):
    try: return stat("/proc/" + name).st_uid
    except OSError: return -1
  def others():
    found = []
    for name in listdir("/proc"):
      if not name.isdigit() or int_(name) == me or int_(name) in ancestors: continue
      try: f = fields(int_(name))
      except OSError: continue
      if f[0] != b"Z" and (scope == "all" or (scope == "uid" and uid_of(name) == my_uid)
                           or (scope == "session" and int_(f[3]) == my_sid)):
        found.append(name)
    return found
  mine = sum(1 for n in listdir("/proc") if n.isdigit() and uid_of(n) == my_uid)
  lim = job["limits"]
  for res, soft, hard in ((resource.RLIMIT_CORE, 0, 0),
                          (resource.RLIMIT_AS, lim["memory_bytes"], lim["memory_bytes"]),
                          (resource.RLIMIT_CPU, lim["cpu_s"], lim["cpu_s"] + 1),
                          (resource.RLIMIT_FSIZE, lim["file_bytes"], lim["file_bytes"]),
                          (resource.RLIMIT_NPROC, mine + lim["max_processes"], mine + lim["max_processes"])):
    cur = resource.getrlimit(res)[1]
    if cur != resource.RLIM_INFINITY: soft, hard = min(soft, cur), min(hard, cur)
    resource.setrlimit(res, (soft, hard))
  stdio = [(s.st_dev, s.st_ino) for s in (fstat(1), fstat(2))]
  pristine = dict_(builtins.__dict__)
  say("S")
  try:
    program = compile_(job["program"], "<program>", "exec", dont_inherit=True)
    tree = compile_(job["tests"], "<tests>", "exec", _ast.PyCF_ONLY_AST, dont_inherit=True)
    tests = [compile_(_ast.Module(body=[s], type_ignores=[]), "<tests>", "exec", dont_inherit=True)
             for s in tree.body]
  except Base as e:
    say("E", "does not compile: " + describe(e)); exit_(1)
  module = sys.modules["__sandbox__"] = types.ModuleType("__sandbox__")  # so pickle finds its names
  ns = module.__dict__
  ns["__builtins__"] = dict_(pristine)
  try: exec_(program, ns)
  except Base as e:
    settrace(None); setprofile(None); say("E", describe(e)); exit_(1)
  test_ns = dict_(ns)
  test_ns["__builtins__"] = dict_(pristine)
  done = 0
  for code in tests:
    try: exec_(code, test_ns)
    except Base as e:
      settrace(None); setprofile(None); say("F", describe(e)); exit_(1)
    settrace(None); setprofile(None)
    done += 1
  # End as a script ends: finalization calls threading._shutdown(), which runs the exit hooks of
  # concurrent.futures and joins every non-daemon thread, so one that never ends meets the timeout.
  # Like CPython, ignore what it raises.
  threading = module_named("threading")
  if threading is not None:
    try: threading._shutdown()
    except Base: pass
    settrace(None); setprofile(None)
  try: same = [(s.st_dev, s.st_ino) for s in (fstat(1), fstat(2))] == stdio
  except OSError: same = False
  if not same: say("T", "stdout/stderr were closed or replaced"); exit_(1)
  left = others()
  if left: say("L", "processes left running: " + " ".join(left[:20])); exit_(1)
  nonce = read(nonce_fd, 64)
  if len_(nonce) != 32: say("T", "the nonce was read by someone else"); exit_(1)
  write(rec_fd, b"P " + nonce + b" %d\n" % done)
  exit_(0)
main()
"""


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How runs are launched; made (and for bwrap probed) once per mode."""

  mode: str  # "bwrap" | "rlimits"
  python: str
  drop: bool  # run as a fresh uid (root only)
  unshare: bool  # rlimits: under `unshare --net --pid`
  scope: str  # which processes the harness counts as left behind: all | uid | session
  binds: tuple[str, ...] = ()  # bwrap args exposing the interpreter


_lock = threading.Lock()
_plans: dict[str, _Plan | str] = {}  # mode -> plan, or why the mode is unavailable


def isolation() -> str:
  """The isolation `run_program` uses by default: "bwrap" or "rlimits" (the fallback)."""
  return _plan(None).mode


def _plan(mode: str | None) -> _Plan:
  if mode not in (None, "bwrap", "rlimits"):
    raise ValueError(f"isolation_mode must be None, 'bwrap' or 'rlimits', not {mode!r}")
  with _lock:
    if mode != "rlimits" and "bwrap" not in _plans:
      _plans["bwrap"] = _bwrap_plan()
    use = mode or ("bwrap" if isinstance(_plans["bwrap"], _Plan) else "rlimits")
    if use == "rlimits" and use not in _plans:  # made once, so this warns once
      _plans[use] = plan = _rlimits_plan()
      why = (
        f"bubblewrap is unusable ({_plans['bwrap']})"
        if mode is None
        else f"isolation_mode={mode!r}"
      )
      logging.warning(
        "sandbox: %s; isolating programs with rlimits, a fresh uid: %s, unshare: %s",
        *(why, plan.drop, plan.unshare),
      )
    plan = _plans[use]
  if isinstance(plan, str):
    raise RuntimeError(f"bwrap isolation is unavailable: {plan}")
  return plan


def _closed_ancestor(path: str) -> str | None:
  """The topmost directory on `path` that others cannot enter, if any."""
  parts = os.path.realpath(path).split(os.sep)[1:]
  for i in range(1, len(parts) + 1):
    prefix = os.sep + os.path.join(*parts[:i])
    if os.path.isdir(prefix) and not os.stat(prefix).st_mode & stat.S_IXOTH:
      return prefix
  return None


def _bwrap_plan() -> _Plan | str:
  if not shutil.which("bwrap"):
    return "bwrap is not installed"
  drop = os.geteuid() == 0
  if drop and not shutil.which("setpriv"):
    return "setpriv is not installed"
  binds: list[str] = []
  if drop:  # the fresh uid must reach the interpreter: hide closed dirs, bind just its prefixes
    needed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    needed.add(os.path.dirname(os.path.realpath(sys.executable)))
    closed = {c for c in map(_closed_ancestor, needed) if c}
    for c in sorted(closed):
      binds += ["--tmpfs", c]
    for p in sorted(needed):
      if any(p.startswith(c + os.sep) for c in closed) and not any(
        p.startswith(q + os.sep) for q in needed
      ):
        binds += ["--ro-bind", p, p]
  plan = _Plan("bwrap", sys.executable, drop, False, "all", tuple(binds))
  probe = _launch("", "pass", 1, Limits(timeout_s=60.0), plan)
  return plan if probe.passed else f"probe {probe.status}: {probe.detail}"


def _rlimits_plan() -> _Plan:
  root = os.geteuid() == 0
  drop, python = root and shutil.which("setpriv") is not None, sys.executable
  if drop and (_closed_ancestor(sys.executable) or _closed_ancestor(sys.base_prefix)):
    # Without bwrap nothing can re-expose a Python under /root: use the system's same-version one.
    version = "python{}.{}".format(*sys.version_info[:2])
    found = [os.path.join(d, version) for d in ("/usr/local/bin", "/usr/bin")]
    found = [p for p in found if os.access(p, os.X_OK) and not _closed_ancestor(p)]
    python, drop = (found[0], True) if found else (python, False)
  if root and not drop:
    logging.warning("sandbox: no unprivileged uid usable; programs run as root, NPROC unenforced")
  unshare = root and shutil.which("unshare") is not None
  if unshare:
    probe = subprocess.run([*_UNSHARE, "true"], capture_output=True, timeout=30, check=False)
    unshare = probe.returncode == 0
  return _Plan("rlimits", python, drop, unshare, "all" if unshare else "uid" if drop else "session")


def _fresh_uid() -> int:
  # Unique among concurrent runs on the machine (pid x in-process counter), so that RLIMIT_NPROC counts
  # only this run's processes and "every process of this uid" is exactly what the run left behind.
  return _UID_BASE + (os.getpid() % 1_000_000) * 1000 + next(_uid_counter) % 1000


def _survivors(uid: int | None, sid: int) -> list[int]:
  """Live processes of the run: those of its uid, else those of its session."""
  found = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      if uid is not None and os.stat(f"/proc/{name}").st_uid != uid:
        continue
      with open(f"/proc/{name}/stat", "rb") as f:
        state, _, _, session = f.read().rsplit(b")", 1)[1].split()[:4]
    except OSError:
      continue
    if state != b"Z" and (uid is not None or int(session) == sid):
      found.append(int(name))
  return found


def _kill(pids: Sequence[int], group: int | None = None) -> None:
  for pid in pids:
    with contextlib.suppress(OSError):
      os.kill(pid, signal.SIGKILL)
  if group is not None:
    with contextlib.suppress(OSError):
      os.killpg(group, signal.SIGKILL)


def _stop(proc: subprocess.Popen, uid: int | None, wrapped: bool) -> None:
  """Kills the run. Under bwrap/unshare its processes go first, so the wrapper reaps them and exits."""
  _kill([p for p in _survivors(uid, proc.pid) if p != proc.pid])
  with contextlib.suppress(subprocess.TimeoutExpired):
    proc.wait(timeout=1.0 if wrapped else 0.0)
  _kill([], proc.pid)


def _pump(fd: int, buf: bytearray, cap: int) -> str:
  """Reads once into a buffer bounded by `cap`: "data", "over" (cap exceeded), "again" or "eof"."""
  try:
    chunk = os.read(fd, 1 << 16)
  except BlockingIOError:
    return "again"
  room = cap - len(buf)
  buf += chunk[: max(room, 0)]
  return "eof" if not chunk else "over" if len(chunk) > room else "data"


def _supervise(proc, out_r, rec_r, limits, kill) -> tuple[bytes, bytes, bool, bool]:
  """Waits for the sandbox under the timeout, reading both pipes into bounded buffers."""
  bufs = {out_r: bytearray(), rec_r: bytearray()}
  caps = {out_r: limits.output_bytes, rec_r: _RECORD_BYTES}
  timed_out = overflow = False
  with selectors.DefaultSelector() as sel:
    for fd in bufs:
      os.set_blocking(fd, False)
      sel.register(fd, selectors.EVENT_READ)
    try:  # readable when the process exits; without it, poll
      pidfd = os.pidfd_open(proc.pid)
      sel.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
      pidfd = None
    deadline = time.monotonic() + limits.timeout_s
    try:
      while not overflow and proc.poll() is None:
        left = deadline - time.monotonic()
        if left <= 0:
          timed_out = True
          break
        for key, _ in sel.select(left if pidfd is not None else min(left, 0.01)):
          if key.fd != pidfd:
            got = _pump(key.fd, bufs[key.fd], caps[key.fd])
            overflow |= got == "over" and key.fd == out_r
            if got == "eof":
              sel.unregister(key.fd)
      if proc.poll() is None:
        kill()
      proc.wait()
      for fd, buf in bufs.items():  # what was written before the exit (leftovers may keep writing)
        while (got := _pump(fd, buf, caps[fd])) == "data":
          pass
        overflow |= got == "over" and fd == out_r
    finally:
      if pidfd is not None:
        os.close(pidfd)
  return bytes(bufs[out_r]), bytes(bufs[rec_r]), timed_out, overflow


def _verdict(rc, records, nonce, expected, timed_out, overflow, left, limits) -> tuple[str, str]:
  if timed_out:
    return "timeout", f"wall-clock limit of {limits.timeout_s:g}s exceeded"
  if overflow:
    return "output_limit", f"more than {limits.output_bytes} bytes of output"
  lines = records.decode("utf-8", "replace").splitlines()
  if lines[:1] != ["S"]:
    return "sandbox_error", f"the harness did not start (exit status {rc})"
  kinds = {"F": "failed", "E": "error", "L": "leftover", "T": "tampered"}
  kind = lines[1].split(" ", 1)[0] if len(lines) > 1 else ""
  if kind in kinds:
    return kinds[kind], lines[1][2:]
  if left:
    return "leftover", f"{len(left)} process(es) outlived the run"
  if rc == 0 and lines[1:] == [f"P {nonce} {expected}"]:
    return "passed", ""
  sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
  if sig:
    name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
    return "killed", f"killed by {name}" + (" (CPU limit)" if sig == signal.SIGXCPU else "")
  if len(lines) == 1:
    return "exited", f"exited with status {rc} before its tests completed"
  return "tampered", "the completion record is missing, forged or repeated"


def _clip(text: str) -> str:
  return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _launch(program: str, tests: str, expected: int, limits: Limits, plan: _Plan) -> Result:
  start = time.monotonic()
  uid = _fresh_uid() if plan.drop else None
  nonce = secrets.token_hex(16)
  job = json.dumps({"program": program, "tests": tests, "limits": dataclasses.asdict(limits)})
  in_fd = os.memfd_create("sandbox-job")
  with open(in_fd, "wb", closefd=False) as f:
    f.write(job.encode())  # ASCII: json escapes the rest
  os.lseek(in_fd, 0, os.SEEK_SET)
  nonce_r, nonce_w = os.pipe()
  os.write(nonce_w, nonce.encode())
  os.close(nonce_w)
  rec_r, rec_w = os.pipe()
  out_r, out_w = os.pipe()
  workdir = None
  env = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": "/tmp/work", "TMPDIR": "/tmp"}
  argv = [plan.python, "-I", "-u", "-c", _HARNESS, str(in_fd), str(nonce_r), str(rec_w), plan.scope]
  if uid is not None:  # dropped last, after bwrap/unshare (run as root) have set the sandbox up
    drop = ("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all")
    argv = [*drop, "--no-new-privs", "--", *argv]
  try:
    if plan.mode == "bwrap":
      argv = [*_bwrap_args(plan, limits), "--", *argv]
      cwd = "/"
    else:
      workdir = tempfile.mkdtemp(prefix="trafl_sandbox_")
      if uid is not None:
        os.chown(workdir, uid, uid)
      env.update(HOME=workdir, TMPDIR=workdir)
      argv = [*(_UNSHARE if plan.unshare else ()), *argv]
      cwd = workdir
    proc = subprocess.Popen(
      argv,
      stdin=subprocess.DEVNULL,
      stdout=out_w,
      stderr=subprocess.STDOUT,
      pass_fds=(in_fd, nonce_r, rec_w),
      cwd=cwd,
      env=env,
      start_new_session=True,
    )
  except OSError as e:
    for fd in (out_r, rec_r):
      os.close(fd)
    _remove(workdir)
    return Result(False, "sandbox_error", _clip(f"cannot start the sandbox: {e}"), 0.0)
  finally:
    for fd in (in_fd, nonce_r, rec_w, out_w):
      os.close(fd)
  try:
    kill = lambda: _stop(proc, uid, plan.mode == "bwrap" or plan.unshare)
    out, records, timed_out, overflow = _supervise(proc, out_r, rec_r, limits, kill)
  finally:
    # Nothing of the run may outlive it: what is found is killed, and a clean run becomes a fail.
    left = alive = _survivors(uid, proc.pid)
    for _ in range(200):
      if not alive:
        break
      _kill(alive, proc.pid)
      time.sleep(0.005)
      alive = _survivors(uid, proc.pid)
    else:
      logging.error("sandbox: processes %s of a finished run could not be killed", alive)
    for fd in (out_r, rec_r):
      os.close(fd)
    _remove(workdir)
  status, detail = _verdict(
    proc.returncode, records, nonce, expected, timed_out, overflow, left, limits
  )
  text = out.decode("utf-8", "replace")
  return Result(status == "passed", status, _clip(detail), time.monotonic() - start, text)


def _bwrap_args(plan: _Plan, limits: Limits) -> list[str]:
  run = ["--tmpfs", "/run"] if os.path.isdir("/run") else []
  caps = ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if plan.drop else ["--unshare-user"]
  return [
    *("bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"),
    *("--unshare-cgroup-try", "--die-with-parent", *caps),
    *("--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *run),
    *("--size", str(limits.tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp", *plan.binds),
    *("--size", str(limits.tmp_bytes), "--perms", "1777", "--tmpfs", "/dev/shm"),  # multiprocessing
    *("--perms", "0777", "--dir", "/tmp/work", "--chdir", "/tmp/work"),
  ]


def _remove(workdir: str | None) -> None:
  if workdir is None:
    return
  shutil.rmtree(workdir, ignore_errors=True)
  if os.path.exists(workdir):  # the program may have made parts unreadable to us (non-root runs)
    subprocess.run(["chmod", "-R", "u+rwx", workdir], capture_output=True, check=False)
    shutil.rmtree(workdir, ignore_errors=True)


def run_program(
  program: str, tests: str, limits: Limits = _DEFAULT_LIMITS, *, isolation_mode: str | None = None
) -> Result:
  """Runs `program`, then each top-level statement of `tests`, in a sandbox; passes iff all of them ran.

  `isolation_mode`: None (bwrap when usable, else rlimits), "bwrap" or "rlimits" (to test the fallback).
  """
  try:
    expected = len(ast.parse(tests).body)
  except (SyntaxError, ValueError) as e:
    return Result(False, "error", _clip(f"the tests do not parse: {e}"), 0.0)
  return _launch(program, tests, expected, limits, _plan(isolation_mode))


def run_many(
  items: Sequence[tuple[str, str]],
  limits: Limits = _DEFAULT_LIMITS,
  workers: int | None = None,
  *,
  isolation_mode: str | None = None,
) -> list[Result]:
  """`run_program` over (program, tests) pairs in parallel (os.cpu_count() at a time), in order."""
  items = list(items)
  if not items:
    return []
  _plan(isolation_mode)  # probe (and warn) once, before the pool
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
    return list(
      pool.map(lambda item: run_program(*item, limits, isolation_mode=isolation_mode), items)
    )
