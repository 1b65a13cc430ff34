"""The rating page: a small local web app where people compare two candidate summaries (A / B / tie / skip) or rate a
single one 1-5, every judgement going to the SQLite feedback store.

Start it with ``sb3-textrl rate --db feedback.db`` (or ``serve``), open the URL it prints, type your name, then use the
keyboard: on a pair ``a`` A is better, ``b`` B is better, ``t`` tie, ``s`` skip; on a single candidate ``1``-``5``;
``u`` undo. Digits never judge a pair (nor letters a single candidate), and the page lists the keys the item on screen
takes. It shows the rater's progress and, once they have a pace, an estimate of the time left (computed by the store,
as for the terminal rater). Several people can rate at once, each under their own name.

Secure by default, because it shows text written by a model and writes to a database:

* it binds 127.0.0.1 unless told otherwise;
* every request must carry a random token (printed in the URL); without it the answer is 403;
* model text is only ever put into the page by Jinja with autoescaping (never as HTML), and the Content-Security-Policy
  forbids inline scripts as a second line of defence;
* malformed submissions get a 4xx with a JSON ``{"error": ...}`` that says what to send instead.

Flask and waitress are imported inside the functions that need them, so ``sb3-textrl --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlencode

from sb3_textrl.feedback.store import FeedbackStore, FeedbackStoreError

# Shared with the terminal rater; importable from here as before.
from sb3_textrl.feedback.views import MAX_RATER_LENGTH as MAX_RATER_LENGTH
from sb3_textrl.feedback.views import PAIR_KEYS, SCORE_LABELS, SCORES, UNDO_KEY, check_rater, item_view, progress_view

if TYPE_CHECKING:
    from flask import Flask

TOKEN_HEADER = "X-Token"
TOKEN_PARAM = "token"
MIN_TOKEN_LENGTH = 16
DEFAULT_PORT = 8000
# Choices as the page and the API accept them (case-insensitive) -> the store's spelling.
PAIR_CHOICES = {"a": "A", "b": "B", "tie": "tie", "skip": "skip"}

# 'self' only: no inline script or style, so even text that escaped escaping could not run.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def rating_url(host: str, port: int, token: str, rater: str | None = None) -> str:
    """
    The URL a rater opens (the token is part of it).

    :param host: the address the server listens on (0.0.0.0 / :: are shown as 127.0.0.1)
    :param port: the port it listens on
    :param token: the access token
    :param rater: a rater name to put in the URL, if any
    """
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:  # an IPv6 address goes in brackets
        host = f"[{host}]"
    query = {TOKEN_PARAM: token} | ({"rater": rater} if rater else {})
    return f"http://{host}:{port}/?{urlencode(query)}"


def create_app(store_path: str | os.PathLike, token: str, *, default_rater: str | None = None) -> Flask:
    """
    Build the rating app (a Flask app; serve it with ``serve`` or any WSGI server, threaded is fine).

    :param store_path: path of the feedback database (created if missing)
    :param token: the secret every request must carry (GET: ``?token=`` or header ``X-Token``; POST: header ``X-Token``
        or a ``token`` form field); make it with ``secrets.token_urlsafe()``
    :param default_rater: rater name used when the URL has no ``?rater=``
    :return: the Flask app
    :raises ValueError: for a short token or a bad default rater
    :raises FeedbackStoreError: when the database is not a (compatible) feedback store
    """
    from flask import Flask
    from flask.json.provider import DefaultJSONProvider

    if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"the token must be a string of at least {MIN_TOKEN_LENGTH} characters: use secrets.token_urlsafe()")
    if default_rater is not None:
        default_rater = check_rater(default_rater)
    store_path = os.fspath(store_path)
    FeedbackStore(store_path).close()  # fail now, not on the first request, for a foreign or newer database

    app = Flask(__name__)  # templates/ and static/ sit next to this module
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # a judgement is a few bytes
    assert isinstance(app.json, DefaultJSONProvider)  # Flask's default provider, the one with sort_keys
    app.json.sort_keys = False
    store = _add_request_store(app, store_path)
    _add_token_check(app, token.encode())
    _add_responses(app)
    _add_pages(app, store, token, default_rater)
    _add_api(app, store)
    return app


def _add_request_store(app: Flask, store_path: str) -> Callable[[], FeedbackStore]:
    """Give each request its own store connection, closed when the request ends; return what opens it."""
    from flask import g

    def store() -> FeedbackStore:
        # One connection per request: a connection is not shared between server threads (each write is its own
        # transaction on it), and opening one costs about 10 ms, nothing next to a person reading a summary.
        if "store" not in g:
            g.store = FeedbackStore(store_path)
        return g.store

    @app.teardown_appcontext
    def close_store(_exc: BaseException | None) -> None:
        opened = g.pop("store", None)
        if opened is not None:
            opened.close()

    return store


def _add_token_check(app: Flask, expected: bytes) -> None:
    """Answer 403 to every request without the token."""
    from flask import abort, request

    @app.before_request
    def require_token() -> None:
        # CSRF: the token is not a cookie, so a browser never sends it on its own. A page from another site cannot read
        # it either (same-origin policy), so it cannot forge a POST that carries it: requiring it on every POST (header
        # or form field) is the CSRF protection. GETs take it from the URL so that the printed link just works.
        if request.method in ("GET", "HEAD"):
            given = request.args.get(TOKEN_PARAM) or request.headers.get(TOKEN_HEADER)
        else:
            given = request.headers.get(TOKEN_HEADER) or request.form.get(TOKEN_PARAM)
        if not given or not secrets.compare_digest(given.encode(), expected):
            abort(
                403,
                description="missing or wrong token: open the URL that `sb3-textrl rate` printed (it ends in "
                f"?token=...); API calls send the token in the {TOKEN_HEADER} header",
            )


def _add_responses(app: Flask) -> None:
    """The security headers of every response, and errors as JSON ``{"error": ...}``."""
    from flask import jsonify
    from werkzeug.exceptions import HTTPException

    @app.after_request
    def security_headers(response):
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"  # the URL holds the token
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return jsonify(error=error.description), error.code

    @app.errorhandler(FeedbackStoreError)
    def store_error(error: FeedbackStoreError):
        # A bad judgement is the request's fault (400); a full disk (507) or a held lock (503) is the server's.
        return jsonify(error=str(error)), getattr(error, "http_status", 400)


def _add_pages(app: Flask, store: Callable[[], FeedbackStore], token: str, default_rater: str | None) -> None:
    """The HTML: the rating page ``/`` and the item fragment ``/item`` its script swaps in."""
    from flask import render_template, request

    @app.get("/")
    def page():
        rater, error = request.args.get("rater", default_rater or ""), None
        if rater:
            try:
                rater = check_rater(rater)
            except ValueError as bad:
                rater, error = "", str(bad)
        context = _item_context(store(), rater) if rater else {"item": None, "rater": ""}
        return render_template("rate.html", token=token, error=error, **context)

    @app.get("/item")
    def item_fragment():
        rater = _rater_arg(request.args.get("rater"))
        return render_template("_item.html", **_item_context(store(), rater))


def _add_api(app: Flask, store: Callable[[], FeedbackStore]) -> None:
    """The JSON API: ``GET /api/next``, ``POST /api/judge``, ``POST /api/undo``."""
    from flask import jsonify, request

    @app.get("/api/next")
    def api_next():
        rater = _rater_arg(request.args.get("rater"))
        return jsonify(item=item_view(store().next_item(rater)), progress=_progress_json(store(), rater))

    @app.post("/api/judge")
    def api_judge():
        body = _json_body()
        rater = _rater_arg(body.get("rater"))
        judgement_id = _record_judgement(store, body, rater)
        return jsonify(ok=True, judgement_id=judgement_id, progress=_progress_json(store(), rater))

    @app.post("/api/undo")
    def api_undo():
        rater = _rater_arg(_json_body().get("rater"))
        return jsonify(undone=store().undo_last(rater), progress=_progress_json(store(), rater))


def _rater_arg(value: Any) -> str:
    """The checked rater name of a request (400 when it is bad)."""
    from flask import abort

    try:
        return check_rater(value)
    except ValueError as error:
        abort(400, description=str(error))


def _json_body() -> dict[str, Any]:
    """The request's JSON object (400 for anything else)."""
    from flask import abort, request

    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        abort(
            400,
            description='the body must be a JSON object, e.g. {"rater": "ann", "kind": "pair", "pair_id": 1, "choice": "A"}',
        )
    return body


