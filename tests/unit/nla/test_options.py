"""`AnalyzeOptions` refuses every out-of-range or unknown option with a message that names it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from talkative.nla.options import AnalyzeOptions, resolve

BAD = [
    ({"optimize_explanations_config": {"best_of_k": 0}}, "best_of_k"),
    ({"optimize_explanations_config": {"best_of_k": 65}}, "best_of_k"),
    ({"optimize_explanations_config": {"best_of_k": 2.5}}, "best_of_k"),
    ({"optimize_explanations_config": {"n_groups_per_rollout": 0}}, "n_groups_per_rollout"),
    ({"optimize_explanations_config": {"temperature": 0.05}}, "temperature"),
    ({"optimize_explanations_config": {"temperature": 2.5}}, "temperature"),
    ({"optimize_explanations_config": {"temperature": -1}}, "temperature"),
    ({"optimize_explanations_config": {"num_samples_per_iteration": 8}}, "num_samples_per_iteration"),
    ({"optimize_explanations_config": {"salience_pct_threshold": 0.5}}, "salience_pct_threshold"),
    ({"optimize_explanations_config": {"salience_pct_threshold": 2}}, "salience_pct_threshold"),
    ({"optimize_explanations_config": {"beam": 3}}, "beam"),
    ({"temperature": 0.05}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 4097}, "batch_size"),
    ({"batch_size": -3}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"move_devices": True}, "move_devices"),
    ({"unknown_option": 1}, "unknown_option"),
    ({"best_of_k": 8}, "best_of_k"),  # belongs in optimize_explanations_config
    ({"add_tokens": ["x"] * 65}, "add_tokens"),
    ({"add_tokens": "not a list"}, "add_tokens"),
    ({"replace_left": "x" * 2001}, "replace_left"),
    ({"replace_right": "x" * 2001}, "replace_right"),
    ({"last_n_messages": 0}, "last_n_messages"),
    ({"no_kl": "maybe"}, "no_kl"),
]


@pytest.mark.parametrize(("options", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_options_are_refused_naming_the_option(options, field):
    with pytest.raises(ValidationError) as err:
        AnalyzeOptions.model_validate(options)
    assert field in str(err.value)
    with pytest.raises(ValidationError):
        resolve(options)


def test_move_devices_explains_why():
    with pytest.raises(ValidationError, match="does not apply here"):
        AnalyzeOptions(move_devices=True)


def test_temperature_explains_the_range():
    with pytest.raises(ValidationError, match=r"0 \(greedy\) or between 0.1 and 2.0"):
        AnalyzeOptions(temperature=0.01)


@pytest.mark.parametrize("t", [0, 0.1, 1, 2])
def test_temperature_bounds_are_inclusive(t):
    assert resolve({"temperature": t}).temperature == t
    assert resolve({"optimize_explanations_config": {"temperature": t}}).temperature == t


def test_defaults():
    r = resolve(None)
    assert (r.best_of_k, r.temperature, r.seed, r.batch_size) == (8, 1.0, 42, None)
    assert r.evaluate and r.kl and r.salience and r.structured
    assert not (r.logit_lens or r.tuned_lens or r.return_vectors or r.hard_tokens)
    assert r.add_tokens == () and r.replace_left is None and r.replace_right is None
    assert resolve({}) == r == resolve(AnalyzeOptions())


def test_precedence_and_implications():
    r = resolve({"temperature": 1.5, "optimize_explanations_config": {"temperature": 0.5, "best_of_k": 3}})
    assert (r.temperature, r.best_of_k) == (0.5, 3)
    assert resolve({"temperature": 1.5, "optimize_explanations_config": {}}).temperature == 1.5
    assert resolve({"optimize_explanations_config": {"n_groups_per_rollout": 7}}).batch_size == 7
    assert (
        resolve({"batch_size": 4, "optimize_explanations_config": {"n_groups_per_rollout": 7}}).batch_size
        == 4
    )
    r = resolve({"no_eval": True})
    assert not (r.evaluate or r.kl or r.salience)
    r = resolve({"no_kl": True})
    assert r.evaluate and not r.kl and r.salience
    assert not resolve({"calculate_salience": False}).salience
    assert not resolve({"calculate_token_salience": False}).salience
    assert resolve({"add_tokens": ["a", " b"]}).add_tokens == ("a", " b")
    assert resolve({"do_hard_tokens": True}).hard_tokens


def test_merge_key_ignores_the_seed_but_not_what_shapes_the_batch():
    a = resolve({"seed": 1})
    assert a.merge_key() == resolve({"seed": 2}).merge_key()
    for other in (
        {"no_kl": True},
        {"temperature": 0.5},
        {"add_tokens": ["x"]},
        {"do_hard_tokens": True},
        {"optimize_explanations_config": {"best_of_k": 2}},
        {"replace_left": "x"},
    ):
        assert resolve(other).merge_key() != a.merge_key(), other
