"""The labeling store: assignment with leases, validation that changes nothing, restart, hashed tokens,
agreement and aggregation against hand-computed values, export read back by the reward stage's reader, and
the `label` commands."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

import httpx
import pytest
from conftest import db_snapshot
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from chatrlhf.configs import LabelerAddConfig, LabelExportConfig
from chatrlhf.errors import UserError
from chatrlhf.labeling.commands import add_labeler, export
from chatrlhf.labeling.store import (
    AnswerLabel,
    AssignmentRow,
    LabelerRow,
    Rejected,
    Store,
    SubmissionIn,
    TaskIn,
    TaskView,
    aggregate_ranks,
    answer_order,
    pairwise_agreement,
)
from chatrlhf.preferences import load_rankings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task(i: int, k: int = 3, labels_per_task: int = 1) -> TaskIn:
    return TaskIn(
        prompt=[{"role": "user", "content": f"Question {i}?"}],
        responses=[f"answer {i}.{j}" for j in range(k)],
        meta={"model": "tiny", "i": i},
        labels_per_task=labels_per_task,
    )


def ranking(view: TaskView, by_text: dict[str, int], **extra) -> SubmissionIn:
    """Rank a task's answers by their text, whatever order the labeler was shown them in."""
    return SubmissionIn([AnswerLabel(i, by_text[text], **extra) for i, text in view.answers])


def in_order(view: TaskView) -> SubmissionIn:
    return SubmissionIn([AnswerLabel(i, r + 1) for r, (i, _) in enumerate(view.answers)])


@pytest.fixture
def store(tmp_path):
    store = Store(str(tmp_path / "labels.db"))
    yield store
    store.close()


@pytest.fixture
def any_store(labels_db):
    store = Store(labels_db)
    yield store
    store.close()


def people(store: Store, *names: str):
    for name in names:
        store.add_labeler(name)
    return [store.labeler(name).id for name in names]


def test_pairwise_agreement_by_hand():
    labels = {
        # K = 3. Pairs (0,1) (0,2) (1,2): ann says 0>1, 0>2, 1>2; bob says 0>1, 0>2, 2>1 -> 2 of 3 agree
        1: {10: [1, 2, 3], 20: [1, 3, 2]},
        # ann: 0=1 (tie), 0>2, 1>2; bob: 1>0, 0>2, 1>2 -> the tie disagrees, 2 of 3 agree
        2: {10: [1, 1, 2], 20: [2, 1, 3]},
        3: {10: [3, 2, 1]},  # one labeler: no pair
    }
    assert pairwise_agreement(labels) == pytest.approx(4 / 6)
    assert pairwise_agreement({1: {10: [1, 2]}, 2: {20: [2, 1]}}) is None
    # three labelers: ann-bob agree on 1 of 1, ann-carl 0 of 1, bob-carl 0 of 1 -> 1/3
    assert pairwise_agreement({1: {1: [1, 2], 2: [1, 2], 3: [2, 1]}}) == pytest.approx(1 / 3)


def test_aggregate_ranks_mean_then_dense():
    # sums [4, 6, 8] -> means 1.33, 2, 2.67 -> ranks 1, 2, 3
    assert aggregate_ranks([[1, 2, 3], [2, 1, 3], [1, 3, 2]]) == [1, 2, 3]
    # sums [3, 3, 6] -> the equal means tie at 1, the next is 2 (dense, not 3)
    assert aggregate_ranks([[1, 2, 3], [2, 1, 3]]) == [1, 1, 2]
    assert aggregate_ranks([[2, 1, 2, 4]]) == [2, 1, 2, 3]


