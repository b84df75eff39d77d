"""The gate of an "always on" shared expert: as good as zero, but never exactly zero.

Qwen2-MoE scales its shared expert by sigmoid(gate · x). A gate of exactly zero gives sigmoid(0) = 1/2
for every token, which the merge doubles back into the donor's MLP output. llama.cpp, though, computes
that sigmoid as silu(z) / z, which is 0/0 = NaN for z = 0, and the model then only says <pad>.

So the gate gets one tiny power-of-two entry, at the hidden dimension where the MLP's RMSNorm weight is
largest. The MLP's input is that norm's output, whose entries are at most max|w| * sqrt(hidden) in size
(an RMS-normalised vector has length sqrt(hidden)), so |z| stays below a bound under which
sigmoid(z) rounds to exactly 1/2 in the model's dtype: transformers computes what it computed with the
zero gate, and llama.cpp divides by a tiny non-zero z (keeping the gate in f32 in the GGUF).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# A bound on |z| a quarter of the largest one for which sigmoid(z) still rounds to 1/2 in the dtype
# (sigmoid(z) ~ 1/2 + z/4, and half a unit in the last place just below 1/2 is 2^-(mantissa bits + 2)).
_SAFE_LOGIT = {"float32": 2.0**-27, "bfloat16": 2.0**-10, "float16": 2.0**-13}
# The smallest positive value each dtype holds (subnormals included): a smaller gate would round to zero.
_SMALLEST = {"float32": 2.0**-149, "bfloat16": 2.0**-133, "float16": 2.0**-24}


def always_on_gate(norm_weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """The (1, hidden) float32 gate of an always-on shared expert whose MLP input is normed by norm_weight."""
    import torch

    weight = norm_weight.detach().float().abs().reshape(-1)
    hidden = weight.numel()
    index = int(torch.argmax(weight))
    largest = max(float(weight[index]), 1.0)
    bound = _SAFE_LOGIT.get(dtype, _SAFE_LOGIT["bfloat16"]) / (largest * math.sqrt(hidden))
    value = max(2.0 ** math.floor(math.log2(bound)), _SMALLEST.get(dtype, _SMALLEST["float16"]))
    gate = torch.zeros(1, hidden)
    gate[0, index] = value
    return gate


def is_zero_gate(gate: torch.Tensor) -> bool:
    """Whether a shared-expert gate is exactly zero (what merges before this fix wrote for always-on experts)."""
    return not bool(gate.detach().ne(0).any())
