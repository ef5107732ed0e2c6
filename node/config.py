"""The rule file IT edits (YAML) and its schema (pydantic, frozen, extra keys forbidden).

Errors name the file, the key path and the line, so IT can fix the file without guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from node.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16 or not value.isascii() or "\\" in value or value != value.strip():
        raise ValueError("an AE title is 1-16 ASCII characters, no backslash, no outer spaces")
    return value


class AllowedCaller(_Frozen):
    """A peer that may open associations: its AE title and, optionally, the host it comes from."""

    ae_title: str
    host: str | None = None  # None: any host

    _ae = field_validator("ae_title")(_check_ae_title)


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

    _ae = field_validator("ae_title")(_check_ae_title)


class StorageSettings(_Frozen):
    """Where instances, quarantine, audit records and the index live."""

    spool_dir: Path = Path("var/spool")
    min_free_disk_mb: float = Field(default=1024.0, ge=0)


class CompletionSettings(_Frozen):
    """When a study counts as complete."""

    quiet_period_s: float = Field(default=20.0, ge=0.5)
    use_expected_counts: bool = True
    poll_interval_s: float = Field(default=0.25, gt=0, le=10)


class ProcessingSettings(_Frozen):
    """Workers and job leases."""

    workers: int = Field(default=1, ge=1, le=16)
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


class DicomWebDestination(_Frozen):
    """A DICOMweb STOW-RS destination."""

    kind: Literal["dicomweb"] = "dicomweb"
    name: str
    url: str  # base URL of the DICOMweb service, e.g. http://127.0.0.1:8042/dicom-web


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


class Rules(_Frozen):
    """The whole rule file."""

    version: Literal[1] = 1
    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    completion: CompletionSettings = CompletionSettings()
    processing: ProcessingSettings = ProcessingSettings()
    logging: LoggingSettings = LoggingSettings()
    destinations: tuple[
        Annotated[DicomDestination | DicomWebDestination, Field(discriminator="kind")], ...
    ] = ()
    delivery: DeliverySettings = DeliverySettings()
    outputs: OutputSettings = OutputSettings()


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """One thing wrong in a rule file: where, what, and what to write instead."""

    path: str  # key path, e.g. node.port
    line: int | None  # 1-based line in the file, when known
    message: str


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each key path of a YAML document to its 1-based line."""
    index: dict[tuple[str | int, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index

    def walk(node: yaml.Node | None, path: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                p = (*path, str(key_node.value))
                index[p] = key_node.start_mark.line + 1
                walk(value_node, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                p = (*path, i)
                index[p] = item.start_mark.line + 1
                walk(item, p)

    walk(root, ())
    return index


def validate_rules_text(text: str) -> tuple[Rules | None, tuple[RuleProblem, ...]]:
    """Parse and validate rule-file text; return the rules or every problem found."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        return None, (RuleProblem(path="", line=line, message=f"not valid YAML: {exc}"),)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, (RuleProblem(path="", line=1, message="the file must be a mapping of keys"),)
    try:
        return Rules.model_validate(data), ()
    except ValidationError as exc:
        lines = _line_index(text)
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = None
            for n in range(len(loc), 0, -1):
                if loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling against routing_rules/default.yaml)"
            problems.append(RuleProblem(path=".".join(str(p) for p in loc), line=line, message=msg))
        return None, tuple(problems)


def load_rules(path: Path) -> Rules:
    """Load and validate a rule file; raise ConfigError naming file, key path and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read rule file: {exc.strerror}") from exc
    rules, problems = validate_rules_text(text)
    if rules is None:
        raise ConfigError(
            "\n".join(
                f"{path}:{p.line if p.line is not None else '?'}: {p.path or '<file>'}: {p.message}"
                for p in problems
            )
        )
    return rules


def cmd_check(args: Any) -> int:
    """`neuronode check RULES`: print every problem with its line, or OK."""
    path: Path = args.rules_file
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"{path}: cannot read rule file: {exc.strerror}")
        return 1
    rules, problems = validate_rules_text(text)
    for p in problems:
        print(f"{path}:{p.line if p.line is not None else '?'}: {p.path or '<file>'}: {p.message}")
    if rules is None:
        print(f"{len(problems)} problem(s) in {path}")
        return 1
    print(f"{path}: OK")
    return 0
