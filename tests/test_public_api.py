"""The public API is what `sheetanchor.__all__` lists: sorted, importable, documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import sheetanchor

README = Path(__file__).resolve().parents[1] / "README.md"


def test_all_is_sorted_and_importable() -> None:
    names = [n for n in sheetanchor.__all__ if n != "__version__"]
    assert names == sorted(names)
    for name in sheetanchor.__all__:
        assert hasattr(sheetanchor, name), name


def test_every_public_name_has_a_docstring() -> None:
    for name in sheetanchor.__all__:
        obj = getattr(sheetanchor, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_readme_api_section_lists_exactly_the_public_names() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## API", 1)[1].split("\n## ", 1)[0]
    documented = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    public = {n for n in sheetanchor.__all__ if n != "__version__"}
    assert documented == public, (
        f"README API table and __all__ differ: missing in README {sorted(public - documented)}, "
        f"not exported {sorted(documented - public)}"
    )
