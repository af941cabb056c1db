"""The main job: reference (masked-diffusion training, unless given) -> post-training -> evaluation.

Each stage works in its own subdirectory of the workdir and resumes on its own, so a rerun of an interrupted
job redoes only what is missing:
  <workdir>/reference/    the reference model (skipped when config.rl.reference names one)
  <workdir>/<objective>/  the post-trained policy
  <workdir>/eval/         eval.json, eval.md, passk.png: reference vs policy
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from absl import logging

from trafl_jax import checkpoint as ckpt_lib
from trafl_jax import config_lib, eval_report, evaluate, posttrain, train

STAGES = ("reference", "posttrain", "evaluate")


def run(config: ml_collections.ConfigDict, workdir: str, max_steps: int | None = None) -> dict:
  """Runs `config.stages`; each stage gets the dataclasses config_lib makes of the config (checked
  whole first: an unknown key stops the job before any stage starts)."""
  config_lib.check_config(config)
  stages = tuple(config.stages)
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise ValueError(f"config.stages has unknown stages {sorted(unknown)}; known: {STAGES}")
  if "reference" not in stages and not config.rl.reference:
    raise ValueError(
      "config.rl.reference is empty and the 'reference' stage is off: name the reference checkpoint "
      "with --config.rl.reference=DIR (a run of ours, a converted or a Hugging Face LLaDA directory)"
    )
  workdir = os.path.abspath(workdir)
  reference = config.rl.reference or os.path.join(workdir, "reference")
  policy = os.path.join(workdir, config.rl.objective)
  out: dict = {}
  if "reference" in stages and not config.rl.reference:
    if _finished(reference, config.train.num_steps):
      logging.info("reference model already trained in %s", reference)
    else:
      logging.info("stage 1: masked-diffusion training of the reference model in %s", reference)
      out["reference"] = reference_stage(config, reference, max_steps)
      if not _finished(reference, config.train.num_steps):
        return out  # stopped early (SIGTERM or --max_steps): the next run continues here
  if "posttrain" in stages:
    logging.info("stage 2: %s post-training in %s", config.rl.objective, policy)
    out["posttrain"] = posttrain_stage(config, policy, reference, max_steps)
    if not _finished(policy, config.rl.num_steps):
      return out
  if "evaluate" in stages:
    logging.info("stage 3: evaluation of the reference and the policy")
    checkpoints, labels = [reference], ["reference"]
    if "posttrain" in stages:
      checkpoints.append(policy)
      labels.append(config.rl.objective)
    summary = evaluate_stage(
      config,
      checkpoints,
      os.path.join(workdir, "eval"),
      labels,
      show_progress=config.train.progress and jax.process_index() == 0,
    )
    out["evaluate"] = summary
    if jax.process_index() == 0:
      print(eval_report.markdown(summary))
      print(f"reports: {os.path.join(workdir, 'eval')}/eval.md, passk.png")
  return out


def reference_stage(config: ml_collections.ConfigDict, workdir: str, max_steps=None) -> dict:
  """Masked-diffusion training of a model of the config's shape into `workdir`."""
  return train.run(
    config_lib.train_config(config),
    config_lib.model_config(config),
    config_lib.layout(config),
    workdir,
    config_lib.record(config),
    max_steps,
  )


def posttrain_stage(
  config: ml_collections.ConfigDict, workdir: str, reference: str, max_steps=None
) -> dict:
  """Post-training of the checkpoint `reference` into `workdir`, with the config's model settings,
  mesh and rules."""
  return posttrain.run(
    config_lib.posttrain_config(config),
    config_lib.model_settings(config),
    config_lib.layout(config),
    workdir,
    reference,
    config_lib.record(config),
    max_steps,
  )


def evaluate_stage(config, checkpoints, workdir: str, labels=(), show_progress=True) -> dict:
  """Evaluation of `checkpoints` on the config's grid, with its model settings, mesh and rules."""
  return evaluate.run(
    evaluation_config(config),
    checkpoints,
    workdir,
    labels,
    show_progress=show_progress,
    settings=config_lib.model_settings(config),
    layout=config_lib.layout(config),
    run_config=config_lib.record(config),
    target_beta=config.rl.beta,  # the tilted target at the run's beta, beside the reference
  )


def evaluation_config(config: ml_collections.ConfigDict) -> evaluate.EvalConfig:
  """The eval section, plus rows with the rollouts' remasking (`rl.remasking`) when it is not among
  `eval.remasking`: a policy is evaluated with the sampler it was post-trained under as well (random
  remasking for the trajectory estimator), and the reference beside it."""
  cfg = config_lib.eval_config(config)
  if config.rl.remasking not in cfg.remasking:
    cfg = dataclasses.replace(cfg, remasking=(*cfg.remasking, config.rl.remasking))
  return cfg


def _finished(run_dir: str, num_steps: int) -> bool:
  if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    return False
  return ckpt_lib.Checkpointer(run_dir, keep=1).latest_step() == num_steps
