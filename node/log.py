"""structlog setup: JSON lines (or console on a TTY), allow-listed keys, no patient data.

Every log call uses a constant event name and keys from ``ALLOWED_KEYS``; any other key is
dropped (and named in ``dropped_keys``) so a careless call cannot leak a header value.
Study and series UIDs are logged only as keyed hashes (``study_key``/``series_key``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Literal

import structlog

LogFormat = Literal["auto", "json", "console"]

ALLOWED_KEYS = frozenset(
    {
        "event",
        "level",
        "timestamp",
        "logger",
        "dropped_keys",
        # correlation
        "study_key",
        "series_key",
        "instance_key",
        "assoc_id",
        "job_id",
        "attempt",
        "model_id",
        "task",
        "destination",
        "object_kind",
        # association
        "calling_ae",
        "called_ae",
        "peer_host",
        "peer_port",
        "reason",
        # processing
        "stage",
        "status",
        "status_code",
        "duration_ms",
        "cpu_ms",
        "count",
        "n_instances",
        "n_series",
        "n_stored",
        "n_duplicates",
        "n_failed",
        "n_quarantined",
        "n_errors",
        "n_findings",
        "n_objects",
        "sop_class",
        "transfer_syntax",
        "label",
        "confidence",
        "method",
        "probability",
        "finding",
        "bytes",
        "free_bytes",
        "path",
        "port",
        "bind_address",
        "ae_title",
        "workers",
        "worker",
        "pid",
        "state",
        "error",
        "error_type",
        "reopened",
        "version",
        "rules",
        "problems",
        "restart_keys",
        "mode",
        "exc_info",
        "exception",
    }
)

_KEY_ENV = "NEURONODE_LOG_KEY"
_key: bytes | None = None


def set_correlation_key(key: bytes) -> None:
    """Set the secret that keys UID hashes (from the spool's key file or the environment)."""
    global _key
    _key = key


def load_or_create_key(path: Path) -> bytes:
    """Read the correlation key file, creating it (0600) on first use."""
    env = os.environ.get(_KEY_ENV)
    if env:
        return env.encode()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return key


def uid_key(uid: str) -> str:
    """A short keyed hash of a UID: stable within a site, not reversible without the key."""
    key = _key if _key is not None else os.environ.get(_KEY_ENV, "neuronode-default").encode()
    return hmac.new(key, uid.encode(), hashlib.sha256).hexdigest()[:12]


def _allow_list(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    dropped = sorted(k for k in event_dict if k not in ALLOWED_KEYS)
    for k in dropped:
        del event_dict[k]
    if dropped:
        event_dict["dropped_keys"] = dropped
    return event_dict


def configure(fmt: LogFormat = "auto", level: str = "info", stream: Any = None) -> None:
    """Configure structlog and route stdlib logging (pynetdicom) through the same renderer."""
    stream = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _allow_list,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _foreign_message_guard,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # Python warnings are log lines too: pydicom's quote header values ("Invalid value for VR
    # DA: '...'"), so they go through the guard above (level and logger kept, text dropped)
    # instead of raw to stderr.
    logging.captureWarnings(False)  # re-arm: True is a no-op while an earlier capture is recorded
    logging.captureWarnings(True)
    # pynetdicom logs dataset dumps (patient attributes) at DEBUG/INFO: keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    _quiet_pynetdicom()


def _foreign_message_guard(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Third-party log lines keep only their level and logger; free text may hold header values."""
    return {
        "event": "third_party_log",
        "level": event_dict.get("level"),
        "logger": event_dict.get("logger"),
        "timestamp": event_dict.get("timestamp"),
    }


def _quiet_pynetdicom() -> None:
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    _config.PASS_CONTEXTVARS = True


def get_logger(name: str) -> Any:
    """A structlog logger for a module."""
    return structlog.get_logger(name)
