"""Wire bodies refuse what the store could not keep: NUL in a string stored in a column of its own."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from talkative.serve.api.schemas import AnalyzeRequest, BatchItem, ShareRequest


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (AnalyzeRequest, {"text": "hi", "client_request_id": "a\x00b"}),
        (AnalyzeRequest, {"text": "hi", "model_id": "m\x00"}),
        (BatchItem, {"id": "item\x00", "text": "hi"}),
        (ShareRequest, {"request_id": "r", "anchor": {"position": 1}, "comment": "see\x00this"}),
    ],
)
def test_nul_in_a_stored_string_is_refused(model: Any, body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="must not contain NUL characters"):
        model.model_validate(body)


def test_nul_in_the_text_stays_accepted() -> None:
    """Texts are stored inside JSON, where NUL is escaped: any character a client analyses is allowed."""
    assert AnalyzeRequest.model_validate({"text": "a\x00b", "client_request_id": "ok"}).text == "a\x00b"
