"""The labeling HTTP API on SQLite and PostgreSQL: tokens on every route, a labeler sees only their own
work, malformed or stale submissions change nothing, a restart resumes, and 20 labelers at once over a
real server lose and duplicate nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from conftest import db_snapshot
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from chatrlhf.labeling.app import create_app
from chatrlhf.labeling.store import Store, SubmissionRow, TaskIn


def task(i: int, k: int = 3, labels_per_task: int = 1) -> TaskIn:
    return TaskIn(
        prompt=[{"role": "user", "content": f"Question {i}?"}],
        responses=[f"answer {i}.{j}" for j in range(k)],
        meta={"i": i},
        labels_per_task=labels_per_task,
    )


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def in_order(view: dict) -> dict:
    return {"answers": [{"id": a["id"], "rank": r + 1} for r, a in enumerate(view["answers"])]}


@pytest.fixture
def site(labels_db):
    store = Store(labels_db)
    tokens = {name: store.add_labeler(name) for name in ("ann", "bob")}
    tokens["boss"] = store.add_labeler("boss", admin=True)
    store.add_tasks([task(1), task(2), task(3, k=4)])
    with TestClient(create_app(store)) as client:
        yield store, client, tokens
    store.close()


ROUTES = [
    ("GET", "/api/me"),
    ("GET", "/api/tasks/next"),
    ("POST", "/api/tasks/1/submit"),
    ("POST", "/api/tasks/1/skip"),
    ("GET", "/api/submissions"),
    ("GET", "/api/submissions/1"),
    ("PUT", "/api/submissions/1"),
]
ADMIN_ROUTES = [
    ("GET", "/api/admin/progress"),
    ("POST", "/api/admin/labelers"),
    ("GET", "/api/admin/export"),
]


def test_every_api_route_needs_a_token(site):
    store, client, tokens = site
    app_routes = {
        (method, route.path)
        for route in client.app.routes
        if route.path.startswith("/api")
        for method in route.methods
    }
    templated = {(m, p.replace("/1", "/{task_id}", 1)) for m, p in ROUTES + ADMIN_ROUTES}
    templated |= {(m, p.replace("/1", "/{submission_id}")) for m, p in ROUTES + ADMIN_ROUTES}
    assert app_routes <= templated, "a route without an auth test"
    before = db_snapshot(store)
    body = {"answers": [], "name": "eve"}
    for method, path in ROUTES + ADMIN_ROUTES:
        for headers in ({}, auth("not-a-token"), {"Authorization": f"Basic {tokens['ann']}"}, auth("")):
            response = client.request(method, path, headers=headers, json=body)
            assert response.status_code == 401, (method, path, headers)
            assert "token" in response.json()["detail"]
    for method, path in ADMIN_ROUTES:
        response = client.request(method, path, headers=auth(tokens["ann"]), json=body)
        assert response.status_code == 403, (method, path)
    assert db_snapshot(store) == before
    assert client.get("/api/me", headers=auth(tokens["boss"])).json() == {"name": "boss", "admin": True}
    page = client.get("/")  # the page itself is public; it asks for the token
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_label_a_task_and_see_only_your_own(site):
    store, client, tokens = site
    ann, bob = auth(tokens["ann"]), auth(tokens["bob"])
    view = client.get("/api/tasks/next", headers=ann).json()
    assert view["task_id"] == 1 and view["prompt"] == [{"role": "user", "content": "Question 1?"}]
    assert sorted(a["text"] for a in view["answers"]) == ["answer 1.0", "answer 1.1", "answer 1.2"]
    assert "meta" not in view  # which model wrote an answer stays hidden from the labeler
    assert client.get("/api/tasks/next", headers=ann).json() == view  # a reload resumes
    assert client.get("/api/tasks/next", headers=bob).json()["task_id"] == 2

    body = {
        "answers": [{"id": a["id"], "rank": 1, "score": 6, "flags": ["other"]} for a in view["answers"][:2]]
        + [{"id": view["answers"][2]["id"], "rank": 3, "flags": ["harmful", "false_information"]}],
        "note": "two equally good",
    }
    created = client.post("/api/tasks/1/submit", headers=ann, json=body)
    assert created.status_code == 201
    sid = created.json()["submission_id"]
    again = client.post("/api/tasks/1/submit", headers=ann, json=body)
    assert again.status_code == 409 and "already submitted" in again.json()["detail"]

    mine = client.get("/api/submissions", headers=ann).json()
    assert [s["submission_id"] for s in mine] == [sid]
    assert [(a["id"], a["rank"], a["score"]) for a in mine[0]["answers"]] == [
        (a["id"], a["rank"], a.get("score")) for a in body["answers"]
    ]
    assert (
        mine[0]["answers"][2]["flags"] == ["false_information", "harmful"] and mine[0]["note"] == body["note"]
    )

    # bob cannot see or change ann's submission, and cannot tell it exists
    assert client.get("/api/submissions", headers=bob).json() == []
    before = db_snapshot(store)
    assert client.get(f"/api/submissions/{sid}", headers=bob).status_code == 404
    assert client.put(f"/api/submissions/{sid}", headers=bob, json=in_order(view)).status_code == 404
    assert client.get("/api/submissions/999", headers=bob).json() == {"detail": "no submission 999 of yours"}
    assert db_snapshot(store) == before

    changed = client.put(f"/api/submissions/{sid}", headers=ann, json=in_order(view))
    assert changed.status_code == 200 and [a["rank"] for a in changed.json()["answers"]] == [1, 2, 3]
    assert client.get(f"/api/submissions/{sid}", headers=ann).json()["answers"] == changed.json()["answers"]

    assert client.post("/api/tasks/3/skip", headers=ann).json() == {"skipped": 3}
    assert client.get("/api/tasks/next", headers=ann).json() == {
        "task_id": None
    }  # 1 done, 2 bob's, 3 skipped


def test_malformed_and_stale_submissions_change_nothing(site):
    store, client, tokens = site
    ann = auth(tokens["ann"])
    view = client.get("/api/tasks/next", headers=ann).json()
    client.get("/api/tasks/next", headers=auth(tokens["bob"]))  # bob holds task 2
    ids = [a["id"] for a in view["answers"]]

    def answers(*ranks, **extra):
        return [{"id": i, "rank": r, **extra} for i, r in zip(ids, ranks)]

    cases = {
        "too few ranks": (1, {"answers": answers(1, 2)}, 400, "ranks 2"),
        "too many ranks": (1, {"answers": [*answers(1, 2, 3), {"id": ids[0], "rank": 1}]}, 400, "ranks 4"),
        "answer twice": (1, {"answers": [*answers(1, 2), {"id": ids[0], "rank": 3}]}, 400, "twice"),
        "unknown answer": (1, {"answers": [*answers(1, 2), {"id": 999, "rank": 3}]}, 400, "999"),
        "rank 0": (1, {"answers": answers(0, 1, 2)}, 400, "rank"),
        "rank above K": (1, {"answers": answers(1, 2, 4)}, 400, "rank"),
        "score 8": (1, {"answers": answers(1, 2, 3, score=8)}, 400, "score"),
        "score 0": (1, {"answers": answers(1, 2, 3, score=0)}, 400, "score"),
        "unknown flag": (1, {"answers": answers(1, 2, 3, flags=["rude"])}, 400, "flag"),
        "rank as text": (1, {"answers": answers("1", 2, 3)}, 422, "rank"),
        "fractional rank": (1, {"answers": answers(1.5, 2, 3)}, 422, "rank"),
        "no answers field": (1, {"ranks": [1, 2, 3]}, 422, "answers"),
        "task of another labeler": (2, in_order(view), 409, "not assigned"),
        "task never assigned": (3, in_order(view), 409, "not assigned"),
        "no such task": (77, in_order(view), 404, "no task 77"),
    }
    before = db_snapshot(store)
    for name, (task_id, body, status, reason) in cases.items():
        response = client.post(f"/api/tasks/{task_id}/submit", headers=ann, json=body)
        assert response.status_code == status, (name, response.text)
        assert reason in response.json()["detail"], (name, response.text)
    not_json = client.post(
        "/api/tasks/1/submit", headers={**ann, "Content-Type": "application/json"}, content="{"
    )
    assert not_json.status_code == 422 and isinstance(not_json.json()["detail"], str)
    assert db_snapshot(store) == before

    assert client.post("/api/tasks/1/submit", headers=ann, json=in_order(view)).status_code == 201
    before = db_snapshot(store)
    assert client.post("/api/tasks/1/submit", headers=ann, json=in_order(view)).status_code == 409
    assert client.post("/api/tasks/1/skip", headers=ann).status_code == 409
    assert (
        client.put("/api/submissions/1", headers=ann, json={"answers": answers(1, 2, 9)}).status_code == 400
    )
    assert db_snapshot(store) == before


def test_admin_routes(site):
    store, client, tokens = site
    boss = auth(tokens["boss"])
    for name in ("ann", "bob"):
        view = client.get("/api/tasks/next", headers=auth(tokens[name])).json()
        client.post(f"/api/tasks/{view['task_id']}/submit", headers=auth(tokens[name]), json=in_order(view))
    progress = client.get("/api/admin/progress", headers=boss).json()
    assert {k: progress[k] for k in ("tasks", "complete", "submissions", "skips")} == {
        "tasks": 3,
        "complete": 2,
        "submissions": 2,
        "skips": 0,
    }
    assert [(p["name"], p["submitted"]) for p in progress["labelers"]] == [
        ("ann", 1),
        ("bob", 1),
        ("boss", 0),
    ]
    assert progress["agreement"] is None  # no task has two labelers yet

    created = client.post("/api/admin/labelers", headers=boss, json={"name": "carl"})
    assert created.status_code == 201 and created.json()["name"] == "carl"
    assert client.get("/api/me", headers=auth(created.json()["token"])).json() == {
        "name": "carl",
        "admin": False,
    }
    duplicate = client.post("/api/admin/labelers", headers=boss, json={"name": "carl"})
    assert duplicate.status_code == 409 and "already exists" in duplicate.json()["detail"]
    for blank in ("", "   "):
        assert client.post("/api/admin/labelers", headers=boss, json={"name": blank}).status_code == 422

    exported = client.get("/api/admin/export", headers=boss).json()
    assert [(r["task_id"], r["labels"]) for r in exported] == [(1, 1), (2, 1)]
    per = client.get("/api/admin/export", headers=boss, params={"per_labeler": "true"}).json()
    assert [(r["task_id"], r["labeler"]) for r in per] == [(1, "ann"), (2, "bob")]
    assert client.get("/api/admin/export", headers=boss, params={"min_labels": 2}).json() == []


def test_restart_resumes_over_http(labels_db):
    store = Store(labels_db)
    token = store.add_labeler("ann")
    store.add_tasks([task(1), task(2)])
    with TestClient(create_app(store)) as client:
        first = client.get("/api/tasks/next", headers=auth(token)).json()
        sid = client.post("/api/tasks/1/submit", headers=auth(token), json=in_order(first)).json()
        second = client.get("/api/tasks/next", headers=auth(token)).json()
    store.close()

    store = Store(labels_db)
    with TestClient(create_app(store)) as client:
        assert client.get("/api/tasks/next", headers=auth(token)).json() == second
        mine = client.get("/api/submissions", headers=auth(token)).json()
        assert [s["submission_id"] for s in mine] == [sid["submission_id"]]
    store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE = """
