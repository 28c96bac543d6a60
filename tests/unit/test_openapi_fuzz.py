"""A schema-driven fuzzer (schemathesis) drives every route of `/openapi.json` through the ASGI
app: whatever it sends, the answer is never a 5xx, and every error is the envelope."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from shared.api.routes import build_api
from tests.unit.test_routes import FakeBackend

schema = schemathesis.openapi.from_asgi("/openapi.json", build_api(lambda: FakeBackend()))


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_survives_the_fuzzer(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (case.path, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"type", "code", "message", "param"}, response.text[:300]
