"""Pictures of merges: cell maps that partition the grid, outlines, the visualize CLI."""

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import spatialmerge
from spatialmerge.models import build_model
from spatialmerge.reporting.pictures import (
    assignment_grid,
    cell_borders,
    cell_map,
    cell_sizes,
    fidelity_levels,
    fidelity_scale_floor,
    merge_figure,
    prepare_image,
    render_cells,
)

TINY_SAM = dict(image_size=128, depth=2, embed_dim=32, num_heads=2, global_attn_indexes=[1], window_size=4)
TINY_OVERRIDES = ["model=sam_b_random", *(f"+model.{k}={v}".replace(" ", "") for k, v in TINY_SAM.items())]
# Expedit-SAM's k=36 is more centroids than a tiny 3x3-per-window clustering has
TINY_K = {"expedite": {"k": 4}}


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    return build_model("sam_b", **TINY_SAM)


@pytest.fixture(scope="module")
def image_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).resize((128, 128)).save(path)
    return path


def test_cell_borders_outline_both_sides_of_every_edge():
    labels = np.array([[0, 0, 1], [0, 0, 1], [2, 2, 2]])
    expected = np.array([[0, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=bool)
    assert (cell_borders(labels) == expected).all()
    assert not cell_borders(np.zeros((4, 4), dtype=int)).any()


def test_assignment_grid_rejects_maps_that_do_not_fit():
    assert assignment_grid(torch.tensor([0, 1, 1, 2]), (2, 2), 3).tolist() == [[0, 1], [1, 2]]
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        assignment_grid(np.arange(6), (2, 2), 6)
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        assignment_grid(np.array([0, 1, 2, 3]), (2, 2), 3)


def test_render_tints_merged_cells_and_leaves_single_patches_alone():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 0], [1, 2]])  # token 0 holds two patches; 1 and 2 one each
    out = render_cells(image, labels, tokens=3)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[2:, :] == 100).all(), "single patches keep the image"
    assert (out[:2, :] != 100).any(axis=-1).all(), "the merged cell is tinted or outlined"


@pytest.mark.parametrize("method", ["cubist", "tome", "expedite", "oracle", "pool"])
def test_cell_map_covers_every_patch_exactly_once(tiny_sam, image_png, method):
    _, x = prepare_image(tiny_sam, Image.open(image_png))
    found = cell_map(tiny_sam, x, {"method": method, "loc": 1, "ratio": 0.25, **TINY_K.get(method, {})})
    assert found.labels.shape == (8, 8) and found.out_hw == (6, 6) and found.tokens == 36
    sizes = cell_sizes(found.labels, found.tokens)
    assert sizes.sum() == 64, "every patch is in exactly one cell"
    if method in ("cubist", "tome"):
        assert set(found.labels.ravel().tolist()) == set(range(36)), "every token holds a patch"
    assert found.features.shape == (1, 256, 8, 8)
    assert spatialmerge.patch_state(tiny_sam) is None, "the model is unpatched afterwards"


def test_figure_shows_each_panel_pixel_for_pixel(tiny_sam, image_png, tmp_path):
    image = Image.open(image_png)
    merges = [{"method": m, "loc": 1, "ratio": 0.25, **TINY_K.get(m, {})} for m in ("cubist", "tome", "expedite")]
    maps = merge_figure(tiny_sam, image, merges, tmp_path / "fig.png", "title", fidelity=True)
    pixels, _ = prepare_image(tiny_sam, image)
    figure = np.asarray(Image.open(tmp_path / "fig.png").convert("RGB"))
    assert figure.shape[0] >= 2 * 128 and figure.shape[1] >= 3 * 128
    for column, found in enumerate(maps):
        panel = render_cells(pixels, found.labels, found.tokens)
        x0 = 8 + column * (128 + 8)  # save_panels' default padding
        hits = [y for y in range(figure.shape[0] - 127) if (figure[y : y + 128, x0 : x0 + 128] == panel).all()]
        assert hits, f"the {found.method} panel is not drawn at its own size"


