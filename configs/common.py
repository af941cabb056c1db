"""Shared config pieces: model size presets, the mesh and its logical-axis rules, optimizer, training.

Every key the code reads exists here, so every config has it; config files only change values.
"""

from __future__ import annotations

import ml_collections

from trafl_jax import model as model_lib
from trafl_jax import sharding as sharding_lib

PRESETS = model_lib.PRESETS


def model_config(preset: str) -> ml_collections.ConfigDict:
  """A preset's shape and the compute defaults; preset "checkpoint" follows the checkpoint's shape
  (every shape field model_lib.FOLLOW), for post-training and evaluation of a given checkpoint."""
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
  values = dict(
    preset=preset,
    rms_norm_eps=1e-5,
    dtype="float32",
    param_dtype="float32",
    remat="none",
    scan_layers=True,
    logits_chunk=0,  # score log-probs over chunks of this many positions (no whole-vocab logits)
  )
  return ml_collections.ConfigDict({**values, **PRESETS[preset]})


def sharding_rules() -> ml_collections.ConfigDict:
  """Logical axis -> mesh axes (sharding.DEFAULT_RULES): batch over data x fsdp; weights' `embed`
  over fsdp; the rest tensor."""
  return ml_collections.ConfigDict(dict(sharding_lib.DEFAULT_RULES))


def sampler_modes() -> ml_collections.ConfigDict:
  """The sampler's speed modes and draw settings (sampler.SECTION_FIELDS; the defaults are LLaDA's
  exact sampler): cache none | prefix | dual, refresh_every (steps of a block between cache
  refreshes; 0: once per block), threshold (commit every position more confident than it; 0: LLaDA's
  per-step counts), threshold_floor (what a thresholded step commits at least: "one", or "schedule":
  the exact schedule's count), stop_at_eos, micro_batch (rows per sampler pass; 0: the whole batch); schedule
  llada | dream (Dream's `linspace(1, eps, steps + 1)` commit counts, confidences of the distribution
  drawn from), top_p, top_k (0: off), alg_temp (draw positions by confidence; 0: the most confident),
  eps (Dream's last timestep)."""
  return ml_collections.ConfigDict(
    dict(
      cache="none",
      refresh_every=0,
      threshold=0.0,
      threshold_floor="one",
      stop_at_eos=False,
      micro_batch=0,
      schedule="llada",
      top_p=1.0,
      top_k=0,
      alg_temp=0.0,
      eps=1e-3,
    )
  )