def test_assignment_distinct_labelers_leases_and_skips(store):
    t1, t2 = store.add_tasks([task(1, labels_per_task=2), task(2)])
    ann, bob, carl, dan = people(store, "ann", "bob", "carl", "dan")
    first = store.next_task(ann)
    assert first.task_id == t1 and first.meta == {"model": "tiny", "i": 1}
    again = store.next_task(ann)  # a reload gets the same task, in the same answer order
    assert again == first
    assert store.next_task(bob).task_id == t1  # the second label of t1
    assert store.next_task(carl).task_id == t2  # t1 is fully leased
    assert store.next_task(dan) is None
    assert sorted(store.next_task(bob).answers) == sorted(first.answers)

    store.submit(ann, t1, in_order(first))
    store.skip(bob, t1)  # frees bob's slot on t1 ...
    assert store.next_task(dan).task_id == t1  # ... which dan gets
    assert store.next_task(bob) is None  # ... and bob never sees t1 again
    with pytest.raises(Rejected) as e:
        store.submit(bob, t1, in_order(first))
    assert e.value.status == 409 and "skipped" in e.value.reason

    progress = store.progress()
    assert progress["tasks"] == 2 and progress["complete"] == 0 and progress["submissions"] == 1
    assert progress["skips"] == 1 and progress["in_progress"] == 2
    counts = {p["name"]: (p["submitted"], p["skipped"]) for p in progress["labelers"]}
    assert counts == {"ann": (1, 0), "bob": (0, 1), "carl": (0, 0), "dan": (0, 0)}


def test_answer_order_is_per_labeler_and_stable():
    ids = [11, 12, 13, 14]
    assert answer_order(1, 5, ids) == answer_order(1, 5, ids)
    assert sorted(answer_order(1, 5, ids)) == ids
    assert len({tuple(answer_order(labeler, 5, ids)) for labeler in range(10)}) > 1


def expire(store: Store, labeler_id: int) -> None:
    with Session(store.engine) as session, session.begin():
        session.execute(
            update(AssignmentRow)
            .where(AssignmentRow.labeler_id == labeler_id)
            .values(leased_until=datetime(2000, 1, 1))
        )


def test_expired_lease(store):
    (t1,) = store.add_tasks([task(1)])
    ann, bob = people(store, "ann", "bob")
    view = store.next_task(ann)
    assert store.next_task(bob) is None
    expire(store, ann)
    assert store.next_task(ann).task_id == t1  # nobody took it meanwhile: ann resumes
    expire(store, ann)
    assert store.next_task(bob).task_id == t1  # lapsed: bob gets it
    before = db_snapshot(store)
    with pytest.raises(Rejected) as e:
        store.submit(ann, t1, in_order(view))
    assert e.value.status == 409 and "expired" in e.value.reason
    assert db_snapshot(store) == before
    store.submit(bob, t1, in_order(store.next_task(bob)))
    assert store.progress()["complete"] == 1


def test_lapsed_lease_still_accepted_when_the_task_is_free(store):
    (t1,) = store.add_tasks([task(1)])
    (ann,) = people(store, "ann")
    view = store.next_task(ann)
    expire(store, ann)
    assert store.submit(ann, t1, in_order(view)) > 0


def bad_submissions(view: TaskView) -> dict[str, tuple[SubmissionIn, int]]:
    ids = [i for i, _ in view.answers]
    good = [AnswerLabel(i, r + 1) for r, i in enumerate(ids)]
    return {
        "too few ranks": (SubmissionIn(good[:-1]), 400),
        "too many ranks": (SubmissionIn([*good, AnswerLabel(ids[0], 1)]), 400),
        "answer twice": (SubmissionIn([good[0], good[0], good[2]]), 400),
        "unknown answer": (SubmissionIn([*good[:2], AnswerLabel(10**6, 3)]), 400),
        "rank 0": (SubmissionIn([AnswerLabel(ids[0], 0), *good[1:]]), 400),
        "rank above K": (SubmissionIn([AnswerLabel(ids[0], 4), *good[1:]]), 400),
        "score 0": (SubmissionIn([AnswerLabel(ids[0], 1, score=0), *good[1:]]), 400),
        "score 8": (SubmissionIn([AnswerLabel(ids[0], 1, score=8), *good[1:]]), 400),
        "unknown flag": (SubmissionIn([AnswerLabel(ids[0], 1, flags=["boring"]), *good[1:]]), 400),
        "huge note": (SubmissionIn(good, note="x" * 10_001), 400),
    }


