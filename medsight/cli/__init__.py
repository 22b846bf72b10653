"""``medsight`` command line: one module per command group, registered in :mod:`medsight.cli.main`.

Nothing is imported here, so ``python -m medsight.cli`` and the ``medsight`` entry point start
without loading the libraries the commands use (each command imports what it needs).
"""

from __future__ import annotations


def __getattr__(name: str):  # PEP 562: ``from medsight.cli import app`` without importing it up front
    if name == "app":
        from medsight.cli.main import app

        return app
    raise AttributeError(name)
