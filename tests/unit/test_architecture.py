"""The layers of docs/architecture.md are the ones import-linter keeps; they cover the package."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "worker"


def _modules() -> set[str]:
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    return names - {"sandbox"}  # the fake API: its own contract forbids every optrack import


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (layers,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return list(layers["layers"])


def test_every_module_has_a_layer_and_the_architecture_names_it() -> None:
    placed = {m.strip().removeprefix("worker.") for line in _layers() for m in line.split(":")}
    assert placed == _modules()
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for name in sorted(placed - {"__main__"}):
        assert re.search(rf"\b{re.escape(name)}\b", doc), f"docs/architecture.md never names {name}"


def test_the_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_only_the_dialect_module_knows_which_database_it_talks_to() -> None:
    # db.py's UTCDateTime is given the dialect by SQLAlchemy itself (SQLite stores it naive).
    allowed = {PACKAGE / "dialect.py", PACKAGE / "db.py"}
    pattern = re.compile(
        r"dialect\.name|sqlalchemy\.dialects|skip_locked=|pg_try_advisory|unnest\("
    )
    found = [
        str(path.relative_to(ROOT))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in allowed and pattern.search(path.read_text())
    ]
    assert found == []
