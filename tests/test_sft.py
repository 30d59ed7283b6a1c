"""The SFT trainer: learning, masking, accumulation, packing, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import demo_rows
from transformers import AutoModelForCausalLM

from chatrlhf.configs import DemoData, SFTConfig
from chatrlhf.data import pack, tokenize_conversations
from chatrlhf.forward import collate, target_logits
from chatrlhf.records import Conversation
from chatrlhf.runs import read_metrics
from chatrlhf.sft import train


def config(tiny_model, demos_file, out, **kw) -> SFTConfig:
    data = DemoData(train=demos_file, shuffle=kw.pop("shuffle", True), packing=kw.pop("packing", False))
    base = dict(
        model=tiny_model,
        data=data,
        output_dir=str(out),
        batch_size=4,
        lr=3e-3,
        dtype="fp32",
        save_every=0,
        warmup_ratio=0.0,
    )
    base.update(kw)
    return SFTConfig(**base)


def weights(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_loss_decreases_and_parameters_change(tiny_model, demos_file, tmp_path):
    summary = train(config(tiny_model, demos_file, tmp_path / "run", max_steps=12))
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    before, after = weights(tiny_model), weights(tmp_path / "run")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every tensor trains in full fine-tuning
    assert summary["train/loss"] == losses[-1]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["lineage"]["parent"] == tiny_model and len(run["lineage"]["data"][demos_file]) == 64
    assert (tmp_path / "run" / "sft_curves.png").stat().st_size > 1000


def test_loss_only_on_assistant_tokens(tiny_model, tokenizer):
    """The loss equals the full-logit cross-entropy on assistant labels; prompt positions get no gradient."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    conv = Conversation("x", demo_rows(1)[0]["messages"])
    (sample,) = tokenize_conversations([conv], tokenizer, 256, False)
    batch = collate([sample], tokenizer.pad_token_id, "cpu")
    logits, targets = target_logits(model, batch)
    ours = torch.nn.functional.cross_entropy(logits, targets)

    ids = torch.tensor([sample.input_ids])
    labels = torch.where(torch.tensor([sample.loss_mask], dtype=torch.bool), ids, torch.full_like(ids, -100))
    full = model(input_ids=ids)
    full.logits.retain_grad()
    reference = torch.nn.functional.cross_entropy(full.logits[0, :-1], labels[0, 1:])
    assert torch.allclose(ours, reference, atol=1e-5)
    reference.backward()
    predicts_prompt = ~torch.tensor(sample.loss_mask[1:], dtype=torch.bool)
    assert full.logits.grad[0, :-1][predicts_prompt].abs().max() == 0
    assert full.logits.grad[0, :-1][~predicts_prompt].abs().max() > 0
    # and changing the labels of user-turn positions cannot matter: they are never targets
    assert int((batch["targets"] != -100).sum()) == sum(sample.loss_mask[1:])


