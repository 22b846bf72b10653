"""Every JSON operation documents its answer as a typed model in /openapi.json (what clients generate code from)."""

from __future__ import annotations


def _schema_ref(schema: dict) -> str | None:
    return schema.get("$ref") or (schema.get("items") or {}).get("$ref")


def test_every_operation_declares_a_typed_response(svc_sqlite) -> None:  # noqa: ANN001
    spec = svc_sqlite.client.get("/openapi.json").json()
    untyped, seen = [], 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            seen += 1
            ok = next(code for code in op["responses"] if code.startswith("2"))
            content = op["responses"][ok].get("content", {})
            if "image/png" in content:
                continue
            schema = content.get("application/json", {}).get("schema", {})
            if not _schema_ref(schema):
                untyped.append(f"{method.upper()} {path}")
    assert seen >= 20
    assert not untyped, f"operations without a response model: {untyped}"
    for name in ("StudyDetail", "Worklist", "Review", "Agreement", "AuditPage", "User", "Login", "Health"):
        assert name in spec["components"]["schemas"]


def test_a_study_answer_keeps_its_fields_and_omits_reviews_where_it_did(svc_sqlite, shape_pngs) -> None:  # noqa: ANN001
    svc = svc_sqlite
    up = svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR")
    assert up.status_code == 202 and "reviews" not in up.json()
    svc.work()
    sid = up.json()["id"]
    as_tech = svc.client.get(f"/api/studies/{sid}", headers=svc.headers["technologist"]).json()
    as_rad = svc.client.get(f"/api/studies/{sid}", headers=svc.headers["radiologist"]).json()
    assert "reviews" not in as_tech and as_rad["reviews"] == []
    assert set(as_rad) - {"reviews"} == set(as_tech)
    assert {"id", "study_uid", "score", "urgency", "instances", "results", "key_result_id", "job"} <= set(as_tech)
    res = as_rad["results"][0]
    assert res["image_url"] == f"/api/results/{res['id']}/image.png" and res["created_at"].endswith("Z")
