"""Schemathesis fuzzes the server from its own /openapi.json: no 500s, and every status, content type and
body it answers with is the one documented. (Schema-valid data may still be a 400: the server's semantic checks,
e.g. the context length or an unknown role, go beyond what a JSON schema says.) Slow (deselected by default;
needs `pip install schemathesis`); the fast check of the same schema is
test_server_security.py::test_openapi_documents_the_real_responses."""
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from schemathesis import checks  # noqa: E402

from engine_utils import one_thread  # noqa: E402,F401
from nemotron3.server import create_app  # noqa: E402
from test_server_errors import make_engine  # noqa: E402

pytestmark = pytest.mark.slow
KEY = {"Authorization": "Bearer k"}


def test_api_answers_as_documented(server_model_dir):
    app = create_app(make_engine(server_model_dir, max_model_len=128), served_model_name="tiny",
                     max_body_bytes=20_000, api_key="k")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=KEY)
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(headers=KEY, checks=[checks.not_a_server_error, checks.status_code_conformance,
                                                        checks.content_type_conformance,
                                                        checks.response_schema_conformance])

        check()
