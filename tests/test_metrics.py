import glob
import json
import logging
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from trafl_jax import metrics


def _read_events(tb_dir):
  """Minimal TFRecord reader: u64 length, u32 crc, payload, u32 crc (crcs not checked)."""
  events = []
  for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      payload = data[pos + 12 : pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event()
      event.ParseFromString(payload)
      events.append(event)
  return events


def _scalar_events(tb_dir):
  return [
    (e.step, v.tag, v.simple_value)
    for e in _read_events(tb_dir)
    for v in e.summary.value
    if v.HasField("simple_value")
  ]


def test_jsonl_roundtrip_accepts_python_numpy_and_jax(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(1, {"train/loss": 1.5, "train/lr": np.float32(0.25)})
    writer.write_scalars(np.int64(2), {"train/loss": jnp.asarray(0.75), "train/lr": np.array(0.5)})
  records = metrics.read_metrics(str(tmp_path))
  assert records == [
    {"step": 1, "train/loss": 1.5, "train/lr": 0.25},
    {"step": 2, "train/loss": 0.75, "train/lr": 0.5},
  ]
  assert all(type(r["step"]) is int for r in records)


def test_lines_are_flushed_before_close(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write_scalars(7, {"train/loss": 2.0})
  # Read through a separate handle while the writer is still open, as after a kill.
  with open(tmp_path / "metrics.jsonl") as f:
    assert json.loads(f.readline()) == {"step": 7, "train/loss": 2.0}
  writer.close()


def test_tensorboard_event_file_has_scalar(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(3, {"train/loss": jnp.float32(1.25)})
    writer.write_texts(3, {"samples/text": "hello world"})
  tb_dir = tmp_path / "tensorboard"
  assert glob.glob(str(tb_dir / "events.out.tfevents.*"))
  assert (3, "train/loss", 1.25) in _scalar_events(str(tb_dir))
  text_tags = {v.tag for e in _read_events(str(tb_dir)) for v in e.summary.value}
  assert any(tag.startswith("samples/text") for tag in text_tags)


def test_write_texts_appends_samples_jsonl(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write_texts(5, {"samples/0": "a b c"})
  with open(tmp_path / "samples.jsonl") as f:
    assert json.loads(f.readline()) == {"step": 5, "texts": {"samples/0": "a b c"}}


def test_resume_drops_later_steps_and_corrupt_tail(tmp_path, caplog):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    for step in range(1, 6):
      writer.write_scalars(step, {"train/loss": float(step)})
    writer.write_texts(2, {"s": "keep"})
    writer.write_texts(4, {"s": "drop"})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "train/lo')  # Partial line from a killed run.

  with caplog.at_level(logging.WARNING), metrics.MetricWriter(str(tmp_path), resume_step=3) as w:
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]
    w.write_scalars(4, {"train/loss": 40.0})
  assert "corrupt" in caplog.text
  records = metrics.read_metrics(str(tmp_path))
  assert [(r["step"], r["train/loss"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 40)]
  with open(tmp_path / "samples.jsonl") as f:
    assert [json.loads(line)["texts"]["s"] for line in f] == ["keep"]
  assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")


def test_append_after_partial_line_without_resume_keeps_new_line(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(3, {"a": 3.0})
  assert metrics.read_metrics(str(tmp_path)) == [{"step": 1, "a": 1.0}, {"step": 3, "a": 3.0}]


def test_resume_without_existing_file(tmp_path):
  with metrics.MetricWriter(str(tmp_path), resume_step=10) as writer:
    writer.write_scalars(11, {"a": 1.0})
  assert metrics.read_metrics(str(tmp_path)) == [{"step": 11, "a": 1.0}]


def test_disabled_writer_creates_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricWriter(str(workdir), enabled=False, resume_step=0) as writer:
    writer.write_scalars(1, {"train/loss": 1.0})
    writer.write_texts(1, {"s": "x"})
    writer.flush()
  assert not workdir.exists()
  assert metrics.read_metrics(str(workdir)) == []


def test_reserved_step_key_rejected(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer, pytest.raises(ValueError, match="step"):
    writer.write_scalars(1, {"step": 1.0})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), jnp.float32(jnp.nan)])
def test_check_finite_raises_naming_step_and_key(bad):
  with pytest.raises(FloatingPointError) as err:
    metrics.check_finite(17, {"train/loss": 1.0, "train/grad_norm": bad})
  message = str(err.value)
  assert "step 17" in message
  assert "train/grad_norm=" in message
  assert "train/loss" not in message


def test_check_finite_names_every_bad_key():
  with pytest.raises(FloatingPointError, match=r"train/a=nan.*train/b=inf.*step 3"):
    metrics.check_finite(3, {"train/a": math.nan, "train/b": math.inf, "train/c": 0.0})


def test_check_finite_passes_for_finite():
  metrics.check_finite(1, {"train/loss": 1e30, "train/lr": np.float32(0.0), "x": jnp.asarray(-2)})


def test_progress_disabled_prints_nothing(capsys):
  progress = metrics.Progress(100, initial_step=10, enabled=False)
  progress.update(50, {"train/loss": 1.0})
  progress.close()
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err == ""


def test_progress_reports_absolute_position_and_postfix(capsys):
  progress = metrics.Progress(1000, initial_step=100, desc="train")
  assert progress.step == 100
  progress.update(150, {"train/loss": 1.23456, "eval/loss": 2.0, "train/lr": 3e-4})
  assert progress.step == 150
  progress.close()
  err = capsys.readouterr().err
  assert "100/1000" in err
  assert "150/1000" in err
  # Shared tails keep their full key; unique ones are shortened.
  assert "train/loss=1.235" in err and "eval/loss=2" in err and "lr=0.0003" in err


def test_progress_eta_ignores_resumed_steps(capsys):
  progress = metrics.Progress(1000, initial_step=500)
  bar = progress._bar
  clock = [0.0]
  bar._time = lambda: clock[0]
  bar.start_t = bar.last_print_t = 0.0
  clock[0] = 100.0
  progress.update(600)  # 100 steps in 100 s -> 1 step/s, 400 steps left.
  assert bar.format_dict["rate"] == pytest.approx(1.0)
  assert "06:40" in str(bar)  # Counting the 500 resumed steps would give ~01:07.
  progress.close()


def test_step_rate():
  rate = metrics.StepRate(step=10)
  rate._time -= 2.0
  assert rate(30) == pytest.approx(10.0, rel=0.05)
