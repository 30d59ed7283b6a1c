"""The OpenAI-compatible server, driven by the official `openai` client; the chat page in a real browser;
the terminal chat."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from chatrlhf.chat_template import prompt_ids
from chatrlhf.models import load_tokenizer

NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, *extra: str):
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="chatrlhf-serve-")) / "server.log"
    # a file, not a pipe: a pipe nobody reads stalls a server that logs a lot
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatrlhf",
                "serve",
                model,
                "--port",
                str(port),
                "--served_name",
                NAME,
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text(errors='replace')}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server(tiny_model):
    proc, url = start_server(tiny_model, "--max_tokens", "64")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def greedy(client, content: str, max_tokens: int = 8, **kw):
    return client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
        **kw,
    )


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_completion_streaming_and_usage(client):
    result = greedy(client, "Hello there")
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert 0 < result.usage.completion_tokens <= 8 and result.usage.prompt_tokens > 5
    stream = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Hello there"}],
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            deltas.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(deltas) == choice.message.content and finish == choice.finish_reason
    assert usage.completion_tokens == result.usage.completion_tokens


def test_n_choices_and_seed(client):
    result = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Pick a word"}],
        n=3,
        temperature=1.0,
        max_tokens=6,
        seed=7,
    )
    assert [c.index for c in result.choices] == [0, 1, 2]
    again = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Pick a word"}],
        n=3,
        temperature=1.0,
        max_tokens=6,
        seed=7,
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in result.choices]


def test_stop_sequence(client):
    full = greedy(client, "Tell me something", max_tokens=16).choices[0].message.content
    assert len(full) >= 6
    stop = full[3:6]
    cut = greedy(client, "Tell me something", max_tokens=16, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            openai.BadRequestError,
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, openai.BadRequestError),
        ({"temperature": 5}, openai.BadRequestError),
        ({"max_tokens": 100000}, openai.BadRequestError),
        ({"max_tokens": -5}, openai.BadRequestError),
        ({"messages": []}, openai.BadRequestError),
        ({"seed": 2**70}, openai.BadRequestError),  # more than a torch generator takes
        ({"model": "gpt-4"}, openai.NotFoundError),
    ],
)
def test_bad_requests_get_the_matching_client_error(client, server, kwargs, error):
    request = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    with pytest.raises(error):
        client.chat.completions.create(**request)
    assert httpx.get(server + "/health").status_code == 200


def test_malformed_json_bad_text_and_too_long_prompt(server):
    r = httpx.post(
        server + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # valid JSON, but the text holds a lone UTF-16 surrogate, which no tokenizer can encode
    r = httpx.post(
        server + "/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
    r = httpx.post(
        server + "/v1/chat/completions",
        json={"model": NAME, "messages": [{"role": "user", "content": "word " * 5000}]},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_greedy_equals_transformers_generate(client, tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    messages = [{"role": "user", "content": "What is a cat?"}]
    ids = torch.tensor([prompt_ids(tokenizer, messages)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert greedy(client, "What is a cat?", max_tokens=12).choices[0].message.content == expected


def test_64_concurrent_streams_complete_unmixed(server, client):
    prompts = [f"Question {10 + i % 16}" for i in range(64)]  # 16 distinct prompts of equal token length
    reference = {p: greedy(client, p, max_tokens=5).choices[0].message.content for p in set(prompts)}
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(p):
        stream = await aclient.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=5, stream=True
        )
        return p, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(answer == reference[p] for p, answer in results)


def test_load_with_malformed_requests_mixed_in(server):
    """bench/serve_load.py's load at test size: 8 streaming clients for 3 s, 10 malformed requests a second."""
    folder = Path(__file__).resolve().parents[1] / "bench"
    spec = importlib.util.spec_from_file_location("serve_load", folder / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    record = asyncio.run(bench.drive(server, NAME, clients=8, duration=3.0, max_tokens=6, malformed_per_s=10))
    assert record["well_formed"] >= 8 and record["well_formed_failed"] == 0, record["failures"]
    statuses = record["malformed_statuses"]
    assert all(statuses[kind] for kind in bench.MALFORMED), statuses  # every kind was sent
    assert record["malformed_not_4xx"] == 0, statuses
    assert httpx.get(server + "/health").status_code == 200


def test_api_key_required_when_set(tiny_model):
    proc, url = start_server(tiny_model, "--api_key", "sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret")
        assert ok.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        ).choices
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class FailingForward:
    """Makes the model's forward raise on its `countdown`-th call from now (1: the prompt's prefill). Hooked
    on the token embedding, where the prefill and every decoding step begin (the engine's lean decoding step
    does not call the model's forward)."""

    def __init__(self, model):
        self.countdown = 0
        model.get_input_embeddings().register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        if self.countdown:
            self.countdown -= 1
            if self.countdown == 0:
                raise RuntimeError("the accelerator fell over")


