"""The routing trace file, CSV exports, usage statistics and the legend."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from app.core.chat import ExpertLegend, ExpertUsage, TokenRouting, read_trace, trace_csv, write_trace
from app.core.chat.trace import TRACE_FIELDS, read_legend, token_heatmap
from app.core.problems import FrankenMoEError


def token(position, experts, weights=None, generated=False, text="x"):
    weights = weights or [(0.75, 0.25)] * len(experts)
    probs = [tuple(0.25 for _ in range(4)) for _ in experts]
    return TokenRouting(
        position=position,
        token_id=100 + position,
        token=text,
        generated=generated,
        layers=tuple(range(0, 2 * len(experts), 2)),
        experts=tuple(tuple(e) for e in experts),
        weights=tuple(tuple(w) for w in weights),
        probs=tuple(probs),
    )


TOKENS = [
    token(0, [(1, 0), (1, 2), (3, 1)], text="Hé"),
    token(1, [(2, 0), (0, 2), (0, 1)], text=' "quoted"\n'),
    token(2, [(3, 1), (2, 1), (0, 3)], weights=[(0.6, 0.4), (0.5, 0.5), (0.9, 0.1)], generated=True),
]


def test_trace_round_trips_and_every_line_has_the_documented_fields(tmp_path):
    path = tmp_path / "trace.jsonl"
    write_trace(TOKENS, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert tuple(first) == TRACE_FIELDS
    assert first["experts"] == [[1, 0], [1, 2], [3, 1]] and first["weights"][0] == [0.75, 0.25]
    assert first["token"] == "Hé" and first["generated"] is False and first["layers"] == [0, 2, 4]
    assert read_trace(path) == TOKENS

    (tmp_path / "bad.jsonl").write_text('{"position": 0}\n')
    with pytest.raises(FrankenMoEError, match="line 1"):
        read_trace(tmp_path / "bad.jsonl")


def test_the_colour_expert_is_the_layer_choice_or_the_majority_over_layers():
    assert TOKENS[0].top_expert() == 1  # first choices 1, 1, 3
    assert TOKENS[0].top_expert(2) == 3
    assert TOKENS[2].top_expert() == 0  # first choices 3, 2, 0: a three-way tie goes to the lowest


def test_usage_per_layer_and_share_of_tokens():
    usage = ExpertUsage(layers=(0, 2, 4), num_experts=4)
    usage.add_all(TOKENS)
    assert usage.tokens == 3
    # Layer 0 picked experts 1,0 / 2,0 / 3,1: expert 0 twice, 1 twice, 2 once, 3 once out of 6.
    np.testing.assert_allclose(usage.layer_shares()[0], [2 / 6, 2 / 6, 1 / 6, 1 / 6])
    np.testing.assert_array_equal(usage.first_choices[0], [0, 1, 1, 1])
    # Most-chosen experts by token: 1, then 0 (first choices 2, 0, 0), then 0 (tie).
    np.testing.assert_allclose(usage.token_shares(), [2 / 3, 1 / 3, 0, 0])
    table = usage.to_csv(ExpertLegend(("maths", "code", "prose", "french"), ("#000",) * 4)).splitlines()
    assert table[0] == "layer,maths,code,prose,french"
    assert table[1] == "0,0.333333,0.333333,0.166667,0.166667"
    assert table[-1] == "tokens,0.666667,0.333333,0.000000,0.000000"


def test_trace_csv_has_a_row_per_token_and_layer():
    rows = list(csv.reader(io.StringIO(trace_csv(TOKENS))))
    assert rows[0] == [
        "position",
        "token_id",
        "token",
        "generated",
        "layer",
        "expert_1",
        "weight_1",
        "expert_2",
        "weight_2",
    ]
    assert len(rows) == 1 + 3 * 3
    assert rows[4][2] == ' "quoted"\n'  # quotes and newlines in token text survive
    assert rows[-1] == ["2", "102", "x", "1", "4", "0", "0.900000", "3", "0.100000"]


def test_heatmap_holds_each_layers_chosen_weights():
    grid = token_heatmap(TOKENS[2], 4)
    assert grid.shape == (3, 4)
    np.testing.assert_allclose(grid[0], [0, 0.4, 0, 0.6])
    np.testing.assert_allclose(grid.sum(axis=1), [1, 1, 1])


def test_legend_defaults_without_a_recipe(tmp_path):
    legend = read_legend(tmp_path, 3)
    assert legend.labels == ("expert 0", "expert 1", "expert 2")
    assert len(set(legend.colors)) == 3
    (tmp_path / "frankenmoe-recipe.yml").write_text("this: [is not a recipe")
    assert read_legend(tmp_path, 3) == legend
