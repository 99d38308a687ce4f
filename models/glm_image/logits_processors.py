"""generate()'s logits processors as FastDecoder runs them: the same scores, without a host synchronisation per token.

FastDecoder keeps the processor list generate() builds from the checkpoint's generation config and the call, and
swaps two processors for exact equivalents (every score equal, so a seed samples the same tokens):
- SuppressTokensLogitsProcessor calls torch.isin on every token. On CUDA, for more than about 40 suppressed tokens,
  isin takes its sorting path, whose unique() makes the host wait for the GPU: the decoding loop could then no
  longer queue a step ahead, and the GPU sat idle for the host's share of every token (1.4 ms of 7.5 on an H200,
  bench/results/glm_image_pipeline_1024_h200_ar_profile.json). Here the mask is built once per request.
- TopKLogitsWarper runs torch.topk for the k-th largest score alone; kthvalue selects that one value without
  sorting out the other k-1 (bench/sampling.py measures both on the AR's vocabulary).
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, SuppressTokensLogitsProcessor, TopKLogitsWarper


def without_host_syncs(processors: LogitsProcessorList) -> LogitsProcessorList:
    """A new list: `processors` with the two above replaced by their equivalents, order kept."""
    return LogitsProcessorList(_equivalent(p) for p in processors)


def _equivalent(processor: LogitsProcessor) -> LogitsProcessor:
    if type(processor) is SuppressTokensLogitsProcessor:
        return SuppressTokens(processor.suppress_tokens)
    if type(processor) is TopKLogitsWarper:
        return TopK(processor.top_k, processor.filter_value)
    return processor


class SuppressTokens(LogitsProcessor):
    """SuppressTokensLogitsProcessor with its token mask computed on the first call, for that vocabulary size."""

    def __init__(self, suppress_tokens: torch.Tensor):
        self.suppress_tokens = suppress_tokens
        self.mask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.mask is None or self.mask.shape[0] != scores.shape[-1] or self.mask.device != scores.device:
            vocab = torch.arange(scores.shape[-1], device=scores.device)
            self.mask = torch.isin(vocab, self.suppress_tokens.to(scores.device))
        return torch.where(self.mask, -float("inf"), scores)


class TopK(LogitsProcessor):
    """TopKLogitsWarper (`top_k` already raised to its min_tokens_to_keep): scores below the k-th largest are
    filtered. kthvalue counts from the smallest, so the k-th largest of n is the (n - k + 1)-th smallest."""

    def __init__(self, top_k: int, filter_value: float):
        self.top_k, self.filter_value = top_k, filter_value

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        n = scores.shape[-1]
        kth = torch.kthvalue(scores, n - min(self.top_k, n) + 1, dim=-1).values[..., None]
        return scores.masked_fill(scores < kth, self.filter_value)
