"""The ranking page in a real browser (headless Chromium) against a real server over a SQLite store: log in,
rank with a tie by drag and drop and by keyboard, submit, skip, the last task, a bad token, the admin panel."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import httpx
import pytest
from conftest import chatrlhf

from chatrlhf.labeling.app import create_app
from chatrlhf.labeling.store import Store, TaskIn

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)

CAPITAL = TaskIn(
    prompt=[
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    responses=[
        "Paris is the capital of France.",
        "The capital is Paris.",
        "France's capital city is Paris.",
        "Lyon, probably.",
    ],
    meta={"model": "test"},
)
COLOUR = TaskIn(
    prompt=[{"role": "user", "content": "Name a colour."}],
    responses=["Blue.", "Green.", "A colour."],
    meta={"model": "test"},
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def site(tmp_path):
    """A store with two tasks and two labelers, served by uvicorn on a free port."""
    import uvicorn

    db = str(tmp_path / "labels.db")
    store = Store(db)
    tokens = {"ann": store.add_labeler("ann"), "boss": store.add_labeler("boss", admin=True)}
    store.add_tasks([CAPITAL, COLOUR])
    server = uvicorn.Server(
        uvicorn.Config(create_app(store), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the labeling server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    yield {"url": url, "store": store, "db": db, "tokens": tokens}
    server.should_exit = True
    thread.join(timeout=10)
    store.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
        except Error as e:
            pytest.skip(f"Chromium cannot be launched here: {(str(e) or 'no reason given').splitlines()[0]}")
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    # Tall enough that every drop target is on screen: a drag that has to scroll does not start in Chromium.
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def log_in(page, url: str, token: str) -> None:
    page.goto(url + "/")
    page.fill("#token", token)
    page.click("#login")


def shown_task(page) -> TaskIn | None:
    """The task on screen once the page has settled after loading one; None when none is left."""
    page.wait_for_selector("#task-view:not(.hidden) .card, #done-view:not(.hidden)")
    if page.is_visible("#done-view"):
        return None
    prompt = page.inner_text("#prompt")
    return CAPITAL if "capital of France" in prompt else COLOUR


def after(page, action) -> None:
    """Run `action` (a submit or a skip) and wait until the next task or the last page is shown."""
    old = page.get_attribute("#task-view", "data-task-id")
    action()
    page.wait_for_function(
        """old => document.getElementById("task-view").dataset.taskId !== old
                 || !document.getElementById("done-view").classList.contains("hidden")""",
        arg=old,
    )


def cards_by_text(page) -> dict:
    """Locators of the shown task's answer cards, keyed by answer text (stable while cards move)."""
    ids = page.locator(".card").evaluate_all("cs => cs.map(c => c.dataset.answerId)")
    cards = {}
    for answer_id in ids:
        card = page.locator(f".card[data-answer-id='{answer_id}']")
        cards[card.locator(".text").inner_text()] = card
    return cards


def ranks_shown(cards: dict) -> dict[str, str | None]:
    return {text: card.get_attribute("data-rank") for text, card in cards.items()}


def rank_capital_task(page) -> dict[str, int]:
    """Rank the four answers with a tie, by drag and drop and by keyboard; submit with Enter."""
    assert page.locator("#prompt .msg").evaluate_all("ms => ms.map(m => m.dataset.role)") == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    cards = cards_by_text(page)
    assert set(cards) == set(CAPITAL.responses)
    best, good, also_good, bad = CAPITAL.responses
    # Every answer starts unranked, and Submit waits until each has a rank.
    assert page.locator("#unranked .card").count() == 4 and page.is_disabled("#submit")

    cards[best].drag_to(page.locator("#new-rank"))
    cards[good].drag_to(page.locator("#new-rank"))
    cards[also_good].drag_to(page.locator(".rank-row[data-rank='2']"))  # onto a taken row: a tie
    assert ranks_shown(cards) == {best: "1", good: "2", also_good: "2", bad: None}
    assert page.is_disabled("#submit")

    cards[bad].focus()
    page.keyboard.press("3")  # the empty row below the tie: a new rank 3
    assert ranks_shown(cards)[bad] == "3"
    page.keyboard.press("ArrowUp")  # one step up: tied with rank 2
    assert ranks_shown(cards) == {best: "1", good: "2", also_good: "2", bad: "2"}
    page.keyboard.press("ArrowDown")  # and back to a rank of its own
    assert ranks_shown(cards) == {best: "1", good: "2", also_good: "2", bad: "3"}
    assert page.locator(".rank-row:not(.empty)").count() == 3
    assert page.get_attribute("#new-rank", "data-rank") == "4"  # always an empty row for a new rank
    assert page.is_enabled("#submit")

    cards[bad].locator(".score").select_option("2")
    cards[bad].locator("input[data-flag='false_information']").check()
    page.fill("#note", "Lyon is wrong.")
    cards[best].focus()
    after(page, lambda: page.keyboard.press("Enter"))  # submits: every answer has a rank
    return {best: 1, good: 2, also_good: 2, bad: 3}


