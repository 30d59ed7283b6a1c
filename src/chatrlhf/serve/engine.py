"""The serving engine: one worker thread owns the model; requests queue up and are batched.

A request is one prompt with its sampling settings and `n` answers. The worker takes the oldest request
and every queued request with the same settings (up to `max_batch` rows, waiting up to `gather_ms` for
more to arrive), generates them together through
the shared generation engine, and streams each row's text as it grows. Requests that fix a `seed` run in
a batch of their own, so the seed alone decides their answer. Requests are served in arrival order.
A batch whose generation raises is logged, each of its requests gets `on_error`, and the worker goes on
with the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chatrlhf.configs import SamplingConfig
from chatrlhf.generation import generate

log = logging.getLogger("chatrlhf.serve")


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingConfig
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # on_text(choice, text_delta) streams; on_done(choice, finish_reason, completion_tokens) closes a choice;
    # on_error(exception) ends the whole request when generation failed (no on_done follows)
    on_text: Callable[[int, str], None] = lambda choice, delta: None
    on_done: Callable[[int, str, int], None] = lambda choice, reason, tokens: None
    on_error: Callable[[Exception], None] = lambda error: None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def key(self) -> tuple:
        s = self.sampling
        return (s.max_new_tokens, s.temperature, s.top_p, s.top_k, self.seed)


class _Row:
    """One answer being generated: its tokens, the text already sent, and how it ended."""

    def __init__(self, request: Request, choice: int):
        self.request, self.choice = request, choice
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def visible(self, tokenizer) -> tuple[str, bool]:
        """The text so far, cut at the first stop sequence; and whether one was met."""
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.request.stop if s and s in text]
        if cuts:
            return text[: min(cuts)], True
        return text, False


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, gather_ms: float = 20.0):
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.gather_s = gather_ms / 1000.0
        self.queue: queue.Queue[Request] = queue.Queue()
        self.pending: list[Request] = []
        self.thread = threading.Thread(target=self._work, daemon=True, name="chatrlhf-engine")
        self.thread.start()

    def submit(self, request: Request) -> None:
        self.queue.put(request)

    def _next_batch(self) -> list[Request]:
        if not self.pending:
            self.pending.append(self.queue.get())
        # clients whose last answer just ended send their next request within milliseconds: give them a
        # short window to join, so a batch is not started with a few rows while others are on their way
        deadline = time.monotonic() + self.gather_s
        while sum(r.n for r in self.pending) < self.max_batch:
            try:
                self.pending.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        while True:
            try:
                self.pending.append(self.queue.get_nowait())
            except queue.Empty:
                break
        first = self.pending[0]
        batch, rows = [first], first.n
        if first.seed is None:
            for r in self.pending[1:]:
                if r.key() == first.key() and rows + r.n <= self.max_batch:
                    batch.append(r)
                    rows += r.n
        self.pending = [r for r in self.pending if r not in batch]
        return [r for r in batch if not r.cancelled.is_set()]

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch:
                try:
                    self._run(batch)
                except Exception as e:  # a failed batch must not take the server down
                    log.exception("generation failed for a batch of %d request(s)", len(batch))
                    for r in batch:
                        r.on_error(e)

    @torch.no_grad()
    def _run(self, batch: list[Request]) -> None:
        tok = self.tokenizer
        rows = [_Row(r, c) for r in batch for c in range(r.n)]
        generator = None
        if batch[0].seed is not None:
            generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(
                batch[0].seed
            )

        def on_step(tokens: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
            stop = torch.zeros(len(rows), dtype=torch.bool)
            for i, (row, token, live) in enumerate(zip(rows, tokens.tolist(), alive.tolist())):
                if not live or row.done:
                    continue
                if row.request.cancelled.is_set():
                    stop[i], row.done = True, True
                    continue
                if token == tok.eos_token_id:
                    row.done = True
                    row.request.on_done(row.choice, "stop", len(row.ids))
                    continue
                row.ids.append(token)
                text, stopped = row.visible(tok)
                # hold back text that may be the start of a stop sequence or of a multi-byte character
                safe = text if stopped else _safe_prefix(text, row.request.stop)
                if len(safe) > len(row.sent):
                    row.request.on_text(row.choice, safe[len(row.sent) :])
                    row.sent = safe
                if stopped:
                    stop[i], row.done = True, True
                    row.request.on_done(row.choice, "stop", len(row.ids))
            return stop

        prompts = [row.request.prompt_ids for row in rows]
        sampling = batch[0].sampling
        generate(self.model, prompts, sampling, tok.eos_token_id, tok.pad_token_id, generator, on_step)
        for row in rows:
            if not row.done:  # ran out of max_tokens
                text, _ = row.visible(tok)
                if len(text) > len(row.sent):
                    row.request.on_text(row.choice, text[len(row.sent) :])
                row.request.on_done(row.choice, "length", len(row.ids))


def _safe_prefix(text: str, stops: list[str]) -> str:
    """The part of `text` that can be sent now: no trailing replacement char, no partial stop sequence."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return text[:end]
