"""Log-probabilities of response tokens under a causal LM.

`log π(y|x)` is the sum over response tokens of `log_softmax(logits)` at the token's id,
read from the logits one position earlier. Prompt and padding tokens never count.
"""

from __future__ import annotations

import torch

from graddyn.data.collate import SequenceBatch


def response_token_logprobs(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """(B, T) log-prob of each token under `model`, zero outside the response.

    Position t holds log π(input_ids[t] | input_ids[:t]); column 0 is always zero because
    the first token is never a response token.
    """
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    return gather_token_logprobs(logits, batch)


def gather_token_logprobs(logits: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """(B, T) response-token log-probs from (B, T, V) logits, zero elsewhere."""
    targets = batch.input_ids[:, 1:]
    shifted = logits[:, :-1]
    if shifted.dtype in (torch.float16, torch.bfloat16):
        shifted = shifted.float()
    picked = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logp = picked - torch.logsumexp(shifted, dim=-1)
    in_response = batch.response_mask[:, 1:].bool()
    token_logp = torch.where(in_response, token_logp, torch.zeros_like(token_logp))
    return torch.nn.functional.pad(token_logp, (1, 0))


def sequence_logprobs(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """(B,) summed response log-prob `log π(y|x)` of each row."""
    return response_token_logprobs(model, batch).sum(dim=1)
