"""The node's HTTP server: the status page, /healthz for the supervisor and /metrics.

Starlette with Jinja2 templates, served by uvicorn in a background thread on the rule file's
`http.bind_address` (loopback by default). The status page shows patient identifiers, so:

- bound to loopback, only requests naming a loopback host are served (a page elsewhere
  cannot reach it by DNS rebinding); bound elsewhere, the config refuses to start without a
  token;
- with a token, every request but /healthz needs `Authorization: Bearer <token>` or the
  session cookie the login form sets (HttpOnly, SameSite=Strict); /metrics too (Prometheus
  sends the token with `authorization: {credentials_file: ...}`);
- every POST (the actions) carries a CSRF token, unless it comes with the bearer token;
- pages are `Cache-Control: no-store` and cannot be framed; request lines are not logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from node import NOT_FOR_CLINICAL_USE, __version__
from node.deliver.outbox import outbox_summary
from node.errors import NodeError
from node.ingest.spool import PARSE_ERRORS, Spool
from node.log import get_logger, uid_key
from node.store.retention import purged_studies
from node.web.metrics import CONTENT_TYPE, NodeMetrics
from node.web.views import (
    StatusHooks,
    delivery_states,
    find_study,
    heatmap_file,
    list_studies,
    render_png,
    study_counts,
    study_detail,
)

log = get_logger(__name__)

# Overrides http.port of the rule file when set (the container image sets it).
HTTP_PORT_ENV = "NEURONODE_HTTP_PORT"

HERE = Path(__file__).parent
PAGE_SIZE = 50
SESSION_COOKIE = "neuronode_session"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# What an action redirect may say (a code, never text from the request).
NOTICES = {
    "job-requeued": "The study job was requeued: it runs again with a fresh set of attempts.",
    "job-not-requeued": "Nothing to requeue: the study's job is not dead or failed (any more).",
    "deliveries-requeued": "The dead deliveries were requeued: they are sent again now.",
    "deliveries-not-requeued": "Nothing to requeue: no dead delivery to that destination.",
    "forced": "The study was marked complete: it is queued for processing.",
    "not-forced": "The study is not receiving (any more): nothing to complete.",
}
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Access:
    """Who may see the page: the token (None: open, loopback only), the session and CSRF
    values derived from it with a per-process secret (a restart signs everyone out)."""

    def __init__(self, token: str | None, *, loopback: bool) -> None:
        self.token = token
        self.loopback = loopback
        self._secret = secrets.token_bytes(32)

    def _mac(self, what: str) -> str:
        return hmac.new(self._secret, what.encode(), hashlib.sha256).hexdigest()

    @property
    def session(self) -> str:
        return self._mac(f"session:{self.token}")

    @property
    def csrf(self) -> str:
        return self._mac(f"csrf:{self.token}")

    def bearer_ok(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return (
            self.token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(value.strip().encode(), self.token.encode())
        )

    def allowed(self, request: Request) -> bool:
        if self.token is None:
            return True
        if self.bearer_ok(request):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self.session.encode())

    def host_ok(self, request: Request) -> bool:
        """Bound to loopback: only a loopback Host header (no DNS rebinding to the page)."""
        if not self.loopback:
            return True
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.lower() in LOOPBACK_HOSTS


async def _form(request: Request) -> dict[str, str]:
    """A url-encoded form (the only kind the page posts)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    body = (await request.body())[:65536].decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body).items()}


