"""Hot reload of the rule file: notice a change, check it as `neuronode check` does, and hand
the running node rules it can swap in between jobs.

An invalid file is refused with the problems `check` prints (file, line, key path, fix); the
old rules stay in force. Keys the node reads only at start (its DICOM listener, its HTTP
server, the log setup, the spool folder, the number of workers) keep their running values
until a restart, and the outcome names them so the log line can say so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import Rules, check_rule_text

# Sections and keys that take effect only at the next start.
RESTART_SECTIONS = ("node", "http", "logging")
RESTART_KEYS = (("storage", "spool_dir"), ("processing", "workers"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadOutcome:
    """What a changed rule file gives: rules to swap in, or the problems that refuse it."""

    rules: Rules | None  # None: refused, the running rules stay
    problems: tuple[str, ...]  # each rendered as `neuronode check` prints it
    restart_keys: tuple[str, ...]  # changed keys that wait for a restart (running values kept)


def restart_keys(running: Rules, new: Rules) -> tuple[str, ...]:
    """The changed keys the node reads only at start, as dotted paths."""
    changed: list[str] = []
    for section in RESTART_SECTIONS:
        old_doc: dict[str, Any] = getattr(running, section).model_dump(mode="json")
        new_doc: dict[str, Any] = getattr(new, section).model_dump(mode="json")
        changed.extend(
            f"{section}.{k}"
            for k in sorted(set(old_doc) | set(new_doc))
            if old_doc.get(k) != new_doc.get(k)
        )
    for section, key in RESTART_KEYS:
        if getattr(getattr(running, section), key) != getattr(getattr(new, section), key):
            changed.append(f"{section}.{key}")
    return tuple(changed)


def keep_restart_keys(running: Rules, new: Rules) -> Rules:
    """The new rules with the running values of every key that waits for a restart."""
    update: dict[str, Any] = {section: getattr(running, section) for section in RESTART_SECTIONS}
    for section, key in RESTART_KEYS:
        base = update.get(section, getattr(new, section))
        update[section] = base.model_copy(update={key: getattr(getattr(running, section), key)})
    return new.model_copy(update=update)


class RuleFileWatcher:
    """Tells when the rule file's content changed since it was last seen (content, not mtime:
    an edit within the same second, or a copy that keeps the old mtime, is still seen)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._digest()
        # The problems of the last refused file, until a valid one is applied (status page).
        self.refused: tuple[str, ...] = ()

    def _digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None  # being replaced, or gone: try again at the next poll

    def poll(self, running: Rules) -> ReloadOutcome | None:
        """None while the file is unchanged (or unreadable); else what to do with it."""
        digest = self._digest()
        if digest is None or digest == self._seen:
            return None
        self._seen = digest
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.refused = (f"{self.path}: cannot read rule file: {exc}",)
            return ReloadOutcome(rules=None, problems=self.refused, restart_keys=())
        rules, problems = check_rule_text(text, self.path)
        if rules is None:
            self.refused = tuple(p.render(self.path) for p in problems)
            return ReloadOutcome(rules=None, problems=self.refused, restart_keys=())
        self.refused = ()
        return ReloadOutcome(
            rules=keep_restart_keys(running, rules),
            problems=(),
            restart_keys=restart_keys(running, rules),
        )
