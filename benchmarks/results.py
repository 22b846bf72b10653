"""Where a benchmark's figures go: ``results.json`` (every number) and ``results.md`` (the tables docs quote)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, res: dict[str, Any], markdown: str) -> None:
    """Write both files into ``out`` (created if missing) and echo the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text(markdown)
    print(markdown)
