"""Load on the server: many concurrent streaming clients for a fixed time, with malformed requests mixed in.

    .venv/bin/python bench/serve_load.py                                  # 64 clients, 60 s, the default model
    .venv/bin/python bench/serve_load.py --clients 16 --duration 20 --model runs/x/ppo
    .venv/bin/python bench/serve_load.py --out bench/out/serve_load.jsonl

`chatrlhf serve --max_batch B` runs in its own process (the default model, SmolLM2-135M-Instruct, unless
`--model` names a checkpoint). C asyncio clients share one `openai.AsyncOpenAI` and each loops until
`--duration` seconds have passed, sending its next request when its last one ends: streaming chat
completions (temperature 0.7, at most `--max-tokens` tokens, `stream_options={"include_usage": True}`).
Meanwhile `--malformed-per-s` malformed requests a second go to the same server, cycling through a bad role,
empty messages, a negative max_tokens, an unknown model, a seed no generator takes (2**70), and with httpx a
body that is not JSON and one whose text holds a lone UTF-16 surrogate ("\\ud800"). requests/s and tokens/s
count the well-formed requests over the whole wall time: sending stops at `--duration`, and the requests
still in flight then are waited for.

A well-formed request fails when it raises, or its stream ends without a finish_reason or a usage chunk; a
malformed one passes when it gets a 4xx. The server's resident memory (VmRSS) is read every second.
stdout gets one JSON record and a one-line summary; logs go to stderr. The exit code is 1 when a well-formed
request failed, a malformed one got anything but a 4xx, or none was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also when loaded by path
import common  # noqa: E402

PROMPTS = [
    "Name three fruits.",
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain what a reward model is in two sentences.",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Say hello in Spanish.",
    "Describe a cat in one sentence.",
]
MALFORMED = [
    "bad_role",
    "empty_messages",
    "negative_max_tokens",
    "unknown_model",
    "bad_json",
    "lone_surrogate",
    "seed_out_of_range",
]


def rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    return None


async def well_formed(client, model: str, prompt: str, max_tokens: int) -> int:
    """One streaming chat completion; its completion tokens. Raises when the answer is not whole."""
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0.7,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    finish, tokens = None, None
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if finish is None or tokens is None:
        raise RuntimeError(f"the stream ended without {'a finish_reason' if finish is None else 'usage'}")
    return tokens


async def malformed(client, http, base: str, model: str, kind: str) -> int:
    """Send one malformed request of `kind`; the HTTP status it got."""
    import openai

    if kind in ("bad_json", "lone_surrogate"):
        head = b'{"model": "' + model.encode() + b'", "messages": ['
        tail = (
            b'{"role": "user", "content": "\\ud800 hi"}], "max_tokens": 8}'
            if kind == "lone_surrogate"
            else b""
        )
        response = await http.post(
            f"{base}/v1/chat/completions", content=head + tail, headers={"content-type": "application/json"}
        )
        return response.status_code
    request = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    if kind == "bad_role":
        request["messages"] = [{"role": "robot", "content": "Hi"}]
    elif kind == "empty_messages":
        request["messages"] = []
    elif kind == "negative_max_tokens":
        request["max_tokens"] = -5
    elif kind == "unknown_model":
        request["model"] = "no-such-model"
    elif kind == "seed_out_of_range":
        request["seed"] = 2**70
    try:
        stream = await client.chat.completions.create(**request, stream=True)
        async for _ in stream:
            pass
    except openai.APIStatusError as e:
        return e.status_code
    return 200


async def drive(
    base: str,
    model: str,
    clients: int,
    duration: float,
    max_tokens: int = 32,
    malformed_per_s: float = 4.0,
    server_pid: int | None = None,
) -> dict:
    """`clients` closed-loop clients against the server at `base` for `duration` seconds; the record."""
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600.0)
    http = httpx.AsyncClient(timeout=60.0)
    tokens: list[int] = []
    failures: list[str] = []
    statuses: dict[str, dict[str, int]] = {kind: {} for kind in MALFORMED}
    rss: list[tuple[float, float]] = []
    began = time.perf_counter()
    deadline = began + duration

    async def one_client(index: int) -> None:
        count = 0
        while time.perf_counter() < deadline:
            count += 1
            prompt = PROMPTS[(index + count) % len(PROMPTS)]
            try:
                tokens.append(await well_formed(client, model, prompt, max_tokens))
            except Exception as e:
                failures.append(f"{type(e).__name__}: {e}")

    async def malformed_sender() -> None:
        sent = 0
        while malformed_per_s > 0 and time.perf_counter() < deadline:
            kind = MALFORMED[sent % len(MALFORMED)]
            sent += 1
            try:
                status = str(await malformed(client, http, base, model, kind))
            except Exception as e:  # a dropped connection is a failure too, not a crash of the bench
                status = type(e).__name__
            statuses[kind][status] = statuses[kind].get(status, 0) + 1
            await asyncio.sleep(1.0 / malformed_per_s)

    async def sample_rss() -> None:
        while server_pid is not None:
            value = rss_mib(server_pid)
            if value is not None:
                rss.append((time.perf_counter() - began, value))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(malformed_sender(), *(one_client(i) for i in range(clients)))
    wall = time.perf_counter() - began
    sampler.cancel()
    end_rss = rss_mib(server_pid) if server_pid is not None else None
    if end_rss is not None:
        rss.append((wall, end_rss))
    await client.close()
    await http.aclose()
    not_4xx = {
        kind: {s: n for s, n in by.items() if not (s.isdigit() and 400 <= int(s) < 500)}
        for kind, by in statuses.items()
    }
    record = {
        "bench": "serve_load",
        "clients": clients,
        "duration_s": duration,
        "wall_s": round(wall, 2),
        "max_tokens": max_tokens,
        "malformed_per_s": malformed_per_s,
        "well_formed": len(tokens) + len(failures),
        "well_formed_failed": len(failures),
        "failures": failures[:10],
        "malformed": sum(sum(by.values()) for by in statuses.values()),
        "malformed_not_4xx": sum(sum(by.values()) for by in not_4xx.values()),
        "malformed_statuses": statuses,
        "requests_per_s": round(len(tokens) / wall, 2),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "mean_completion_tokens": round(sum(tokens) / max(len(tokens), 1), 1),
    }
    if rss:
        middle = min(rss, key=lambda r: abs(r[0] - wall / 2))
        record.update(
            server_rss_mib_start=rss[0][1],
            server_rss_mib_middle=middle[1],
            server_rss_mib_end=rss[-1][1],
            server_rss_mib_max=max(r[1] for r in rss),
        )
    return record


async def warm_up(base: str, model: str, batch: int) -> None:
    """A full batch of short requests, untimed: the first forwards of each shape are slow."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600.0)
    await asyncio.gather(*(well_formed(client, model, p, 4) for p in (PROMPTS * batch)[:batch]))
    await client.close()


