"""The docs name tests that exist: every `tests/…py::test_…` reference in README.md and docs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")


def test_every_test_the_docs_name_exists() -> None:
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path, name in REFERENCE.findall(doc.read_text()):
            source = ROOT / path
            if not source.exists():
                missing.append(f"{doc.name}: {path}")
            elif name and not re.search(rf"^(async )?def {name}\b", source.read_text(), re.M):
                missing.append(f"{doc.name}: {path}::{name}")
    assert missing == []