def test_malformed_and_stale_submissions_change_nothing(any_store):
    store = any_store
    t1, t2, t3 = store.add_tasks([task(1), task(2), task(3)])
    ann, bob = people(store, "ann", "bob")
    view = store.next_task(ann)
    other = store.next_task(bob)
    assert view.task_id == t1 and other.task_id == t2
    before = db_snapshot(store)
    for name, (submission, status) in bad_submissions(view).items():
        with pytest.raises(Rejected) as e:
            store.submit(ann, t1, submission)
        assert e.value.status == status, name
        assert e.value.reason, name
    stale = {
        "task of another labeler": (t2, in_order(other), 409),
        "task never assigned": (t3, in_order(view), 409),
        "no such task": (10**6, in_order(view), 404),
    }
    for name, (task_id, submission, status) in stale.items():
        with pytest.raises(Rejected) as e:
            store.submit(ann, task_id, submission)
        assert e.value.status == status, name
    assert db_snapshot(store) == before

    sid = store.submit(ann, t1, ranking(view, {a: 1 for _, a in view.answers}))  # all tied is allowed
    before = db_snapshot(store)
    with pytest.raises(Rejected) as e:
        store.submit(ann, t1, in_order(view))
    assert e.value.status == 409 and f"/api/submissions/{sid}" in e.value.reason
    with pytest.raises(Rejected) as e:
        store.update_submission(bob, sid, in_order(view))  # someone else's submission
    assert e.value.status == 404
    for name, (submission, status) in bad_submissions(view).items():
        with pytest.raises(Rejected) as e:
            store.update_submission(ann, sid, submission)
        assert e.value.status == status, name
    assert db_snapshot(store) == before


