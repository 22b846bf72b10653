"""Accounts (issue 13): the number of active admins never reaches 0; password change and reset end sessions."""

from __future__ import annotations

from sqlalchemy import select

from medsight.serve.auth import issue_token
from medsight.serve.db import User
from tests.serve.conftest import PASSWORD, post_login_form


def _id(svc, name: str) -> int:  # noqa: ANN001
    with svc.ctx.db.session() as s:
        return s.execute(select(User.id).where(User.username == name)).scalar_one()


def _second_admin(svc) -> dict[str, str]:  # noqa: ANN001
    with svc.ctx.db.session() as s:
        u = User(username="admin2", password_hash=s.execute(select(User.password_hash).limit(1)).scalar_one(),
                 role="admin", full_name="Second admin")
        s.add(u)
        s.flush()
        raw, _ = issue_token(s, u, 1.0)
    return {"Authorization": f"Bearer {raw}"}


def test_the_last_active_admin_cannot_be_demoted_or_deactivated(svc) -> None:  # noqa: ANN001
    admin = svc.headers["admin"]
    me = _id(svc, "admin1")
    r = svc.client.patch(f"/api/users/{me}", json={"role": "technologist"}, headers=admin)
    assert r.status_code == 409 and "last active administrator" in r.json()["detail"]
    other = _second_admin(svc)
    # with a second admin, that one may deactivate the first; then the remaining one is the last
    assert svc.client.patch(f"/api/users/{me}", json={"active": False}, headers=other).status_code == 200
    r = svc.client.patch(f"/api/users/{_id(svc, 'admin2')}", json={"role": "radiologist"}, headers=other)
    assert r.status_code == 409
    assert svc.client.patch(f"/api/users/{me}", json={"active": True}, headers=other).status_code == 200
    assert svc.client.patch(f"/api/users/{_id(svc, 'admin2')}", json={"role": "radiologist"}, headers=admin).status_code == 200
    with svc.ctx.db.session() as s:
        assert s.execute(select(User.role).where(User.username == "admin1")).scalar_one() == "admin"


def test_the_users_page_refuses_to_demote_the_last_admin(svc_sqlite) -> None:  # noqa: ANN001
    svc = svc_sqlite
    assert post_login_form(svc.client, "admin1", PASSWORD).status_code == 303
    page = svc.client.get("/users")
    import re

    csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text).group(1)
    r = svc.client.post(f"/users/{_id(svc, 'admin1')}/role", data={"csrf_token": csrf, "role": "auditor"},
                        follow_redirects=True)
    assert "last active administrator" in r.text


def test_own_password_change_needs_the_old_one_and_ends_the_other_sessions(svc) -> None:  # noqa: ANN001
    c, rad = svc.client, svc.headers["radiologist"]
    other = c.post("/api/auth/login", json={"username": "radiologist1", "password": PASSWORD}).json()["token"]
    r = c.post("/api/auth/password", json={"old_password": "not it at all", "new_password": "brand new secret"}, headers=rad)
    assert r.status_code == 422
    r = c.post("/api/auth/password", json={"old_password": PASSWORD, "new_password": "short"}, headers=rad)
    assert r.status_code == 422
    r = c.post("/api/auth/password", json={"old_password": PASSWORD, "new_password": "brand new secret"}, headers=rad)
    assert r.status_code == 200
    assert c.get("/api/auth/me", headers=rad).status_code == 200  # this session stays
    assert c.get("/api/auth/me", headers={"Authorization": f"Bearer {other}"}).status_code == 401
    assert c.post("/api/auth/login", json={"username": "radiologist1", "password": PASSWORD}).status_code == 401
    assert c.post("/api/auth/login", json={"username": "radiologist1", "password": "brand new secret"}).status_code == 200


def test_admin_password_reset_ends_the_users_sessions(svc) -> None:  # noqa: ANN001
    c = svc.client
    uid = _id(svc, "technologist1")
    r = c.post(f"/api/users/{uid}/password", json={"password": "reset by admin 1"}, headers=svc.headers["admin"])
    assert r.status_code == 200
    assert c.get("/api/auth/me", headers=svc.headers["technologist"]).status_code == 401
    assert c.post("/api/auth/login", json={"username": "technologist1", "password": "reset by admin 1"}).status_code == 200
    assert c.post(f"/api/users/{uid}/password", json={"password": "x"}, headers=svc.headers["admin"]).status_code == 422


def test_the_account_page_changes_the_password(svc_sqlite) -> None:  # noqa: ANN001
    import re

    svc = svc_sqlite
    assert post_login_form(svc.client, "auditor1", PASSWORD).status_code == 303
    page = svc.client.get("/account")
    assert page.status_code == 200
    csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text).group(1)
    r = svc.client.post("/account/password", data={"csrf_token": csrf, "old_password": PASSWORD,
                                                   "new_password": "auditor's new one"}, follow_redirects=True)
    assert "Password changed" in r.text
