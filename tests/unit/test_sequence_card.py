"""The sequence model card: evaluate-sequences results stored in metadata, tables per set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node.bundles import bundle as bundles
from node.lab.train.evaluate import record_sequence_evaluations
from tests.unit.test_bundles import make_bundle


def _metrics(acc: dict[str, float], cells: dict[str, dict[str, tuple[float, int]]]) -> Any:
    """A metrics.json document as evaluate-sequences writes it (only the fields read here)."""

    def breakdown(prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}{cell}": {m: {"accuracy": a, "n": n} for m, (a, n) in methods.items()}
            for cell, methods in cells.items()
        }

    return {
        "accuracy": acc["fused"],
        "n_series": sum(next(iter(m.values()))[1] for m in cells.values()),
        "methods": {m: {"accuracy": a} for m, a in acc.items()},
        "by_acquisition": breakdown(""),
        "by_vendor": breakdown("vendor "),
        "by_thickness": breakdown("thick "),
        "by_cell": breakdown("siemens "),
    }


def test_card_shows_each_set_side_by_side_per_plane(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, "sequence", variant="planes")
    weights_before = bundles.sha256_file(path / "models" / "model.pt")
    same = _metrics(
        {"tags": 0.99, "cnn": 0.875, "fused": 0.995},
        {"sagittal 2D": {"tags": (1.0, 40), "cnn": (0.675, 40), "fused": (1.0, 40)}},
    )
    held = _metrics(
        {"tags": 0.98, "cnn": 0.8125, "fused": 0.985},
        {
            "sagittal 2D": {"tags": (1.0, 43), "cnn": (0.5625, 43), "fused": (1.0, 43)},
            "axial 3D": {"tags": (1.0, 72), "cnn": (0.4375, 72), "fused": (1.0, 72)},
        },
    )
    no_cnn = {**held, "methods": {"tags": {"accuracy": 0.5}, "fused": {"accuracy": 0.5}}}
    record_sequence_evaluations(
        path,
        [("style a", "same style", same), ("style b", "held out", held), ("tags", "x", no_cnn)],
    )
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    stored = meta["metrics"]["evaluate_sequences"]
    assert list(stored) == ["style a", "style b", "tags"]
    assert stored["style b"]["accuracy"] == {"tags": 0.98, "cnn": 0.8125, "fused": 0.985}
    assert stored["tags"]["accuracy"] == {"tags": 0.5, "fused": 0.5}
    card = (path / "docs" / "README.md").read_text()
    assert "| style b | 115 | 0.980 | 0.812 | 0.985 |" in card
    assert "| tags | 115 | 0.500 | - | 0.500 |" in card  # no CNN: never invented
    # a cell one set lacks is a dash there, the other set's figures beside it
    assert "| axial 3D | - | - | - | - | 72 | 1.000 | 0.438 | 1.000 |" in card
    assert "| sagittal 2D | 40 | 1.000 | 0.675 | 1.000 | 43 | 1.000 | 0.562 | 1.000 |" in card
    assert "By vendor:" in card and "By slice thickness:" in card
    assert "| siemens sagittal 2D | 40 | 1.000 | 0.675 | 1.000 | 43 |" in card
    assert "in the plane the series was acquired in" in card
    assert bundles.sha256_file(path / "models" / "model.pt") == weights_before
    bundles.load_bundle(path)  # still loads: the metadata rewrite keeps the checksum