def test_grad_accumulation_equals_full_batch(tiny_model, demos_file, tmp_path):
    full = train(
        config(
            tiny_model, demos_file, tmp_path / "full", max_steps=2, batch_size=8, grad_accum=1, shuffle=False
        )
    )
    accum = train(
        config(
            tiny_model, demos_file, tmp_path / "accum", max_steps=2, batch_size=4, grad_accum=2, shuffle=False
        )
    )
    assert accum["train/loss"] == pytest.approx(full["train/loss"], abs=1e-5)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "accum")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_packing_leaves_each_sample_loss_unchanged(tiny_model, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    convs = [Conversation(f"x:{i}", r["messages"]) for i, r in enumerate(demo_rows(5))]
    samples = tokenize_conversations(convs, tokenizer, 512, False)
    with torch.no_grad():
        separate = torch.cat(
            [
                torch.nn.functional.cross_entropy(
                    *target_logits(model, collate([s], 0, "cpu")), reduction="none"
                )
                for s in samples
            ]
        )
        (row,) = pack(samples, 512)
        packed = torch.nn.functional.cross_entropy(
            *target_logits(model, collate([row], 0, "cpu")), reduction="none"
        )
        padded = torch.nn.functional.cross_entropy(
            *target_logits(model, collate(samples, tokenizer.pad_token_id, "cpu")), reduction="none"
        )
    assert torch.allclose(separate, packed, atol=1e-5)
    assert torch.allclose(separate, padded, atol=1e-5)


def test_packed_training_puts_several_demonstrations_in_a_row_and_learns(
    tiny_model, tokenizer, demos_file, tmp_path
):
    from chatrlhf.data import load_demonstrations

    samples = tokenize_conversations(load_demonstrations(demos_file), tokenizer, 1024, False)
    single = max(sum(s.loss_mask[1:]) for s in samples)
    train(config(tiny_model, demos_file, tmp_path / "run", max_steps=8, packing=True, batch_size=1))
    rows = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    # one row a step: its loss tokens are those of several demonstrations
    assert all(r["train/tokens"] > single for r in rows)
    losses = [r["train/loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


class Killed(Exception):
    pass


def test_resume_continues_the_same_curve(tiny_model, demos_file, tmp_path):
    whole = config(tiny_model, demos_file, tmp_path / "whole", max_steps=6, save_every=2)
    train(whole)
    reference = [r["train/loss"] for r in read_metrics(tmp_path / "whole") if "train/loss" in r]

    cut = config(tiny_model, demos_file, tmp_path / "cut", max_steps=6, save_every=2)

    def kill_after_step_5(step, metrics):
        if step == 5:
            raise Killed  # dies after logging step 5; the last checkpoint is step 4

    with pytest.raises(Killed):
        train(cut, on_step=kill_after_step_5)
    assert not (tmp_path / "cut" / "run.json").exists()
    cut.resume = True
    train(cut)
    rows = [r for r in read_metrics(tmp_path / "cut") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in rows] == pytest.approx(reference, abs=1e-6)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_lora_trains_only_adapters_and_exports_merged(tiny_model, demos_file, tmp_path):
    from chatrlhf.configs import LoraConfig

    cfg = config(
        tiny_model,
        demos_file,
        tmp_path / "lora",
        max_steps=3,
        lora=LoraConfig(rank=4, targets=["q_proj", "v_proj"]),
    )
    train(cfg)
    before, after = weights(tiny_model), weights(tmp_path / "lora")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def test_lora_layers_puts_adapters_in_the_last_layers_only_and_backward_stops_below(tokenizer, tmp_path):
    from conftest import make_tiny_model

    from chatrlhf.configs import LoraConfig
    from chatrlhf.errors import UserError
    from chatrlhf.models import apply_lora, load_causal_lm

    folder = make_tiny_model(tmp_path / "four", tokenizer, layers=4)
    model = apply_lora(load_causal_lm(folder, tokenizer), LoraConfig(rank=4, layers=1))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".layers.3." in n for n in trainable)
    out = model(torch.tensor([[5, 6, 7, 8]]), output_hidden_states=True)
    # what enters the adapted layer carries no graph: backward has nothing to do below it
    assert not out.hidden_states[3].requires_grad and out.logits.requires_grad
    out.logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(UserError, match="lora.layers: 5 is not between 0 and the model's 4 layers"):
        apply_lora(load_causal_lm(folder, tokenizer), LoraConfig(rank=4, layers=5))


def test_bf16_reaches_the_fp32_loss(tiny_model, demos_file, tmp_path):
    """bf16 autocast over fp32 master weights trains like fp32 (small differences only)."""
    fp32 = train(config(tiny_model, demos_file, tmp_path / "fp32", max_steps=6, shuffle=False, dtype="fp32"))
    bf16 = train(config(tiny_model, demos_file, tmp_path / "bf16", max_steps=6, shuffle=False, dtype="bf16"))
    assert abs(bf16["train/loss"] - fp32["train/loss"]) < 0.05 * fp32["train/loss"]
    first = [r["train/loss"] for r in read_metrics(tmp_path / "bf16") if "train/loss" in r][0]
    assert bf16["train/loss"] < first - 0.3  # and it learned


def _file_mappings() -> list[tuple[int, int, str]]:
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) > 5:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end, fields[5]))
    return spans


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see file mappings")
def test_loaded_weights_live_in_process_memory_not_in_the_mapped_checkpoint(tiny_model, tokenizer):
    """Training writes every weight; weights that still map the safetensors file would take a copy-on-write
    fault per page on the first optimizer step. Tied weights stay tied."""
    from chatrlhf.models import load_causal_lm, load_reward_model

    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    checkpoint = str(Path(tiny_model, "model.safetensors").resolve())

    def in_checkpoint(model) -> list[str]:
        spans = [(a, b) for a, b, path in _file_mappings() if path == checkpoint]
        return [n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in spans)]

    assert in_checkpoint(plain), "transformers no longer maps the checkpoint: this test checks nothing"
    lm = load_causal_lm(tiny_model, tokenizer)
    assert in_checkpoint(lm) == []
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert in_checkpoint(load_reward_model(tiny_model, tokenizer, "cpu", init_head=True)) == []