def start_server(args, port: int, log_file) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "chatrlhf", "serve", "--port", str(port), "--served_name", args.served_name]
    cmd += ["--max_batch", str(args.max_batch), "--max_tokens", str(max(args.max_tokens, 64))]
    if args.model:
        cmd += ["--model", args.model]
    common.log("$ " + " ".join(cmd))
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=common.REPO)


def run(args) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w+", prefix="chatrlhf-serve-load-", suffix=".log") as server_log:
        proc = start_server(args, port, server_log)
        try:
            _wait_healthy(base, proc)
            common.log("server healthy; warming up")
            asyncio.run(warm_up(base, args.served_name, args.max_batch))
            common.log(f"{args.clients} clients for {args.duration:.0f} s")
            record = asyncio.run(
                drive(
                    base,
                    args.served_name,
                    args.clients,
                    args.duration,
                    args.max_tokens,
                    args.malformed_per_s,
                    proc.pid,
                )
            )
            record["server_alive_after"] = proc.poll() is None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            server_log.seek(0)
            text = server_log.read()
    record["server_error_log_lines"] = sum(" ERROR " in line for line in text.splitlines())
    record.update(max_batch=args.max_batch, model=args.model or "default (SmolLM2-135M-Instruct)")
    record["versions"] = common.versions((*common.CHATRLHF_PACKAGES, "openai", "fastapi", "uvicorn"))
    return record


def _wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        if proc.poll() is not None:
            sys.exit(f"the server exited with code {proc.returncode} before it was healthy")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    sys.exit(f"the server was not healthy after {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds during which requests are sent")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--malformed-per-s", type=float, default=4.0, help="malformed requests sent a second")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max_batch")
    ap.add_argument("--model", default="", help="checkpoint to serve (empty: the default model)")
    ap.add_argument("--served-name", default="smollm2")
    ap.add_argument("--out", help="append the JSON record to this file")
    args = ap.parse_args()
    record = run(args)
    common.emit(record, Path(args.out) if args.out else None)
    print(
        f"\n{record['clients']} clients, {record['wall_s']:.0f} s: {record['well_formed']} well-formed requests "
        f"({record['well_formed_failed']} failed), {record['malformed']} malformed "
        f"({record['malformed_not_4xx']} without a 4xx); {record['requests_per_s']:.2f} requests/s, "
        f"{record['tokens_per_s']:.1f} tokens/s; server RSS {record.get('server_rss_mib_start')} -> "
        f"{record.get('server_rss_mib_middle')} -> {record.get('server_rss_mib_end')} MiB"
    )
    ok = (
        record["well_formed_failed"] == 0
        and record["malformed"] > 0
        and record["malformed_not_4xx"] == 0
        and record["server_alive_after"]
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
