"""The embedded model's scribble ControlNet: its training data drawn from the world's geometry, and, where it ships,
the judge: the generated shape lies where the outline was drawn, in the colours the prompt asks for."""

import numpy as np
import pytest

from lcm_live.demo_model.control import ControlTrainConfig, evaluate_control, filled, iou, outline, scenes, shape_masks
from lcm_live.presets import EMBEDDED_MODEL


def test_outlines_are_strokes_on_the_shapes_border():
    masks = shape_masks(np.array([0, 1, 2]), [20, 32, 44], [20, 32, 40], [8, 10, 12])
    strokes = outline(masks, np.array([1, 2, 3]))
    assert (strokes <= masks).all()  # inside each shape
    assert not strokes[0, 20, 20] and strokes[0, 20, 12]  # a circle's centre is empty, its left edge drawn
    for mask, stroke in zip(masks, strokes):
        assert iou(filled(stroke), mask) > 0.95  # the filled outline is the shape again


def test_training_scenes_pair_each_outline_with_its_scene():
    images, strokes, captions = scenes(np.random.default_rng(0), 6, ControlTrainConfig(caption_drop=0.0))
    assert images.shape == strokes.shape == (6, 64, 64, 3) and len(captions) == 6
    assert set(np.unique(strokes)) == {0, 255}
    for image, stroke in zip(images, strokes):
        region = filled(stroke[..., 0] > 0)
        background = image[0, 0]
        shape = (image != background).any(-1)
        assert iou(region, shape) > 0.6  # the drawing is a little off the scene, by design


def test_iou_counts_overlap_over_union():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, np.zeros_like(a)) == 0.0


@pytest.mark.skipif(not (EMBEDDED_MODEL / "controlnet-scribble" / "config.json").exists(),
                    reason="the embedded model's scribble ControlNet is not in assets/")  # fmt: skip
def test_the_shipped_scribble_control_puts_the_shape_where_it_was_drawn(cpu32):
    from lcm_live.engine import Engine
    from lcm_live.presets import PRESETS

    engine = Engine.load(PRESETS["demo"], cpu32, warmup=False)
    scores = evaluate_control(engine, n=30, seed=11)
    assert scores["iou_on"] >= 0.7, scores
    assert scores["iou_off"] < scores["iou_on"] - 0.2, scores  # without the control the prompt alone decides
    assert scores["colours_on"] >= 0.9, scores
