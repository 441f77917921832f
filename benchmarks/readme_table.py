"""Write a benchmark's table into benchmarks/README.md between its two `<!-- name -->` markers."""

from __future__ import annotations

from pathlib import Path


README = Path(__file__).resolve().parent / "README.md"


def write_table(name: str, table: str, readme: Path = README) -> None:
    """Replace what stands between the two `<!-- name -->` markers of `readme` with `table`."""
    marker = f"<!-- {name} -->"
    text = readme.read_text() if readme.exists() else ""
    start = text.find(marker)
    end = text.find(marker, start + 1) if start >= 0 else -1
    if start < 0 or end < 0:
        raise SystemExit(f"{readme} lacks the two {marker} markers")
    readme.write_text(text[: start + len(marker)] + "\n" + table + "\n" + text[end:])
