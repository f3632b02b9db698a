"""The checkpoint-format registry: which format claims a path when several could, what `convert` may write, and
that every format answers the same questions."""

from __future__ import annotations

import pytest

from talkative.nla.checkpoint import CheckpointError, detect_format
from talkative.nla.formats import FORMATS, format_of, named, writable


def test_every_format_answers_the_same_questions():
    assert [f.name for f in FORMATS] == ["native", "official", "upstream"]
    for fmt in FORMATS:
        assert callable(fmt.detect) and callable(fmt.load) and callable(fmt.describe) and fmt.expects
    assert writable() == ["native", "upstream"]
    assert named("official") is FORMATS[1]
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        named("onnx")


def test_a_directory_several_formats_could_claim_goes_to_the_first(tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    (both / "nla.json").write_text("{}")
    (both / "old.pt").write_bytes(b"")
    assert detect_format(both) == "native"
    pair = tmp_path / "pair"
    (pair / "av").mkdir(parents=True)
    (pair / "ar").mkdir()
    (pair / "stray.pt").write_bytes(b"")
    assert detect_format(pair) == "official"
    assert format_of(tmp_path / "pair" / "stray.pt").name == "upstream"


def test_what_no_format_claims_is_refused_with_what_was_expected(tmp_path):
    with pytest.raises(CheckpointError, match=r"expected nla\.json \(native\), .* or \*\.pt"):
        format_of(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"not a native nla\.json, not an upstream \.pt checkpoint"):
        format_of(tmp_path / "notes.txt")
