"""Control preprocessors (Canny edges, scribbles from the canvas, depth only when downloaded) and `--control` parsing."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lcm_live.control import ControlError, DepthEstimator, edges, preprocess, scribble
from lcm_live.presets import parse_controls


def _square(size: int = 128, inside: int = 200, outside: int = 40) -> Image.Image:
    image = Image.new("RGB", (size, size), (outside,) * 3)
    ImageDraw.Draw(image).rectangle((32, 32, 95, 95), fill=(inside,) * 3)
    return image


def _drawing(size=(256, 256), mode="RGB") -> Image.Image:
    """A black outline of a triangle on white paper (or on a transparent canvas for RGBA)."""
    paper = (0, 0, 0, 0) if mode == "RGBA" else "white"
    image = Image.new(mode, size, paper)
    ImageDraw.Draw(image).polygon([(128, 40), (40, 200), (216, 200)], outline="black", width=4)
    return image


def test_edges_trace_the_square_border_white_on_black():
    found = np.asarray(edges(_square()))
    assert found.shape == (128, 128, 3) and set(np.unique(found)) == {0, 255}
    ring = found[28:100, 28:100, 0].copy()
    ring[8:-8, 8:-8] = 0
    assert ring.sum() > 0  # along the border
    assert found[40:88, 40:88].sum() == 0 and found[:20].sum() == 0  # nothing inside or far outside


def test_edge_thresholds_decide_what_counts_as_an_edge():
    faint = _square(inside=70, outside=40)  # a low-contrast square
    assert np.asarray(edges(faint, 10, 30)).any()
    assert not np.asarray(edges(faint, 300, 600)).any()


def test_scribble_inverts_the_strokes_to_white_on_black():
    strokes = np.asarray(scribble(_drawing()))[..., 0] > 127
    assert strokes[200, 128] and strokes[120, 84]  # the base and the left side of the triangle
    assert not strokes[0, 0] and not strokes[150, 128]  # the paper, outside and inside, is black


def test_scribble_reads_a_transparent_canvas_as_blank_paper():
    ours = np.asarray(scribble(_drawing(mode="RGBA")))
    assert np.array_equal(ours, np.asarray(scribble(_drawing())))


def test_scribble_at_a_side_keeps_thin_strokes_solid():
    image = Image.new("RGB", (512, 512), "white")
    ImageDraw.Draw(image).line([(0, 256), (511, 256)], fill="black", width=2)  # 2 px of 512
    small = np.asarray(scribble(image, side=64))
    assert small.shape == (64, 64, 3)
    assert (small[31:34, :, 0] == 255).any(axis=0).all()  # an unbroken white line across
    assert small[:28].max() == 0 and small[36:].max() == 0


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (Image.new("RGB", (64, 64), "white"), "The drawing is empty"),
        (Image.new("I;16", (64, 64)), "is a I;16 image"),
        (Image.new("CMYK", (64, 64)), "is a CMYK image"),
        (Image.new("RGB", (8, 64)), "is 8x64; each side must be from 16"),
        (Image.new("RGB", (640, 64)), "more than 4 times as long"),
        (b"not an image", "must be an image; got bytes"),
    ],
)
def test_bad_drawings_get_one_clear_message(image, message):
    with pytest.raises(ControlError, match=message):
        scribble(image)


def test_bad_thresholds_and_unknown_controls_are_refused():
    with pytest.raises(ControlError, match="low <= high"):
        edges(_square(), 200, 100)
    with pytest.raises(ControlError, match="Unknown control 'pose'"):
        preprocess("pose", _square())


def test_a_depth_model_that_is_not_downloaded_gives_one_clear_message():
    estimator = DepthEstimator("nobody/no-such-depth-model")
    with pytest.raises(ControlError, match="'nobody/no-such-depth-model' is not available.*hf download"):
        estimator(_square())


def test_control_flags_parse_presets_sources_and_names():
    assert parse_controls("scribble, edges") == (("scribble", None), ("edges", None))
    assert parse_controls("depth=/models/my-depth") == (("depth", "/models/my-depth"),)
    assert parse_controls("lllyasviel/control_v11p_sd15_canny") == (("edges", "lllyasviel/control_v11p_sd15_canny"),)
    assert parse_controls(None) == ()
    with pytest.raises(ValueError, match="say which control it is"):
        parse_controls("someone/controlnet")
    with pytest.raises(ValueError, match="the control must be one of"):
        parse_controls("pose=someone/openpose")
    with pytest.raises(ValueError, match="names a control twice"):
        parse_controls("scribble,scribble=x")