def test_racing_double_submits_store_one(any_store):
    """Each labeler submits their task twice at the same instant: one wins, the other gets 409."""
    store = any_store
    store.add_tasks(task(i) for i in range(8))
    held = [(labeler, store.next_task(labeler)) for labeler in people(store, *(f"l{n}" for n in range(8)))]
    outcomes: list[int] = []
    barrier = threading.Barrier(2 * len(held))

    def submit(labeler: int, view: TaskView) -> None:
        barrier.wait()
        try:
            store.submit(labeler, view.task_id, in_order(view))
            outcomes.append(201)
        except Rejected as e:
            outcomes.append(e.status)

    threads = [threading.Thread(target=submit, args=pair) for pair in held for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [201] * 8 + [409] * 8
    progress = store.progress()
    assert (progress["submissions"], progress["complete"]) == (8, 8)


def test_restart_loses_nothing_and_resumes(labels_db):
    store = Store(labels_db)
    t1, t2, _ = store.add_tasks([task(1), task(2), task(3)])
    (ann,) = people(store, "ann")
    token = store.add_labeler("bob")
    first = store.next_task(ann)
    sid = store.submit(ann, first.task_id, in_order(first))
    open_task = store.next_task(ann)
    assert (first.task_id, open_task.task_id) == (t1, t2)
    store.close()

    store = Store(labels_db)
    try:
        assert store.next_task(ann) == open_task  # same task, same answer order
        assert [s["submission_id"] for s in store.submissions(ann)] == [sid]
        assert store.submission(ann, sid)["answers"][0]["rank"] == 1
        assert store.authenticate(token).name == "bob"
        with pytest.raises(Rejected):
            store.submit(ann, t1, in_order(first))
    finally:
        store.close()


def test_update_replaces_labels(store):
    (t1,) = store.add_tasks([task(1)])
    (ann,) = people(store, "ann")
    view = store.next_task(ann)
    sid = store.submit(ann, t1, ranking(view, {"answer 1.0": 1, "answer 1.1": 2, "answer 1.2": 3}))
    store.update_submission(
        ann,
        sid,
        SubmissionIn(
            [
                AnswerLabel(i, 1 if t == "answer 1.2" else 2, score=5, flags=["other"])
                for i, t in view.answers
            ],
            note="changed my mind",
        ),
    )
    (record,) = store.rankings(per_labeler=True)
    assert (
        record["ranks"] == [2, 2, 1] and record["scores"] == [5, 5, 5] and record["note"] == "changed my mind"
    )
    assert record["flags"] == [["other"]] * 3 and record["labeler"] == "ann"


def test_tokens_are_stored_hashed(store):
    token = store.add_labeler("ann")
    boss = store.add_labeler("boss", admin=True)
    with Session(store.engine) as session:
        hashes = session.scalars(select(LabelerRow.token_hash).order_by(LabelerRow.id)).all()
    assert hashes == [hashlib.sha256(t.encode()).hexdigest() for t in (token, boss)]
    for path in store.engine.url.database, store.engine.url.database + "-wal":
        with open(path, "rb") as f:
            assert token.encode() not in f.read()
    assert store.authenticate(token).name == "ann" and not store.authenticate(token).admin
    assert store.authenticate(boss).admin
    assert store.authenticate(token + "x") is None and store.authenticate("") is None
    with pytest.raises(UserError, match="already exists"):
        store.add_labeler("ann")
    with pytest.raises(UserError, match="name"):
        store.add_labeler("  ")


def test_bad_tasks_are_user_errors(store):
    with pytest.raises(UserError, match="at least 2"):
        store.add_tasks([TaskIn([{"role": "user", "content": "q"}], ["only one"], {})])
    with pytest.raises(UserError, match="distinct"):
        store.add_tasks([TaskIn([{"role": "user", "content": "q"}], ["same", "same"], {})])
    with pytest.raises(UserError, match="user turn"):
        store.add_tasks([TaskIn([{"role": "assistant", "content": "q"}], ["a", "b"], {})])
    assert store.progress()["tasks"] == 0


@pytest.mark.parametrize(
    "url, message",
    [
        ("postgresql://nobody@127.0.0.1:1/labels", "cannot open the labeling database"),
        ("{tmp}/a-file/labels.db", "cannot create the folder"),
        ("sqlite:///{tmp}", "cannot open the labeling database"),
        ("postgresql://u:secret@host:port/x", "not a database URL"),
        ("nosuchdb://host/x", "no database driver"),
    ],
)
def test_bad_database_is_a_user_error(tmp_path, url, message):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(UserError, match=message) as e:
        Store(url.format(tmp=tmp_path))
    assert "secret" not in str(e.value)


def test_agreement_and_export(store, tmp_path):
    # two tasks, K = 3, ranked by ann and bob: the hand-computed case of test_pairwise_agreement_by_hand
    store.add_tasks([task(1, labels_per_task=2), task(2, labels_per_task=2), task(3)])
    ann, bob, carl = people(store, "ann", "bob", "carl")
    wanted = {
        (ann, 1): [1, 2, 3],
        (bob, 1): [1, 3, 2],
        (ann, 2): [1, 1, 2],
        (bob, 2): [2, 1, 3],
        (carl, 3): [2, 2, 2],  # all tied: nothing to learn, left out of the export
    }
    for labeler in (ann, bob, carl):
        while (view := store.next_task(labeler)) is not None:
            i = view.meta["i"]
            if (labeler, i) not in wanted:
                store.skip(labeler, view.task_id)
                continue
            texts = [f"answer {i}.{j}" for j in range(3)]
            store.submit(labeler, view.task_id, ranking(view, dict(zip(texts, wanted[labeler, i]))))
    progress = store.progress()
    assert progress["agreement"] == pytest.approx(4 / 6) and progress["complete"] == 3
    per = {p["name"]: p for p in progress["labelers"]}
    assert per["ann"]["agreement"] == pytest.approx(4 / 6) and per["carl"]["agreement"] is None
    assert per["ann"]["submitted"] == 2 and per["carl"]["submitted"] == 1

    out = tmp_path / "out" / "rankings.jsonl"
    export(LabelExportConfig(db=store.url, out=str(out)))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # task 1: sums [2, 5, 5] -> [1, 2, 2]; task 2: sums [3, 2, 5] -> [2, 1, 3]
    assert [(r["task_id"], r["ranks"], r["labels"]) for r in records] == [
        (1, [1, 2, 2], 2),
        (2, [2, 1, 3], 2),
    ]
    assert records[0]["prompt"] == [{"role": "user", "content": "Question 1?"}]
    assert records[0]["responses"] == ["answer 1.0", "answer 1.1", "answer 1.2"]
    assert records[0]["meta"] == {"model": "tiny", "i": 1}
    loaded = load_rankings(str(out))
    assert [(r.prompt, r.responses, r.ranks) for r in loaded] == [
        (r["prompt"], r["responses"], r["ranks"]) for r in records
    ]

    export(LabelExportConfig(db=store.url, out=str(out), per_labeler=True))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["labeler"], r["ranks"]) for r in records] == [
        (1, "ann", [1, 2, 3]),
        (2, "ann", [1, 1, 2]),
        (1, "bob", [1, 3, 2]),
        (2, "bob", [2, 1, 3]),
    ]
    assert len(load_rankings(str(out))) == 4
    assert [r["task_id"] for r in store.rankings(min_labels=2)] == [1, 2]
    assert store.rankings(min_labels=3) == []


