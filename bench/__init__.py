"""`make bench`: convd against bare qemu-img, as an operator would otherwise run it.

Stdlib only, so it runs in the project's venv without extra dependencies.
``python -m bench --help`` lists the options; docs/benchmarks.md holds the
latest table.
"""

__all__: list[str] = []
