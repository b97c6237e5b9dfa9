"""Expedite / Hourglass token clustering and reconstruction (Liang et al.).

Pure tensor code, no model knowledge. `expedite_cluster` shrinks an (H, W) token grid to an
(H', W') grid of centroids by a local soft k-means (superpixel style), so later blocks run on
fewer tokens without changing how they work; `expedite_reconstruct` maps a centroid grid back to
the full grid for dense heads, using the similarities recorded at clustering time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ExpediteRecord:
    """What `expedite_reconstruct` needs from one `expedite_cluster` call (all detached)."""

    tokens: Tensor  # (B, H*W, C) token features before clustering, input dtype
    centroids: Tensor  # (B, H'*W', C) centroids at clustering time, float32
    labels: Tensor  # (B, H*W) index of each token's nearest allowed centroid
    in_hw: tuple[int, int]  # (H, W)
    out_hw: tuple[int, int]  # (H', W')
    k: int | None  # centroids mixed per token in reconstruction; None: all of them
    temperature: float


def expedite_cluster(
    x: Tensor,
    out_hw: tuple[int, int],
    n_iters: int = 5,
    temperature: float = 0.01,
    window_size: int = 5,
    k: int | None = 20,
) -> tuple[Tensor, ExpediteRecord]:
    """Cluster a token grid `x` (B, H, W, C) into an `out_hw` (H', W') grid of centroids.

    Centroids start as the adaptive average pool of the grid. Each iteration gives every token
    a softmax affinity (of -squared distance * temperature) over the centroids within
    `window_size // 2` cells of its own cell, then moves each centroid to the affinity-weighted
    mean of its tokens. Restricting to a window keeps centroids local, so the output is still a
    spatial grid. Returns the centroids (B, H', W', C) in `x`'s dtype and the record that
    `expedite_reconstruct` needs; `k` is the reconstruction's number of centroids per token.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a (B, H, W, C) token grid, got shape {tuple(x.shape)}")
    batch, height, width, channels = x.shape
    out_h, out_w = _check_out_hw(out_hw, height, width)
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters={n_iters!r} must be an int >= 1; Expedite uses 5")
    if (
        isinstance(window_size, bool)
        or not isinstance(window_size, int)
        or window_size < 1
        or window_size % 2 == 0
    ):
        raise ValueError(
            f"window_size={window_size!r} must be a positive odd int so the window is centred "
            f"on each token's own cell; Expedite uses 5"
        )
    if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(
            f"temperature={temperature!r} must be a finite number > 0; Expedite uses 0.01"
        )
    num_centroids = out_h * out_w
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an int >= 1, or None to mix all centroids")
        if k > num_centroids:
            raise ValueError(
                f"k={k} exceeds the {num_centroids} centroids of the {out_h}x{out_w} grid; "
                f"pass k <= {num_centroids}, or k=None to mix all centroids"
            )

    # float32 even under autocast: squared distances of fp16/bf16 features lose the small
    # differences the softmax depends on
    with torch.autocast(x.device.type, enabled=False):
        feats = x.reshape(batch, height * width, channels).float()  # (B, N, C)
        centroids = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2).float(), (out_h, out_w))
        centroids = centroids.flatten(2).transpose(1, 2)  # (B, K, C)
        mask = _window_mask((height, width), (out_h, out_w), window_size // 2, x.device)  # (N, K)

        for _ in range(n_iters):
            # the assignment is not differentiated: gradients reach x only through the means
            with torch.no_grad():
                logits = -_squared_dist(feats, centroids) * temperature + mask  # (B, N, K)
                affinity = logits.softmax(dim=-1)
                mass = affinity.sum(dim=1)[..., None].clamp_min(1e-16)  # (B, K, 1)
            centroids = affinity.transpose(1, 2) @ feats / mass  # (B, K, C)

        with torch.no_grad():
            # subtracting the 0/-inf mask turns out-of-window distances into +inf
            labels = (_squared_dist(feats, centroids) - mask).argmin(dim=-1)  # (B, N)

    record = ExpediteRecord(
        tokens=x.detach().reshape(batch, height * width, channels),
        centroids=centroids.detach(),
        labels=labels,
        in_hw=(height, width),
        out_hw=(out_h, out_w),
        k=k,
        temperature=float(temperature),
    )
    return centroids.reshape(batch, out_h, out_w, channels).to(x.dtype), record


def expedite_reconstruct(y: Tensor, record: ExpediteRecord) -> Tensor:
    """Map a centroid grid `y` (B, H', W', C) back to the full grid (B, H, W, C).

    Each original token becomes a softmax-weighted mix (of -squared distance * temperature) of
    its `record.k` most similar clustering-time centroids, measured on its pre-clustering
    features. The weights are fixed by the record; gradients flow through `y` only.
    """
    out_h, out_w = record.out_hw
    height, width = record.in_hw
    batch = record.tokens.shape[0]
    if y.dim() != 4 or tuple(y.shape[:3]) != (batch, out_h, out_w):
        raise ValueError(
            f"y must be (B={batch}, H'={out_h}, W'={out_w}, C) as clustered, "
            f"got shape {tuple(y.shape)}"
        )
    channels = y.shape[-1]
    num_centroids = out_h * out_w
    k = num_centroids if record.k is None else record.k

    with torch.autocast(y.device.type, enabled=False):
        with torch.no_grad():
            logits = -_squared_dist(record.tokens.float(), record.centroids)  # (B, N, K)
            top_logits, top_idx = (logits * record.temperature).topk(k, dim=-1)  # (B, N, k)
            weights = torch.zeros_like(logits).scatter_(-1, top_idx, top_logits.softmax(-1))
        y_flat = y.reshape(batch, num_centroids, channels).float()  # (B, K, C)
        out = weights @ y_flat  # (B, N, C)
    return out.reshape(batch, height, width, channels).to(y.dtype)


def _check_out_hw(out_hw: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    valid = (
        isinstance(out_hw, (tuple, list))
        and len(out_hw) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in out_hw)
    )
    if not valid or not (1 <= out_hw[0] <= height and 1 <= out_hw[1] <= width):
        raise ValueError(
            f"out_hw={out_hw!r} must be two ints with 1 <= H' <= {height} and "
            f"1 <= W' <= {width} for a {height}x{width} token grid; clustering cannot add "
            f"tokens, so pick a centroid grid no larger than the input"
        )
    return out_hw[0], out_hw[1]


def _squared_dist(x: Tensor, c: Tensor) -> Tensor:
    """Squared Euclidean distances between x (B, N, C) and c (B, K, C): (B, N, K)."""
    sq_norms = x.square().sum(-1, keepdim=True) + c.square().sum(-1)[:, None, :]  # (B, N, K)
    # expanding the square turns tiny negatives out of rounding, which are not distances
    return torch.baddbmm(sq_norms, x, c.transpose(1, 2), alpha=-2).clamp_min(0)


def _window_mask(
    in_hw: tuple[int, int], out_hw: tuple[int, int], radius: int, device: torch.device
) -> Tensor:
    """Additive mask (H*W, H'*W'): 0 where a centroid is within `radius` cells of the token's
    own cell in both axes, -inf elsewhere. Built once per call, shared by batch and iterations.
    """

    def allowed(n: int, m: int) -> Tensor:
        # a token's own cell is its nearest-interpolated centroid index, floor(i * m / n), as
        # F.interpolate(mode="nearest") would pick
        label = torch.arange(n, device=device) * m // n  # (n,)
        return (label[:, None] - torch.arange(m, device=device)[None, :]).abs() <= radius

    (height, width), (out_h, out_w) = in_hw, out_hw
    inside = allowed(height, out_h)[:, None, :, None] & allowed(width, out_w)[None, :, None, :]
    mask = torch.zeros(inside.shape, device=device).masked_fill_(~inside, -math.inf)
    return mask.reshape(height * width, out_h * out_w)