def _int_field(body: dict[str, Any], name: str) -> int:
    """An integer id of the body (400 for anything else, booleans included)."""
    from flask import abort

    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        abort(400, description=f"'{name}' must be an integer id (the one shown with the item), got {value!r}")
    return value


def _record_judgement(store: Callable[[], FeedbackStore], body: dict[str, Any], rater: str) -> int:
    """Store the judgement of a ``/api/judge`` body (400 for a bad kind, id, choice or score); return its id."""
    from flask import abort

    # store() is called only once the body is valid: a bad body gets its 400 without opening the database.
    kind = body.get("kind")
    if kind == "pair":
        pair_id = _int_field(body, "pair_id")
        choice = body.get("choice")
        if not isinstance(choice, str) or choice.lower() not in PAIR_CHOICES:
            abort(400, description=f"'choice' must be one of A, B, tie, skip, got {choice!r}")
        return store().record_preference(pair_id, rater, PAIR_CHOICES[choice.lower()])
    if kind == "single":
        candidate_id = _int_field(body, "candidate_id")
        score = body.get("score")
        if isinstance(score, bool) or score not in SCORES:
            abort(400, description=f"'score' must be an integer from 1 to 5, got {score!r}")
        return store().record_rating(candidate_id, rater, int(score))
    abort(
        400,
        description=f"'kind' must be 'pair' (with pair_id and choice) or 'single' (with candidate_id and score), got {kind!r}",
    )


