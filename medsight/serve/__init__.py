"""The clinical service: upload, background analysis, triage worklist, human review, audit.

Everything is built from a :class:`~medsight.serve.config.ServiceSettings` object
(``create_app(settings)``, ``Worker(settings)``); nothing reads global state, so
tests, the CLI and the benchmark each run fully isolated services side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medsight.serve.config import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]


def create_app(settings: ServiceSettings | None = None):  # noqa: ANN201 - FastAPI imported lazily
    from medsight.serve.app import create_app as _create

    return _create(settings)


def __getattr__(name: str):  # noqa: ANN202 - PEP 562: importing a submodule does not load the settings' pydantic models
    if name != "ServiceSettings":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from medsight.serve.config import ServiceSettings

    return ServiceSettings
