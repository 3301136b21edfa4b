"""The independent reference for teacher log-probs: one unbatched full forward, nothing clever.

Deliberately shares no code with any backend, so that a bug in a backend's batching, padding,
gathering or chunked head cannot also be present in the reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def naive_logprobs(
    model: Any, prompt_ids: Sequence[int], response_ids: Sequence[int], temperature: float = 1.0
) -> np.ndarray:
    """`log_softmax(model(prompt + response[:j]).logits / T)[response[j]]` for every j, as float32."""
    prompt, response = list(prompt_ids), list(response_ids)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + response], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    out = [logprobs[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(response)]
    return np.asarray(out, dtype=np.float32)
