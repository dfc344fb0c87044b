"""The API fuzzed from its own /openapi.json with schemathesis: a bounded run of generated requests,
valid and invalid, against a live loopback server. No response is a 500, every response matches
its declared status, content type and schema, and the server answers normally afterwards."""

from __future__ import annotations

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                 response_schema_conformance, status_code_conformance, unsupported_method)

from serve.engine import ServeLimits
from serve.management import FleetSettings
from serve.server import AccessConfig
from serve.service import Service, ServiceConfig
from tests.conftest import LiveServer, free_port

KEY = "fuzz-key"
EXAMPLES = 60
"""Per operation and generation mode: about 500 requests over the five /v1 operations (four with
a body, each valid and invalid), in well under a minute here (each reply is capped at three tokens)."""
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, unsupported_method]
"""What must hold of every response. Left out: positive_data_acceptance (a schema-valid body may
still name a model that does not exist, or a schema xgrammar cannot compile: a documented 400 or
404), and the checks of stateful and auth scenarios this API does not declare."""


@pytest.fixture(scope="module")
def fuzzed(tiny_base, two_adapters, tmp_path_factory):
    config = ServiceConfig(base=str(tiny_base), adapters=str(two_adapters.root), max_queue=64, watch_s=5,
                           reports=str(tmp_path_factory.mktemp("reports")), limits=ServeLimits(max_new_tokens=3))
    fleet = FleetSettings(allow_runtime_loading=True)  # the management routes answer, not only refuse
    with LiveServer(Service.start(config), AccessConfig("127.0.0.1", free_port(), (), KEY), fleet=fleet) as server:
        yield server


def operations(server) -> list:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations() if result.ok().path.startswith("/v1")]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_response_off_the_schema(fuzzed):
    names = fuzzed.service.model_names()
    ops = operations(fuzzed)
    assert {op.path for op in ops} >= {"/v1/models", "/v1/chat/completions", "/v1/completions"}
    seen = {"cases": 0, "statuses": set()}
    for op in ops:
        # An operation that takes nothing (GET /v1/models) has no invalid input to generate.
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if len(op.body) else (GenerationMode.POSITIVE,):
            run_operation(fuzzed, op, mode, names, seen)
    assert seen["cases"] >= 4 * EXAMPLES, seen  # the run was not cut short
    assert 200 in seen["statuses"] and 400 in seen["statuses"], seen  # it reached the engine and the checks
    reply = openai.OpenAI(base_url=f"{fuzzed.url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="colors", messages=[{"role": "user", "content": "Color of cat?"}], temperature=0, max_tokens=3)
    assert reply.choices[0].message.content == "red"  # and it still answers normally


def run_operation(server, op, mode: GenerationMode, names: list[str], seen: dict) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode), model=st.sampled_from(names))
    def check(case, model):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model  # a served model, so that valid requests reach the engine
        response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        seen["cases"] += 1
        seen["statuses"].add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    check()
