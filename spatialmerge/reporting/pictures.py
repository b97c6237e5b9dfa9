"""Pictures of what a merge did: which original patches each merged token holds.

After one forward of a patched model, ``patch_state(model).last_assignment`` maps every original
patch to the merged token that holds it (for several CubistMerge stages, the composed map). Drawn
over the input image, CubistMerge shows small compact cells (pairs, 2x2 blocks, steps) that keep the
grid's rows and columns in order, single-layer ToMe scattered groups, and Expedite clusters.
"""

from __future__ import annotations

import colorsys
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

import spatialmerge
from spatialmerge.adapters import find_adapter
from spatialmerge.evaluators.fidelity import fidelity_map
from spatialmerge.reporting.table import method_label

# Merged cells are tinted and outlined; a patch left on its own keeps the image visible.
MERGED_ALPHA = 0.5
BORDER_COLOUR = (255, 255, 255)


@dataclass
class CellMap:
    """What one merge did to one image.

    Attributes:
        method: the merge method.
        labels: (H, W) int64, the merged token holding each original patch.
        out_hw: the merged grid (H', W'), or None where the result is no grid (per-layer ToMe).
        tokens: merged patch tokens (H' * W' for grid methods).
        features: (1, C, H, W) dense output of the merged model, recovered to the full grid.
    """

    method: str
    labels: np.ndarray
    out_hw: tuple[int, int] | None
    tokens: int
    features: Tensor


def assignment_grid(
    assignment: Tensor | np.ndarray, grid_hw: tuple[int, int], tokens: int
) -> np.ndarray:
    """(H * W,) patch -> token map as an (H, W) label grid, checked: one label per patch, every
    label in [0, tokens)."""
    labels = np.asarray(assignment.cpu() if isinstance(assignment, Tensor) else assignment).astype(np.int64)
    h, w = grid_hw
    if labels.shape != (h * w,):
        raise ValueError(f"assignment has shape {labels.shape}, expected ({h * w},) for a {h}x{w} grid")
    if labels.min() < 0 or labels.max() >= tokens:
        raise ValueError(f"assignment values span [{labels.min()}, {labels.max()}], outside [0, {tokens})")
    return labels.reshape(h, w)


def cell_sizes(labels: np.ndarray, tokens: int) -> np.ndarray:
    """(tokens,) how many original patches each merged token holds (0: an empty token)."""
    return np.bincount(labels.ravel(), minlength=tokens)


def cell_borders(labels: np.ndarray) -> np.ndarray:
    """Bool mask, True where a pixel's label differs from one of its 4 neighbours: the outlines
    of the cells, two pixels wide (one on each side of the edge)."""
    border = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:] != labels[:-1]
    horizontal = labels[:, 1:] != labels[:, :-1]
    border[1:] |= vertical
    border[:-1] |= vertical
    border[:, 1:] |= horizontal
    border[:, :-1] |= horizontal
    return border


def upsample_nearest(values: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour (H, W, ...) -> (H_img, W_img, ...): each pixel takes its patch's value."""
    rows = np.arange(size_hw[0]) * values.shape[0] // size_hw[0]
    cols = np.arange(size_hw[1]) * values.shape[1] // size_hw[1]
    return values[rows[:, None], cols[None, :]]


def token_colours(count: int, seed: int = 0) -> np.ndarray:
    """(count, 3) uint8 saturated random colours, the same for the same seed."""
    hues = np.random.default_rng(seed).random(count)
    rgb = np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]).reshape(count, 3)
    return (rgb * 255).round().astype(np.uint8)


def render_cells(image: np.ndarray, labels: np.ndarray, tokens: int, seed: int = 0) -> np.ndarray:
    """Draw a cell map over an image.

    Args:
        image: (H_img, W_img, 3) uint8, the model input as pixels.
        labels: (H, W) patch -> token map (``assignment_grid``).
        tokens: number of merged tokens.
        seed: colour seed.

    Returns:
        (H_img, W_img, 3) uint8: tokens holding several patches tinted in a random colour per
        token and outlined; patches left alone untouched.
    """
    size = image.shape[:2]
    pixel_labels = upsample_nearest(labels, size)  # (H_img, W_img)
    merged = cell_sizes(labels, tokens) > 1  # (tokens,)
    alpha = np.where(merged, MERGED_ALPHA, 0.0)[pixel_labels][..., None]  # (H_img, W_img, 1)
    colours = token_colours(tokens, seed)[pixel_labels].astype(np.float32)
    out = (1 - alpha) * image.astype(np.float32) + alpha * colours
    outline = cell_borders(pixel_labels) & merged[pixel_labels]
    out[outline] = BORDER_COLOUR
    return out.round().clip(0, 255).astype(np.uint8)


