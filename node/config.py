"""The rule file IT edits (YAML) and its schema (pydantic, frozen, extra keys forbidden).

Errors name the file, the key path and the line, and say what to write instead, so IT can fix
the file without guessing.

Why this module is long: the rule file is one schema (every section IT edits) plus its
validation with line numbers and fixes; one file mirrors one YAML document.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from node.errors import ConfigError
from node.records import SequenceLabel


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _rule_error(message: str, fix: str) -> PydanticCustomError:
    """A validation error that carries what to write instead (shown by `neuronode check`)."""
    return PydanticCustomError("rule_value", "{message}", {"message": message, "fix": fix})


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16 or not value.isascii() or "\\" in value or value != value.strip():
        raise _rule_error(
            f"'{value}' is not a valid AE title (1-16 ASCII characters, no backslash,"
            " no leading or trailing spaces)",
            "an AE title such as ORTHANC or PACS_MAIN",
        )
    if any(ord(c) < 32 for c in value):
        raise _rule_error(
            f"AE title {value!r} contains a control character", "an AE title such as ORTHANC"
        )
    return value


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _is_host(value: str) -> bool:
    """True for an IPv4/IPv6 address or an RFC 1123 host name."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    if not value or len(value) > 253 or re.fullmatch(r"[0-9.]+", value):
        return False  # all digits and dots but not an address: a mistyped IP
    return all(_HOST_LABEL.match(label) for label in value.rstrip(".").split("."))


def _check_host(value: str | None) -> str | None:
    if value is not None and not _is_host(value):
        raise _rule_error(
            f"'{value}' is neither an IP address nor a host name",
            "an address such as 10.1.2.3 or a host name such as pacs.hospital.local",
        )
    return value


def _check_bind_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _rule_error(
            f"'{value}' is not an IP address to listen on",
            "127.0.0.1 (this machine only), 0.0.0.0 (every interface) or the host's address",
        ) from None
    return value


class AllowedCaller(_Frozen):
    """A peer that may open associations: its AE title and, optionally, the host it comes from."""

    ae_title: str
    host: str | None = None  # None: any host

    _ae = field_validator("ae_title")(_check_ae_title)
    _host = field_validator("host")(_check_host)


