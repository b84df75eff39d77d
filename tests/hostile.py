"""Hostile files shared by the core and GUI tests."""

from __future__ import annotations


def billion_laughs(levels: int) -> str:
    """A valid recipe with nested YAML aliases under unknown keys: 9**(levels + 1) strings once expanded."""
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels + 1):
        lines.append(f"lol{level}: &lol{level} [{', '.join([f'*lol{level - 1}'] * 9)}]")
    return "\n".join(["base_model: ./base", "experts: [{source_model: ./a}, {source_model: ./b}]", *lines])