# Fidelity is drawn as -log10(1 - cosine): 1 is a cosine of 0.9, 2 of 0.99, 3 of 0.999 or better,
# so the differences that matter near 1 (0.97 against 0.99) get distinct colours.
FIDELITY_BEST = 3.0


def fidelity_levels(cosines: np.ndarray) -> np.ndarray:
    """Per-patch cosines -> -log10(1 - cosine), at most ``FIDELITY_BEST``."""
    return -np.log10(np.clip(1.0 - cosines, 10 ** -FIDELITY_BEST, None))


def fidelity_scale_floor(levels: list[np.ndarray]) -> float:
    """The low end of the shared colour scale: the 2nd percentile of every panel's levels, so a
    few outlier patches do not squeeze the rest into one colour (patches below it share the
    darkest); at most 2 (a cosine of 0.99), so a near-lossless merge keeps a readable scale."""
    return min(float(np.percentile(np.concatenate([m.ravel() for m in levels]), 2)), 2.0)


def render_heatmap(
    values: np.ndarray, size_hw: tuple[int, int], vmin: float, vmax: float, cmap: str = "viridis"
) -> np.ndarray:
    """(H, W) per-patch values -> (H_img, W_img, 3) uint8 through a matplotlib colour map."""
    import matplotlib

    scaled = (values - vmin) / max(vmax - vmin, 1e-12)
    rgb = matplotlib.colormaps[cmap](np.clip(scaled, 0.0, 1.0))[..., :3]  # (H, W, 3)
    return (upsample_nearest(rgb, size_hw) * 255).round().astype(np.uint8)


def prepare_image(model: nn.Module, image: Image.Image) -> tuple[np.ndarray, Tensor]:
    """Resize an image to the model's input size and normalise it as the model expects.

    Returns the resized (H_img, W_img, 3) uint8 pixels (what the pictures are drawn over) and the
    (1, 3, H_img, W_img) float input.
    """
    adapter = find_adapter(model)
    _, h, w = adapter.input_size(model)
    pixels = np.asarray(image.convert("RGB").resize((w, h), Image.BICUBIC))  # (H_img, W_img, 3)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()[None]  # (1, 3, H_img, W_img)
    return pixels, adapter.normalize_pixels(model, x)


def cell_map(model: nn.Module, x: Tensor, merge: Mapping[str, Any]) -> CellMap:
    """Patch ``model`` with ``merge`` (``spatialmerge.patch`` kwargs), run ``x`` through it once
    and read the patch -> token map back; the model is unpatched afterwards."""
    spatialmerge.patch(model, **{**merge, "recover": True})
    try:
        with torch.inference_mode():
            features, _ = find_adapter(model).dense_features(model, x)  # (1, C, H, W)
        state = spatialmerge.patch_state(model)
        if state is None or state.last_assignment is None:
            raise ValueError(
                f"merge {dict(merge)} merged nothing on this model (loc past the last block?); "
                "choose merge.loc below the model's depth"
            )
        assignment = state.last_assignment[0]  # (H * W,)
        if state.last_hw is not None:
            grid_hw, out_hw = state.last_hw
            tokens = out_hw[0] * out_hw[1]
        else:  # per-layer ToMe: the patches of a square grid, merged into a token set
            side = math.isqrt(assignment.numel())
            grid_hw, out_hw = (side, side), None
            tokens = int(assignment.max()) + 1
        labels = assignment_grid(assignment, grid_hw, tokens)
    finally:
        spatialmerge.unpatch(model)
    return CellMap(method_label(merge), labels, out_hw, tokens, features)


