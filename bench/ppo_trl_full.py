"""TRL's side of `bench/ppo.py`'s full row in bf16: the anchor's own `trl_baseline.py ppo`, with the one change
that its TrainingArguments ask for bf16 mixed precision, as chatrlhf's side runs bf16 in that row.

TRL's PPOTrainer builds its own Accelerator, which reads the mixed precision from the environment that
`accelerate launch --mixed_precision bf16` would set, not from PPOConfig's `bf16`; both are set here. In TRL
1.12 this autocasts the update's forwards; generation and the no-grad scoring forwards stay fp32 (seen in the
lora row, `bench/ppo_trl_lora.py`). Run by `bench/ppo.py --workload full --dtype bf16` with the interpreter of
`.venv-trl-ppo`; by hand, from the repository root:

    .venv-trl-ppo/bin/python bench/ppo_trl_full.py --anchor ../shared/bench --model-dir bench/models/smollm2-135m

stdout gets the anchor's JSON record(s); logs go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchor", required=True, help="the folder holding trl_baseline.py")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.anchor))
    import trl_baseline

    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    anchor_args = trl_baseline.common_args

    def bf16_args(out_dir, **kw):
        return {**anchor_args(out_dir, **kw), "bf16": True}

    trl_baseline.common_args = bf16_args  # looked up by name when cmd_ppo builds its PPOConfig
    return trl_baseline.main(["ppo", "--model-dir", args.model_dir, "--threads", str(args.threads)])


if __name__ == "__main__":
    sys.exit(main())
