"""Schemathesis over the server's own /openapi.json, against a real tiny-model server: every operation, generated
valid and invalid requests, no 5xx, every status, header, content type and body as documented, and invalid input
refused.

Bounded to a few dozen examples per operation so that the file runs in a minute or two; the server caps the
work generated requests can queue (MAX_QUEUE_SIZE, REQUEST_TIMEOUT) so that refusals are 429, never a pile-up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from e2e_helpers import Server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import CheckConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from security_support import base_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLES = 25


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory, tiny_groups: Path) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("schemathesis")
    env = base_env(
        tiny_groups,
        workdir,
        RATE_LIMIT_PER_MINUTE="0",
        MAX_QUEUE_SIZE="4",
        MAX_TEXT_LENGTH="400",
        MAX_TOKENS="256",
        REQUEST_TIMEOUT="5",
    )
    server = Server(workdir, env, name="schemathesis").start()
    yield server
    server.stop()


def test_every_operation_answers_as_documented(api_server: Server) -> None:
    """Each operation in turn, positive and negative examples, failures collected (schemathesis' pytest loader
    relies on pytest internals that pytest 9 no longer has, so the operations are driven here)."""
    schema = schemathesis.openapi.from_url(api_server.url + "/openapi.json")
    # invalid input is refused with 400 (or 413 when it is too large to read, 404 for an unknown id, 429 when the
    # queue is full), never with FastAPI's 422 and never with a 5xx
    schema.config.checks.negative_data_rejection = CheckConfig(
        expected_statuses=["400", "401", "403", "404", "405", "409", "413", "429"]
    )
    # every conformance check: statuses, content types, headers and bodies as documented, and invalid input
    # (`true` or "2" where an integer is declared, among others) refused. positive_data_acceptance is not run:
    # some schema-valid input is refused by rules a JSON schema cannot state (blank text, MAX_TEXT_LENGTH and
    # MAX_TOKENS of this server, an unknown model id), each with its documented 400 or 404.
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                case.call_and_validate(checks=checks, timeout=60)

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label  # nothing to negate: no parameters
            except (Exception, BaseExceptionGroup) as exc:  # one line per failing operation; the others run
                failures.append(f"{operation.label} ({mode.value}): {str(exc).strip()[:1500]}")
    assert not failures, "\n\n".join(failures)


def test_the_server_survived(api_server: Server) -> None:
    assert api_server.get("/health").status_code == 200
    assert api_server.get("/ready").status_code == 200
    assert "Traceback" not in api_server.log_path.read_text()