def save_panels(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[Sequence[str]],
    title: str,
    path: Path,
    colorbar: tuple[float, float, str, str] | None = None,
    pad: int = 8,
) -> Path:
    """Lay out image panels in rows, each shown at its own pixel size (no resampling), with a
    title above each panel and one above all; ``colorbar`` = (vmin, vmax, cmap, label) adds a
    colour scale to the right of the last row. Returns ``path``."""
    import matplotlib
    from matplotlib.figure import Figure

    dpi = 100
    ph, pw = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    font = min(max(pw / 45, 6.0), 16.0)  # points
    line = math.ceil(font * dpi / 72 * 1.5)  # pixels per text line
    bar = int(12 * font) if colorbar else 0
    width = columns * pw + (columns + 1) * pad + bar
    chars = max(int(width / (font * dpi / 72 * 0.55)), 20)
    heading = textwrap.wrap(title, chars)
    top = line * len(heading) + pad
    height = top + len(rows) * (line + ph) + pad
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    fig.text(0.5, 1 - (pad / 2) / height, "\n".join(heading), ha="center", va="top", fontsize=font * 1.1)
    for r, (panels, names) in enumerate(zip(rows, titles)):
        y_top = top + r * (line + ph) + line
        for c, (panel, name) in enumerate(zip(panels, names)):
            x0 = pad + c * (pw + pad)
            ax = fig.add_axes((x0 / width, 1 - (y_top + ph) / height, pw / width, ph / height))
            ax.imshow(panel, interpolation="nearest")
            ax.set_axis_off()
            fig.text((x0 + pw / 2) / width, 1 - (y_top - line * 0.15) / height, name, ha="center",
                     va="bottom", fontsize=font)
    if colorbar is not None:
        vmin, vmax, cmap, label = colorbar
        y_top = top + (len(rows) - 1) * (line + ph) + line
        box = ((width - bar + pad) / width, 1 - (y_top + ph) / height, (bar / 6) / width, ph / height)
        cax = fig.add_axes(box)
        scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(vmin, vmax), cmap)
        scale_bar = fig.colorbar(scale, cax=cax)
        scale_bar.ax.tick_params(labelsize=font * 0.8)
        scale_bar.set_label(label, fontsize=font * 0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def merge_figure(
    model: nn.Module,
    image: Image.Image,
    merges: Sequence[Mapping[str, Any]],
    path: Path,
    title: str,
    fidelity: bool = False,
    seed: int = 0,
    panel_width: int | None = None,
) -> list[CellMap]:
    """Draw every merge in ``merges`` over ``image`` side by side (one panel each, titled with the
    method and tokens kept) and, with ``fidelity``, a second row: per-patch cosine similarity of
    the merged-and-recovered output to the unmerged one. Panels show the model input at its own
    size, or ``panel_width`` pixels wide. Writes ``path``; returns the cell maps."""
    if panel_width is not None and panel_width < 1:
        raise ValueError(f"panel_width={panel_width} must be a positive number of pixels")
    spatialmerge.unpatch(model)
    model.eval()
    pixels, x = prepare_image(model, image)
    x = x.to(next(model.parameters()).device)
    maps = [cell_map(model, x, merge) for merge in merges]
    if panel_width is not None:
        height = round(panel_width * pixels.shape[0] / pixels.shape[1])
        pixels = np.asarray(Image.fromarray(pixels).resize((panel_width, height), Image.BICUBIC))
    full = maps[0].labels.size
    panels = [[render_cells(pixels, m.labels, m.tokens, seed) for m in maps]]
    titles = [[f"{m.method}: {m.tokens} tokens ({100 * m.tokens / full:.0f}% of {full})" for m in maps]]
    colorbar = None
    if fidelity:
        with torch.inference_mode():
            reference, _ = find_adapter(model).dense_features(model, x)  # (1, C, H, W)
        heat = [fidelity_map(reference, m.features)[0].cpu().numpy() for m in maps]  # (H, W) each
        levels = [fidelity_levels(h) for h in heat]
        vmin = fidelity_scale_floor(levels)
        panels.append([render_heatmap(lv, pixels.shape[:2], vmin, FIDELITY_BEST) for lv in levels])
        titles.append([f"{m.method}: mean cosine {h.mean():.3f}" for m, h in zip(maps, heat)])
        colorbar = (vmin, FIDELITY_BEST, "viridis",
                    f"cosine to unmerged as -log10(1 - cos): 2 = 0.99, 3 = 0.999 (darkest: <= {1 - 10 ** -vmin:.3f})")
    save_panels(panels, titles, title, path, colorbar)
    return maps
