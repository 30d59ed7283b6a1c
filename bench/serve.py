"""Serving benchmark: `chatrlhf serve` under 1, 8 and 32 concurrent streaming clients, against plain transformers.

Both sides answer the same chat prompts (the 16 PPO prompts of the shared TRL anchor, `make_prompt_data()` in
`<repo>/../shared/bench/trl_baseline.py`, repeated; CHATRLHF_SHARED_BENCH overrides the folder) with the
default model (SmolLM2-135M-Instruct in fp32, `chatrlhf.models.default_model_path()`), sampling at
temperature 0.7 (no top-k / top-p), at most `--max-tokens` new tokens, no seed, on the CPU:

* chatrlhf: `python -m chatrlhf serve --served_name smollm2 --max_batch 8` in its own process (torch's
  default thread count); for each level C, C asyncio clients (`openai.AsyncOpenAI`) share a queue of
  `--requests` streaming chat completions (`stream_options={"include_usage": True}`), each client sending
  its next request when its last one ends (closed loop). TTFT = request sent -> first non-empty content
  delta, measured in the client; tokens = the usage chunk's completion_tokens.
* transformers: this script's hidden `--baseline-child` mode in a fresh process (2 torch threads): one
  `model.generate(do_sample=True)` per request, one after the other, as a server-less transformers loop
  serves many users. Its rows at C > 1 come from that same sequential run: with C clients in a closed loop
  and one worker, request j (0-based) is sent when request j - C ends (at time 0 for j < C), so its TTFT =
  its wait in the queue + its own time to first token. A second row, `transformers-batch8`, times
  `generate` on 8 left-padded prompts at a time (throughput only: no streaming, no arrivals).

Run from the repository root:

    .venv/bin/python bench/serve.py                              # baseline, then the server (about 5-7 min)
    .venv/bin/python bench/serve.py --out bench/out/serve.jsonl --requests-c1 8
    .venv/bin/python bench/serve.py --skip-baseline --levels 8,32 --requests 64

stdout gets one JSON line per (framework, concurrency), a summary JSON line and a table; logs go to stderr.
tokens/s = completion tokens (EOS not counted, as in the API's usage) / wall seconds of the level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also when loaded by path
import common  # noqa: E402

SERVED_NAME = "smollm2"
TEMPERATURE = 0.7
NOTES = [
    "chatrlhf: `chatrlhf serve --max_batch 8` in its own process; C asyncio openai clients in a closed loop "
    "(each sends its next request when its last one ends) over one shared list of requests; the clients run on "
    "the same 2 cores as the server. TTFT = request sent -> first non-empty content delta, client side "
    "(HTTP, prompt rendering, queueing, prefill and the first decode step included). wall_s = first request "
    "sent -> last request done",
    "transformers: one model.generate(do_sample=True, temperature=0.7, top_k=0) per request, sequentially, in "
    "a fresh process with 2 torch threads (no server, no HTTP). Rows at C > 1 are the same sequential run seen "
    "by C closed-loop clients: request j is sent when request j - C ends (at 0 for j < C) and its TTFT = queue "
    "wait + its own time to first token (prompt rendering + prefill + first sampled token, from a "
    "StoppingCriteria timestamp). tokens/s and requests/s do not change with C",
    "transformers-batch8: model.generate on 8 left-padded prompts at a time over the same requests; throughput "
    "only (wall = sum of the generate calls), first_token_s_mean = batch start -> first token of the batch",
    "completion tokens exclude the EOS token (as the API's usage counts them); answers are sampled without a "
    "seed, so their lengths differ between rows: compare mean_completion_tokens",
]


def request_prompts(n: int) -> list[str]:
    """The anchor's 16 prompts, repeated to n requests."""
    prompts = [row["prompt"] for row in common.load_anchor(common.shared_bench_dir()).make_prompt_data()]
    return [prompts[i % len(prompts)] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def level_record(
    framework: str, concurrency: int, ttfts: list[float], tokens: list[int], wall: float
) -> dict:
    n = len(tokens)
    return {
        "bench": "serve",
        "framework": framework,
        "concurrency": concurrency,
        "requests": n,
        "completion_tokens": sum(tokens),
        "mean_completion_tokens": round(sum(tokens) / n, 1),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "requests_per_s": round(n / wall, 3),
        "ttft_mean_s": round(statistics.fmean(ttfts), 3) if ttfts else None,
        "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
        "ttft_p90_s": round(percentile(ttfts, 90), 3) if ttfts else None,
        "ttft_max_s": round(max(ttfts), 3) if ttfts else None,
    }


# --------------------------------------------------------------------------------------------------
# chatrlhf: the server in its own process, streaming clients here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, max_batch: int, log_file) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "chatrlhf",
        "serve",
        "--port",
        str(port),
        "--served_name",
        SERVED_NAME,
        "--max_batch",
        str(max_batch),
    ]
    common.log("$ " + " ".join(cmd))
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=common.REPO)


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 300.0) -> float:
    """Poll GET /health until 200; returns the seconds it took."""
    import httpx

    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        if proc.poll() is not None:
            sys.exit(f"the server exited with code {proc.returncode} before it was healthy")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return time.perf_counter() - began
        time.sleep(0.5)
    sys.exit(f"the server was not healthy after {timeout:.0f} s")