REFAULT_SCRIPT = """
import resource, torch
from chatrlhf.harness import reuse_freed_memory

def faults_of_the_last_of_four_steps():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step = [torch.ones(n) for n in (30_000_000, 1_000_000, 5_000_000, 30_000_000)]  # 264 MB
        del step  # freed as a training step's gradients and activations are
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_the_last_of_four_steps()
tuned = reuse_freed_memory()
print(default, tuned, faults_of_the_last_of_four_steps())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator tuning is for glibc on Linux")
def test_training_reuses_freed_memory_instead_of_faulting_fresh_pages():
    """Blocks freed and allocated again step after step (gradients, activations) come back without page
    faults once `reuse_freed_memory` has run; with glibc's default every step faults its pages in again."""
    out = subprocess.run([sys.executable, "-c", REFAULT_SCRIPT], capture_output=True, text=True, check=True)
    default, tuned, after = out.stdout.split()
    if tuned != "True":
        pytest.skip("the C library is not glibc")
    pages = 264_000_000 // 4096
    assert int(default) > pages // 2, "glibc's default already reuses the blocks: this test checks nothing"
    assert int(after) < pages // 20


def test_a_diverging_run_stops_at_the_step_naming_it_and_keeps_no_model(tiny_model, demos_file, tmp_path):
    from conftest import chatrlhf

    out = tmp_path / "run"
    args = ["--model", tiny_model, "--data.train", demos_file, "--output_dir", str(out), "--dtype", "fp32"]
    result = chatrlhf(
        "sft", *args, "--max_steps", "6", "--lr", "1e30", "--warmup_ratio", "0", "--save_every", "0"
    )
    assert result.returncode == 2, result.stderr
    assert "the loss became NaN or infinite at step" in result.stderr and "try a lower lr" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "run.json").exists() and not (out / "model.safetensors").exists()


def test_freeze_layers_keeps_the_embeddings_and_bottom_layers_and_trains_the_rest(
    tokenizer, demos_file, tmp_path
):
    from conftest import make_tiny_model

    folder = make_tiny_model(tmp_path / "three", tokenizer, layers=3)
    cfg = config(folder, demos_file, tmp_path / "sft", freeze_layers=2)
    train(cfg)
    before, after = weights(folder), weights(tmp_path / "sft")
    frozen = [k for k in before if "embed_tokens" in k or ".layers.0." in k or ".layers.1." in k]
    trained = [k for k in before if ".layers.2." in k]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("proj.weight"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--freeze_layers", "3"], "freeze_layers: 3 is not between 0 and the model's 2 layers"),
        (["--freeze_layers", "-1"], "freeze_layers: -1 is negative"),
        (["--freeze_layers", "1", "--lora.rank", "4"], "freeze_layers: with LoRA only the adapters train"),
    ],
)
def test_impossible_freeze_layers_stop_with_the_key(tiny_model, demos_file, tmp_path, flags, message):
    result = subprocess.run(
        [sys.executable, "-m", "chatrlhf", "sft", "--model", tiny_model, "--data.train", demos_file,
         "--output_dir", str(tmp_path / "out"), *flags],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
