"""The listener and the service on one data folder send results to the same places, or one of them refuses to start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medsight.cli import app
from medsight.serve.config import ServiceSettings
from medsight.serve.shared_outputs import DestinationMismatchError, claim_outputs

PACS = {"dicom_destination": "ORTHANC@127.0.0.1:4242"}


def settings(tmp_path: Path, **outputs: str) -> ServiceSettings:
    return ServiceSettings(data_dir=tmp_path, outputs=outputs)


def test_a_listener_with_a_destination_refuses_a_service_without_one(tmp_path: Path) -> None:
    release = claim_outputs(settings(tmp_path, **PACS), "listener")
    with pytest.raises(DestinationMismatchError, match=r"dicom -> ORTHANC@127.0.0.1:4242.*dicom -> none.*--settings"):
        claim_outputs(settings(tmp_path), "service")
    claim_outputs(settings(tmp_path, **PACS), "service")()  # the same destinations: fine
    release()
    assert not (tmp_path / "delivery-listener.json").exists()
    claim_outputs(settings(tmp_path), "service")()  # nobody else runs now


def test_the_reverse_is_refused_too_and_a_dead_process_does_not_count(tmp_path: Path) -> None:
    claim_outputs(settings(tmp_path), "service")
    with pytest.raises(DestinationMismatchError, match="the service"):
        claim_outputs(settings(tmp_path, **PACS), "listener")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "destinations": {"dicom": None, "fhir": None, "hl7": None}}
    (tmp_path / "delivery-service.json").write_text(json.dumps(record))
    claim_outputs(settings(tmp_path, **PACS), "listener")()


def test_medsight_serve_refuses_to_start_with_a_clear_message(tmp_path: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "destinations": {"dicom": PACS["dicom_destination"], "fhir": None, "hl7": None}}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "delivery-listener.json").write_text(json.dumps(record))
    r = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path), "--workers", "0", "--port", "1"])
    assert r.exit_code == 2, r.output
    assert "refused" in r.output and "ORTHANC@127.0.0.1:4242" in r.output and "--settings" in r.output
