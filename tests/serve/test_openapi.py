"""The published API description (/openapi.json) is what the server does.

schemathesis reads the document and generates requests from it, valid and invalid ones,
against a real server (uvicorn on 127.0.0.1, a tiny model with a 64-token context so every
generation is short). Every answer must be as documented: never a 5xx; a status code, content
type, headers and JSON body the document lists; a 4xx for every request the schema forbids;
405 with Allow for methods an endpoint does not take. Bounded: KUBETUNE_SCHEMATHESIS_EXAMPLES
cases per endpoint (default 60)."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from kubetune.api.spec import GenerationSpec
from kubetune.serve.server import ServeSettings, create_app

EXAMPLES = int(os.environ.get("KUBETUNE_SCHEMATHESIS_EXAMPLES", "60"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
    allow_header_conformance,
]


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    from kubetune.serve.loader import load_model
    from kubetune.testing import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("short-model"), max_position_embeddings=64)
    return load_model(str(folder), cache_dir=tmp_path_factory.mktemp("short-model-cache"))


# The document the served app publishes; the test below checks the server sends this one.
SETTINGS = ServeSettings("tiny", GenerationSpec(max_tokens=8), max_body_bytes=64 * 1024)
DOCUMENT = create_app(SETTINGS).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def served(short_model):
    from kubetune.serve.engine import Engine
    from kubetune.serve.server import BackgroundServer

    engine = Engine(short_model.model, short_model.tokenizer, max_batch=4, max_queue=8)
    engine.start()
    try:
        with BackgroundServer(create_app(SETTINGS, engine=engine)) as server:
            yield server.url
    finally:
        engine.stop()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_as_documented(case, served):
    response = case.call(base_url=served, timeout=120)
    case.validate_response(response, checks=CHECKS)


def test_the_server_publishes_the_document(served):
    doc = httpx.get(f"{served}/openapi.json").json()
    assert doc == DOCUMENT
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    request = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert request["model"]["enum"] == ["tiny"]  # the one name this server answers to
    seed = request["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**64 - 1)