def base_config(preset: str = "mini") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # What `trafl_jax.main` runs, in order: "reference" (masked-diffusion training, skipped when
  # rl.reference is set), "posttrain" (rl.objective), "evaluate" (reference vs policy).
  c.stages = ("reference", "posttrain", "evaluate")
  c.model = model_config(preset)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.rules = sharding_rules()

  c.data = ml_collections.ConfigDict()
  c.data.source = "countdown"  # "countdown" (generated, no download) or "jsonl"
  c.data.train_path = ""  # JSONL of prompt/answer pairs when source == "jsonl"
  c.data.prompt_key = "prompt"
  c.data.answer_key = "answer"
  c.data.num_generated = 20000  # countdown problems generated into the workdir
  c.data.countdown_numbers = 3
  c.data.countdown_max_number = 20
  c.data.prompt_len = 24
  c.data.answer_len = 16
  # Completion canvases drawn per training step, e.g. (16, 24, 32) with answer_len 32 (empty: answer_len
  # only). Each record must fit the smallest; the rest of a row is EOS fill, masked and scored.
  c.data.answer_lens = ()
  c.data.batch_size = 64  # global, over all processes
  c.data.shuffle = True
  c.data.too_long = "error"  # a record over prompt_len + answer_len: "error" (naming it) or "drop"

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "sentencepiece"  # or "hf" (a tokenizer.json)
  c.tokenizer.path = (
    ""  # empty: train a sentencepiece model on the task's text, cached in the workdir
  )

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.schedule = "cosine"  # or "constant"
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1500
  c.train.t_min = 1e-3  # masking ratio t ~ U(t_min, 1)
  c.train.log_every = 50
  c.train.ckpt_every = 500
  c.train.keep_checkpoints = 2
  c.train.init_checkpoint = ""  # params-only start when the workdir has no checkpoint
  c.train.progress = True

  # Low-rank adapters for post-training (trafl_jax/lora.py). rank 0: full post-training. With adapters
  # only they (and TraFL's log Z head) are trained and checkpointed, and the reference is the same base
  # with them off (no second copy; rl.reference_dtype does not apply).
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 0.0  # the update is scaled by alpha / rank
  c.lora.targets = (
    "q_proj",
    "k_proj",
    "v_proj",
  )  # any of q_proj k_proj v_proj attn_out ff_proj up_proj ff_out
  c.lora.base_dtype = "bfloat16"  # the frozen base's parameters: float32 | bfloat16 | int8 | nf4

  # Post-training (TraFL and the baselines) of a reference model.
  c.rl = ml_collections.ConfigDict()
  c.rl.reference = (
    ""  # checkpoint of the reference; empty: built by masked-diffusion training first
  )
  c.rl.reference_dtype = "float32"  # "bfloat16" halves the frozen copy's memory
  c.rl.task = "countdown"
  c.rl.train_path = ""  # prompts for tasks read from files
  c.rl.eval_path = ""
  c.rl.train_limit = 0  # 0 = all (countdown: every problem of the post-training part of the space)
  # The seed of the post-training problems' order and draw (-1: the run's seed). Fixing it with a
  # train_limit keeps the same problems across seeds (Countdown's probe is the first eval.limit of seed 0).
  c.rl.problems_seed = -1
  c.rl.objective = "trafl"  # trafl | diffu_grpo | elbo_grpo | wd1
  c.rl.beta = 2.0
  c.rl.length_normalize = False
  # Mask and score the EOS fill with the answer: the answer's length is inside l (for every objective).
  c.rl.score_eos_fill = True
  # The surrogate's masks (pair | random_t | one_step), or "trajectory": the exact log-probability of
  # the rollout's recorded denoising path, one forward pass per sampler step (needs remasking "random").
  c.rl.estimator = "pair"
  c.rl.num_masks = 2
  c.rl.t_min = 0.2
  c.rl.t_max = 0.8
  # mlp (learned head) | batch_mean (per-group mean, no head) | centred (the head is learned and
  # reported, but the policy's gradient takes the residual centred per group, as with batch_mean)
  c.rl.log_z = "mlp"
  # The policy's residual reads log Z clipped to [0, beta], where log Z(x) lies for rewards in [0, 1]
  # (mlp: the head, which learns unclipped; batch_mean: the group mean). Not with centred.
  c.rl.log_z_bounded = False
  # TraFL's loss: "square" (mean delta^2) or "product" (delta_A * delta_B over two independent halves
  # of the masks: unbiased for the exact residual's square; pair needs num_masks 4, 8, ...).
  c.rl.residual = "square"
  c.rl.log_z_lr = 1e-2
  c.rl.importance_weights = False
  c.rl.importance_clip = 0.2
  c.rl.clip_eps = 0.5
  c.rl.kl_coef = 0.04
  # The GRPO baselines' mean over tokens: sequence | token | group (d1's; the d1 variant sets it).
  c.rl.loss_aggregation = "sequence"
  c.rl.prompt_mask_prob = 0.15
  c.rl.num_inner_updates = 1
  # Gradient accumulation: prepare and update run over this many micro-batches of whole prompt groups
  # (one optimizer step per update; the same result as 1, less activation memory).
  c.rl.micro_batches = 1
  c.rl.prompts_per_step = 8
  c.rl.group_size = 8
  # Of each group's group_size completions, this many are sampled from the frozen reference (the rest
  # from the policy): trajectory balance is valid off-policy, and reference samples keep covering what
  # the policy stops sampling. 0: on-policy.
  c.rl.reference_rollouts = 0
  c.rl.gen_length = 128
  c.rl.sample_steps = 64
  c.rl.block_length = 32
  c.rl.temperature = 1.0
  c.rl.remasking = "low_confidence"
  # The rollouts' sampler modes (cached, parallel, early exit): TraFL is valid off-policy; the GRPO
  # baselines assume on-policy samples (README: Fast rollouts).
  c.rl.rollout = sampler_modes()
  c.rl.lr = 1e-4
  c.rl.warmup_steps = 0
  c.rl.weight_decay = 0.0
  c.rl.grad_clip = 1.0
  c.rl.num_steps = 200
  c.rl.log_every = 10
  c.rl.ckpt_every = 50
  c.rl.keep_checkpoints = 2
  c.rl.sample_every = 50
  c.rl.eval_every = 50
  c.rl.eval_problems = 64
  # diag/mask_noise (Var_M of l_theta - l_ref) from a second, independent mask draw (one more prepare)
  # every this many steps; 0: never.
  c.rl.diag_noise_every = 10

  # Evaluation (python -m trafl_jax.evaluate): tasks x generation lengths, greedy and n samples each.
  c.eval = ml_collections.ConfigDict()
  c.eval.tasks = ("countdown",)  # "task" or "task=path", e.g. "math=/data/minerva_math/test.jsonl"
  # Rows per split: "test" (held out); "train" adds a probe of the post-training prompts (Countdown).
  c.eval.splits = ("test",)
  c.eval.limit = 200  # problems per task (0 = all)
  c.eval.gen_lengths = (128, 256, 512)
  c.eval.steps_per_token = 0.5  # steps = gen_length / 2
  c.eval.block_length = 32
  # Each a row of its own: "low_confidence" rows keep the task's label, others are "task[random]".
  c.eval.remasking = ("low_confidence",)
  # The sampler's modes for evaluation; a row not sampled exactly is tagged with its mode
  # (`countdown[dual+t0.9]`).
  c.eval.sampler = sampler_modes()
  c.eval.num_samples = 16  # n for pass@k, k = 1, 2, 4, ..., n
  c.eval.temperature = 1.0
  c.eval.batch_size = 64  # sampler rows per call
  c.eval.problems_per_batch = 16  # problems recorded together (the unit an interrupted run redoes)
  c.eval.seed = 0
  return c


