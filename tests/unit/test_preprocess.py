import io

import numpy as np
import pytest
from PIL import Image

from cascade_server.bundle import ImagePreprocess
from cascade_server.errors import InvalidInput, PayloadTooLarge
from cascade_server.preprocess import ImagePreprocessor, normalize

GREY = ImagePreprocess(height=8, width=8, channels=1, mean=(0.5,), std=(0.5,))
RGB = ImagePreprocess(height=4, width=6, channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_normalize_matches_the_formula_and_layout():
    x = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(1, 4, 6, 3)
    out = normalize(x, RGB)
    assert out.dtype == np.float32 and out.shape == (1, 3, 4, 6)
    expected = (x[0, 2, 5, 1] / 255.0 - 0.2) / 0.6
    assert out[0, 1, 2, 5] == pytest.approx(expected, rel=1e-6)


def test_normalize_rejects_floats():
    with pytest.raises(ValueError, match="uint8"):
        normalize(np.zeros((1, 8, 8, 1), np.float32), GREY)


def test_greyscale_png_at_model_size_is_lossless():
    arr = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    batch = ImagePreprocessor(GREY, 10_000)([encode(Image.fromarray(arr, "L"))])
    np.testing.assert_allclose(batch[0, 0], (arr / 255.0 - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16", "1"])
@pytest.mark.parametrize("size", [(8, 8), (28, 28), (300, 17)])
def test_any_mode_and_size_becomes_the_manifest_shape(mode, size):
    img = Image.new("RGB", size, (200, 100, 50)).convert(mode)
    for spec, shape in ((GREY, (1, 1, 8, 8)), (RGB, (1, 3, 4, 6))):
        assert ImagePreprocessor(spec, 10**6)([encode(img)]).shape == shape


def test_jpeg_and_bmp_decode():
    img = Image.new("RGB", (16, 16), (255, 255, 255))
    for fmt in ("JPEG", "BMP", "GIF", "WEBP"):
        out = ImagePreprocessor(GREY, 10**6)([encode(img, fmt)])
        assert out.max() == pytest.approx(1.0, abs=0.02)  # white -> (1 - 0.5) / 0.5


def test_transparent_pixels_take_the_background_grey():
    img = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    black = ImagePreprocessor(GREY, 10**6)([encode(img)])
    assert black.max() == pytest.approx(-1.0)
    white_bg = GREY.model_copy(update={"background": 255})
    assert ImagePreprocessor(white_bg, 10**6)([encode(img)]).min() == pytest.approx(1.0)


def test_not_an_image_is_invalid_input():
    with pytest.raises(InvalidInput, match="not a supported image"):
        ImagePreprocessor(GREY, 10**6)([b"definitely not a png"])


def test_truncated_image_is_invalid_input():
    data = encode(Image.new("L", (64, 64), 7))
    with pytest.raises(InvalidInput):
        ImagePreprocessor(GREY, 10**6)([data[: len(data) // 2]])


def test_empty_is_invalid_input():
    with pytest.raises(InvalidInput, match="empty"):
        ImagePreprocessor(GREY, 10**6)([b""])


def test_pixel_limit_is_checked_before_decoding():
    data = encode(Image.new("L", (200, 100)))
    with pytest.raises(PayloadTooLarge, match="200x100 = 20000 pixels; the limit is 19999"):
        ImagePreprocessor(GREY, 19_999)([data])
    assert ImagePreprocessor(GREY, 20_000)([data]).shape == (1, 1, 8, 8)


def test_batch_error_names_the_bad_item():
    good = encode(Image.new("L", (8, 8)))
    with pytest.raises(InvalidInput, match=r"inputs\[1\]"):
        ImagePreprocessor(GREY, 10**6)([good, b"junk", good])
