"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): whatever a client sends, the
server answers with a documented status and body, never a 5xx, and stays healthy."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from lmfleet.engine import AsyncLLMEngine, LLMEngine
from lmfleet.serve import ServeSettings, build_app

from .helpers import chat_model_dir

NAME = "fuzz"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    # A short context bounds the work of any one example (n x max_tokens), not what is checked.
    model_dir = chat_model_dir(tmp_path_factory.mktemp("fuzz"), tokenizer, 256, 5)
    engine = AsyncLLMEngine(LLMEngine(model_dir, num_blocks=160, max_model_len=24, max_num_seqs=128))
    app = build_app(engine, ServeSettings(NAME, enable_docs=True, max_body_bytes=64 * 1024))
    yield app
    engine.shutdown()


def test_api_answers_every_generated_request(served) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", served)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                               "POST /tokenize", "POST /detokenize", "GET /health"}
    statuses: dict[str, Counter] = {op.label: Counter() for op in operations}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=75, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def run(case) -> None:
            # Every check but positive-data acceptance: the schema cannot say that prompt +
            # max_tokens must fit the context, so a schema-valid body may rightly get a 400.
            response = case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])
            statuses[case.operation.label][response.status_code] += 1

        run()
    print(statuses)
    # The fuzz reached the engine: some generated requests were valid and got their completions.
    assert statuses["POST /v1/completions"][200] > 0 and statuses["POST /v1/chat/completions"][200] > 0
    assert not any(code >= 500 for counts in statuses.values() for code in counts)
    from fastapi.testclient import TestClient

    assert TestClient(served).get("/health").status_code == 200
