"""HTTP hygiene (issue 13): out-of-range ids, the OpenAPI document's refusals and media types, security and
cache headers, file modes, and read audit without a row per auto-refresh."""

from __future__ import annotations

import re
import stat

from sqlalchemy import func, select

from medsight.serve.db import AuditEvent
from tests.serve.conftest import PASSWORD, ROLES, post_login_form

HUGE = str(2**63)


def test_ids_and_pages_beyond_64_bits_are_4xx_everywhere(svc) -> None:  # noqa: ANN001
    schema = svc.client.get("/openapi.json").json()
    tried = 0
    for path, ops in schema["paths"].items():
        if "{" not in path:
            continue
        for method, op in ops.items():
            for role in op.get("x-roles", []):
                r = svc.client.request(method, re.sub(r"\{[^}]+\}", HUGE, path), headers=svc.headers[role], json={})
                assert 400 <= r.status_code < 500, f"{method.upper()} {path} as {role}: {r.status_code}"
                tried += 1
    assert tried >= 15
    for url, role in (("/api/worklist", "radiologist"), ("/api/audit", "auditor")):
        assert svc.client.get(url, params={"page": HUGE}, headers=svc.headers[role]).status_code == 422
    body = {"label": "disc", "result_id": int(HUGE)}
    assert svc.client.post("/api/studies/1/reviews", json=body, headers=svc.headers["radiologist"]).status_code == 422
    assert post_login_form(svc.client, "radiologist1", PASSWORD).status_code == 303
    for url in (f"/studies/{HUGE}", f"/worklist?page={HUGE}", f"/worklist/rows?page={HUGE}"):
        assert svc.client.get(url).status_code < 500, url


def test_openapi_lists_the_refusals_and_media_types(svc_sqlite) -> None:  # noqa: ANN001
    paths = svc_sqlite.client.get("/openapi.json").json()["paths"]
    login = paths["/api/auth/login"]["post"]["responses"]
    assert {"401", "422", "429", "503"} <= login.keys()
    upload = paths["/api/studies"]["post"]["responses"]
    assert {"401", "403", "409", "413", "422"} <= upload.keys()
    assert {"401", "403", "404", "409", "422"} <= paths["/api/users/{user_id}"]["patch"]["responses"].keys()
    assert "503" in paths["/health"]["get"]["responses"]
    for path in ("/api/instances/{instance_id}/image.png", "/api/results/{result_id}/overlay.png"):
        ok = paths[path]["get"]["responses"]["200"]
        assert list(ok["content"]) == ["image/png"], path
        assert {"401", "403", "404"} <= paths[path]["get"]["responses"].keys()


def _assert_hygiene(r, what: str) -> None:  # noqa: ANN001
    h = r.headers
    assert "frame-ancestors 'none'" in h["content-security-policy"] and "script-src 'self'" in h["content-security-policy"], what
    assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff", what
    assert h["referrer-policy"] == "no-referrer", what
    assert h["cache-control"] == "no-store", what


def test_security_and_cache_headers_on_pages_api_and_images(svc_sqlite, shape_pngs) -> None:  # noqa: ANN001
    svc = svc_sqlite
    study = svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR").json()
    svc.work()
    detail = svc.client.get(f"/api/studies/{study['id']}", headers=svc.headers["radiologist"]).json()
    inst = detail["instances"][0]["id"] if "instances" in detail else 1
    _assert_hygiene(svc.client.get("/login"), "login page")
    _assert_hygiene(svc.client.get("/health"), "health")
    _assert_hygiene(svc.client.get("/api/worklist", headers=svc.headers["radiologist"]), "api")
    _assert_hygiene(svc.client.get("/api/worklist"), "a 401")
    _assert_hygiene(svc.client.get(f"/api/studies/{2**40}", headers=svc.headers["radiologist"]), "a 404")
    img = svc.client.get(f"/api/instances/{inst}/image.png", headers=svc.headers["radiologist"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    _assert_hygiene(img, "patient image")
    assert "no-store" not in svc.client.get("/static/app.js").headers.get("cache-control", "")


def test_database_settings_and_key_files_are_private(tmp_path) -> None:  # noqa: ANN001
    from medsight.serve.config import ServiceSettings
    from medsight.serve.context import ServiceContext

    ctx = ServiceContext.build(ServiceSettings(data_dir=tmp_path / "data", use_zoo=False))
    cfg = ctx.settings
    settings_file = cfg.write_json(cfg.data_dir / "settings.json")
    ctx.close()
    for path in (cfg.data_dir / "medsight.db", settings_file, cfg.audit_key_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(cfg.data_dir.stat().st_mode) == 0o700


def _reads(svc, action: str) -> int:  # noqa: ANN001
    with svc.ctx.db.session() as s:
        return s.execute(select(func.count()).where(AuditEvent.action == action)).scalar_one()


def test_the_worklist_auto_refresh_is_not_audited_every_time_but_opening_a_study_is(svc_sqlite, shape_pngs) -> None:  # noqa: ANN001
    svc = svc_sqlite
    study = svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR").json()
    assert post_login_form(svc.client, "radiologist1", PASSWORD).status_code == 303
    before = _reads(svc, "worklist.read")
    for _ in range(6):  # the page's refresh every 5 s
        assert svc.client.get("/worklist/rows").status_code == 200
    assert _reads(svc, "worklist.read") == before + 1
    for _ in range(3):
        svc.client.get("/api/worklist", headers=svc.headers["radiologist"])
    assert _reads(svc, "worklist.read") == before + 2  # another session: its own row
    svc.upload([("b.png", shape_pngs["bar"][0])], modality="CR")  # the list changed: audited again
    svc.client.get("/worklist/rows")
    assert _reads(svc, "worklist.read") == before + 3
    for _ in range(2):
        assert svc.client.get(f"/studies/{study['id']}").status_code == 200
    assert _reads(svc, "study.read") == 2
    assert set(ROLES)  # the roles' tokens stay valid throughout