class NodeTls(_Frozen):
    """Inbound DICOM TLS: our certificate and key; with a CA, callers must present a
    certificate it signed (client-certificate verification)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None


RECEIVER_PROCESSES_DEFAULT = 1


class NodeSettings(_Frozen):
    """Our DICOM identity and association policy."""

    ae_title: str = "NEURONODE"
    bind_address: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=65535)
    max_associations: int = Field(default=10, ge=1, le=256)
    max_pdu_bytes: int = Field(default=262144, ge=0)  # 0 = no limit (PS3.8)
    accept_unknown_callers: bool = False
    allowed_callers: tuple[AllowedCaller, ...] = ()
    network_timeout_s: float = Field(default=60.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    tls: NodeTls | None = None  # None: the listener speaks plain DICOM
    # Processes answering C-STORE on the one port (SO_REUSEPORT, Linux): each has its own
    # interpreter (no shared GIL) and its own group commit; max_associations is per process.
    receiver_processes: int = Field(default=RECEIVER_PROCESSES_DEFAULT, ge=1, le=16)

    _ae = field_validator("ae_title")(_check_ae_title)
    _bind = field_validator("bind_address")(_check_bind_address)

    @field_validator("receiver_processes")
    @classmethod
    def _check_receiver_processes(cls, value: int) -> int:
        import socket  # here: this module stays free of network imports (a pure module)

        if value > 1 and not hasattr(socket, "SO_REUSEPORT"):
            raise _rule_error(
                "several receiver processes share the port with SO_REUSEPORT, which this"
                " system does not have",
                "receiver_processes: 1",
            )
        return value


HTTP_TOKEN_MIN_CHARS = 16


def _check_token(value: str | None) -> str | None:
    if value is not None and (len(value) < HTTP_TOKEN_MIN_CHARS or value != value.strip()):
        raise _rule_error(
            f"the token must be at least {HTTP_TOKEN_MIN_CHARS} characters, without leading or"
            " trailing spaces",
            "a random secret, e.g. the output of `python -c 'import secrets;"
            " print(secrets.token_urlsafe(32))'`, or better token_file: a file holding it",
        )
    return value


class HttpSettings(_Frozen):
    """The node's HTTP server: the status page, /healthz and /metrics (Prometheus).

    The status page shows patient identifiers: bound to anything but loopback, a token is
    required (token_file, a file holding the secret, or token in the rule file itself).
    """

    enabled: bool = True
    bind_address: str = "127.0.0.1"  # loopback: only this machine (a Prometheus beside it)
    port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (tests)
    token_file: Path | None = None  # a file whose content (stripped) is the access token
    token: str | None = None  # the token itself (token_file keeps it out of the rule file)

    _bind = field_validator("bind_address")(_check_bind_address)
    _token = field_validator("token")(_check_token)

    @property
    def loopback(self) -> bool:
        """True when only this machine can connect."""
        return ipaddress.ip_address(self.bind_address).is_loopback

    def read_token(self) -> str | None:
        """The access token (None: none set); ConfigError naming the key if the file fails."""
        if self.token is not None:
            return self.token
        if self.token_file is None:
            return None
        try:
            value = self.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ConfigError(f"http.token_file: cannot read {self.token_file}: {reason}") from None
        try:
            _check_token(value)
        except PydanticCustomError as exc:
            raise ConfigError(f"http.token_file: {self.token_file}: {exc}") from None
        return value


def _http_problems(http: HttpSettings) -> list[tuple[Loc, str, str]]:
    """A status page with patient identifiers is never open to the network without a token."""
    found: list[tuple[Loc, str, str]] = []
    if http.token is not None and http.token_file is not None:
        found.append(
            (
                ("http", "token"),
                "both http.token and http.token_file are set",
                "one of them (token_file keeps the secret out of the rule file)",
            )
        )
    if http.enabled and not http.loopback and http.token is None and http.token_file is None:
        found.append(
            (
                ("http", "bind_address"),
                f"the status page shows patient identifiers: listening on {http.bind_address}"
                " needs an access token",
                "bind_address: 127.0.0.1, or add token_file: /etc/neuronode/http.token"
                " (a file holding a random secret of 16 characters or more)",
            )
        )
    return found


class StorageSettings(_Frozen):
    """Where instances, quarantine, audit records and the index live."""

    spool_dir: Path = Path("var/spool")
    min_free_disk_mb: float = Field(default=1024.0, ge=0)


_DB_URL_RE = re.compile(r"^postgresql(\+psycopg)?://[^/\s]+/[A-Za-z0-9_.-]+(\?\S*)?$")
_DB_URL_FIX = "postgresql+psycopg://USER@HOST:PORT/DATABASE (the password in url_file)"


_DB_PASSWORD_RE = re.compile(r"^[^:]+://[^/@]*:[^/@]*@")


def _check_db_url(value: str | None) -> str | None:
    if value is None:
        return None
    if _DB_PASSWORD_RE.match(value.strip()):
        # Rule files are read by many and shown in reviews: a password never lives in one.
        raise _rule_error("a password in the rule file", "url_file: a file holding the URL")
    if not _DB_URL_RE.match(value.strip()):
        raise _rule_error("not a PostgreSQL URL", _DB_URL_FIX)
    return value.strip()


class DatabaseSettings(_Frozen):
    """Where the index, job queue and outbox live: the embedded SQLite files in the spool
    (nothing set), or one PostgreSQL database shared by every node of a scaled-out site."""

    url: str | None = None  # postgresql+psycopg://user@host:port/db; no password here
    url_file: Path | None = None  # a secret file holding the URL, password included

    _url = field_validator("url")(_check_db_url)

    @field_validator("url_file")
    @classmethod
    def _only_one(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("url") is not None:
            raise _rule_error("url and url_file are both set", "one of them (url_file: secret)")
        return value

    @property
    def shared(self) -> bool:
        """True when the node keeps its tables in PostgreSQL."""
        return self.url is not None or self.url_file is not None

    def resolve_url(self) -> str | None:
        """The URL to connect with (read from url_file when set); None: the embedded SQLite.
        Raise ConfigError naming the key, never quoting the file's content."""
        if self.url_file is None:
            return self.url
        try:
            text = self.url_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"database.url_file: cannot read {self.url_file}: {exc.strerror}"
            ) from None
        if not _DB_URL_RE.match(text):
            raise ConfigError(
                f"database.url_file: {self.url_file} does not hold a PostgreSQL URL;"
                f" write {_DB_URL_FIX}"
            )
        return text


class RetentionSettings(_Frozen):
    """How long the running node keeps studies whose results were delivered everywhere."""

    # Purge a study this long after its last result was delivered (null: no age limit).
    delivered_max_age_h: float | None = Field(default=720.0, gt=0)
    # Keep instances + result objects under this; delivered studies go oldest first (null: none).
    max_spool_mb: float | None = Field(default=None, gt=0)
    interval_s: float = Field(default=300.0, ge=1)  # how often the running node applies it


