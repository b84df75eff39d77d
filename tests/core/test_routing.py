from __future__ import annotations

import numpy as np
import pytest

from app.core.routing import PromptRouting, evaluate_routing, misrouted_prompts


def one_hot_weights(choices, num_experts=3):
    """Router weights whose top-1 per layer and token is given by choices (layers x tokens)."""
    choices = np.asarray(choices)
    weights = np.full((*choices.shape, num_experts), 0.1)
    for index in np.ndindex(choices.shape):
        weights[index][choices[index]] = 0.8
    return weights


def test_hand_checked_case():
    # Prompt A (expert 0), 2 layers x 3 tokens: token majorities 0, 1 and 0 (a 0/2 tie with equal
    # mean weights goes to the lower index).
    a = PromptRouting("a", 0, one_hot_weights([[0, 1, 0], [0, 1, 2]]))
    # Prompt B (expert 2), 2 layers x 2 tokens: token majorities 1 (a tie again) and 2.
    b = PromptRouting("b", 2, one_hot_weights([[1, 2], [2, 2]]))
    assert list(a.token_choices()) == [0, 1, 0]
    assert list(b.token_choices()) == [1, 2]
    assert a.prompt_choice() == 0
    assert b.prompt_choice() == 2  # one token each for 1 and 2: expert 2 has the larger mean weight
    quality = evaluate_routing([a, b], 3)
    assert quality.prompts == 2
    assert quality.tokens == 5
    assert quality.prompt_share == pytest.approx(1.0)
    assert quality.token_share == pytest.approx(3 / 5)  # A: tokens 0 and 2; B: token 1
    # Layer 0: A right on tokens 0, 2; B right on token 1 -> 3/5. Layer 1: A token 0; B tokens 0, 1 -> 3/5.
    assert quality.layer_token_share == pytest.approx((3 / 5, 3 / 5))
    # Top-1 choices over all 10 (layer, token) cells: expert 0 x3, expert 1 x3, expert 2 x4.
    assert quality.usage == pytest.approx((0.3, 0.3, 0.4))
    assert "100% of 2 test prompts and 60% of their 5 tokens" in quality.summary()


def test_a_split_vote_goes_to_the_more_confident_expert():
    weights = np.array([[[0.5, 0.4, 0.1]], [[0.05, 0.9, 0.05]]])  # layer 0 picks 0 weakly, layer 1 picks 1 firmly
    routing = PromptRouting("t", 1, weights)
    assert list(routing.layer_choices[:, 0]) == [0, 1]
    assert list(routing.token_choices()) == [1]


def test_no_prompts():
    quality = evaluate_routing([], 2)
    assert (quality.prompts, quality.tokens, quality.usage) == (0, 0, (0.0, 0.0))


def test_misrouted_prompts_are_listed_worst_first():
    def routed(text, intended, mean_weights):
        return PromptRouting(text, intended, np.array([[mean_weights]]))  # 1 layer x 1 token

    right = routed("right", 0, [0.7, 0.2, 0.1])
    close = routed("close", 1, [0.45, 0.4, 0.15])
    far = routed("far", 2, [0.1, 0.85, 0.05])
    tie_small_margin = routed("tie small margin", 0, [0.3, 0.4, 0.3])
    tie_big_margin = routed("tie big margin", 1, [0.6, 0.3, 0.1])
    listed = misrouted_prompts([right, close, far, tie_small_margin, tie_big_margin])
    assert [m.text for m in listed] == ["far", "tie big margin", "tie small margin", "close"]
    worst = listed[0]
    assert (worst.intended_expert, worst.chosen_expert) == (2, 1)
    assert worst.intended_weight == pytest.approx(0.05) and worst.margin == pytest.approx(0.8)
    assert misrouted_prompts([right]) == []