def test_export_to_an_unwritable_place_is_a_user_error(store, tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        export(LabelExportConfig(db=store.url, out=str(tmp_path / "a-file" / "out.jsonl")))
    with pytest.raises(UserError, match="no such labeling database"):
        export(LabelExportConfig(db=str(tmp_path / "typo.db"), out=str(tmp_path / "out.jsonl")))
    assert not (tmp_path / "typo.db").exists() and not (tmp_path / "out.jsonl").exists()


def test_labeler_add_prints_the_token_last(store, capsys):
    add_labeler(LabelerAddConfig(name="ann", db=store.url))
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert store.authenticate(token).name == "ann"
    with pytest.raises(UserError, match="already exists"):
        add_labeler(LabelerAddConfig(name="ann", db=store.url))
    with pytest.raises(UserError, match="NAME"):
        add_labeler(LabelerAddConfig(name="", db=store.url))


def test_label_commands_end_to_end(tmp_path, capsys):
    """`label serve`, `label labeler add NAME` and `label export` as a user runs them."""
    from chatrlhf.cli import main

    db = str(tmp_path / "labels.db")
    store = Store(db)
    store.add_tasks([task(1)])
    store.close()
    port = free_port()
    command = [sys.executable, "-m", "chatrlhf", "label"]
    server = subprocess.Popen(
        [*command, "serve", "--db", db, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # the server starts up while the labeler is added
        added = subprocess.run(
            [*command, "labeler", "add", "ann", "--db", db], capture_output=True, text=True
        )
        assert added.returncode == 0, added.stderr
        token = added.stdout.strip().splitlines()[-1]
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.time() < deadline, "label serve did not start"
            try:
                me = httpx.get(url + "/api/me", headers={"Authorization": f"Bearer {token}"}, timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert me.json() == {"name": "ann", "admin": False}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
            view = client.get("/api/tasks/next").json()
            by_text = {"answer 1.0": 2, "answer 1.1": 1, "answer 1.2": 3}
            answers = [{"id": a["id"], "rank": by_text[a["text"]]} for a in view["answers"]]
            submitted = client.post(f"/api/tasks/{view['task_id']}/submit", json={"answers": answers})
            assert submitted.status_code == 201
    finally:
        server.terminate()
        server.wait(timeout=30)

    # export through the command line's own entry point, in this process (its start-up imports are paid)
    out = tmp_path / "rankings.jsonl"
    main(["label", "export", "--db", db, "--out", str(out)])
    assert f"wrote 1 rankings (tasks) to {out}" in capsys.readouterr().out
    assert [r.ranks for r in load_rankings(str(out))] == [[2, 1, 3]]
    with pytest.raises(SystemExit) as e:
        main(["label", "export", "--db", str(tmp_path / "typo.db"), "--out", str(out)])
    assert e.value.code == 2
    assert "no such labeling database" in capsys.readouterr().err