class CompletionSettings(_Frozen):
    """When a study counts as complete."""

    quiet_period_s: float = Field(default=20.0, ge=0.5)
    # A study that keeps trickling is processed this long after its first instance (of this
    # round) even if instances still come; later ones re-open it.
    max_wait_s: float = Field(default=3600.0, ge=1)
    use_expected_counts: bool = True
    poll_interval_s: float = Field(default=0.25, gt=0, le=10)
    # An idle worker runs the stages before the SR (LOAD to ENSEMBLE) for a study quiet for a
    # while, ahead of its job, which keeps that work only if no instance came meanwhile.
    speculate: bool = True


class ProcessingSettings(_Frozen):
    """Worker processes, the per-job timeout, job leases and the attempt policy."""

    workers: int = Field(default=1, ge=1, le=16)  # worker processes, each with its own models
    # A job still running after this is stopped (its worker process killed), recorded with the
    # stage it hung in, and retried or dead-lettered like any failed attempt.
    timeout_s: float = Field(default=900.0, ge=1, le=86400)
    lease_s: float = Field(default=600.0, ge=1)
    max_attempts: int = Field(default=3, ge=1, le=100)


class LoggingSettings(_Frozen):
    """Log format and level."""

    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class DicomDestination(_Frozen):
    """A C-STORE destination (the PACS)."""

    kind: Literal["dicom"] = "dicom"
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    _ae = field_validator("ae_title")(_check_ae_title)
    _host = field_validator("host")(_check_host)


class DicomWebDestination(_Frozen):
    """A DICOMweb STOW-RS destination."""

    kind: Literal["dicomweb"] = "dicomweb"
    name: str
    url: str  # base URL of the DICOMweb service, e.g. http://127.0.0.1:8042/dicom-web

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        match = re.fullmatch(r"(https?)://([^/:]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?(/.*)?", value)
        if match is None or not _is_host(match.group(2).strip("[]")):
            raise _rule_error(
                f"'{value}' is not an http(s) URL of a DICOMweb service",
                "a base URL such as http://127.0.0.1:8042/dicom-web",
            )
        return value


class DeliverySettings(_Frozen):
    """Retry policy of the outbox."""

    max_attempts: int = Field(default=8, ge=1, le=1000)
    backoff_initial_s: float = Field(default=5.0, gt=0)
    backoff_max_s: float = Field(default=900.0, gt=0)
    jitter_fraction: float = Field(default=0.2, ge=0, le=1)


class OutputSettings(_Frozen):
    """Which result objects are made."""

    structured_report: bool = True
    heatmaps_per_series: int = Field(default=3, ge=0, le=64)
    uid_root: str | None = None  # None: 2.25 UUID-derived UIDs

    @field_validator("uid_root")
    @classmethod
    def _root(cls, value: str | None) -> str | None:
        if value is not None and (
            len(value) > 40 or not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", value)
        ):
            raise _rule_error(
                f"'{value}' is not a UID root (digits and dots, no leading zeros, at most 40"
                " characters so derived UIDs fit in 64)",
                "your organisation's registered root such as 1.2.826.0.1.3680043.10.1234,"
                " or remove the key for 2.25 UIDs",
            )
        return value


# --- sequence classification, routes and ensemble (issues 5, 6) ----------------------------------


class SequenceSettings(_Frozen):
    """How series get their sequence label: the CNN bundle and how its vote meets the tag rules."""

    bundle: str = "sequence"  # bundle folder name under models_dir
    slices_per_series: int = Field(default=9, ge=1, le=256)  # slices voted over, central first
    # A tag label at or above this is confident and no CNN vote overturns it; below, it is
    # unsure and alone gives OTHER (not routed).
    min_confidence: float = Field(default=0.6, ge=0, le=1)
    # The calibrated CNN confidence a vote needs to count at all (below: ignored).
    min_cnn_confidence: float = Field(default=0.6, ge=0, le=1)
    # Who decides where the tags do not (docs/sequence.md): "other" = the CNN names the label
    # when the tags abstain, and a CNN that contradicts an unsure tag label gives OTHER;
    # "prefer_tags" = the CNN only confirms or doubts, it never names a label; "prefer_cnn" =
    # the CNN also decides over an unsure tag label. A confident tag label and a tag OTHER
    # hold under all three.
    disagreement: Literal["other", "prefer_tags", "prefer_cnn"] = "other"
    # Let a CNN vote choose T1 or T1C where the headers say nothing of contrast (off: the
    # sequence bundle swaps T1/T1C on about a third of synthetic series).
    cnn_decides_contrast: bool = False