def llada_8b_posttraining(c: ml_collections.ConfigDict, task: str) -> None:
  """Post-training a converted LLaDA-8B(-Instruct) checkpoint with d1-like rollouts (G 6, length 256,
  block 32, 128 steps, temperature 0.9, lr 3e-6), FSDP over all devices in bfloat16, evaluated at lengths
  128/256/512 with steps = length / 2."""
  with c.unlocked():
    c.model = model_config("llada_8b")
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.stages = ("posttrain", "evaluate")
  c.rl.task = task
  c.rl.train_limit = 0
  c.rl.reference_dtype = "bfloat16"
  c.rl.group_size = 6
  c.rl.prompts_per_step = 8
  c.rl.gen_length = 256
  c.rl.sample_steps = 128
  c.rl.block_length = 32
  c.rl.temperature = 0.9
  c.rl.lr = 3e-6
  c.rl.eval_every = 100
  c.rl.eval_problems = 64
  # diag/mask_noise (Var_M of l_theta - l_ref) from a second, independent mask draw (one more prepare)
  # every this many steps; 0: never.
  c.rl.diag_noise_every = 10
  c.eval.gen_lengths = (128, 256, 512)
  c.eval.block_length = 32
  c.eval.steps_per_token = 0.5
  c.eval.temperature = 0.9
  c.eval.batch_size = 32


def dream_7b_posttraining(c: ml_collections.ConfigDict, task: str) -> None:
  """Post-training a converted Dream-v0-7B / DiffuCoder-7B checkpoint: llada_8b_posttraining's run
  shape (FSDP, bfloat16, G 6, lr 3e-6) on the dream_7b preset, with Dream's own sampler for rollouts
  and evaluation: `diffusion_generate`'s schedule over one block (the whole canvas), entropy
  confidences (alg="entropy", Dream's recommended setting), one token per step, top-p 0.95 when
  sampling; greedy evaluation as Dream's GSM8K evaluation runs it."""
  llada_8b_posttraining(c, task)
  with c.unlocked():
    c.model = model_config("dream_7b")
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  for section, top_p in ((c.rl.rollout, 0.95), (c.eval.sampler, 1.0)):
    section.schedule = "dream"
    section.top_p = top_p
  c.rl.remasking = "entropy"
  c.rl.sample_steps = c.rl.gen_length  # steps = tokens, as Dream's evaluation and DiffuCoder run
  c.rl.block_length = c.rl.gen_length
  c.eval.remasking = ("entropy",)
  c.eval.block_length = max(c.eval.gen_lengths)  # one block at every length
  c.eval.steps_per_token = 1.0
  c.eval.temperature = 0.0


