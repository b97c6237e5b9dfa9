"""What the evaluators that read a dataset share: how many images, how many loader processes,
and whether to show a progress bar."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm import tqdm

from spatialmerge.distributed import is_main

Item = TypeVar("Item")


class DatasetEvaluator:
    """The options every dataset-reading evaluator takes, checked once.

    Args:
        max_images: use at most the dataset's first ``max_images`` images; None for all.
        num_workers: DataLoader processes decoding (and transforming) images.
        progress: show a tqdm bar (on rank 0 only).
        config_key: where these options sit in the Hydra config (``evaluator.miou``), so an
            error names the override that fixes it.
    """

    def __init__(
        self, max_images: int | None, num_workers: int, progress: bool, config_key: str
    ) -> None:
        if max_images is not None and max_images < 1:
            raise ValueError(
                f"{config_key}.max_images={max_images} must be >= 1; use "
                f"{config_key}.max_images=null for all images"
            )
        if num_workers < 0:
            raise ValueError(f"{config_key}.num_workers={num_workers} must be >= 0")
        self.max_images = max_images
        self.num_workers = num_workers
        self.progress = progress

    def qualities(self) -> tuple[str, ...]:
        """The numbers this evaluator may report (with a merge, on some backbone) that grow with
        quality: what a search may maximise (``--quality``), checked before any work. Counts
        (``images``), the unmerged model's own numbers and lower-is-better ones are not."""
        raise NotImplementedError

    def image_count(self, available: int) -> int:
        """How many of ``available`` images to evaluate."""
        return available if self.max_images is None else min(self.max_images, available)

    def bar(self, items: Iterable[Item], desc: str, unit: str) -> tqdm:
        """``items`` under a progress bar, shown with ``progress`` on rank 0 only."""
        return tqdm(items, desc=desc, unit=unit, disable=not (self.progress and is_main()))
