"""The toy ImageFolder of photo crops that the README's offline fine-tune trains on."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialmerge.data import imagenet_dataset
from spatialmerge.data.toy import main, write_photo_classes


def test_each_class_is_crops_of_its_photo_in_both_splits(tmp_path):
    root = write_photo_classes(tmp_path / "toy", ("astronaut", "coffee"), train_per_class=3, val_per_class=2, side=32)
    for split, count in (("train", 3), ("val", 2)):
        dataset = imagenet_dataset(root, split=split)
        assert dataset.classes == ["astronaut", "coffee"] and len(dataset) == 2 * count
    with Image.open(root / "val" / "coffee" / "0.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    crops = [np.asarray(Image.open(p)) for p in sorted((root / "train" / "astronaut").glob("*.png"))]
    assert not np.array_equal(crops[0], crops[1]), "random crops, not one image repeated"
    again = write_photo_classes(tmp_path / "again", ("astronaut", "coffee"), 3, 2, 32)
    assert np.array_equal(np.asarray(Image.open(again / "train" / "astronaut" / "0.png")), crops[0]), "seeded"


def test_it_never_writes_into_a_directory_with_files(tmp_path, capsys):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        write_photo_classes(tmp_path / "toy")
    assert main([str(tmp_path / "toy")]) == 1 and "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["mine.txt"]


@pytest.mark.parametrize(("classes", "message"), [(("astronaut",), "at least 2"), (("astronaut", "dog"), "dog is not one")])
def test_unknown_or_too_few_classes_are_refused(tmp_path, classes, message):
    with pytest.raises(ValueError, match=message):
        write_photo_classes(tmp_path / "toy", classes)
    assert not Path(tmp_path / "toy").exists()
