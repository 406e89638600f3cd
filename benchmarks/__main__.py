"""Run the benchmarks: ``python -m benchmarks [NAME ...]`` (default: every ``bench_*`` module).

Each ``benchmarks/bench_<name>.py`` module has ``main(argv) -> int``; a non-zero return means a
goal was missed. Add a module, not a line here.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys


def main(argv: list[str]) -> int:
    import benchmarks

    names = sorted(
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")
    )
    wanted = [a for a in argv if not a.startswith("-")]
    if wanted:
        names = [n for n in names if n in wanted or n.removeprefix("bench_") in wanted]
    status = 0
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        status |= int(module.main(argv))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
