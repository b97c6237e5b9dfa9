"""How a merge request resolves on a grid: the rows and columns each stage removes."""

from __future__ import annotations


def window_budget(hw: tuple[int, int], removal: tuple[int, int], window: int) -> int:
    """Centroids per window side for a per-window reduction with about the requested budget.

    The grid pads to n windows per axis, each reduced to s x s, so the result is n * s per side:
    s = round((H - r_h) / n), the nearest whole-window grid to what cubist would keep. Windows
    are square, so both axes must give the same s.
    """
    sides = []
    for size, r in zip(hw, removal):
        count = -(-size // window)
        sides.append(min(window, max(1, round((size - r) / count))))
    if sides[0] != sides[1]:
        raise ValueError(
            f"a per-window reduction keeps square windows, but the removal (r_h, r_w)={removal} "
            f"on the {hw[0]}x{hw[1]} grid asks for {sides[0]} x {sides[1]} tokens per "
            f"{window}x{window} window; give one ratio, or r_h and r_w that agree"
        )
    if sides[0] == window:
        raise ValueError(
            f"the removal (r_h, r_w)={removal} on the {hw[0]}x{hw[1]} grid rounds to "
            f"{window}x{window} tokens per {window}x{window} window: nothing would be merged; "
            "ask for more (a larger ratio)"
        )
    return sides[0]
