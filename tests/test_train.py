"""Training loop: loss weighting, exact resume on a (4, 2) mesh, preemption, params-only starts."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import math as math_config
from trafl_jax import checkpoint as ckpt_lib
from trafl_jax import config_lib, convert, data, diffusion, metrics, pipeline, train

from .conftest import ROOT, subprocess_env


def tiny_config(**overrides):
  config = math_config.get_config("tiny")
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 1, 2
    config.train.progress = False
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
  return config


def test_loss_weighting_matches_hand_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  completion = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], bool)
  masked = np.array([[0, 0, 1, 0, 1], [0, 0, 1, 1, 0]], bool)
  t = np.array([0.25, 0.8], np.float32)
  loss, _ = diffusion.masked_diffusion_loss(
    jnp.asarray(logits),
    jnp.asarray(targets),
    jnp.asarray(masked),
    jnp.asarray(t),
    jnp.asarray(completion),
  )
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = []
  for b in range(2):
    nll = [-logp[b, j, targets[b, j]] / t[b] for j in range(5) if masked[b, j]]
    want.append(sum(nll) / completion[b].sum())
  np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-5)


def test_forward_mask_never_masks_prompt_and_tracks_t():
  completion = jnp.zeros((4096, 32), bool).at[:, 8:].set(True)
  masked, t = diffusion.forward_mask(jax.random.PRNGKey(0), completion, t_min=0.1)
  masked = np.asarray(masked)
  assert not masked[:, :8].any()
  assert float(t.min()) >= 0.1 and float(t.max()) <= 1.0
  # The fraction masked in each row follows its t (binomial with 24 trials).
  frac = masked[:, 8:].mean(1)
  assert abs(np.corrcoef(frac, np.asarray(t))[0, 1]) > 0.9
  assert abs(frac.mean() - float(t.mean())) < 0.01


def _params_of(workdir):
  import orbax.checkpoint as ocp

  step = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  return ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(step), "params")
  ), step


def test_exact_resume_on_4x2_mesh(tmp_path):
  """Stopped after 7 steps and resumed to 20 == an uninterrupted 20-step run, bit for bit, with each
  step's completion canvas (data.answer_lens) the pure draw for its step."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  lengths = (16, 24)
  config = tiny_config(
    **{"train.ckpt_every": 5, "data.answer_lens": lengths, "data.answer_len": max(lengths)}
  )
  pipeline.reference_stage(config, straight)
  pipeline.reference_stage(config, resumed, max_steps=7)
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["5", "7"]
  pipeline.reference_stage(config, resumed)

  a, b = metrics.read_metrics(straight), metrics.read_metrics(resumed)
  assert [r["step"] for r in b] == list(range(1, 21))
  assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]
  assert a[-1]["train/loss"] < a[0]["train/loss"]
  want = [float(data.canvas_length(lengths, config.seed, s)) for s in range(20)]
  assert [r["train/canvas_length"] for r in b] == want and set(want) == {16.0, 24.0}
  (pa, sa), (pb, sb) = _params_of(straight), _params_of(resumed)
  assert sa == sb == 20
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def test_canvas_lengths_name_a_bad_setting():
  cfg = config_lib.train_config(tiny_config())
  assert train.canvas_lengths(cfg.data) == (16,)
  data_cfg = dataclasses.replace(cfg.data, answer_lens=(32, 16, 24, 24), answer_len=32)
  assert train.canvas_lengths(data_cfg) == (16, 24, 32)
  with pytest.raises(ValueError, match=r"answer_lens \(16, 24\).*answer_len=32"):
    train.canvas_lengths(dataclasses.replace(cfg.data, answer_lens=(16, 24), answer_len=32))


def test_init_checkpoint_loads_params_only(tmp_path):
  source = str(tmp_path / "source")
  pipeline.reference_stage(tiny_config(**{"train.num_steps": 3}), source)
  params, _ = _params_of(source)
  target = str(tmp_path / "target")
  config = tiny_config(
    **{
      "train.num_steps": 1,
      "train.init_checkpoint": source,
      "optim.lr": 0.0,
      "optim.weight_decay": 0.0,
    }
  )
  pipeline.reference_stage(config, target)
  loaded, step = _params_of(target)
  assert step == 1  # a fresh optimizer/step count, not a resume
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(x, y)
  # The same parameters through a Hugging Face LLaDA directory.
  hf_dir = str(tmp_path / "hf")
  convert.orbax_to_hf(source, hf_dir)
  with config.unlocked():
    config.train.init_checkpoint = hf_dir
  pipeline.reference_stage(config, str(tmp_path / "from_hf"))
  from_hf, _ = _params_of(str(tmp_path / "from_hf"))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(from_hf)):
    np.testing.assert_array_equal(x, y)


def test_nan_stops_with_the_step_named(tmp_path):
  config = tiny_config(**{"optim.lr": 1e30, "optim.grad_clip": 1e30, "optim.warmup_steps": 0})
  with pytest.raises(FloatingPointError, match=r"at step \d+"):
    pipeline.reference_stage(config, str(tmp_path / "nan"))


def _main(args, **kw):
  env = subprocess_env()
  return subprocess.Popen(
    [sys.executable, "-m", "trafl_jax.main", *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kw,
  )


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
  # The main job's first stage trains the reference model in <workdir>/reference.
  workdir = str(tmp_path / "preempt" / "reference")
  args = [
    "--config=configs/math.py:tiny",
    f"--workdir={tmp_path / 'preempt'}",
    "--config.train.num_steps=100000",
    "--config.train.ckpt_every=100000",
    "--config.train.progress=False",
  ]
  proc = _main(args)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and (
    not os.path.exists(metrics_path) or len(metrics.read_metrics(workdir)) < 3
  ):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(steps) == 1 and steps[0] >= 3
  assert metrics.read_metrics(workdir)[-1]["step"] == steps[0]
  # The resumed run picks up at that step.
  config = tiny_config(**{"train.num_steps": steps[0] + 2})
  with config.unlocked():
    config.mesh.data, config.mesh.tensor = -1, 1
  pipeline.reference_stage(config, workdir)
  assert [r["step"] for r in metrics.read_metrics(workdir)][-3:] == [
    steps[0],
    steps[0] + 1,
    steps[0] + 2,
  ]


def test_checkpoint_restore_detects_incompatible_and_corrupt_checkpoints(tmp_path):
  workdir = str(tmp_path / "run")
  pipeline.reference_stage(tiny_config(**{"train.num_steps": 2}), workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints", "2")
  before = sorted(os.listdir(ckpt_dir))

  with pytest.raises(ckpt_lib.CheckpointError, match="d_model"):
    pipeline.reference_stage(tiny_config(**{"train.num_steps": 4, "model.d_model": 32}), workdir)
  with pytest.raises(ckpt_lib.CheckpointError, match="batch_size"):
    pipeline.reference_stage(tiny_config(**{"train.num_steps": 4, "data.batch_size": 8}), workdir)

  # Corrupt the stored parameters; the error names the checkpoint and nothing is removed.
  params_dir = os.path.join(ckpt_dir, "params")
  for root, _, files in os.walk(params_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError, match="corrupt or unreadable"):
    pipeline.reference_stage(tiny_config(**{"train.num_steps": 4}), workdir)
  assert sorted(os.listdir(ckpt_dir)) == before
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
