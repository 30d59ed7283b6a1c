"""`chatrlhf chat`: multi-turn chat with a checkpoint in the terminal, answers streamed as they are generated.

    chatrlhf chat runs/x/ppo --system "Answer briefly." --temperature 0.7

Commands: /reset starts over, /save FILE writes the conversation as a demonstrations record, /exit quits.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from chatrlhf.chat_template import prompt_ids
from chatrlhf.configs import ChatConfig
from chatrlhf.serve.engine import Engine, Request


def reply(engine: Engine, tokenizer, messages: list[dict], cfg: ChatConfig, out=sys.stdout) -> str:
    """Stream one answer to `out` and return it."""
    parts: list[str] = []
    done = threading.Event()

    def on_text(choice: int, delta: str) -> None:
        parts.append(delta)
        out.write(delta)
        out.flush()

    ids = prompt_ids(tokenizer, messages, cfg.system)

    def on_error(error: Exception) -> None:
        out.write(f"\n(generation failed: {type(error).__name__}: {error})")
        done.set()

    engine.submit(
        Request(ids, cfg.sampling, on_text=on_text, on_done=lambda c, r, t: done.set(), on_error=on_error)
    )
    done.wait()
    out.write("\n")
    return "".join(parts)


def run(cfg: ChatConfig, lines=None, out=sys.stdout) -> list[dict]:
    from chatrlhf.models import load_causal_lm, load_tokenizer, pick_device, resolve_model

    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path)
    engine = Engine(load_causal_lm(path, tokenizer, pick_device()), tokenizer, max_batch=1)
    out.write(f"chatting with {path}; /reset, /save FILE, /exit\n")
    messages: list[dict] = []
    lines = lines if lines is not None else _stdin_lines()
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = []
            out.write("(new conversation)\n")
            continue
        if text.startswith("/save"):
            target = text[len("/save") :].strip()
            if not target or not messages:
                out.write("usage: /save FILE (after at least one answer)\n")
                continue
            record = [{"role": "system", "content": cfg.system}] if cfg.system else []
            with open(Path(target).expanduser(), "a", encoding="utf-8") as f:
                f.write(json.dumps({"messages": record + messages}) + "\n")
            out.write(f"(saved to {target})\n")
            continue
        messages.append({"role": "user", "content": text})
        out.write("assistant> ")
        messages.append({"role": "assistant", "content": reply(engine, tokenizer, messages, cfg, out)})
    return messages


def _stdin_lines():
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return
