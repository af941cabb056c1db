"""Math tasks: TraFL and the baselines on Countdown (default, CPU) and GSM8K / MATH (LLaDA-8B-Instruct).

The main job: (1) a reference model by masked-diffusion training on generated Countdown solutions (skipped
when --config.rl.reference names one), (2) post-training with --config.rl.objective (trafl by default; or
diffu_grpo, elbo_grpo, wd1), (3) evaluation of reference vs post-trained model (eval.md, passk.png).

CPU (the README's main command; ~19 minutes on 2 quiet cores of the faster machine, ~47 on the slower):
  python -m trafl_jax.main --config=configs/math.py --workdir=runs/math
A baseline on the same reference:
  python -m trafl_jax.main --config=configs/math.py --workdir=runs/math --config.rl.objective=diffu_grpo
The baselines as d1 runs them (variant d1: 8 inner updates per rollout batch on Countdown, 12 on GSM8K,
clip 0.5, KL 0.04, temperature 0.9, the token mean per prompt group; combine with tiny or gsm8k):
  python -m trafl_jax.main --config=configs/math.py:d1 --workdir=runs/math --config.rl.objective=diffu_grpo
  python -m trafl_jax.main --config=configs/math.py:gsm8k,d1 --workdir=runs/gsm8k_d1 \
    --config.rl.objective=diffu_grpo --config.rl.reference=/ckpt/llada8b \
    --config.rl.train_path=/data/gsm8k/train.jsonl
The reference of the tables before 2026-12-06 (completion canvases of 16 only; the default trains on 16,
24 and 32, so length 32 can be evaluated):
  python -m trafl_jax.main --config=configs/math.py --workdir=runs/math_len16 \
    --config.data.answer_lens='()' --config.data.answer_len=16
Test-sized (seconds):
  python -m trafl_jax.main --config=configs/math.py:tiny --workdir=/tmp/tiny
Evaluation of any checkpoints on this config's grid:
  python -m trafl_jax.evaluate --config=configs/math.py --checkpoint=runs/math/reference \
    --checkpoint=runs/math/trafl

GSM8K with LLaDA-8B-Instruct (d1-like rollouts: G 6, length 256, block 32, 128 steps, temperature 0.9),
evaluated on GSM8K, a MATH-format file and Minerva Math at lengths 128/256/512. Convert the weights first:
  python -m trafl_jax.convert --src=/models/LLaDA-8B-Instruct --dst=/ckpt/llada8b
GPU node (8 GPUs; FSDP over them, bfloat16 compute, bfloat16 reference):
  python -m trafl_jax.main --config=configs/math.py:gsm8k --workdir=runs/gsm8k \
    --config.rl.reference=/ckpt/llada8b --config.rl.train_path=/data/gsm8k/train.jsonl \
    --config.eval.tasks='("gsm8k=/data/gsm8k/test.jsonl","math=/data/math500.jsonl","math=/data/minerva_math/test.jsonl")'
TPU pod slice (launch/tpu_pod.sh runs it on every worker; the bucket is mounted at /gcs/BUCKET, so
checkpoints and logs land in gs://BUCKET/runs/gsm8k):
  CONFIG=configs/math.py:gsm8k WORKDIR=gs://BUCKET/runs/gsm8k launch/tpu_pod.sh run \
    --config.rl.reference=gs://BUCKET/ckpt/llada8b --config.rl.train_path=gs://BUCKET/gsm8k/train.jsonl
LLaDA-8B TraFL with d1's adapters (rank 128, alpha 64 on q/k/v, a bfloat16 base) on one GPU; the run
holds the adapters, exported with --to=peft or --to=hf --merge_lora (trafl_jax.convert):
  python -m trafl_jax.main --config=configs/math.py:gsm8k_lora --workdir=runs/gsm8k_lora \
    --config.rl.reference=/ckpt/llada8b --config.rl.train_path=/data/gsm8k/train.jsonl
GSM8K with Dream-v0-Instruct-7B (converted the same way; rollouts and evaluation with Dream's sampler:
alg entropy over one block, one token per step; combine with d1 for the baselines):
  python -m trafl_jax.convert --src=/models/Dream-v0-Instruct-7B --dst=/ckpt/dream7b
  python -m trafl_jax.main --config=configs/math.py:dream_gsm8k --workdir=runs/dream_gsm8k \
    --config.rl.reference=/ckpt/dream7b --config.rl.train_path=/data/gsm8k/train.jsonl
  (dream_gsm8k_lora: with d1's adapters on a bfloat16 base, on one accelerator, as gsm8k_lora)
Masked-diffusion SFT of the small preset on a GSM8K-format JSONL (reference making, no post-training):
  python -m trafl_jax.main --config=configs/math.py:gsm8k_sft --workdir=runs/gsm8k_sft \
    --config.data.train_path=/data/gsm8k/train.jsonl
"""

from configs import common

VARIANTS = ("tiny", "small", "gsm8k", "gsm8k_lora", "gsm8k_sft", "bf16", "fsdp", "constant", "d1")
VARIANTS += ("varied_len",)
VARIANTS += ("dream_gsm8k", "dream_gsm8k_lora")


