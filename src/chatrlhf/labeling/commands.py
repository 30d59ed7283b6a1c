"""`chatrlhf label ...`: the ranking web app, labeler tokens, and export to a rankings file.

chatrlhf label labeler add alice --db labels.db            # prints alice's token on its last line
chatrlhf label serve --db labels.db --port 8100            # labelers open http://127.0.0.1:8100/
chatrlhf label export --db labels.db --out rankings.jsonl  # then: chatrlhf reward --data.train rankings.jsonl
"""

from __future__ import annotations

import socket
from pathlib import Path

from chatrlhf.configs import LabelerAddConfig, LabelExportConfig, LabelServeConfig
from chatrlhf.errors import UserError


def serve(cfg: LabelServeConfig) -> None:
    import uvicorn

    from chatrlhf.labeling.app import create_app
    from chatrlhf.labeling.store import Store

    store = Store(cfg.db)
    with socket.socket() as s:  # say so plainly instead of uvicorn's bind error
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((cfg.host, cfg.port))
        except OSError as e:
            raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    progress = store.progress()
    print(
        f"labeling {progress['tasks']} tasks ({progress['complete']} complete) from {cfg.db} "
        f"on http://{cfg.host}:{cfg.port}/",
        flush=True,
    )
    if not progress["labelers"]:
        print(f"no labelers yet: add one with `chatrlhf label labeler add NAME --db {cfg.db}`", flush=True)
    try:
        uvicorn.run(create_app(store), host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        store.close()


def add_labeler(cfg: LabelerAddConfig) -> None:
    from chatrlhf.labeling.store import Store

    if not cfg.name.strip():
        raise UserError("give the labeler's name: chatrlhf label labeler add NAME --db URL")
    store = Store(cfg.db)
    try:
        token = store.add_labeler(cfg.name, cfg.admin)
    finally:
        store.close()
    role = "admin" if cfg.admin else "labeler"
    print(f"added {role} {cfg.name.strip()!r} to {cfg.db}; their token (shown only now):")
    print(token)


def export(cfg: LabelExportConfig) -> None:
    from chatrlhf.labeling.store import Store
    from chatrlhf.runs import atomic_write_jsonl

    if cfg.min_labels < 1:
        raise UserError(f"--min_labels must be at least 1, got {cfg.min_labels}")
    store = Store(cfg.db, create=False)
    try:
        records = store.rankings(per_labeler=cfg.per_labeler, min_labels=cfg.min_labels)
    finally:
        store.close()
    out = Path(cfg.out)
    try:
        atomic_write_jsonl(out, records)
    except OSError as e:
        raise UserError(f"--out {cfg.out}: cannot write the file: {e.strerror or e}") from None
    kind = "submissions" if cfg.per_labeler else "tasks"
    print(f"wrote {len(records)} rankings ({kind}) to {out}")