def _ts(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z"


def _dur(s: float | None) -> str:
    if s is None:
        return ""
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _prob(p: float | None) -> str:
    return "" if p is None else f"{p:.3f}"


class StatusApp:
    """The Starlette application: routes, access control and the templates."""

    def __init__(
        self, spool: Spool, *, metrics: NodeMetrics, hooks: StatusHooks, access: Access
    ) -> None:
        self.spool = spool
        self.metrics = metrics
        self.hooks = hooks
        self.access = access
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        env = self.templates.env
        env.filters["ts"] = _ts
        env.filters["dur"] = _dur
        env.filters["prob"] = _prob
        # The notice without its own "NOT FOR CLINICAL USE:" (the banner says it in bold).
        env.globals["notice_text"] = NOT_FOR_CLINICAL_USE.split(": ", 1)[-1]
        env.globals["version"] = __version__
        self.app = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/metrics", self.metrics_page),
                Route("/", self.index),
                Route("/login", self.login_form, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/studies/{key}", self.study),
                Route("/studies/{key}/heatmaps/{n:int}.png", self.heatmap),
                Route("/studies/{key}/requeue-job", self.requeue_job, methods=["POST"]),
                Route(
                    "/studies/{key}/requeue-deliveries",
                    self.requeue_deliveries,
                    methods=["POST"],
                ),
                Route("/studies/{key}/force-complete", self.force_complete, methods=["POST"]),
                Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
            ],
            exception_handlers={404: self.not_found},
        )
        self.app.add_middleware(_Guard, access=access, unauthorized=self.unauthorized)

    # --- open -----------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        try:
            await asyncio.to_thread(self.spool.index.query, "SELECT 1")
        except sqlite3.Error as exc:
            return JSONResponse({"status": "error", "error": type(exc).__name__}, 503)
        return JSONResponse({"status": "ok"})

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return PlainTextResponse("not found\n", 404)

    def unauthorized(self, request: Request) -> Response:
        """401: a login form for a browser, a bare answer for a scraper or a script."""
        if "text/html" not in request.headers.get("accept", ""):
            return PlainTextResponse(
                "401 unauthorized: send Authorization: Bearer <token>\n",
                401,
                headers={"WWW-Authenticate": 'Bearer realm="neuronode"'},
            )
        return self._page(
            request, "login.html", {"next": request.url.path, "failed": False}, status=401
        )

    async def login_form(self, request: Request) -> Response:
        if self.access.token is None or self.access.allowed(request):
            return RedirectResponse("/", 303)
        return self._page(request, "login.html", {"next": "/", "failed": False})

    async def login(self, request: Request) -> Response:
        form = await _form(request)
        token = self.access.token
        given = form.get("token", "")
        target = form.get("next", "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"  # only our own pages
        if token is None or not hmac.compare_digest(given.encode(), token.encode()):
            log.warning("http_login_refused")
            return self._page(request, "login.html", {"next": target, "failed": True}, 401)
        response = RedirectResponse(target, 303)
        response.set_cookie(
            SESSION_COOKIE, self.access.session, httponly=True, samesite="strict", path="/"
        )
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/login" if self.access.token else "/", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # --- behind the guard -----------------------------------------------------------------

    async def metrics_page(self, request: Request) -> Response:
        try:
            text = await asyncio.to_thread(self.metrics.render)
        except sqlite3.Error as exc:
            return PlainTextResponse(f"index error: {type(exc).__name__}\n", 503)
        return Response(text, 200, media_type=CONTENT_TYPE)

    async def index(self, request: Request) -> Response:
        try:
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            page = 1
        try:
            studies, total, counts, outbox, purged = await asyncio.to_thread(self._index_data, page)
        except sqlite3.Error as exc:
            return PlainTextResponse(f"index error: {type(exc).__name__}\n", 503)
        pages = max(1, -(-total // PAGE_SIZE))
        return self._page(
            request,
            "index.html",
            {
                "studies": studies,
                "total": total,
                "page": page,
                "pages": pages,
                "counts": counts,
                "outbox": outbox,
                "purged": purged,
            },
        )

    def _index_data(self, page: int) -> tuple[Any, ...]:
        studies, total = list_studies(self.spool, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        sent = delivery_states(
            self.spool.root,
            [s.study_uid for s in studies],
            database_url=self.spool.index.url_if_shared,
        )
        return (
            [(s, sent.get(s.study_uid, {})) for s in studies],
            total,
            study_counts(self.spool),
            outbox_summary(self.spool.root),
            purged_studies(self.spool)[:10],
        )

    async def study(self, request: Request) -> Response:
        key = request.path_params["key"]
        try:
            detail = await asyncio.to_thread(self._detail, key)
        except sqlite3.Error as exc:
            return PlainTextResponse(f"index error: {type(exc).__name__}\n", 503)
        if detail is None:
            return PlainTextResponse("no such study (purged, or never received)\n", 404)
        notice = NOTICES.get(request.query_params.get("done", ""))
        return self._page(request, "study.html", {"d": detail, "notice": notice})

    def _detail(self, key: str) -> Any:
        study = find_study(self.spool, key)
        return None if study is None else study_detail(self.spool, self.hooks, study)

    async def heatmap(self, request: Request) -> Response:
        key, n = request.path_params["key"], int(request.path_params["n"])
        study = await asyncio.to_thread(find_study, self.spool, key)
        path = None if study is None else heatmap_file(self.hooks, study.study_uid, n)
        if path is None or not path.is_file():
            return PlainTextResponse("no such heatmap\n", 404)
        try:
            png = await asyncio.to_thread(render_png, path)
        except PARSE_ERRORS as exc:
            log.warning("heatmap_unreadable", error_type=type(exc).__name__)
            return PlainTextResponse("heatmap unreadable\n", 500)
        return Response(png, 200, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def _action(
        self, request: Request, act: Callable[[str, dict[str, str]], str]
    ) -> Response:
        """POST-redirect-GET around one action, with the CSRF check."""
        form = await _form(request)
        if not self.access.bearer_ok(request) and not hmac.compare_digest(
            form.get("csrf", "").encode(), self.access.csrf.encode()
        ):
            log.warning("http_csrf_refused")
            return PlainTextResponse("403 forbidden: missing or wrong CSRF token\n", 403)
        key = request.path_params["key"]
        study = await asyncio.to_thread(find_study, self.spool, key)
        if study is None:
            return PlainTextResponse("no such study\n", 404)
        try:
            done = await asyncio.to_thread(act, study.study_uid, form)
        except (NodeError, sqlite3.Error, OSError) as exc:
            log.error("http_action_failed", error_type=type(exc).__name__)
            return PlainTextResponse(f"action failed: {type(exc).__name__}\n", 500)
        return RedirectResponse(f"/studies/{quote(key)}?done={done}", 303)

    async def requeue_job(self, request: Request) -> Response:
        def act(uid: str, _fields: dict[str, str]) -> str:
            n = self.hooks.requeue_job(uid)
            log.info("http_requeue_job", study_key=uid_key(uid), count=n)
            return "job-requeued" if n else "job-not-requeued"

        return await self._action(request, act)

    async def requeue_deliveries(self, request: Request) -> Response:
        def act(uid: str, form: dict[str, str]) -> str:
            n = self.hooks.requeue_deliveries(uid, form.get("destination", ""))
            log.info("http_requeue_deliveries", study_key=uid_key(uid), count=n)
            return "deliveries-requeued" if n else "deliveries-not-requeued"

        return await self._action(request, act)

    async def force_complete(self, request: Request) -> Response:
        def act(uid: str, _fields: dict[str, str]) -> str:
            return "forced" if self.hooks.force_complete(uid) else "not-forced"

        return await self._action(request, act)

    def _page(
        self, request: Request, name: str, context: dict[str, Any], status: int = 200
    ) -> Response:
        refusal = self.hooks.last_refusal()
        response: HTMLResponse = self.templates.TemplateResponse(
            request,
            name,
            {
                **context,
                "csrf": self.access.csrf,
                "refusal": refusal,
                "signed_in": self.access.token is not None and self.access.allowed(request),
            },
            status_code=status,
        )
        return response


class _Guard:
    """ASGI middleware: host check (loopback), token check, security headers."""

    def __init__(
        self, app: Any, *, access: Access, unauthorized: Callable[[Request], Response]
    ) -> None:
        self.app = app
        self.access = access
        self.unauthorized = unauthorized

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        path = scope["path"]
        response: Response | None = None
        if path != "/healthz":
            if not self.access.host_ok(request):
                response = PlainTextResponse("421 misdirected: use 127.0.0.1\n", 421)
            elif (
                path not in ("/login", "/logout")
                and not path.startswith("/static/")
                and not self.access.allowed(request)
            ):
                response = self.unauthorized(request)

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in _SECURITY_HEADERS.items():
                    if k.lower().encode() not in names:
                        headers.append((k.lower().encode(), v.encode()))
                message = {**message, "headers": headers}
            await send(message)

        if response is not None:
            await response(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)


class WebServer:
    """The HTTP server in a background thread (uvicorn on a socket bound at construction, so
    a port in use fails here, and port 0 gives a free port at once).

    Without `metrics` it makes its own, with only the gauges read from the spool; without
    `hooks`, actions work directly on the spool (what `neuronode requeue` does).
    """

    def __init__(
        self,
        spool: Spool,
        *,
        port: int,
        active_associations: Callable[[], int],
        host: str = "127.0.0.1",
        metrics: NodeMetrics | None = None,
        hooks: StatusHooks | None = None,
        token: str | None = None,
    ) -> None:
        if token is None and not _is_loopback(host):
            # The config refuses this too (http.bind_address); a caller in code must not get
            # around it: the page shows patient identifiers.
            raise ValueError(f"host: serving {host} beyond loopback needs a token")
        self.spool = spool
        if metrics is None:
            metrics = NodeMetrics()
        metrics.watch(spool, active_associations=active_associations)
        self.metrics = metrics
        self.access = Access(token, loopback=_is_loopback(host))
        self.status = StatusApp(
            spool,
            metrics=metrics,
            hooks=hooks if hooks is not None else StatusHooks.for_spool(spool),
            access=self.access,
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(128)
        except OSError:
            self._sock.close()
            raise
        self._host = host
        config = uvicorn.Config(
            self.status.app,
            log_config=None,  # uvicorn's lines go through the node's guarded root logger
            log_level="warning",
            access_log=False,  # request lines are not logged (study keys in paths)
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="web", daemon=True)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._sock.getsockname()[1])

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def start(self) -> None:
        """Serve in a background thread; return once it accepts requests."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        log.info("http_started", bind_address=self._host, port=self.port)

    def stop(self) -> None:
        """Stop serving and close the socket (also when serving never started: a node whose
        listener failed to open stops without waiting for a serve loop that never ran)."""
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(STOP_TIMEOUT_S)
        self._sock.close()
