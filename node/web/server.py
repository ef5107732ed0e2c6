"""The node's HTTP server: /healthz for the supervisor and /metrics (Prometheus text).

It listens on the rule file's `http.bind_address` (loopback by default). Counts and states
only; no UIDs and no patient data are ever served.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from node.ingest.spool import Spool
from node.log import get_logger
from node.web.metrics import CONTENT_TYPE, NodeMetrics

log = get_logger(__name__)

# Overrides http.port of the rule file when set (the container image sets it).
HTTP_PORT_ENV = "NEURONODE_HTTP_PORT"


class WebServer:
    """A small threaded HTTP server serving /healthz and /metrics.

    Without `metrics` it makes its own, with only the gauges read from the spool.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        port: int,
        active_associations: Callable[[], int],
        host: str = "127.0.0.1",
        metrics: NodeMetrics | None = None,
    ) -> None:
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server_self._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return  # request lines are not logged (paths are ours, but keep logs clean)

        self.spool = spool
        if metrics is None:
            metrics = NodeMetrics()
        metrics.watch(spool, active_associations=active_associations)
        self.metrics = metrics
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="web", daemon=True)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()
        log.info("http_started", bind_address=str(self._httpd.server_address[0]), port=self.port)

    def stop(self) -> None:
        """Stop serving and close the socket (also when serving never started: a node whose
        listener failed to open stops without waiting for a serve loop that never ran)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        if path == "/healthz":
            try:
                self.spool.index.query("SELECT 1")
                code, body = 200, {"status": "ok"}
            except sqlite3.Error as exc:
                code, body = 503, {"status": "error", "error": type(exc).__name__}
            self._send(req, code, "application/json", json.dumps(body).encode())
        elif path == "/metrics":
            try:
                text = self.metrics.render()
            except sqlite3.Error as exc:
                self._send(req, 503, "text/plain", f"index error: {type(exc).__name__}\n".encode())
                return
            self._send(req, 200, CONTENT_TYPE, text)
        else:
            self._send(req, 404, "text/plain", b"not found\n")

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes) -> None:
        req.send_response(code)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