def test_rank_with_a_tie_by_drag_and_keyboard_then_export(site, page, tmp_path):
    url, store = site["url"], site["store"]
    log_in(page, url, site["tokens"]["ann"])
    expected = None
    while (task := shown_task(page)) is not None:
        if task is CAPITAL:
            expected = rank_capital_task(page)
        else:  # `s` skips (not while typing in the note)
            page.fill("#note", "s")
            assert page.input_value("#note") == "s" and shown_task(page) is COLOUR
            page.locator("#prompt").click()
            after(page, lambda: page.keyboard.press("s"))
    assert expected is not None
    assert "No tasks left - thank you" in page.inner_text("#done-view")

    (record,) = store.rankings()
    assert record["prompt"] == CAPITAL.prompt
    assert dict(zip(record["responses"], record["ranks"])) == expected
    out = tmp_path / "rankings.jsonl"
    result = chatrlhf("label", "export", "--db", site["db"], "--out", str(out))
    assert result.returncode == 0, result.stderr
    (line,) = out.read_text().splitlines()
    exported = json.loads(line)
    assert dict(zip(exported["responses"], exported["ranks"])) == expected

    progress = store.progress()
    assert (progress["submissions"], progress["skips"]) == (1, 1)
    headers = {"Authorization": "Bearer " + site["tokens"]["ann"]}
    (mine,) = httpx.get(url + "/api/submissions", headers=headers).json()
    assert "Lyon is wrong." in json.dumps(mine) and "false_information" in json.dumps(mine)


def test_keyboard_only_ranking_and_skip_button(site, page):
    url, store = site["url"], site["store"]
    log_in(page, url, site["tokens"]["ann"])
    if shown_task(page) is CAPITAL:
        after(page, lambda: page.click("#skip"))
    assert shown_task(page) is COLOUR
    cards = cards_by_text(page)
    blue, green, vague = COLOUR.responses
    cards[vague].focus()
    page.keyboard.press("1")
    cards[blue].focus()
    page.keyboard.press("1")  # rank 1 is taken: a tie
    cards[green].focus()
    page.keyboard.press("ArrowDown")  # an unranked answer steps into a new last rank
    assert ranks_shown(cards) == {blue: "1", green: "2", vague: "1"}
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")  # tied with rank 1, then a rank of its own above it
    assert ranks_shown(cards) == {blue: "2", green: "1", vague: "2"}
    page.keyboard.press("0")  # back to unranked
    assert ranks_shown(cards)[green] is None and page.is_disabled("#submit")
    page.keyboard.press("2")  # past the last rank: a new rank 2
    assert ranks_shown(cards) == {blue: "1", green: "2", vague: "1"} and page.is_enabled("#submit")
    after(page, lambda: page.click("#submit"))
    if shown_task(page) is CAPITAL:
        after(page, lambda: page.click("#skip"))
    assert shown_task(page) is None
    (record,) = store.rankings()
    assert dict(zip(record["responses"], record["ranks"])) == {blue: 1, green: 2, vague: 1}
    assert store.progress()["skips"] == 1


def test_bad_token_logout_and_admin_panel(site, page):
    url = site["url"]
    detail = httpx.get(url + "/api/me", headers={"Authorization": "Bearer nope"}).json()["detail"]
    log_in(page, url, "nope")
    page.wait_for_selector("#error:not(.hidden)")
    assert detail in page.inner_text("#error")
    assert page.is_visible("#login-view") and page.is_hidden("#task-view")

    log_in(page, url, site["tokens"]["boss"])
    page.wait_for_selector("#task-view:not(.hidden)")
    assert page.is_hidden("#error") and "boss" in page.inner_text("#whoami")
    page.click("#admin-tab")
    page.wait_for_selector("#progress-summary")
    assert "tasks 2" in page.inner_text("#progress-summary")
    assert page.locator("#progress td", has_text="ann").count() == 1

    page.reload()  # the token is remembered
    page.wait_for_selector("#task-view:not(.hidden)")
    page.click("#logout")
    assert page.is_visible("#login-view") and page.is_hidden("#admin-tab")
    page.reload()  # and forgotten after logging out
    assert page.is_visible("#login-view")

    log_in(page, url, site["tokens"]["ann"])  # a labeler sees no admin panel
    page.wait_for_selector("#task-view:not(.hidden)")
    assert page.is_hidden("#admin-tab")
