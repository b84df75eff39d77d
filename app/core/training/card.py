"""The "Router training" section of the model card, and the same record as a comment block in the saved recipe.

The recipe keeps it as YAML comments so that mergekit-moe and this app read the recipe exactly as
before (a key would be an unknown field to both); a later training replaces the block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SECTION_TITLE = "## Router training"
RECIPE_BLOCK_START = "# --- Router training (frankenmoe train-router) ---"
RECIPE_BLOCK_END = "# --- end of router training ---"


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def summary_lines(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs that both the card and the recipe comment show."""
    settings = report["settings"]
    data = report["data"]
    load = ", ".join(f"{share:.1%}" for share in report.get("expert_load", ()))
    sources = ", ".join(data["sources"])
    stopped = " (stopped early: no better validation loss)" if report["stopped_early"] else ""
    return [
        ("Trained", "the routers (and shared-expert gates) only; every other weight is unchanged"),
        ("Data", f"{sources}: {data['tokens']:,} tokens packed into sequences of {data['seq_len']} tokens "
         f"({data['train_sequences']} for training, {data['validation_sequences']} held out)"),
        ("Steps", f"{report['steps']} of {report['planned_steps']} planned, {report['tokens']:,} training tokens"
         f"{stopped}"),
        ("Objective", f"next-token loss + {settings['balance_coef']} x load-balancing loss + {settings['z_coef']} x "
         "router z-loss"),
        ("Optimiser", f"AdamW, lr {settings['lr']}, warm-up {settings['warmup_fraction']:.0%} then cosine, "
         f"batch {settings['batch_size']}, gradient clip {settings['grad_clip']}, seed {settings['seed']}"),
        ("Validation loss", f"{_loss(report['initial_val_loss'])} before, {_loss(report['final_val_loss'])} after "
         f"(best {_loss(report['best_val_loss'])})"),
        ("Final training loss", f"{_loss(report['final_train_loss'])} next-token, "
         f"{_loss(report.get('final_balance_loss'))} load-balancing"),
        ("Expert load", load or "n/a"),
    ]


def card_section(report: Mapping[str, Any]) -> str:
    """The Markdown section appended to the model card."""
    rows = "\n".join(f"| {label} | {value} |" for label, value in summary_lines(report))
    return (
        f"{SECTION_TITLE}\n\n"
        "The routers of this model were trained with FrankenMoE Studio after merging "
        f"(`frankenmoe train-router`), starting from `{report['model_name']}`.\n\n"
        f"| | |\n| --- | --- |\n{rows}\n"
    )


def recipe_comment(report: Mapping[str, Any]) -> str:
    """The comment block appended to the saved recipe."""
    lines = [RECIPE_BLOCK_START, f"# from: {report['model_name']}"]
    lines += [f"# {label.lower()}: {value}" for label, value in summary_lines(report)[1:]]
    return "\n".join([*lines, RECIPE_BLOCK_END]) + "\n"


def with_recipe_comment(recipe_text: str, comment: str) -> str:
    """The recipe text with the comment block at its end, replacing one an earlier training wrote."""
    if RECIPE_BLOCK_START in recipe_text:
        before, _, rest = recipe_text.partition(RECIPE_BLOCK_START)
        after = rest.partition(RECIPE_BLOCK_END)[2]
        recipe_text = before.rstrip("\n") + "\n" + after.lstrip("\n")
    return recipe_text.rstrip("\n") + "\n\n" + comment