def get_config(arg: str | None = None):
  variants = common.parse_variant(arg, VARIANTS)
  c = common.base_config("mini")
  # Numbers 1..10 and t ~ U(0.1, 1): the mini reference reaches ~30-50% greedy in 2,000 steps (with
  # numbers 1..20 and t_min 1e-3 it stayed near 1%; see docs/results.md).
  c.data.countdown_max_number = 10
  c.train.t_min = 0.1
  c.train.num_steps = 2000
  # The reference trains on completion canvases of 16, 24 and 32 positions (EOS fill after the answer),
  # so length 32 measures the policy, not a canvas the reference never saw (trained on 16 alone it
  # solves ~0.1% at 32; docs/results.md: the same post-training differences at 16 with either, 3 seeds;
  # ~13% more time per reference step). The 16-only reference of the earlier tables:
  # --config.data.answer_lens='()' --config.data.answer_len=16.
  c.data.answer_lens = (16, 24, 32)
  c.data.answer_len = 32
  # The Countdown answers are short: evaluate at the trained length and twice it, one token per step.
  c.eval.gen_lengths = (16, 32)
  c.eval.block_length = 16
  c.eval.steps_per_token = 1.0
  # Countdown's problem space is split three ways (tasks/countdown.py): the reference trains on one part,
  # post-training uses every problem of another (train_limit 0), and the held-out test is the third.
  # Evaluation reports the test and a probe of the post-training prompts as separate rows.
  c.rl.train_limit = 0
  c.eval.splits = ("test", "train")
  c.rl.gen_length = 16
  c.rl.sample_steps = 16
  c.rl.block_length = 16
  # The best TraFL setting of the issue-11 screen on the post-training probe (docs/results.md): 32 prompts
  # x 8 samples per step (per-step noise in l_theta - l_ref is what keeps the tilt from building), lr 3e-4,
  # log Z clipped to [0, beta] for the policy's residual (no collapse onto the policy's own samples).
  c.rl.prompts_per_step = 32
  c.rl.lr = 3e-4
  c.rl.log_z_bounded = True
  if "tiny" in variants:
    common.apply_preset(c, "tiny")
    c.rl.num_steps = 3
    c.rl.prompts_per_step = 4
    c.rl.group_size = 4
    c.rl.train_limit = 64
    c.rl.eval_every = 3
    c.rl.diag_noise_every = 2
    c.rl.eval_problems = 8
    c.rl.ckpt_every = 2
    c.eval.limit = 6
    c.eval.splits = ("test",)
    c.eval.num_samples = 4
    c.eval.gen_lengths = (16,)
    c.eval.batch_size = 24
    c.eval.problems_per_batch = 3
    c.data.num_generated = 512
    c.data.answer_lens = ()  # one canvas: the tests' tiny references stay seconds
    c.data.answer_len = 16
    c.data.batch_size = 16
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.ckpt_every = 10
    c.optim.warmup_steps = 5
  if "small" in variants:
    common.apply_preset(c, "small")
  if "gsm8k_lora" in variants:  # gsm8k with d1's adapters: one 80 GB GPU, or a Colab TPU chip
    variants.append("gsm8k")
  if "dream_gsm8k_lora" in variants:  # the same adapters on Dream-7B
    variants.append("dream_gsm8k")
  if "gsm8k" in variants:
    # The reference is LLaDA-8B-Instruct (rl.reference); the model section follows it on load.
    common.llada_8b_posttraining(c, "gsm8k")
    c.rl.num_steps = 1000
    c.eval.tasks = ("gsm8k",)
    c.eval.splits = ("test",)
  if "gsm8k_lora" in variants:
    common.d1_lora(c)
  if "dream_gsm8k" in variants:  # Dream-v0-Instruct-7B (rl.reference) with Dream's own sampler
    common.dream_7b_posttraining(c, "gsm8k")
    c.rl.num_steps = 1000
    c.eval.tasks = ("gsm8k",)
    c.eval.splits = ("test",)
  if "dream_gsm8k_lora" in variants:
    common.d1_lora(c)
  if "gsm8k_sft" in variants:
    common.apply_preset(c, "small")
    c.stages = ("reference",)
    c.data.source = "jsonl"
    c.data.prompt_key = "question"
    c.data.answer_key = "answer"
    c.data.prompt_len = 256
    c.data.answer_lens = ()
    c.data.answer_len = 320
    # 1% of GSM8K's train answers are longer than 320 tokens of the 1,024-piece tokenizer.
    c.data.too_long = "drop"
    c.data.batch_size = 16
    c.optim.lr = 3e-4
    c.train.num_steps = 5000
  if "bf16" in variants:
    c.model.dtype = "bfloat16"
  if "fsdp" in variants:
    c.mesh.data = 1
    c.mesh.fsdp = -1
  if "constant" in variants:
    c.optim.schedule = "constant"
  # varied_len: the canvases 16, 24 and 32, the default since 2026-12-06 (kept so earlier commands run).
  if "d1" in variants:  # after the task is set: d1's inner updates depend on it
    common.d1_baselines(c)
  c.lock()
  return c