class ModelRoute(_Frozen):
    """One route: series with these sequence labels go to this bundle, with this ensemble weight."""

    bundle: str
    sequences: tuple[SequenceLabel, ...] = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)

    @field_validator("sequences")
    @classmethod
    def _no_other(cls, value: tuple[SequenceLabel, ...]) -> tuple[SequenceLabel, ...]:
        if SequenceLabel.OTHER in value:
            allowed = ", ".join(s.value for s in SequenceLabel if s is not SequenceLabel.OTHER)
            raise _rule_error(
                "OTHER series are never routed to a model (they are localizers, fMRI, maps of"
                " unknown kind, or series the classifier was unsure of)",
                f"a list of labels from {allowed}",
            )
        return value


FusionMethod = Literal["weighted_mean_logit", "weighted_mean_probability", "max_weight"]


class TaskSettings(_Frozen):
    """One study-level task: its labels, the routes to its bundles and how they are fused."""

    enabled: bool = True
    positive_label: str = Field(min_length=1)
    negative_label: str = Field(min_length=1)
    models: tuple[ModelRoute, ...] = Field(min_length=1)
    method: FusionMethod = "weighted_mean_logit"
    temperature: float = Field(default=1.0, gt=0)  # applied to the fused logit
    indeterminate_band: tuple[float, float] = (0.35, 0.65)  # fused p inside -> indeterminate
    # The lesion gate: the name of a task (e.g. tumour) whose "absent" finding means this task
    # gives no diagnosis and reports "no lesion found" instead.
    requires_lesion: str | None = None

    @field_validator("indeterminate_band")
    @classmethod
    def _band(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low < high < 1:
            raise _rule_error(
                f"[{low}, {high}] is not a band of probabilities: need 0 < low < high < 1",
                "two probabilities, low first, e.g. [0.35, 0.65]"
                " (a narrow band such as [0.49, 0.51] almost never says indeterminate)",
            )
        return value


# The gate: absent at or below 0.55, which keeps 95% of the calibration studies' tumours
# (style a, seeds 6001 randomised and 6101 plain) above it.
TUMOUR_BAND = (0.55, 0.75)


def _default_tasks() -> dict[str, TaskSettings]:
    def route(bundle: str, sequence: SequenceLabel, weight: float) -> ModelRoute:
        return ModelRoute(bundle=bundle, sequences=(sequence,), weight=weight)

    # Weights and temperatures fitted by `neuronode fit-ensemble` on synthetic calibration
    # studies (style a, domain-randomised, seed 6001: neither training nor test data; glioma
    # grade also on style c, seed 6201, docs/models.md).
    return {
        # The lesion gate: glioblastoma/lymphoma and glioma grade give a diagnosis only on a
        # study where this task did not find the brain free of tumour.
        "tumour": TaskSettings(
            positive_label="brain tumour",
            negative_label="no brain tumour",
            models=(
                route("tumour_flair_detector", SequenceLabel.FLAIR, 1.0),
                route("tumour_t1c_detector", SequenceLabel.T1C, 0.912),
            ),
            temperature=0.613,
            indeterminate_band=TUMOUR_BAND,
        ),
        "gbm_pcnsl": TaskSettings(
            requires_lesion="tumour",
            positive_label="glioblastoma",
            negative_label="primary CNS lymphoma",
            models=(
                route("gbm_pcnsl_t1c", SequenceLabel.T1C, 0.81),
                route("gbm_pcnsl_adc", SequenceLabel.ADC, 1.0),
            ),
            temperature=1.33,
        ),
        "glioma_grade": TaskSettings(
            requires_lesion="tumour",
            positive_label="high grade glioma",
            negative_label="low grade glioma",
            models=(
                route("glioma_grade_t1c", SequenceLabel.T1C, 0.646),
                route("glioma_grade_flair", SequenceLabel.FLAIR, 0.491),
                # enhancement measured, no network (node.bundles.lesion)
                route("glioma_grade_t1c_enhancement", SequenceLabel.T1C, 1.0),
            ),
            # calibration studies of two styles: a (seed 6001) and c (seed 6201)
            temperature=0.711,
        ),
        # Off by default: cortical tubers are a question of a paediatric epilepsy work-up, not
        # of a brain-tumour flow; a site that wants it turns it on.
        "tubers": TaskSettings(
            enabled=False,
            positive_label="cortical tubers",
            negative_label="no cortical tubers",
            models=(
                route("tubers_flair", SequenceLabel.FLAIR, 0.108),
                route("tubers_t2", SequenceLabel.T2, 0.12),
                # many small bright foci measured, no network (node.bundles.lesion)
                route("tubers_flair_foci", SequenceLabel.FLAIR, 1.0),
            ),
            temperature=0.868,
        ),
    }


class QualifySettings(_Frozen):
    """Which studies are processed at all (others are recorded and skipped)."""

    modalities: tuple[str, ...] = ("MR",)  # the study must contain a series of one of these
    body_parts: tuple[str, ...] = ()  # empty: any (BodyPartExamined is often blank)
    min_series: int = Field(default=1, ge=1)


class Rules(_Frozen):
    """The whole rule file."""

    version: Literal[1] = 1
    node: NodeSettings = NodeSettings()
    http: HttpSettings = HttpSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    retention: RetentionSettings = RetentionSettings()
    completion: CompletionSettings = CompletionSettings()
    processing: ProcessingSettings = ProcessingSettings()
    logging: LoggingSettings = LoggingSettings()
    destinations: tuple[
        Annotated[DicomDestination | DicomWebDestination, Field(discriminator="kind")], ...
    ] = ()
    delivery: DeliverySettings = DeliverySettings()
    outputs: OutputSettings = OutputSettings()
    # Relative paths are taken from the rule file's folder; load_rules makes it absolute.
    models_dir: Path = Path("models")
    sequence: SequenceSettings = SequenceSettings()
    tasks: dict[str, TaskSettings] = Field(default_factory=_default_tasks)
    qualify: QualifySettings = QualifySettings()

    @field_validator("tasks")
    @classmethod
    def _lesion_gates(cls, tasks: dict[str, TaskSettings]) -> dict[str, TaskSettings]:
        for name, task in tasks.items():
            gate = task.requires_lesion
            if gate is None:
                continue
            if gate == name or gate not in tasks:
                others = sorted(t for t in tasks if t != name)
                raise _rule_error(
                    f"task {name}: requires_lesion names '{gate}', which is not another task",
                    f"the name of the lesion task, one of {others}, or remove the key",
                )
            if tasks[gate].requires_lesion is not None:
                raise _rule_error(
                    f"task {name}: its lesion gate '{gate}' is itself gated",
                    f"a task without requires_lesion (remove it from task {gate})",
                )
        return tasks


# --- validation with line numbers and fixes ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """One thing wrong in a rule file: where, what, and what to write instead."""

    path: str  # key path, e.g. node.port
    line: int | None  # 1-based line in the file, when known
    message: str
    fix: str | None = None  # what to write instead, when we can say

    def render(self, file: Path | str) -> str:
        """`file:line: key.path: message (write instead: fix)`, as `neuronode check` prints."""
        where = f"{file}:{self.line if self.line is not None else '?'}: {self.path or '<file>'}"
        fix = f" (write instead: {self.fix})" if self.fix else ""
        return f"{where}: {self.message}{fix}"


Loc = tuple[str | int, ...]


def _compose_index(text: str) -> tuple[dict[Loc, int], list[tuple[Loc, int]]]:
    """Map each key path of a YAML document to its 1-based line; also list repeated keys."""
    index: dict[Loc, int] = {}
    repeated: list[tuple[Loc, int]] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index, repeated

    def walk(node: yaml.Node | None, path: Loc) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                p = (*path, key)
                if key in seen:
                    repeated.append((p, key_node.start_mark.line + 1))
                seen.add(key)
                index[p] = key_node.start_mark.line + 1
                walk(value_node, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                p = (*path, i)
                index[p] = item.start_mark.line + 1
                walk(item, p)

    walk(root, ())
    return index, repeated


def _line_index(text: str) -> dict[Loc, int]:
    """Map each key path of a YAML document to its 1-based line."""
    return _compose_index(text)[0]


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional around a type."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _walk_loc(loc: Loc) -> tuple[Loc, type[BaseModel] | None]:
    """Drop discriminator tags from a pydantic error location and find the model holding its last
    key, so an unknown key can be compared with the keys that exist there."""
    tp: Any = Rules
    clean: list[str | int] = []
    parent: type[BaseModel] | None = None
    for i, part in enumerate(loc):
        tp = _unwrap(tp)
        last = i == len(loc) - 1
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and isinstance(part, str):
            members = {
                str(m.model_fields["kind"].default): m
                for m in typing.get_args(tp)
                if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields
            }
            if part in members and not last:
                tp = members[part]
                continue  # a tag pydantic inserts, not a key in the file
        clean.append(part)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            parent = tp
            field = tp.model_fields.get(str(part))
            tp = field.annotation if field is not None else None
        elif typing.get_origin(tp) is tuple:
            parent = None
            args = typing.get_args(tp)
            tp = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else None
        elif typing.get_origin(tp) is dict:
            parent = None
            tp = typing.get_args(tp)[1]
        else:
            parent = None
            tp = None
    return tuple(clean), parent


_TYPE_FIXES = {
    "int_parsing": "a whole number",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text (put quotes around it if it looks like a number, e.g. '0042')",
    "tuple_type": "a list, e.g. [T1C, FLAIR] or one '- item' per line",
    "list_type": "a list, e.g. [T1C, FLAIR] or one '- item' per line",
    "dict_type": "a mapping: 'key: value' lines indented below this key",
    "model_type": "a mapping: 'key: value' lines indented below this key",
    "model_attributes_type": "a mapping: 'key: value' lines indented below this key",
    "path_type": "a folder path",
    "union_tag_invalid": "kind: dicom (C-STORE) or kind: dicomweb (STOW-RS)",
    "union_tag_not_found": "kind: dicom (C-STORE) or kind: dicomweb (STOW-RS)",
}

_BOUND_FIXES = {
    "greater_than": "a number greater than {gt}",
    "greater_than_equal": "a number of at least {ge}",
    "less_than": "a number less than {lt}",
    "less_than_equal": "a number of at most {le}",
    "too_short": "at least {min_length} item(s)",
    "too_long": "at most {max_length} item(s)",
    "string_too_short": "non-empty text",
}


def _problem_from_error(err: Any, lines: dict[Loc, int]) -> RuleProblem:
    """Turn one pydantic error into a RuleProblem with its line and a fix."""
    loc, parent = _walk_loc(tuple(err["loc"]))
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    msg: str = err["msg"]
    fix: str | None = None
    if kind == "extra_forbidden" and loc:
        key = str(loc[-1])
        valid = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if close:
            msg = f"unknown key '{key}'; did you mean '{close[0]}'?"
            fix = f"{close[0]}: ..."
        else:
            msg = f"unknown key '{key}'"
            fix = "one of the keys " + ", ".join(valid) if valid else "remove it"
    elif kind == "missing" and loc:
        msg = f"required key '{loc[-1]}' is missing"
        fix = f"add '{loc[-1]}: ...' here (see routing_rules/default.yaml)"
    elif kind in ("literal_error", "enum"):
        expected = str(ctx.get("expected", "")).replace("'", "")
        msg = f"'{err.get('input')}' is not allowed here"
        fix = f"one of {expected}"
        if "sequences" in loc:
            fix = "one of " + ", ".join(s.value for s in SequenceLabel if s != SequenceLabel.OTHER)
    elif kind == "rule_value":
        msg = str(ctx.get("message", msg))
        fix = str(ctx["fix"])
    elif kind in _BOUND_FIXES:
        fix = _BOUND_FIXES[kind].format(
            **{k: f"{v:g}" if isinstance(v, float) else v for k, v in ctx.items()}
        )
    elif kind in _TYPE_FIXES:
        fix = _TYPE_FIXES[kind]
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    line = None
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            line = lines[loc[:n]]
            break
    return RuleProblem(path=".".join(str(p) for p in loc), line=line, message=msg, fix=fix)


_TASK_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _semantic_problems(rules: Rules) -> list[tuple[Loc, str, str]]:
    """Checks across keys that a single field cannot make: unique names, known task names."""
    found: list[tuple[Loc, str, str]] = []
    seen: dict[str, int] = {}
    for i, dest in enumerate(rules.destinations):
        if dest.name in seen:
            found.append(
                (
                    ("destinations", i, "name"),
                    f"destination name '{dest.name}' is already used by destination"
                    f" {seen[dest.name] + 1}",
                    f"a name used once, e.g. {dest.name}_{i + 1}",
                )
            )
        seen.setdefault(dest.name, i)
    for name, task in rules.tasks.items():
        if not _TASK_NAME.fullmatch(name):
            found.append(
                (
                    ("tasks", name),
                    f"task name '{name}' must be lower-case letters, digits and _",
                    "a name such as gbm_pcnsl, glioma_grade or tubers",
                )
            )
        bundles: dict[str, int] = {}
        for j, route in enumerate(task.models):
            if route.bundle in bundles:
                found.append(
                    (
                        ("tasks", name, "models", j, "bundle"),
                        f"bundle '{route.bundle}' is listed twice in task '{name}'",
                        f"one entry for '{route.bundle}' with all its sequences, e.g."
                        " sequences: [T2, FLAIR]",
                    )
                )
            bundles.setdefault(route.bundle, j)
    for j, caller in enumerate(rules.node.allowed_callers):
        if caller.ae_title == rules.node.ae_title:
            found.append(
                (
                    ("node", "allowed_callers", j, "ae_title"),
                    f"caller AE title '{caller.ae_title}' is the node's own AE title",
                    "the AE title the scanner or PACS sends as calling AE",
                )
            )
    found.extend(_http_problems(rules.http))
    return found


def validate_rules_text(
    text: str, base_dir: Path | None = None
) -> tuple[Rules | None, tuple[RuleProblem, ...]]:
    """Parse and validate rule-file text; return the rules or every problem found.

    With base_dir (the rule file's folder) a relative models_dir is made absolute against it.
    """
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        return None, (
            RuleProblem(
                path="",
                line=line,
                message=f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                fix="'key: value' with spaces (not tabs) for indentation",
            ),
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, (
            RuleProblem(
                path="",
                line=1,
                message="the file must be a mapping of keys",
                fix="top-level 'key: value' lines as in routing_rules/default.yaml",
            ),
        )
    lines, repeated = _compose_index(text)
    problems = [
        RuleProblem(
            path=".".join(str(p) for p in loc),
            line=line,
            message="this key is given twice; YAML would silently keep only the last one",
            fix="one entry for this key",
        )
        for loc, line in repeated
    ]
    try:
        rules = Rules.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A list whose items all failed also reports "too short": drop that echo of the real error.
        deep = [tuple(e["loc"]) for e in errors if e["type"] != "too_short"]
        errors = [
            e
            for e in errors
            if e["type"] != "too_short"
            or not any(
                d[: len(e["loc"])] == tuple(e["loc"]) and len(d) > len(e["loc"]) for d in deep
            )
        ]
        problems.extend(_problem_from_error(err, lines) for err in errors)
        return None, tuple(problems)
    for loc, message, fix in _semantic_problems(rules):
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        problems.append(
            RuleProblem(path=".".join(str(p) for p in loc), line=line, message=message, fix=fix)
        )
    if problems:
        return None, tuple(problems)
    if base_dir is not None and not rules.models_dir.is_absolute():
        absolute = Path(os.path.normpath(base_dir.absolute() / rules.models_dir))
        rules = rules.model_copy(update={"models_dir": absolute})
    return rules, ()


def resolve_models_dir(rules: Rules, base_dir: Path) -> Path:
    """The bundles folder: models_dir itself if absolute, else relative to base_dir."""
    return rules.models_dir if rules.models_dir.is_absolute() else base_dir / rules.models_dir


def check_bundles_exist(
    rules: Rules, base_dir: Path, text: str | None = None
) -> tuple[RuleProblem, ...]:
    """Every bundle the rules name (sequence CNN, enabled tasks' routes) has a folder under
    models_dir; base_dir is the rule file's folder, text (optional) gives line numbers."""
    lines = _line_index(text) if text is not None else {}
    models_dir = resolve_models_dir(rules, base_dir)

    def line_of(loc: Loc) -> int | None:
        return next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)

    if not models_dir.is_dir():
        return (
            RuleProblem(
                path="models_dir",
                line=line_of(("models_dir",)),
                message=f"bundle folder {models_dir} does not exist",
                fix="the folder holding the model bundles, relative to this file's folder"
                " (e.g. ../models) or absolute",
            ),
        )
    present = sorted(p.name for p in models_dir.iterdir() if p.is_dir())
    wanted: list[tuple[Loc, str]] = [(("sequence", "bundle"), rules.sequence.bundle)]
    for name, task in rules.tasks.items():
        if task.enabled:
            wanted.extend(
                (("tasks", name, "models", j, "bundle"), r.bundle)
                for j, r in enumerate(task.models)
            )
    problems = []
    for loc, bundle in wanted:
        if (models_dir / bundle).is_dir():
            continue
        close = difflib.get_close_matches(bundle, present, n=1, cutoff=0.6)
        fix = (
            f"bundle: {close[0]}"
            if close
            else ("one of " + ", ".join(present) if present else "install the bundle there")
        )
        problems.append(
            RuleProblem(
                path=".".join(str(p) for p in loc),
                line=line_of(loc),
                message=f"no bundle folder '{bundle}' in {models_dir}",
                fix=fix + (" (or set enabled: false on the task)" if loc[0] == "tasks" else ""),
            )
        )
    return tuple(problems)


_FILE_FIX = {
    "http": "the path of a token file readable by the node",
    "database": "the path of a file readable by the node holding the database URL",
}


def check_files_exist(rules: Rules, text: str | None = None) -> tuple[RuleProblem, ...]:
    """Every TLS file and the HTTP token file the rules name exist (relative paths: from the
    working directory)."""
    lines = _line_index(text) if text is not None else {}
    wanted: list[tuple[Loc, Path]] = []
    tls = rules.node.tls
    if tls is not None:
        wanted.append((("node", "tls", "cert_file"), tls.cert_file))
        wanted.append((("node", "tls", "key_file"), tls.key_file))
        if tls.ca_file is not None:
            wanted.append((("node", "tls", "ca_file"), tls.ca_file))
    if rules.http.token_file is not None:
        wanted.append((("http", "token_file"), rules.http.token_file))
    if rules.database.url_file is not None:
        wanted.append((("database", "url_file"), rules.database.url_file))
    for i, dest in enumerate(rules.destinations):
        if isinstance(dest, DicomDestination):
            for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
                value = getattr(dest, key)
                if value is not None:
                    wanted.append((("destinations", i, key), value))
    problems = []
    for loc, path in wanted:
        if path.is_file():
            continue
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        problems.append(
            RuleProblem(
                path=".".join(str(p) for p in loc),
                line=line,
                message=f"file {path} does not exist",
                fix=_FILE_FIX.get(str(loc[0]), "the path of a PEM file readable by the node")
                + " (absolute, or relative to the folder the node runs in)",
            )
        )
    return tuple(problems)


def check_rule_text(text: str, path: Path) -> tuple[Rules | None, tuple[RuleProblem, ...]]:
    """Everything `neuronode check` checks on a rule file's text: the schema, the files it names
    and the bundle folders (relative to the file's folder). The rules come back only when there
    is no problem at all; their models_dir is made absolute against the file's folder."""
    rules, problems = validate_rules_text(text, base_dir=path.parent)
    if rules is None:
        return None, problems
    problems = (*check_files_exist(rules, text), *check_bundles_exist(rules, path.parent, text))
    return (None, problems) if problems else (rules, ())


def load_rules(path: Path) -> Rules:
    """Load and validate a rule file; raise ConfigError naming file, key path and line.

    A relative models_dir is resolved against the rule file's folder.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read rule file: {exc.strerror}") from exc
    rules, problems = validate_rules_text(text, base_dir=path.parent)
    if rules is None:
        raise ConfigError("\n".join(p.render(path) for p in problems))
    return rules


def summarise_rules(rules: Rules) -> str:
    """One paragraph for IT: who we are, who may send, where results go, what runs on what."""
    node = rules.node
    callers = ", ".join(f"{c.ae_title}@{c.host or 'any host'}" for c in node.allowed_callers)
    callers = callers or "none listed"
    if node.accept_unknown_callers:
        callers += "; unknown callers ACCEPTED"
    else:
        callers += "; unknown callers rejected"
    dests = (
        ", ".join(
            f"{d.name} (C-STORE {d.ae_title}@{d.host}:{d.port}{' TLS' if d.tls else ''})"
            if isinstance(d, DicomDestination)
            else f"{d.name} (STOW-RS {d.url})"
            for d in rules.destinations
        )
        or "none (results are kept on this machine only)"
    )
    tasks = []
    for name, task in rules.tasks.items():
        if not task.enabled:
            tasks.append(f"{name} (disabled)")
            continue
        routes = ", ".join(
            f"{'/'.join(s.value for s in r.sequences)} -> {r.bundle} (weight {r.weight:g})"
            for r in task.models
        )
        low, high = task.indeterminate_band
        tasks.append(
            f"{name}: {task.positive_label} vs {task.negative_label} from {routes};"
            f" {task.method}, temperature {task.temperature:g},"
            f" indeterminate between {low:g} and {high:g}"
        )
    return (
        f"AE title {node.ae_title} on {node.bind_address}:{node.port}. "
        f"Callers: {callers}. Destinations: {dests}. "
        f"Qualifying studies: modalities {', '.join(rules.qualify.modalities) or 'any'},"
        f" at least {rules.qualify.min_series} series. "
        f"Sequence CNN bundle {rules.sequence.bundle} over {rules.sequence.slices_per_series}"
        f" slices (disagreement: {rules.sequence.disagreement}). "
        f"Bundles from {rules.models_dir}. "
        f"Tasks: {'; '.join(tasks) or 'none'}."
    )