import sys, uvicorn
from chatrlhf.labeling.app import create_app
from chatrlhf.labeling.store import Store
uvicorn.run(create_app(Store(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


@contextmanager
def server_process(db: str):
    """The app in a process of its own, as `label serve` runs it, without the CLI's start-up imports."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, db, str(port)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the labeling server did not start"
            try:
                httpx.get(url + "/api/me", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_twenty_labelers_at_once_lose_and_duplicate_nothing(labels_db):
    tasks, labelers = 1000, 20
    store = Store(labels_db)
    tokens = [store.add_labeler(f"labeler-{n}") for n in range(labelers)]
    store.add_tasks(task(i, k=2) for i in range(tasks))
    store.close()
    acknowledged: list[tuple[int, int, int]] = []  # (task, submission, labeler), appended under the GIL
    failures: list[str] = []

    def label(url: str, n: int) -> None:
        with httpx.Client(base_url=url, headers=auth(tokens[n]), timeout=120) as client:
            while True:
                view = client.get("/api/tasks/next").json()
                if view["task_id"] is None:
                    return
                response = client.post(f"/api/tasks/{view['task_id']}/submit", json=in_order(view))
                if response.status_code != 201:
                    failures.append(f"labeler {n}, task {view['task_id']}: {response.text}")
                    return
                acknowledged.append((view["task_id"], response.json()["submission_id"], n))

    with server_process(labels_db) as url:
        workers = [threading.Thread(target=label, args=(url, n)) for n in range(labelers)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert not failures, failures[:3]
    assert len(acknowledged) == tasks and len({t for t, _, _ in acknowledged}) == tasks
    assert len({n for _, _, n in acknowledged}) > 1  # the work really was shared

    store = Store(labels_db)  # what a fresh process finds: every acknowledged submission, nothing else
    try:
        with Session(store.engine) as session:
            rows = session.execute(select(SubmissionRow.task_id, SubmissionRow.id)).tuples().all()
        assert sorted(rows) == sorted((t, s) for t, s, _ in acknowledged)
        progress = store.progress()
        assert (progress["complete"], progress["submissions"]) == (tasks, tasks)
        assert store.next_task(store.labeler("labeler-0").id) is None
    finally:
        store.close()