def coupled_grpo(c: ml_collections.ConfigDict) -> None:
  """DiffuCoder's coupled-GRPO settings (apple/ml-diffucoder, recipes/config_coupled_code.yaml) for the
  baselines: 10 rollouts per prompt at temperature 1.0 (top-p 0.95), 256 tokens in 256 steps, two
  updates per rollout batch, PPO clip 0.5, k3 KL 0.01, lr 1e-6, weight decay 0.1, gradient norm 0.2,
  and its coupled masks (t ~ U(0.2, 0.8) and the complement: the pair estimator). Not modelled: its
  extra fully masked pass in the log-probability, leave-one-out advantages, the reference re-synced
  every 64 steps, the cosine schedule. The objective stays the config's (elbo_grpo is the baseline's)."""
  c.rl.group_size = 10
  c.rl.prompts_per_step = 8
  c.rl.gen_length = c.rl.sample_steps = c.rl.block_length = 256
  c.rl.temperature = 1.0
  c.rl.num_inner_updates = 2
  c.rl.clip_eps = 0.5
  c.rl.kl_coef = 0.01
  c.rl.lr = 1e-6
  c.rl.weight_decay = 0.1
  c.rl.grad_clip = 0.2
  c.rl.estimator = "pair"
  c.rl.num_masks = 2
  c.rl.t_min, c.rl.t_max = 0.2, 0.8
  c.rl.importance_weights = True


# d1's diffu-GRPO settings (dllm-reasoning/d1, diffu-grpo/slurm_scripts/*.yaml and *.sbatch): mu inner
# updates per rollout batch (12 for GSM8K and MATH, 8 for Countdown and Sudoku), PPO clip 0.5, k3 KL
# 0.04, rollouts at temperature 0.9, AdamW weight decay 0.1, gradient norm clipped at 0.2, the loss the
# token mean of each device micro-batch (one prompt group of 6), completions scored up to their first EOS.
D1_INNER_UPDATES = {"countdown": 8, "sudoku": 8}


def d1_baselines(c: ml_collections.ConfigDict) -> None:
  """d1's training settings for every objective (the learning rate, G and lengths stay with the
  model-size variant: llada_8b_posttraining has d1's). TraFL reusing a rollout batch for several
  updates weights its samples by the clipped ratio to the rollout policy (importance_weights)."""
  c.rl.num_inner_updates = D1_INNER_UPDATES.get(c.rl.task, 12)
  c.rl.clip_eps = 0.5
  c.rl.kl_coef = 0.04
  c.rl.temperature = 0.9
  c.rl.loss_aggregation = "group"
  c.rl.score_eos_fill = False
  c.rl.weight_decay = 0.1
  c.rl.grad_clip = 0.2
  c.rl.prompt_mask_prob = 0.15
  c.rl.importance_weights = True


def d1_lora(c: ml_collections.ConfigDict) -> None:
  """d1's adapters (rank 128, alpha 64 on the attention's q, k, v projections; PEFT's LoraConfig in
  diffu-grpo) on a bfloat16 base: LLaDA-8B post-training on one accelerator, no second frozen copy.
  d1's lora_dropout (0.05) is not modelled."""
  c.lora.rank = 128
  c.lora.alpha = 64.0
  c.lora.targets = ("q_proj", "k_proj", "v_proj")
  c.lora.base_dtype = "bfloat16"
  c.mesh.data, c.mesh.fsdp = 1, -1
  # One accelerator holds every row: 8 micro-batches of one prompt group (6 rows) in the update, 8 rows
  # per sampler pass (the same results as one pass; docs/scaling.md has the memory each saves).
  c.rl.micro_batches = 8
  c.rl.rollout.micro_batch = 8
  c.eval.sampler.micro_batch = 8


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> None:
  with c.unlocked():
    c.model = model_config(preset)


def parse_variant(arg: str | None, known: tuple[str, ...]) -> list[str]:
  """`"tiny,constant"` -> ["tiny", "constant"]; unknown names are an error naming them."""
  parts = [p for p in (arg or "").split(",") if p]
  unknown = [p for p in parts if p not in known]
  if unknown:
    raise ValueError(f"unknown config variant(s) {unknown}; known: {list(known)}")
  return parts