def server_peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of the server process, read before it is stopped."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    return None


async def one_request(client, prompt: str, max_tokens: int) -> tuple[float, int, float]:
    """Stream one chat completion; returns (seconds to the first content token, completion tokens, seconds)."""
    began = time.perf_counter()
    first, tokens = None, None
    stream = await client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": prompt}],
        temperature=TEMPERATURE,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - began
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - began
    if tokens is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return (first if first is not None else total), tokens, total


async def run_level(base: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """C clients in a closed loop over one shared queue of requests."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600.0)
    todo: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        todo.put_nowait(p)
    results: list[tuple[float, int, float]] = []

    async def client_loop() -> None:
        while True:
            try:
                prompt = todo.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await one_request(client, prompt, max_tokens))

    began = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    await client.close()
    record = level_record("chatrlhf", concurrency, [r[0] for r in results], [r[1] for r in results], wall)
    record["latency_mean_s"] = round(statistics.fmean(r[2] for r in results), 3)
    return record


async def warm_up(base: str, prompts: list[str], max_batch: int) -> None:
    """One lone request and one full batch, untimed: the first forwards of each shape are slow."""
    await run_level(base, prompts[:1], 1, 4)
    await run_level(base, prompts[:max_batch], max_batch, 4)


def run_chatrlhf(args, levels: list[int]) -> list[dict]:
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    records = []
    with tempfile.NamedTemporaryFile("w+", prefix="chatrlhf-bench-serve-", suffix=".log") as server_log:
        proc = start_server(port, args.max_batch, server_log)
        try:
            load_s = wait_healthy(base, proc)
            common.log(f"server healthy after {load_s:.1f} s; warming up")
            asyncio.run(warm_up(base, request_prompts(args.max_batch), args.max_batch))
            for c in levels:
                n = requests_at(args, c)
                common.log(f"chatrlhf: {n} requests at concurrency {c}")
                record = asyncio.run(run_level(base, request_prompts(n), c, args.max_tokens))
                record.update(
                    max_tokens=args.max_tokens, max_batch=args.max_batch, server_load_s=round(load_s, 1)
                )
                records.append(record)
            peak = server_peak_rss_mib(proc.pid)
            for r in records:
                r["server_peak_rss_mib"] = peak
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            server_log.seek(0)
            tail = server_log.read()[-2000:].strip()
            if tail:
                common.log("server log (tail):\n" + tail)
    return records


# --------------------------------------------------------------------------------------------------
# transformers baseline: a fresh process, plain generate


def requests_at(args, concurrency: int) -> int:
    return args.requests_c1 if concurrency == 1 and args.requests_c1 else args.requests


def run_baseline(args, levels: list[int]) -> list[dict]:
    n = max(requests_at(args, c) for c in levels)
    cmd = common.child_cmd(
        __file__,
        "--baseline-child",
        "--requests",
        str(n),
        "--max-tokens",
        str(args.max_tokens),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.max_batch),
    )
    code, lines = common.run_json_lines(cmd)
    if code != 0 or not lines:
        sys.exit(f"baseline process failed (exit {code})")
    raw = json.loads(lines[-1])
    records = [sequential_level(raw, c, requests_at(args, c)) for c in levels]
    batch = raw["batched"]
    tokens = batch["tokens"]
    record = level_record(f"transformers-batch{args.max_batch}", args.max_batch, [], tokens, batch["wall_s"])
    record["first_token_s_mean"] = round(statistics.fmean(batch["first_token_s"]), 3)
    records.append(record)
    for r in records:
        r.update(max_tokens=args.max_tokens, torch_threads=args.threads, peak_rss_mib=raw["peak_rss_mib"])
    return records


def sequential_level(raw: dict, concurrency: int, n: int) -> dict:
    """The first n requests of the sequential run as C closed-loop clients would see them."""
    runs = raw["sequential"][:n]
    starts = [0.0]
    for r in runs[:-1]:
        starts.append(starts[-1] + r["total_s"])
    ends = [s + r["total_s"] for s, r in zip(starts, runs)]
    sent = [0.0 if j < concurrency else ends[j - concurrency] for j in range(n)]
    ttfts = [starts[j] - sent[j] + runs[j]["first_s"] for j in range(n)]
    record = level_record("transformers", concurrency, ttfts, [r["tokens"] for r in runs], ends[-1])
    record["latency_mean_s"] = round(statistics.fmean(e - s for e, s in zip(ends, sent)), 3)
    return record


def baseline_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    from chatrlhf.models import default_model_path, load_tokenizer

    class FirstToken(StoppingCriteria):
        """Records when generate has chosen its first token; never stops anything."""

        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.at is None:
                self.at = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    path = str(default_model_path())
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # a pad token was added
        model.resize_token_embeddings(len(tokenizer))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = dict(
        do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad
    )

    def encode(prompts: list[str]):
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        return tokenizer.apply_chat_template(
            conversations if len(prompts) > 1 else conversations[0],
            add_generation_prompt=True,
            padding=len(prompts) > 1,
            return_dict=True,
            return_tensors="pt",
        )

    def run(prompts: list[str], max_new: int) -> tuple[float, list[int], float, float]:
        """(seconds to the first token, new tokens per row without EOS, seconds, when it began)."""
        began = time.perf_counter()
        enc = encode(prompts)
        first = FirstToken()
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new, stopping_criteria=StoppingCriteriaList([first]), **sampling
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        tokens = [row.index(eos) if eos in row else sum(t != pad for t in row) for row in new]
        tokenizer.batch_decode(
            [row[:k] for row, k in zip(new, tokens)], skip_special_tokens=True
        )  # a server sends text
        return first.at - began, tokens, time.perf_counter() - began, began

    prompts = request_prompts(args.requests)
    tokenizer.padding_side = "left"
    run(prompts[:1], 4)  # warm-up
    run(prompts[: args.batch], 4)
    common.log(f"transformers: {args.requests} sequential requests")
    sequential = []
    for p in prompts:
        first_s, tokens, total_s, _ = run([p], args.max_tokens)
        sequential.append({"first_s": round(first_s, 4), "tokens": tokens[0], "total_s": round(total_s, 4)})
    common.log(f"transformers: the same requests in batches of {args.batch}")
    batched = {"tokens": [], "first_token_s": [], "wall_s": 0.0}
    for i in range(0, len(prompts), args.batch):
        first_s, tokens, total_s, _ = run(prompts[i : i + args.batch], args.max_tokens)
        batched["tokens"] += tokens
        batched["first_token_s"].append(round(first_s, 4))
        batched["wall_s"] += total_s
    record = {
        "sequential": sequential,
        "batched": batched,
        "peak_rss_mib": common.peak_rss_mib(),
    }
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------------
# parent


def summarize(records: list[dict], args, levels: list[int]) -> dict:
    by = {(r["framework"], r["concurrency"]): r for r in records}
    ratios = {}
    for c in levels:
        a, b = by.get(("chatrlhf", c)), by.get(("transformers", c))
        if a and b:
            ratios[str(c)] = {
                "tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 2),
                "ttft_p50": round(a["ttft_p50_s"] / b["ttft_p50_s"], 3),
            }
    return {
        "bench": "serve",
        "summary": True,
        "levels": levels,
        "requests": {str(c): requests_at(args, c) for c in levels},
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "ratio_chatrlhf_over_transformers": ratios,
        "versions": common.versions((*common.CHATRLHF_PACKAGES, "openai", "fastapi", "uvicorn")),
        "notes": NOTES,
    }


def print_table(records: list[dict], summary: dict) -> None:
    head = ("framework", "C", "requests", "tokens/s", "req/s", "TTFT mean", "TTFT p50", "TTFT p90", "tok/req")
    rows = [head]
    for r in records:
        ttft = [r[k] for k in ("ttft_mean_s", "ttft_p50_s", "ttft_p90_s")]
        rows.append(
            (
                r["framework"],
                str(r["concurrency"]),
                str(r["requests"]),
                f"{r['tokens_per_s']:.1f}",
                f"{r['requests_per_s']:.3f}",
                *("-" if t is None else f"{t:.3f}" for t in ttft),
                f"{r['mean_completion_tokens']:.1f}",
            )
        )
    print(f"\nServing, max_tokens {summary['max_tokens']}, temperature {TEMPERATURE} (TTFT in seconds):")
    common.print_rows(rows, 22, 11)
    for c, r in summary["ratio_chatrlhf_over_transformers"].items():
        print(
            f"chatrlhf/transformers at C={c}: {r['tokens_per_s']:.2f}x tokens/s, {r['ttft_p50']:.3f}x TTFT p50"
        )


def parent_main(args) -> None:
    levels = [int(c) for c in args.levels.split(",") if c.strip()]
    out = Path(args.out) if args.out else None
    records = []
    if not args.skip_baseline:
        for record in run_baseline(args, levels):
            common.emit(record, out)
            records.append(record)
    if not args.skip_chatrlhf:
        for record in run_chatrlhf(args, levels):
            common.emit(record, out)
            records.append(record)
    summary = summarize(records, args, levels)
    common.emit(summary, out)
    print_table(records, summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=32, help="requests per level")
    ap.add_argument("--requests-c1", type=int, default=0, help="requests at C=1 (0: --requests)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--max-batch", type=int, default=8, help="server --max_batch and the batched baseline's size"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the transformers baseline")
    ap.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-chatrlhf", action="store_true")
    ap.add_argument("--out", help="append the JSON lines to this file")
    ap.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_child:
        baseline_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
