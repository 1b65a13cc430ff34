"""The rating page: a real Flask app on a real threaded server over a real SQLite store, driven over HTTP and by a real
headless Chromium (Playwright)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import sqlite3
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from sb3_textrl.cli import build_parser, main
from sb3_textrl.feedback import FeedbackStore, FeedbackStoreError
from sb3_textrl.feedback.webapp import create_app, rating_server, rating_url, stop_server

XSS = "<script>window.__xss=1</script><img src=x onerror=window.__xss=1>"
TOKEN = "test-token-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def rating_db(tmp_path) -> tuple[Path, dict[str, int]]:
    """Two pairs (model text with an XSS payload in candidate A of the first, in the article of the second) and one
    single candidate to rate."""
    path = tmp_path / "feedback.db"
    with FeedbackStore(path) as store:
        first = store.add_prompt("Summarize: storm", article="A storm hit the coast on Monday.")
        a1 = store.add_candidate(first, XSS, model="tiny", settings={"temperature": 1.0})
        b1 = store.add_candidate(first, "A storm hit the coast.", model="tiny")
        second = store.add_prompt("Summarize: vote", article=f"The council voted. {XSS}")
        a2 = store.add_candidate(second, "The council voted.", model="tiny")
        b2 = store.add_candidate(second, "Nothing happened.", model="tiny")
        ids = dict(a1=a1, b1=b1, a2=a2, b2=b2, pair1=store.add_pair(first, a1, b1), pair2=store.add_pair(second, a2, b2))
        single = store.add_candidate(second, "Council votes.", model="tiny")
        ids |= dict(single=single, single_item=store.request_rating(single))
    return path, ids


@pytest.fixture()
def server(rating_db):
    """The app on werkzeug's threaded server, port 0; yields its base URL."""
    app = create_app(rating_db[0], TOKEN)
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(5)


