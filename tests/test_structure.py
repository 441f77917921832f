"""The testbed's structure metric on hand-drawn images whose IoU and stray-mark area are known exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from headpag.testbed.data import RELATIONS, RGB, SHADE, SHAPES, SIZES, TEXTURES, Scene, draw, parse_prompt
from headpag.testbed.structure import shape_mask, structure


def canvas(background: str = "blue") -> np.ndarray:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:] = RGB[background]
    return image


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_shapes_drawn_by_the_testbed_fit_their_class(shape, size):
    scene = Scene(size, "red", shape, "blue", "bottom right")
    result = structure(draw(scene, np.random.default_rng(0), jitter=False), scene.prompt)
    assert result.objects[0].iou >= 0.95 and result.stray == 0.0


@pytest.mark.parametrize("texture", TEXTURES)
@pytest.mark.parametrize("color", ["red", "black", "white"])
def test_a_texture_does_not_cut_holes_in_the_object(texture, color):
    scene = Scene("large", color, "circle", "blue", "top left", texture=texture)
    result = structure(draw(scene, np.random.default_rng(0), jitter=False), scene.prompt)
    assert result.objects[0].iou >= 0.95 and result.stray == 0.0


@pytest.mark.parametrize("relation", RELATIONS)
def test_two_drawn_objects_fit_their_classes(relation):
    scene = parse_prompt(f"a red triangle {relation} a white square on a black background")
    result = structure(draw(scene, np.random.default_rng(0), jitter=False), scene.prompt)
    assert [(o.color, o.shape) for o in result.objects] == [("red", "triangle"), ("white", "square")]
    assert min(o.iou for o in result.objects) >= 0.95 and result.stray == 0.0


def test_two_pixel_exact_squares_one_with_a_blob():
    image = canvas()
    image[10:30, 10:30] = RGB["red"]  # the first square (400 pixels)
    image[40:50, 40:50] = RGB["white"]  # the second (100 pixels)
    image[40:50, 4:8] = RGB["white"]  # a detached blob of the second colour (40 pixels)
    image[60:62, 60:62] = RGB["yellow"]  # a mark of neither colour (4 pixels)
    result = structure(Image.fromarray(image), "a red square left of a white square on a blue background")
    assert result.objects[0].iou == pytest.approx(1.0)
    assert result.objects[1].iou == pytest.approx(100 / 140) and result.objects[1].pixels == 140
    assert result.iou == pytest.approx((1.0 + 100 / 140) / 2)
    assert result.stray == pytest.approx(44 / 4096)


def test_a_texture_shade_counts_only_for_a_textured_object():
    image = canvas()
    image[10:30, 10:30] = RGB["red"]
    image[10:30:4, 10:30] = SHADE["red"]  # stripes of the red shade inside the square
    striped = structure(Image.fromarray(image), "a large striped red square on a blue background")
    assert striped.objects[0].iou == pytest.approx(1.0) and striped.stray == 0.0
    plain = structure(Image.fromarray(image), "a large red square on a blue background")
    assert plain.objects[0].iou < 0.9


def test_a_pixel_exact_square_and_a_detached_blob():
    image = canvas()
    image[10:30, 10:30] = RGB["red"]  # the square (400 pixels)
    image[45:55, 45:55] = RGB["red"]  # a detached blob of the same colour (100 pixels)
    result = structure(Image.fromarray(image), "a large red square on a blue background")
    assert result.objects[0].iou == pytest.approx(400 / 500)  # the fitted square is the square itself
    assert result.objects[0].pixels == 500
    assert result.stray == pytest.approx(100 / 4096)  # the blob lies outside the fitted shape


def test_a_mark_of_another_colour_is_stray_and_leaves_the_fit_alone():
    image = canvas()
    image[10:30, 10:30] = RGB["red"]
    image[50:58, 2:10] = RGB["black"]
    result = structure(image, "a large red square on a blue background")
    assert result.objects[0].iou == pytest.approx(1.0) and result.stray == pytest.approx(64 / 4096)


def test_a_missing_object_scores_zero():
    image = canvas()
    image[10:30, 10:30] = RGB["green"]  # the wrong colour
    result = structure(image, "a large red square on a blue background")
    assert result.objects[0].iou == 0.0 and result.objects[0].pixels == 0
    assert result.stray == pytest.approx(400 / 4096)


def test_the_named_class_is_fitted_not_the_drawn_one():
    """A square named as a circle fits worse than as a square; half a circle fits a circle at most half as well."""
    square = Scene("large", "red", "square", "blue", "center")
    image = draw(square, np.random.default_rng(0), jitter=False)
    as_circle = structure(image, "a large red circle on a blue background").objects[0].iou
    assert 0.7 < as_circle < structure(image, square.prompt).objects[0].iou
    disc = shape_mask("circle", (32.0, 32.0), 16.0, (64, 64))
    image = canvas()
    image[disc & (np.arange(64)[:, None] < 32)] = RGB["red"]  # the upper half of a disc
    half_disc = structure(image, "a large red circle on a blue background").objects[0].iou
    assert 0.45 < half_disc < 0.75


def test_shape_masks_have_the_testbeds_areas():
    assert shape_mask("square", (20.0, 20.0), 10 / 0.9, (64, 64)).sum() == 400
    assert shape_mask("circle", (32.0, 32.0), 16.0, (64, 64)).sum() == pytest.approx(np.pi * 16**2, rel=0.02)
    with pytest.raises(ValueError, match="Unknown shape 'star'"):
        shape_mask("star", (1.0, 1.0), 1.0, (8, 8))


def test_the_metric_is_registered_and_scores_images_in_headpag_eval(tmp_path):
    import json

    from headpag.cli import main
    from headpag.eval.registry import load_pair_metric, pair_metric_names

    assert "shapes-structure" in pair_metric_names()
    rng = np.random.default_rng(1)
    scenes = [
        Scene("large", "red", "circle", "blue", "center"),
        Scene("small", "white", "triangle", "black", "top left"),
    ]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, scene in enumerate(scenes):
        draw(scene, rng).save(folder / f"{i}.png")
    image = canvas()  # a third image: right colour, wrong shape and a stray mark
    image[20:44, 20:44] = RGB["red"]
    image[2:6, 2:6] = RGB["white"]
    Image.fromarray(image).save(folder / "2.png")
    prompts = [s.prompt for s in scenes] + ["a large red circle on a blue background"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    metric = load_pair_metric("shapes-structure")
    expected = metric([Image.open(folder / f"{i}.png") for i in range(3)], prompts)
    assert expected[0] > 0.95 and expected[2] < 0.9
    out = tmp_path / "scored"
    argv = ["eval", "--images", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--metrics"]
    assert main([*argv, "shapes-structure", "--output-dir", str(out), "--no-progress"]) == 0
    row = json.loads((out / "report.json").read_text())["configurations"][0]
    assert row["metrics"]["shapes-structure"]["mean"] == pytest.approx(np.mean(expected))
