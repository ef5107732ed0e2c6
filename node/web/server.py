"""Loopback HTTP: /healthz for the supervisor and /metrics (Prometheus text) for monitoring.

Counts and states only, from the spool index; no UIDs and no patient data are ever served.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from node.ingest.spool import Spool, disk_free_bytes
from node.log import get_logger
from node.records import StudyStatus

log = get_logger(__name__)

HTTP_PORT_ENV = "NEURONODE_HTTP_PORT"


def render_metrics(spool: Spool, *, active_associations: int) -> str:
    """The node's gauges and counters in the Prometheus text exposition format."""
    studies = {
        str(r["state"]): int(r["n"])
        for r in spool.index.query("SELECT state, COUNT(*) AS n FROM studies GROUP BY state")
    }
    jobs = {
        str(r["state"]): int(r["n"])
        for r in spool.index.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
    }
    n_instances = int(spool.index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"])
    n_quarantined = int(spool.index.query("SELECT COUNT(*) AS n FROM quarantine")[0]["n"])
    lines = [
        "# HELP neuronode_up 1 while the node serves.",
        "# TYPE neuronode_up gauge",
        "neuronode_up 1",
        "# HELP neuronode_studies Studies in the spool index by state.",
        "# TYPE neuronode_studies gauge",
        *(f'neuronode_studies{{state="{s.value}"}} {studies.get(s.value, 0)}' for s in StudyStatus),
        "# HELP neuronode_jobs Study jobs by state.",
        "# TYPE neuronode_jobs gauge",
        *(
            f'neuronode_jobs{{state="{s.value}"}} {jobs.get(s.value, 0)}'
            for s in StudyStatus
            if s is not StudyStatus.RECEIVING
        ),
        "# HELP neuronode_instances_stored_total Instances durably stored (not duplicates).",
        "# TYPE neuronode_instances_stored_total counter",
        f"neuronode_instances_stored_total {n_instances}",
        "# HELP neuronode_instances_quarantined_total Distinct instances put in quarantine.",
        "# TYPE neuronode_instances_quarantined_total counter",
        f"neuronode_instances_quarantined_total {n_quarantined}",
        "# HELP neuronode_active_associations DICOM associations open now.",
        "# TYPE neuronode_active_associations gauge",
        f"neuronode_active_associations {active_associations}",
        "# HELP neuronode_spool_free_bytes Free bytes on the spool's file system.",
        "# TYPE neuronode_spool_free_bytes gauge",
        f"neuronode_spool_free_bytes {disk_free_bytes(spool.root)}",
        "# HELP neuronode_spool_min_free_bytes Free-space floor below which C-STORE gets 0xA700.",
        "# TYPE neuronode_spool_min_free_bytes gauge",
        f"neuronode_spool_min_free_bytes {spool.min_free_bytes}",
    ]
    return "\n".join(lines) + "\n"


class WebServer:
    """A small threaded HTTP server bound to loopback, serving /healthz and /metrics."""

    def __init__(
        self,
        spool: Spool,
        *,
        port: int,
        active_associations: Callable[[], int],
        host: str = "127.0.0.1",
    ) -> None:
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server_self._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return  # request lines are not logged (paths are ours, but keep logs clean)

        self.spool = spool
        self._active = active_associations
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
        log.info("http_started", port=self.port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
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
                text = render_metrics(self.spool, active_associations=self._active())
            except sqlite3.Error as exc:
                self._send(req, 503, "text/plain", f"index error: {type(exc).__name__}\n".encode())
                return
            self._send(req, 200, "text/plain; version=0.0.4; charset=utf-8", text.encode())
        else:
            self._send(req, 404, "text/plain", b"not found\n")

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes) -> None:
        req.send_response(code)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
