"""densenet_cli: the ``densenet`` command (report, convert, summary, train, bench, check).
The top floor of the packages: it imports the parity engine and what lies below it, nothing
above (the benchmarks of a source checkout run as a program, never imported)."""
from densenet_cli.main import main

__all__ = ["main"]