@pytest.mark.slow
def test_visualize_cli_accepts_eval_overrides(image_png, tmp_path, visualize_cli, capsys, monkeypatch):
    out = tmp_path / "merges.png"
    args = [str(image_png), *TINY_OVERRIDES, "merge.loc=1", "merge.ratio=0.25", "--methods", "cubist,tome,pool",
            "--out", str(out)]
    assert visualize_cli(args) == 0
    with Image.open(out) as png:
        assert png.size[0] >= 3 * 128 and png.size[1] >= 128
    assert "cubist: 36 tokens of 64" in capsys.readouterr().out
    assert visualize_cli([*args[:-4], "merge=tome", "--out", str(tmp_path / "one.png")]) == 0
    with Image.open(tmp_path / "one.png") as png:
        assert 128 <= png.size[0] < 2 * 128, "merge=X alone draws X only"
    assert visualize_cli([*args[:-2], "--panel-width", "64", "--out", str(tmp_path / "small.png")]) == 0
    with Image.open(tmp_path / "small.png") as png:
        assert 3 * 64 <= png.size[0] < 3 * 128
    capsys.readouterr()
    assert visualize_cli(args) == 1 and "never overwrites a file" in capsys.readouterr().err
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    # no --out: a run directory of its own under the project's logs/, not the current directory
    assert visualize_cli([*args[:-2], f"paths.root_dir={tmp_path / 'repo'}"]) == 0
    (written,) = (tmp_path / "repo" / "logs" / "visualize").glob(f"*/{image_png.stem}_merges.png")
    assert not list((tmp_path / "cwd").iterdir())
    assert f"wrote {written}" in capsys.readouterr().out


def test_the_fidelity_colour_scale_separates_cosines_near_one_and_ignores_a_few_outliers():
    levels = fidelity_levels(np.array([0.9, 0.97, 0.99, 0.999, 1.0, -0.1]))
    np.testing.assert_allclose(levels[:5], [1.0, -np.log10(0.03), 2.0, 3.0, 3.0])
    assert levels[2] - levels[1] > 0.4, "0.97 and 0.99 are far apart on the scale"
    cosines = np.full((10, 10), 0.98)
    cosines[0, :2] = -0.1  # 2 of 200 patches
    floor = fidelity_scale_floor([fidelity_levels(cosines), fidelity_levels(np.full((10, 10), 0.99))])
    assert floor == pytest.approx(-np.log10(0.02)), "the outliers do not set the scale"
    assert fidelity_scale_floor([fidelity_levels(np.ones((4, 4)))]) == 2.0, "a lossless merge keeps a scale"



def test_visualize_cli_explains_a_bad_schedule(image_png, visualize_cli, capsys):
    assert visualize_cli([str(image_png), *TINY_OVERRIDES, "merge.loc=1", "merge.ratio=0.6"]) == 1
    assert "ratio=0.6" in capsys.readouterr().err


def test_a_sam2_cell_map_is_drawn_on_the_hiera_stage_it_merged(image_png, tmp_path):
    trunk = {"embed_dim": 8, "num_heads": 1, "stages": [1, 1, 4, 1], "global_att_blocks": [4],
             "window_spec": [8, 4, 14, 7], "window_pos_embed_bkg_spatial_size": [7, 7]}
    torch.manual_seed(0)
    sam2 = build_model("sam2_t", trunk=trunk)
    pixels, x = prepare_image(sam2, Image.open(image_png))
    assert pixels.shape == (1024, 1024, 3), "SAM 2's 1024 x 1024 input"
    found = cell_map(sam2, x, {"method": "cubist", "loc": 3, "ratio": 0.125, "align": "window"})
    # stage 3's 64x64 grid (16 px cells) -> 56x56 tokens; the features are its FPN level
    assert found.labels.shape == (64, 64) and found.out_hw == (56, 56) and found.tokens == 3136
    assert set(found.labels.ravel().tolist()) == set(range(3136))
    assert found.features.shape == (1, 256, 64, 64)
    assert spatialmerge.patch_state(sam2) is None


@pytest.mark.slow
def test_a_16_bit_greyscale_photo_is_drawn_grey_not_white(tmp_path, visualize_cli):
    grey = np.full((64, 64), 30000, dtype=np.uint16)  # 46% of the 16-bit range
    Image.fromarray(grey).save(tmp_path / "scan.png")
    out = tmp_path / "scan_merges.png"
    args = [str(tmp_path / "scan.png"), *TINY_OVERRIDES, "merge.loc=1", "merge.ratio=0.25", "--methods", "pool",
            "--out", str(out)]
    assert visualize_cli(args) == 0
    figure = np.asarray(Image.open(out).convert("RGB"))
    untouched = figure[figure.sum(-1) < 3 * 250]  # drop the white margins
    assert np.median(untouched) == pytest.approx(30000 * 255 / 65535, abs=25), "scaled to 8 bits, not clipped"
