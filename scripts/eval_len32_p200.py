"""The 600-step TraFL runs of the sweep and its reference at twice the trained length (32 tokens, blocks
of 16, 32 steps), 32 samples, on the probe: the every-length question at one more length (docs/results.md).

    python3 scripts/eval_len32_p200.py SWEEP_WORKDIR   # records and eval.md in SWEEP_WORKDIR/len32_eval
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from scripts import sweep  # noqa: E402
from trafl_jax import cli, pipeline  # noqa: E402

workdir = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "/work/sweep")
flags.FLAGS(sys.argv[:1])
cli.quiet_libraries()
name = "p200_bounded_b32_lr3e-4_600"
config = sweep.setting_config(name, 0, "seeds", 32, 200)
with config.unlocked():
  config.eval.gen_lengths = (32,)
  config.eval.block_length = 16
  config.eval.splits = ("train",)  # the probe: where it trained
runs = [os.path.join(workdir, "runs", f"{name}_s{s}") for s in (0, 1, 2)]
labels = ["reference"] + [f"{name}/s{s}" for s in (0, 1, 2)]
reference = os.path.join(workdir, "reference_main_quiet")
out = os.path.join(workdir, "len32_eval")
pipeline.evaluate_stage(config, [reference, *runs], out, labels, show_progress=False)
print(f"wrote {out}")
