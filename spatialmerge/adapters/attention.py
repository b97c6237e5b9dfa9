"""Proportional attention for attention modules that take no mask: SAM's (segment-anything,
timm ``samvit``, ``transformers``' ``SamVisionAttention``) and SAM 2's Hiera.

Their ``forward`` computes the logits and then calls ``softmax`` or
``scaled_dot_product_attention`` exactly once. Rather than rewriting those forwards, the
attention runs as written under a ``TorchFunctionMode`` that, at that one call, adds the
per-key bias (``GridRun.window_key_bias``: log(size) of each key of every window, 0 for
padding) to the logits, or to the mask the call already has (timm's rel-pos bias). Everything
else (qkv, q/k-norm, rel-pos interpolation, q-pooling, the projection) is the authors' code. A
block whose attention makes no such call, or several, is refused at run time rather than left
unbiased.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_SOFTMAX = (torch.Tensor.softmax, torch.softmax, F.softmax)


def _broadcast(bias: Tensor, leading: torch.Size, num_keys: int) -> Tensor:
    """The (Bw, N) key bias laid out for logits whose leading dims are ``leading`` (Bw * heads
    folded, as SAM's (B * nHead, N, N), or (Bw, heads)): (*leading, 1, N)."""
    windows = bias.shape[0]
    total = math.prod(leading)
    if bias.shape[1] != num_keys or total % windows:
        raise RuntimeError(
            f"prop_attn: attention over {num_keys} keys in {tuple(leading)} batches does not match "
            f"the size map of {bias.shape[0]} windows x {bias.shape[1]} tokens; this attention "
            "module lays its tokens out in a way the bias cannot follow: use prop_attn=false"
        )
    heads = total // windows  # batch-major, heads inner: index = window * heads + head
    return bias.repeat_interleave(heads, dim=0).view(*leading, 1, num_keys)


class _KeyBias(TorchFunctionMode):
    """Adds ``bias`` at the attention's one softmax over keys or SDPA call, and counts them."""

    def __init__(self, bias: Tensor) -> None:
        super().__init__()
        self.bias = bias  # (Bw, N)
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            query, key = args[0], args[1]
            args, kwargs = args[:3], {**dict(zip(("attn_mask", "dropout_p", "is_causal"), args[3:])), **kwargs}
            bias = _broadcast(self.bias, query.shape[:-2], key.shape[-2]).to(query.dtype)
            mask = kwargs.get("attn_mask")
            if mask is not None and mask.dtype == torch.bool:
                raise RuntimeError("prop_attn cannot add a bias to a boolean attention mask: use prop_attn=false")
            kwargs["attn_mask"] = bias if mask is None else mask + bias
            self.calls += 1
        elif func in _SOFTMAX:
            logits = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, logits.dim() - 1):
                bias = _broadcast(self.bias, logits.shape[:-2], logits.shape[-1]).to(logits.dtype)
                args = (logits + bias, *args[1:])
                self.calls += 1
        return func(*args, **kwargs)


@contextmanager
def key_bias(attention: nn.Module, bias: Tensor | None) -> Iterator[None]:
    """Run ``attention`` (a module called with one window batch) with ``bias`` (Bw, N) added to
    the logits of its keys while the context is open; ``bias=None`` leaves it untouched."""
    if bias is None:
        yield
        return
    original = attention.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with _KeyBias(bias) as mode:
            out = original(*args, **kwargs)
        if mode.calls != 1:
            raise RuntimeError(
                f"prop_attn: {type(attention).__name__} computed {mode.calls} softmax / "
                "scaled_dot_product_attention calls over its keys, where exactly one was expected, "
                "so the size bias cannot be placed; use prop_attn=false"
            )
        return out

    attention.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del attention.forward
