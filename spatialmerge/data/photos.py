"""Real photographs that install with scikit-image: a labelled-free image set available offline.

scikit-image ships a handful of classic test photographs inside its wheel (``skimage/data``), so
every machine that installs the project has them, with no download. They are the default images
for fidelity runs and merge pictures; greyscale ones are read as RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from spatialmerge.data.errors import DatasetLayoutError
from spatialmerge.data.folder import ImageFolderUnlabeled

# name -> file in skimage/data: the photographs (not the synthetic, binary or text images).
PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "camera": "camera.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "moon": "moon.png",
    "motorcycle": "motorcycle_left.png",
    "rocket": "rocket.jpg",
}


def skimage_data_dir() -> Path:
    """The folder of images bundled in the installed scikit-image wheel."""
    try:
        import skimage.data
    except ImportError as err:
        raise DatasetLayoutError(
            f"dataset=photos reads the photographs bundled with scikit-image, which is not "
            f"installed ({err}); run: pip install scikit-image"
        ) from None
    return Path(skimage.data.__file__).parent


class SkimagePhotos(ImageFolderUnlabeled):
    """scikit-image's bundled photographs, as an unlabelled image set.

    Args:
        names: which photos, from ``PHOTOS``; None for all 12, in ``PHOTOS`` order.
        transform: applied to the RGB PIL image; without it an item is a (H, W, 3) uint8 array.
    """

    def __init__(self, names: Sequence[str] | None = None, transform: Callable | None = None) -> None:
        chosen = list(PHOTOS) if names is None else list(names)
        unknown = [name for name in chosen if name not in PHOTOS]
        if unknown or not chosen:
            raise ValueError(
                f"dataset.names={chosen!r}: unknown or empty; choose from {', '.join(PHOTOS)} "
                "(or dataset.names=null for all of them)"
            )
        root = skimage_data_dir()
        missing = [PHOTOS[name] for name in chosen if not (root / PHOTOS[name]).is_file()]
        if missing:
            raise DatasetLayoutError(
                f"{', '.join(missing)} not found in {root}: this scikit-image does not ship them; "
                "reinstall it (pip install --force-reinstall scikit-image) or pick other "
                "dataset.names"
            )
        self.root = str(root)
        self.transform = transform
        self.names = chosen
        self.paths = [PHOTOS[name] for name in chosen]
