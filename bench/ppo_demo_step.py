"""Seconds per PPO step at the demo's PPO settings, chatrlhf alone (no competitor: a before/after figure).

The demo's `PPOConfig` (`chatrlhf.demo_pipeline.pipeline_config`: 8 prompts x 4 answers, 48 new tokens, rloo,
LoRA r16 in the last 8 layers, 2 epochs x 2 minibatches) on the demo's training prompts, with the default
model as the policy and, with a fresh score head, as the reward model (so the rewards mean nothing, but
every forward and backward is the demo's). Prints each step's `timing/*` seconds and their medians.

    .venv/bin/python bench/ppo_demo_step.py --steps 4
    PYTHONPATH=/path/to/older/checkout/src .venv/bin/python bench/ppo_demo_step.py   # the same, older code
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="PPO steps (default 4)")
    ap.add_argument("--out", default="", help="run folder (default: a temporary one)")
    args = ap.parse_args()

    from chatrlhf import demo, demo_pipeline
    from chatrlhf.configs import DemoConfig
    from chatrlhf.models import resolve_model
    from chatrlhf.ppo import train

    out = Path(args.out or tempfile.mkdtemp(prefix="ppo_demo_step_"))
    data = out.parent / (out.name + "_data")
    data.mkdir(parents=True, exist_ok=True)
    rows = demo.paired_prompts([t for t in demo.TOPICS if t not in demo.HELD_OUT_TOPICS])
    (data / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model = resolve_model("")
    cfg = demo_pipeline.pipeline_config(DemoConfig(output_dir=str(out)), data).ppo
    cfg = dataclasses.replace(
        cfg, model=model, reward_model=model, output_dir=str(out), max_steps=args.steps, overwrite=True,
        sample_every=0,
    )  # fmt: skip
    cfg.data.train = str(data / "prompts.jsonl")
    train(cfg)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "timing/step" in r]
    keys = ("timing/rollout", "timing/score", "timing/update", "timing/step")
    for i, r in enumerate(steps, 1):
        print(json.dumps({"step": i, **{k: round(r[k], 2) for k in keys}}))
    print(json.dumps({"median": True, **{k: round(statistics.median(r[k] for r in steps), 2) for k in keys}}))


if __name__ == "__main__":
    main()
