"""Authentication and roles: every route of the OpenAPI schema, every web page, the session cookie, the CLI."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.routing import APIRoute
from typer.testing import CliRunner

from medsight.serve.deps import Require
from tests.serve.conftest import PASSWORD, ROLES, post_login_form

PUBLIC_API = {("/health", "get"), ("/api/auth/login", "post")}
PUBLIC_PAGES = {("/login", "GET"), ("/login", "POST")}


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_openapi_route_requires_a_role(svc) -> None:  # noqa: ANN001
    schema = svc.client.get("/openapi.json").json()
    checked = 0
    logout_roles = None
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            url = _fill(path)
            if (path, method) in PUBLIC_API:
                assert "x-roles" not in op
                assert svc.client.request(method, url, json={}).status_code not in (401, 403) or path == "/api/auth/login"
                continue
            allowed = op.get("x-roles")
            assert allowed, f"{method.upper()} {path} declares no roles"
            r = svc.client.request(method, url)
            assert r.status_code == 401, f"{method.upper()} {path} without credentials gave {r.status_code}"
            assert r.headers.get("www-authenticate") == "Bearer"
            r = svc.client.request(method, url, headers={"Authorization": "Bearer not-a-real-token"})
            assert r.status_code == 401, f"{method.upper()} {path} with a bad token gave {r.status_code}"
            for role in ROLES:
                if role in allowed:
                    continue
                r = svc.client.request(method, url, headers=svc.headers[role])
                assert r.status_code == 403, f"{method.upper()} {path} as {role} gave {r.status_code}"
            if path == "/api/auth/logout":
                logout_roles = allowed  # calling it would revoke the tokens the loop still needs
                continue
            for role in allowed:
                r = svc.client.request(method, url, headers=svc.headers[role])
                assert r.status_code not in (401, 403), f"{method.upper()} {path} as allowed {role} gave {r.status_code}"
            checked += 1
    assert checked >= 18  # the walk really covered the API
    assert set(logout_roles) == set(ROLES)
    assert svc.client.post("/api/auth/logout", headers=svc.headers["auditor"]).status_code == 200
    assert svc.client.get("/api/auth/me", headers=svc.headers["auditor"]).status_code == 401  # token revoked


def test_every_web_page_requires_a_role(svc) -> None:  # noqa: ANN001
    from medsight.serve.pages import router as pages_router

    pages = [r for r in pages_router.routes if isinstance(r, APIRoute)]
    assert len(pages) >= 12
    for route in pages:
        for method in route.methods:
            url = _fill(route.path)
            if (route.path, method) in PUBLIC_PAGES:
                continue
            guards = [d.call for d in route.dependant.dependencies if isinstance(d.call, Require)]
            assert guards, f"page {method} {route.path} has no role guard"
            r = svc.client.request(method, url, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), f"{method} {route.path}: {r.status_code}"
            for role in set(ROLES) - set(guards[0].roles):
                r = svc.client.request(method, url, headers=svc.headers[role], follow_redirects=False)
                assert r.status_code == 403, f"page {method} {route.path} as {role} gave {r.status_code}"


def test_login_cookie_csrf_and_logout(svc) -> None:  # noqa: ANN001
    c = svc.client
    r = c.post("/api/auth/login", json={"username": "radiologist1", "password": "wrong password!"})
    assert r.status_code == 401
    r = c.post("/login", data={"username": "radiologist1", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 403 and "expired" in r.text  # the login form's own CSRF token is missing
    r = post_login_form(c, "radiologist1", PASSWORD)
    assert r.status_code == 303 and r.headers["location"] == "/worklist"
    cookie = r.cookies.get("medsight_session")
    assert cookie and "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    page = c.get("/worklist", cookies={"medsight_session": cookie})
    assert page.status_code == 200 and "Worklist" in page.text
    csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text).group(1)
    # A cookie-authenticated API write without the CSRF header is refused (cross-site request forgery).
    r = c.post("/api/studies/1/reviews", json={"label": "disc"}, cookies={"medsight_session": cookie})
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = c.post("/api/studies/1/reviews", json={"label": "disc"}, cookies={"medsight_session": cookie},
               headers={"X-CSRF-Token": csrf})
    assert r.status_code == 404  # past auth and CSRF: the study does not exist
    r = c.post("/logout", data={"csrf_token": "forged"}, cookies={"medsight_session": cookie}, follow_redirects=False)
    assert r.status_code == 403
    r = c.post("/logout", data={"csrf_token": csrf}, cookies={"medsight_session": cookie}, follow_redirects=False)
    assert r.status_code == 303
    assert c.get("/worklist", cookies={"medsight_session": cookie}, follow_redirects=False).status_code == 303
    with svc.ctx.db.session() as s:
        from sqlalchemy import select

        from medsight.serve.db import AuditEvent

        actions = s.execute(select(AuditEvent.action, AuditEvent.actor).order_by(AuditEvent.id)).all()
    assert ("login.failed", "radiologist1") in actions and ("login", "radiologist1") in actions
    assert ("logout", "radiologist1") in actions


def test_users_create_cli(tmp_path: Path) -> None:
    from medsight.cli import app
    from medsight.serve.context import ServiceContext
    from medsight.serve.config import ServiceSettings
    from medsight.serve.db import User

    runner = CliRunner()
    d = str(tmp_path / "data")
    env = {"MEDSIGHT_DATABASE_URL": "", "MEDSIGHT_PASSWORD": ""}
    r = runner.invoke(app, ["users", "create", "--username", "Chief", "--role", "admin", "--data-dir", d,
                            "--password-stdin"], input="a-long-secret-pw\n", env=env)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["users", "create", "--username", "x2", "--role", "janitor", "--data-dir", d,
                            "--password-stdin"], input="a-long-secret-pw\n", env=env)
    assert r.exit_code == 2 and "role must be one of" in r.output
    r = runner.invoke(app, ["users", "create", "--username", "x3", "--role", "auditor", "--data-dir", d,
                            "--password-stdin"], input="short\n", env=env)
    assert r.exit_code == 2 and "at least 10" in r.output
    r = runner.invoke(app, ["users", "create", "--username", "x4", "--role", "auditor", "--data-dir", d], env=env)
    assert r.exit_code == 2 and "no password" in r.output  # never a default password
    r = runner.invoke(app, ["users", "create", "--username", "rad", "--role", "radiologist", "--data-dir", d],
                      env={**env, "MEDSIGHT_PASSWORD": "another-long-pw"})
    assert r.exit_code == 0, r.output
    ctx = ServiceContext.build(ServiceSettings(data_dir=Path(d)))
    with ctx.db.session() as s:
        from sqlalchemy import select

        users = {u.username: u for u in s.execute(select(User)).scalars()}
    ctx.close()
    assert set(users) == {"chief", "rad"}
    assert users["chief"].password_hash.startswith("$argon2id$")
    assert "a-long-secret-pw" not in users["chief"].password_hash