def http(method: str, url: str, body: bytes | str | dict | None = None, token: str | None = TOKEN) -> tuple[int, dict, str]:
    """(status, headers, text) of one request; a dict body is sent as JSON, the token in the X-Token header."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    headers = {"X-Token": token} if token else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def judgements(db: Path) -> list[dict]:
    with FeedbackStore(db) as store:
        return store.judgements()


# -- HTTP --------------------------------------------------------------------------------------------------------------
def test_requests_without_the_token_are_forbidden(server):
    for url in (f"{server}/", f"{server}/?token=wrong-token-0123456789", f"{server}/static/rate.js", f"{server}/item?rater=a"):
        status, _, text = http("GET", url, token=None)
        assert status == 403, url
        assert "token" in json.loads(text)["error"]
    status, _, _ = http("POST", f"{server}/api/judge", {"rater": "eve", "kind": "pair", "pair_id": 1, "choice": "A"},
                        token=None)
    assert status == 403
    status, _, _ = http("POST", f"{server}/api/undo", {"rater": "eve"}, token="wrong-token-0123456789")
    assert status == 403
    # the token in a query string is not enough for a POST (it must be a header or form field)
    status, _, _ = http("POST", f"{server}/api/undo?token={TOKEN}", {"rater": "eve"}, token=None)
    assert status == 403
    # ...and with the token everything works
    assert http("GET", f"{server}/?token={TOKEN}", token=None)[0] == 200
    assert http("GET", f"{server}/static/rate.js?token={TOKEN}", token=None)[0] == 200


def test_form_field_token_is_accepted_on_post(server):
    body = f"token={TOKEN}&rater=eve".encode()
    request = urllib.request.Request(f"{server}/api/undo", data=body, method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as caught:  # past the token check; the API then wants JSON
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert "JSON object" in json.loads(caught.value.read())["error"]


def test_security_headers_and_escaped_page(server):
    status, headers, text = http("GET", f"{server}/?token={TOKEN}&rater=ann", token=None)
    assert status == 200
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert XSS not in text
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in text


def test_a_bad_rater_name_in_the_url_is_explained(server):
    status, _, text = http("GET", f"{server}/?token={TOKEN}&rater=%1B%5B2J", token=None)
    assert status == 200
    assert "control characters" in text
    assert 'id="item"' not in text  # asks for a name instead of showing an item
    assert http("GET", f"{server}/item?rater=")[0] == 400


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("not json at all", 400, "JSON object"),
        ("[1, 2]", 400, "JSON object"),
        ({"kind": "pair", "pair_id": 1, "choice": "A"}, 400, "rater name is required"),
        ({"rater": "ann", "pair_id": 1, "choice": "A"}, 400, "'kind'"),
        ({"rater": "ann", "kind": "pair", "choice": "A"}, 400, "'pair_id'"),
        ({"rater": "ann", "kind": "pair", "pair_id": "1", "choice": "A"}, 400, "'pair_id'"),
        ({"rater": "ann", "kind": "pair", "pair_id": 1, "choice": "C"}, 400, "'choice'"),
        ({"rater": "ann", "kind": "pair", "pair_id": 1}, 400, "'choice'"),
        ({"rater": "ann", "kind": "pair", "pair_id": 999, "choice": "A"}, 400, "no item with id 999"),
        ({"rater": "ann", "kind": "single", "candidate_id": 1, "score": 4}, 400, "no rating request"),
        ({"rater": "ann", "kind": "single", "candidate_id": 5, "score": 7}, 400, "'score'"),
        ({"rater": "ann", "kind": "single", "candidate_id": 5, "score": True}, 400, "'score'"),
        ({"rater": "x" * 65, "kind": "pair", "pair_id": 1, "choice": "A"}, 400, "at most 64"),
        ({"rater": "ann\x1b[2J", "kind": "pair", "pair_id": 1, "choice": "A"}, 400, "control characters"),
    ],
)
def test_malformed_submissions_get_a_clear_4xx(server, rating_db, body, status, message):
    got, headers, text = http("POST", f"{server}/api/judge", body)
    assert got == status
    assert headers["Content-Type"] == "application/json"
    assert message in json.loads(text)["error"]
    assert judgements(rating_db[0]) == []  # nothing was stored


def test_unknown_routes_and_methods_answer_json(server):
    assert http("GET", f"{server}/nope?token={TOKEN}")[0] == 404
    status, _, text = http("GET", f"{server}/api/judge?token={TOKEN}")
    assert status == 405
    assert json.loads(text)["error"]


def test_api_judge_undo_and_raters_are_separate(server, rating_db):
    db, ids = rating_db
    status, _, text = http("GET", f"{server}/api/next?rater=ann")
    assert status == 200
    item = json.loads(text)["item"]
    assert (item["kind"], item["item_id"], item["text_a"]) == ("pair", ids["pair1"], XSS)

    answer = json.loads(http("POST", f"{server}/api/judge", {"rater": "ann", "kind": "pair", "pair_id": ids["pair1"],
                                                            "choice": "b"})[2])
    assert answer["progress"] == {"done": 1, "total": 3, "eta_s": None, "eta": None}  # no pace yet
    answer = json.loads(http("POST", f"{server}/api/judge", {"rater": "bob", "kind": "single",
                                                            "candidate_id": ids["single"], "score": 2})[2])
    assert answer["progress"] == {"done": 1, "total": 3, "eta_s": None, "eta": None}
    stored = judgements(db)
    assert [(j["item_id"], j["rater"], j["choice"], j["score"]) for j in stored] == [
        (ids["pair1"], "ann", "B", None), (ids["single_item"], "bob", None, 2)]

    # bob has not judged the first pair, so it is still his next item; ann moved on
    assert json.loads(http("GET", f"{server}/api/next?rater=bob")[2])["item"]["item_id"] == ids["pair1"]
    assert json.loads(http("GET", f"{server}/api/next?rater=ann")[2])["item"]["item_id"] == ids["pair2"]

    # undo takes back only the asking rater's last judgement
    assert json.loads(http("POST", f"{server}/api/undo", {"rater": "ann"})[2]) == {
        "undone": True, "progress": {"done": 0, "total": 3, "eta_s": None, "eta": None}}
    assert json.loads(http("POST", f"{server}/api/undo", {"rater": "ann"})[2])["undone"] is False
    assert [(j["rater"], j["score"]) for j in judgements(db)] == [("bob", 2)]


def test_concurrent_raters_through_threads(server, rating_db):
    """Twelve raters judging all three items at once through the threaded server: every judgement lands."""
    db, ids = rating_db
    errors: list[str] = []

    def rate(name: str) -> None:
        for body in ({"kind": "pair", "pair_id": ids["pair1"], "choice": "A"},
                     {"kind": "pair", "pair_id": ids["pair2"], "choice": "tie"},
                     {"kind": "single", "candidate_id": ids["single"], "score": 4}):
            status, _, text = http("POST", f"{server}/api/judge", body | {"rater": name})
            if status != 200:
                errors.append(text)

    threads = [threading.Thread(target=rate, args=(f"rater{i}",)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(judgements(db)) == 36
    with FeedbackStore(db) as store:
        assert store.ratings([ids["single"]]) == {ids["single"]: 4.0}
        assert all(store.progress(f"rater{i}") == (3, 3) for i in range(12))


def test_create_app_refuses_bad_setup(tmp_path, rating_db):
    with pytest.raises(ValueError, match="token_urlsafe"):
        create_app(rating_db[0], "short")
    with pytest.raises(ValueError, match="rater name"):
        create_app(rating_db[0], TOKEN, default_rater="  ")
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(FeedbackStoreError, match="another application"):
        create_app(foreign, TOKEN)


def test_rating_url_and_cli_defaults():
    assert rating_url("127.0.0.1", 8000, "tok") == "http://127.0.0.1:8000/?token=tok"
    assert rating_url("0.0.0.0", 81, "tok", "Ann Lee") == "http://127.0.0.1:81/?token=tok&rater=Ann+Lee"
    assert rating_url("::1", 81, "tok") == "http://[::1]:81/?token=tok"
    args = build_parser().parse_args(["rate", "--db", "f.db"])
    assert (args.host, args.terminal, args.rater) == ("127.0.0.1", False, None)  # loopback unless asked


def test_waitress_server_prints_a_tokened_url_and_warns_on_open_host(rating_db, capsys):
    """The server ``sb3-textrl rate`` runs: waitress on port 0 of all interfaces (with the warning), stopped cleanly."""
    out = io.StringIO()
    server, url = rating_server(rating_db[0], host="0.0.0.0", port=0, rater="cli", out=out)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert url in out.getvalue()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{32}&rater=cli", url)  # secrets.token_urlsafe(24)
        assert "WARNING: listening on 0.0.0.0" in capsys.readouterr().err
        status, headers, text = http("GET", url, token=None)
        assert status == 200 and "judged by <strong>cli</strong>" in text
        assert headers["Server"] == "waitress"
        assert http("GET", url.split("?")[0], token=None)[0] == 403
    finally:
        stop_server(server)
        thread.join(10)
    assert not thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
    # on loopback there is no warning, and two servers get separate tokens
    server, other = rating_server(rating_db[0], port=0, out=io.StringIO())
    server.close()
    assert "WARNING" not in capsys.readouterr().err
    assert other.split("token=")[1] != url.split("token=")[1].split("&")[0]


# -- the browser ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if shutil.which("chromium") is None and not os.path.exists(CHROMIUM):
        pytest.skip("Chromium is not installed: run `apt-get install -y chromium` (CI's .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def expect(browser):
    from playwright.sync_api import expect

    return expect


def test_browser_keyboard_rating_undo_progress_and_escaping(browser, expect, server, rating_db):
    db, ids = rating_db
    # bypass_csp: the page's CSP would stop an injected script anyway; without it, only escaping can keep
    # window.__xss unset, so this test fails if model text is ever rendered as HTML.
    page = browser.new_page(bypass_csp=True)
    page.set_default_timeout(10_000)
    try:
        assert page.goto(f"{server}/").status == 403  # no token, no page
        assert page.goto(f"{server}/?token={TOKEN}&rater=ann").status == 200

        # the XSS candidate is shown as text and did not run
        assert page.text_content("#candidate-a .text") == XSS
        assert page.locator("#candidate-a img, #slot script").count() == 0
        assert page.evaluate("window.__xss") is None
        assert page.text_content("#progress") == "0 / 3"
        assert page.locator("#eta").count() == 0  # no pace yet, so no estimate
        assert "a A is better · b B is better · t tie · s skip · u undo" in " ".join(page.text_content("#keys").split())

        # a = A is better: stored in SQLite, progress moves, the second pair comes (fetched and swapped in by JS)
        page.keyboard.press("a")
        expect(page.locator("#progress")).to_have_text("1 / 3")
        assert [(j["item_id"], j["rater"], j["choice"]) for j in judgements(db)] == [(ids["pair1"], "ann", "A")]
        assert page.text_content("#article") == f"The council voted. {XSS}"
        assert page.locator("#slot img, #slot script").count() == 0
        assert page.evaluate("window.__xss") is None
        assert "Saved" in page.text_content("#status")

        # u = undo: gone from SQLite, counter back, the first pair again
        page.keyboard.press("u")
        expect(page.locator("#progress")).to_have_text("0 / 3")
        assert judgements(db) == []
        assert page.text_content("#candidate-a .text") == XSS

        # typing in the rater field is not a judgement
        page.focus("#rater")
        page.keyboard.press("b")
        page.keyboard.press("Escape")
        page.evaluate("document.activeElement.blur()")

        page.keyboard.press("b")  # B is better
        expect(page.locator("#progress")).to_have_text("1 / 3")
        page.keyboard.press("t")  # tie on the second pair
        expect(page.locator("#progress")).to_have_text("2 / 3")
        assert page.get_attribute("#item", "data-kind") == "single"
        assert "1–5 score this summary" in page.text_content("#keys")
        page.keyboard.press("a")  # not a rating key for a single item: nothing happens
        expect(page.locator("#status")).to_contain_text("letters judge pairs only")
        page.keyboard.press("4")
        expect(page.locator("#progress")).to_have_text("3 / 3")
        assert "Nothing left to judge" in page.text_content("#item")

        stored = [(j["item_id"], j["rater"], j["choice"], j["score"]) for j in judgements(db)]
        assert stored == [(ids["pair1"], "ann", "B", None), (ids["pair2"], "ann", "tie", None),
                          (ids["single_item"], "ann", None, 4)]
        with FeedbackStore(db) as store:
            assert store.progress("ann") == (3, 3)
            assert store.progress("bob") == (0, 3)

        # the buttons work too: undo by click, then rate 5 by click
        page.click("button[data-action=undo]")
        expect(page.locator("#progress")).to_have_text("2 / 3")
        page.click("button[data-score='5']")
        expect(page.locator("#progress")).to_have_text("3 / 3")
        with FeedbackStore(db) as store:
            assert store.ratings([ids["single"]]) == {ids["single"]: 5.0}
            # an item added while the page waits (as a live run does) shows up without a reload
            third = store.add_prompt("Summarize: late", article="Late news.")
            late = store.add_pair(third, store.add_candidate(third, "late A", model="tiny"),
                                  store.add_candidate(third, "late B", model="tiny"))
        expect(page.locator("#progress")).to_have_text("3 / 4")
        assert page.get_attribute("#item", "data-pair-id") == str(late)
        assert page.text_content("#candidate-b .text") == "late B"
        assert page.evaluate("window.__xss") is None
    finally:
        page.close()


def test_browser_digits_on_a_pair_store_nothing(browser, expect, server, rating_db):
    """"1"/"2" once meant A/B on a pair: a rater who thought they were scoring stated a preference unawares."""
    db, ids = rating_db
    page = browser.new_page()
    page.set_default_timeout(10_000)
    try:
        page.goto(f"{server}/?token={TOKEN}&rater=ann")
        assert page.get_attribute("#item", "data-kind") == "pair"
        for digit in ("2", "1", "5"):
            page.keyboard.press(digit)
            expect(page.locator("#status")).to_contain_text(f'"{digit}" does nothing here (digits score single')
        expect(page.locator("#status")).to_contain_text("press a, b, t, s, u")
        page.wait_for_timeout(300)  # time for a request, had one been sent
        assert judgements(db) == []
        assert page.text_content("#progress") == "0 / 3"
        assert page.get_attribute("#item", "data-pair-id") == str(ids["pair1"])
        page.keyboard.press("b")  # the letter does judge it
        expect(page.locator("#progress")).to_have_text("1 / 3")
        assert [(j["item_id"], j["choice"]) for j in judgements(db)] == [(ids["pair1"], "B")]
    finally:
        page.close()


def test_page_and_api_show_the_time_left_from_the_raters_pace(browser, expect, server, rating_db):
    db, ids = rating_db
    with FeedbackStore(db) as store:  # three more pairs: six items
        for k in range(3):
            prompt = store.add_prompt(f"Summarize: extra {k}", article=f"Extra article {k}.")
            store.add_pair(prompt, store.add_candidate(prompt, f"extra {k} a", model="tiny"),
                           store.add_candidate(prompt, f"extra {k} b", model="tiny"))
    # ann judged three items 30 s apart, the last one 30 s ago (judgements at chosen times through the store's clock)
    when = [datetime.now(timezone.utc) - timedelta(seconds=90)]
    with FeedbackStore(db, clock=lambda: when[0]) as store:
        store.record_preference(ids["pair1"], "ann", "A")
        when[0] += timedelta(seconds=30)
        store.record_preference(ids["pair2"], "ann", "B")
        when[0] += timedelta(seconds=30)
        store.record_rating(ids["single"], "ann", 4)
    _, _, text = http("GET", f"{server}/api/next?rater=ann")
    assert json.loads(text)["progress"] == {"done": 3, "total": 6, "eta_s": 90, "eta": "about 2 min left"}

    page = browser.new_page()
    page.set_default_timeout(10_000)
    try:
        page.goto(f"{server}/?token={TOKEN}&rater=ann")
        assert page.text_content("#progress") == "3 / 6"
        assert page.text_content("#eta") == "about 2 min left"  # 3 left at 30 s each
        # a judgement now, about 30 s after the last: 2 left at the same pace
        page.keyboard.press("t")
        expect(page.locator("#progress")).to_have_text("4 / 6")
        expect(page.locator("#eta")).to_have_text("about 1 min left")
        # bob has judged nothing: no pace, no estimate
        page.goto(f"{server}/?token={TOKEN}&rater=bob")
        assert page.text_content("#progress") == "0 / 6"
        assert page.locator("#eta").count() == 0
    finally:
        page.close()


def test_browser_asks_for_a_name_first(browser, expect, server, rating_db):
    page = browser.new_page()
    page.set_default_timeout(10_000)
    try:
        page.goto(f"{server}/?token={TOKEN}")
        assert page.locator("#item").count() == 0
        page.fill("#rater", "Zoë")
        page.click("#rater-form button")
        page.wait_for_selector("#item")
        assert "judged by Zoë" in page.text_content(".progress")
        page.keyboard.press("s")
        expect(page.locator("#progress")).to_have_text("1 / 3")
        assert [(j["rater"], j["choice"]) for j in judgements(rating_db[0])] == [("Zoë", "skip")]
    finally:
        page.close()


def test_cli_reports_setup_errors_without_a_traceback(tmp_path, rating_db, capsys):
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
    assert main(["rate", "--db", str(foreign), "--port", "0"]) == 2
    assert "another application" in capsys.readouterr().err

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["rate", "--db", str(rating_db[0]), "--port", str(busy.getsockname()[1])]) == 2
    assert "pick another port with --port" in capsys.readouterr().err
