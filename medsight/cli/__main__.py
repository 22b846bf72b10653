"""``python -m medsight.cli``: the same app as the ``medsight`` entry point."""

from medsight.cli.main import app

app()