def test_a_failed_generation_is_an_error_the_client_sees(tiny_model, caplog):
    """In-process server (so the model can be made to fail): a 500 before streaming starts, an error event
    after, a log line each time, and the next request is served."""
    import threading

    import uvicorn

    from chatrlhf.configs import ServeConfig
    from chatrlhf.models import load_causal_lm
    from chatrlhf.serve.app import create_app

    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, tokenizer)
    failing = FailingForward(model)
    port = free_port()
    app = create_app(ServeConfig(max_tokens=64), model, tokenizer, NAME)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    request = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    try:
        expected = client.chat.completions.create(**request, max_tokens=12).choices[0].message.content
        assert expected

        failing.countdown = 1  # the prefill fails: nothing was sent, so a 500 in OpenAI's error body
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(**request, max_tokens=12)
        assert caught.value.body["type"] == "server_error" and "fell over" in caught.value.body["message"]
        failing.countdown = 1
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(**request, max_tokens=12, stream=True)

        failing.countdown = 6  # five tokens streamed, then the sixth forward fails
        stream = client.chat.completions.create(**request, max_tokens=12, stream=True)
        received, finish_reasons = [], []
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                for c in chunk.choices:
                    received.append(c.delta.content or "")
                    finish_reasons.append(c.finish_reason)
        assert not isinstance(caught.value, openai.APIStatusError)  # the 200 was sent: an error event
        assert "fell over" in caught.value.message
        text = "".join(received)
        assert text and expected.startswith(text) and "fell over" not in text
        assert finish_reasons == [None] * len(finish_reasons)  # never finished as if it were an answer

        failures = [r for r in caplog.records if r.name == "chatrlhf.serve" and r.levelname == "ERROR"]
        assert len(failures) == 3 and all("fell over" in str(r.exc_info[1]) for r in failures)
        assert client.chat.completions.create(**request, max_tokens=12).choices[0].message.content == expected
        stream = client.chat.completions.create(**request, max_tokens=12, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    finally:
        server.should_exit = True
        thread.join(timeout=30)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_chat_page_in_a_browser(server, client):
    from playwright.sync_api import sync_playwright

    expected = greedy(client, "Hello page", max_tokens=8).choices[0].message.content
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page()
        page.goto(server + "/")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "8")
        page.fill("#input", "Hello page")
        page.keyboard.press("Enter")
        page.wait_for_selector(".assistant[data-done='true']", timeout=60000)
        assert page.inner_text(".user") == "Hello page"
        assert page.text_content(".assistant") == expected
        page.click("#new")
        assert page.query_selector_all(".msg") == []
        browser.close()


def test_terminal_chat(tiny_model, tmp_path):
    from chatrlhf.configs import ChatConfig, SamplingConfig
    from chatrlhf.terminal import run

    out = io.StringIO()
    saved = tmp_path / "chat.jsonl"
    messages = run(
        ChatConfig(
            model=tiny_model, sampling=SamplingConfig(max_new_tokens=6, temperature=0), system="Be brief."
        ),
        lines=["Hi", "And then?", f"/save {saved}", "/reset", "New topic", "/exit"],
        out=out,
    )
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "New topic"
    record = json.loads(saved.read_text())
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert "(new conversation)" in out.getvalue()
