"""Math tasks. Default: masked-diffusion training of a small reference model on generated Countdown.

Evaluation (pass@k, diversity, locking) of one or more checkpoints on the config's eval grid:
  python -m trafl_jax.evaluate --config=configs/math.py --checkpoint=runs/math

Until the TraFL issue lands, the main job is the masked-diffusion (LLaDA SFT) training that makes
reference models.

CPU (this is the README's main command; a few minutes on 2 cores):
  python -m trafl_jax.main --config=configs/math.py --workdir=runs/math
Test-sized:
  python -m trafl_jax.main --config=configs/math.py:tiny --workdir=/tmp/tiny
Masked-diffusion SFT on GSM8K (a local JSONL with question/answer):
  python -m trafl_jax.main --config=configs/math.py:gsm8k --workdir=runs/gsm8k \
    --config.data.train_path=/path/to/gsm8k/train.jsonl
GPU node (all local GPUs, bfloat16 compute):
  python -m trafl_jax.main --config=configs/math.py:small,bf16 --workdir=runs/small
TPU pod slice (every worker runs the same command; FSDP over the slice):
  python -m trafl_jax.main --config=configs/math.py:small,bf16,fsdp --workdir=gs://BUCKET/runs/small
"""

from configs import common

VARIANTS = ("tiny", "small", "gsm8k", "bf16", "fsdp", "constant")


def get_config(arg: str | None = None):
  variants = common.parse_variant(arg, VARIANTS)
  c = common.base_config("mini")
  # Numbers 1..10 and t ~ U(0.1, 1): the mini reference reaches ~30-50% greedy in 2,000 steps (with
  # numbers 1..20 and t_min 1e-3 it stayed near 1%; see docs/results.md).
  c.data.countdown_max_number = 10
  c.train.t_min = 0.1
  c.train.num_steps = 2000
  # The Countdown answers are short: evaluate at the trained length and twice it, one token per step.
  c.eval.gen_lengths = (16, 32)
  c.eval.block_length = 16
  c.eval.steps_per_token = 1.0
  c.rl.train_limit = 2000
  c.rl.gen_length = 16
  c.rl.sample_steps = 16
  c.rl.block_length = 16
  if "tiny" in variants:
    common.apply_preset(c, "tiny")
    c.rl.num_steps = 3
    c.rl.prompts_per_step = 4
    c.rl.group_size = 4
    c.rl.train_limit = 64
    c.rl.eval_every = 3
    c.rl.eval_problems = 8
    c.rl.ckpt_every = 2
    c.eval.limit = 6
    c.eval.num_samples = 4
    c.eval.gen_lengths = (16,)
    c.eval.batch_size = 24
    c.eval.problems_per_batch = 3
    c.data.num_generated = 512
    c.data.batch_size = 16
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.ckpt_every = 10
    c.optim.warmup_steps = 5
  if "small" in variants:
    common.apply_preset(c, "small")
  if "gsm8k" in variants:
    common.apply_preset(c, "small")
    c.data.source = "jsonl"
    c.data.prompt_key = "question"
    c.data.answer_key = "answer"
    c.data.prompt_len = 256
    c.data.answer_len = 320
    c.data.batch_size = 16
    c.optim.lr = 3e-4
    c.train.num_steps = 5000
    c.eval.tasks = ("gsm8k",)
    c.eval.gen_lengths = (128, 256, 512)
    c.eval.block_length = 32
    c.eval.steps_per_token = 0.5
    c.eval.temperature = 0.9
  if "bf16" in variants:
    c.model.dtype = "bfloat16"
  if "fsdp" in variants:
    c.mesh.data = 1
    c.mesh.fsdp = -1
  if "constant" in variants:
    c.optim.schedule = "constant"
  c.lock()
  return c
