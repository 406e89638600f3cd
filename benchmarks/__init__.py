"""Benchmarks: ``./dev bench`` runs every ``bench_*.py`` module's ``main()`` and prints ratios."""
