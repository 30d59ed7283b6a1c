"""llama.cpp's side of bench/generate.py, run by `.venv-llama`'s interpreter (llama-cpp-python, no torch).

Reads a job from stdin (the GGUF file, the prompts' token ids, the shape, new tokens at most, temperature, seed,
threads, EOS) and prints one JSON line: every answer's token ids and the wall time of generating them, one
sequence at a time through `Llama.generate` (which keeps the KV of the prompt it has just seen, so a repeated
prompt is prefilled once).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from llama_cpp import Llama

    job = json.loads(sys.stdin.read())
    longest = max(len(p) for p in job["prompts"]) + job["max_new"] + 8
    llm = Llama(model_path=job["gguf"], n_ctx=longest, n_threads=job["threads"], n_batch=512, seed=job["seed"],
                verbose=False)  # fmt: skip
    temperature = job["temperature"]
    rows = [p for p in job["prompts"] for _ in range(4)] if job["shape"] == "rollout" else job["prompts"]
    began, answers = time.perf_counter(), []
    for prompt in rows:
        answer = []
        for token in llm.generate(prompt, temp=temperature, top_k=0 if temperature else 1, top_p=1.0,
                                  min_p=0.0, repeat_penalty=1.0, reset=True):  # fmt: skip
            if token in (job["eos"], llm.token_eos()):
                break
            answer.append(token)
            if len(answer) == job["max_new"]:
                break
        answers.append(answer)
    print(json.dumps({"token_lists": answers, "wall_s": time.perf_counter() - began}), flush=True)


if __name__ == "__main__":
    main()