def _progress_json(feedback: FeedbackStore, rater: str) -> dict[str, Any]:
    """The rater's progress for the API: ``done``, ``total``, ``eta_s`` and ``eta`` (None until there is a pace)."""
    return progress_view(feedback.progress_report(rater))


def _item_context(feedback: FeedbackStore, rater: str) -> dict[str, Any]:
    """What the page and the item fragment render: the rater's next item, progress and the keys it takes."""
    progress = progress_view(feedback.progress_report(rater))
    return {
        "item": item_view(feedback.next_item(rater)),
        "done": progress["done"],
        "total": progress["total"],
        "eta": progress["eta"],
        "rater": rater,
        "pair_keys": PAIR_KEYS,
        "score_labels": SCORE_LABELS,
        "undo_key": UNDO_KEY,
    }


def rating_server(
    store_path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    rater: str | None = None,
    token: str | None = None,
    threads: int = 8,
    out: TextIO | None = None,
) -> tuple[Any, str]:
    """
    Make the rating page's waitress server (a threaded pure-Python WSGI server) and print the URL to open.

    :param store_path: path of the feedback database (created if missing)
    :param host: address to listen on; anything but loopback exposes the page to the network (a warning is printed)
    :param port: port to listen on (0 picks a free one)
    :param rater: default rater name put in the printed URL
    :param token: access token (default: a fresh ``secrets.token_urlsafe(24)``)
    :param threads: worker threads, i.e. requests handled at once
    :param out: where the URL is printed (default stdout)
    :return: ``(server, url)``: ``server.run()`` serves until Ctrl+C, ``stop_server(server)`` stops it from another thread
    :raises OSError: when the port cannot be used (the message says what to do)
    """
    from waitress import create_server

    # Checked first: waitress takes threads=0 (then answers no request, and ignores Ctrl+C) and any port number.
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1 (requests handled at once), got {threads!r}; 8 is plenty")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be 0 (any free port) to 65535, got {port!r}")
    out = out or sys.stdout
    token = token or secrets.token_urlsafe(24)
    app = create_app(store_path, token, default_rater=rater)
    try:
        server = create_server(app, host=host, port=port, threads=threads)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror}): pick another port with --port (0 = any free "
                      "port) or stop the program using it") from error
    if not _is_loopback(host):
        print(f"WARNING: listening on {host}: anyone who can reach this machine and has the token can read the items and "
              "record judgements. Share the URL only with your raters, or use --host 127.0.0.1.", file=sys.stderr)
    url = rating_url(host, server.effective_port, token, rater)
    print(f"Rating page for {os.fspath(store_path)}:\n  {url}", file=out, flush=True)
    if host in ("0.0.0.0", "::"):
        print(f"  (from other machines use this machine's address, e.g. {socket.gethostname()}, instead of 127.0.0.1)",
              file=out, flush=True)
    return server, url


def stop_server(server: Any) -> None:
    """
    Stop a server from ``rating_server`` that runs in another thread; ``server.run()`` then returns.

    :param server: the waitress server
    """
    # Let the worker threads finish first (they wake the loop when done), then close the listening socket and every
    # open connection (a browser keeps some alive) on the server's own loop, through its wake-up trigger.
    server.task_dispatcher.shutdown(timeout=5)

    def close_all() -> None:
        for channel in list(server._map.values()):
            channel.close()

    server.trigger.pull_trigger(close_all)


def serve(
    store_path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    rater: str | None = None,
    token: str | None = None,
    threads: int = 8,
    out: TextIO | None = None,
) -> None:
    """
    Serve the rating page until Ctrl+C (the arguments are those of :func:`rating_server`).

    :param store_path: path of the feedback database (created if missing)
    :param host: address to listen on (default loopback only)
    :param port: port to listen on (0 picks a free one)
    :param rater: default rater name put in the printed URL
    :param token: access token (default: a fresh random one)
    :param threads: worker threads
    :param out: where the URL is printed (default stdout)
    """
    server, _ = rating_server(store_path, host=host, port=port, rater=rater, token=token, threads=threads, out=out)
    print("Press Ctrl+C to stop.", file=out or sys.stdout, flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
