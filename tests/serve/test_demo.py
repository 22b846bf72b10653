"""`medsight serve --demo`: demo users with generated passwords, bundled samples queued through the normal upload path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from medsight.io.samples import SAMPLES_DIR
from medsight.errors import MedSightError
from medsight.models.registry import list_cards
from medsight.serve.config import ServiceSettings
from medsight.serve.context import ServiceContext
from medsight.serve.db import Job, Study, User


def test_demo_loads_the_samples_of_installed_models(tmp_path: Path) -> None:
    from medsight.cli.serve import prepare_demo

    entries = json.loads((SAMPLES_DIR / "samples.json").read_text())
    installed = {c.name for c in list_cards()}
    # The DICOM samples are routed like any study since docs/routing.md: the adult chest CR (RG1) does not
    # fit the paediatric model it is listed for and US1 names no body part, so neither is queued.
    expected = [e for e in entries if e["model"] in installed and "file" in e]
    refused = [e for e in entries if e["model"] in installed and "pydicom_data" in e]
    if not expected:
        pytest.skip("no zoo model of the demo samples is installed yet")
    ctx = ServiceContext.build(ServiceSettings(data_dir=tmp_path / "demo"))
    try:
        logins = prepare_demo(ctx)
        assert [(u, r) for u, r, _ in logins] == [("admin", "admin"), ("radiologist", "radiologist")]
        assert all(len(pw) >= 16 for _, _, pw in logins) and logins[0][2] != logins[1][2]  # generated, not a default
        with ctx.db.session() as s:
            studies = s.execute(select(Study).order_by(Study.id)).scalars().all()
            jobs = s.execute(select(Job)).scalars().all()
            assert {u.username for u in s.execute(select(User)).scalars()} == {"admin", "radiologist"}
        assert len(studies) == len(expected) == len(jobs)
        assert [st.model for st in studies] == [e["model"] for e in expected]
        assert refused and not any(st.source_format == "dicom" for st in studies)
        assert prepare_demo(ctx) == []  # restart: nothing re-created, no password printed again
    finally:
        ctx.close()


def test_demo_refuses_a_real_data_folder(tmp_path: Path) -> None:
    from medsight.serve.auth import create_user
    from medsight.cli.serve import prepare_demo

    ctx = ServiceContext.build(ServiceSettings(data_dir=tmp_path / "prod", use_zoo=False, model_paths=[tmp_path]))
    try:
        with ctx.db.session() as s:
            create_user(s, "chief", "a-real-password", "admin")
        with pytest.raises(MedSightError, match="not a demo data folder"):
            prepare_demo(ctx)
    finally:
        ctx.close()
