"""The API against its own OpenAPI document, property-based (schemathesis): with each role's token,
generated requests to every operation get no server error and answers that match the schema
(status codes listed, media types, bodies). Bounded and derandomized, so it runs in seconds."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: would end the sessions the rest of the run needs (logout, a password reset of a test user)
SKIP = {("POST", "/api/auth/logout"), ("POST", "/api/users/{user_id}/password")}
#: roles in this order: the admin's account changes come last
ORDER = ("auditor", "technologist", "radiologist", "admin")


def test_every_operation_conforms_for_every_role(svc_sqlite, shape_pngs) -> None:  # noqa: ANN001
    svc = svc_sqlite
    svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR")  # something to find at id 1
    svc.work()
    schema = schemathesis.openapi.from_asgi("/openapi.json", svc.app)
    ops = [r.ok() for r in schema.get_all_operations()]
    ops = [op for op in ops if (op.method.upper(), op.path) not in SKIP]
    assert len(ops) >= 18
    failures: list[str] = []
    for role in ORDER:
        for op in ops:
            @settings(max_examples=4, derandomize=True, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy())
            def run(case) -> None:  # noqa: ANN001
                case.call_and_validate(headers=svc.headers[role], checks=CHECKS)

            try:
                run()
            except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report all
                failures.append(f"{role} {op.method.upper()} {op.path}: {str(e)[:600]}")
    assert not failures, "\n\n".join(failures)
