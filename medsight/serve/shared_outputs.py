"""One data folder, one set of result destinations: the DICOM listener and ``medsight serve`` must agree.

The listener's workers analyse a study and send the preliminary SR; the radiologist reviews it in
``medsight serve``, whose process queues the verified SR. If only one of them knows the PACS (a
``--dest`` given to the listener alone, or two different settings files), one of those reports is
never sent, and nothing says so. So each of them records the destinations it runs with in the data
folder (``delivery-<role>.json``, with its process id) and refuses to start while the other one runs
with different destinations. The remedy is the one settings file both read (docs/pacs-integration.md).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from medsight.errors import MedSightError
from medsight.integration.delivery import CHANNELS
from medsight.serve.config import ServiceSettings

ROLES = {"listener": "the DICOM listener ('medsight dicom listen')", "service": "the service ('medsight serve')"}


class DestinationMismatchError(MedSightError):
    """The listener and the service on one data folder would send results to different places."""


def destinations(settings: ServiceSettings) -> dict[str, str | None]:
    """Where results go, per channel (None: not sent)."""
    return {c: settings.outputs.destination(c) for c in CHANNELS}


def _record(settings: ServiceSettings, role: str) -> Path:
    return settings.data_dir / f"delivery-{role}.json"


def _running(rec: dict) -> bool:
    """Whether the process that wrote a record still runs (one on another host is assumed to)."""
    if rec.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(rec.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return int(rec.get("pid", 0)) > 0


def _describe(dest: dict[str, str | None]) -> str:
    return ", ".join(f"{c} -> {v or 'none'}" for c, v in dest.items())


def claim_outputs(settings: ServiceSettings, role: str) -> Callable[[], None]:
    """Refuse to start ``role`` ("listener" | "service") when the other one runs on this data folder with other
    destinations; otherwise record ours. Returns the function that removes our record (call it on exit)."""
    other = next(r for r in ROLES if r != role)
    mine = destinations(settings)
    path = _record(settings, other)
    if path.exists():
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            rec = {}
        theirs = rec.get("destinations")
        if isinstance(theirs, dict) and _running(rec) and theirs != mine:
            raise DestinationMismatchError(
                f"refused: {ROLES[other]} runs on {settings.data_dir} (pid {rec.get('pid')}) and sends results to "
                f"{_describe(theirs)}; {ROLES[role]} would send them to {_describe(mine)}. A study analysed by one "
                f"and reviewed in the other would lose its preliminary or its verified report. Put the destinations "
                f"('outputs') in one settings file and start both with --settings FILE (docs/pacs-integration.md, "
                f"section 2); no --dest/--fhir-url/--hl7 on one of them alone.")
    own = _record(settings, role)
    own.parent.mkdir(parents=True, exist_ok=True)
    tmp = own.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "destinations": mine}))
    tmp.replace(own)
    pid = os.getpid()

    def release() -> None:
        try:
            if json.loads(own.read_text()).get("pid") == pid:
                own.unlink()
        except (OSError, ValueError):
            pass

    return release


__all__ = ["DestinationMismatchError", "claim_outputs", "destinations"]
