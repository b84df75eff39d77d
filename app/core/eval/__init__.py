"""Evaluation of merged models: NLL / perplexity per dataset, routing statistics, runtime routing controls.

Import the submodules directly (``app.core.eval.nll``, ``.data``, ``.controls``, ``.routing_stats``);
they import torch and transformers only inside the functions that need them.
"""
