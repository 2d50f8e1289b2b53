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
    limit = r"200x100 = 20000 pixels; the limit \(CASCADE_MAX_IMAGE_PIXELS\) is 19999"
    with pytest.raises(PayloadTooLarge, match=limit):
        ImagePreprocessor(GREY, 19_999)([data])
    assert ImagePreprocessor(GREY, 20_000)([data]).shape == (1, 1, 8, 8)


def test_batch_error_names_the_bad_item():
    good = encode(Image.new("L", (8, 8)))
    with pytest.raises(InvalidInput, match=r"inputs\[1\]"):
        ImagePreprocessor(GREY, 10**6)([good, b"junk", good])


def progressive_jpeg(size=(64, 64), scans_file=None) -> bytes:
    """A progressive JPEG (Pillow's encoder writes a handful of scans)."""
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8))
    return encode(img, "JPEG", progressive=True, quality=90)


def with_repeated_scans(data: bytes, extra: int) -> bytes:
    """The scan-bomb shape: the last scan of a progressive JPEG repeated `extra` times (a
    decoder runs every one, costing pixels x scans)."""
    last = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * extra + data[end:]


def test_a_progressive_jpeg_with_too_many_scans_is_refused_before_decoding(monkeypatch):
    pre = ImagePreprocessor(RGB, 10**6, max_jpeg_scans=64)
    normal = progressive_jpeg()
    scans = normal.count(b"\xff\xda")
    assert 1 < scans <= 64  # a real encoder's progressive JPEG passes
    assert pre([normal]).shape == (1, 3, 4, 6)
    bomb = with_repeated_scans(normal, 200)
    loads = []
    monkeypatch.setattr(pre, "load", lambda img: loads.append(img))
    with pytest.raises(PayloadTooLarge, match=r"JPEG has \d+ scans; the limit \(CASCADE_MAX_JPEG"):
        pre.plan([bomb])
    assert loads == []  # refused from the header, no pixel decoded


def test_an_mpo_scan_bomb_is_refused_like_a_jpeg():
    """An MPO (a JPEG with an MPF header, frames after it) opens as format "MPO", not "JPEG";
    its first frame's scans cost the same and count against the same limit."""
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "MPO", save_all=True, append_images=[img], progressive=True)
    mpo = buf.getvalue()
    end = mpo.index(b"\xff\xd9")  # the first frame's end
    last = mpo.rindex(b"\xff\xda", 0, end)
    bomb = mpo[:end] + mpo[last:end] * 200 + mpo[end:]
    assert Image.open(io.BytesIO(bomb)).format == "MPO"
    pre = ImagePreprocessor(RGB, 10**6, max_jpeg_scans=64)
    assert pre([mpo]).shape == (1, 3, 4, 6)
    with pytest.raises(PayloadTooLarge, match=r"JPEG has \d+ scans"):
        pre.plan([bomb])


def test_the_scan_limit_is_the_operators():
    bomb = with_repeated_scans(progressive_jpeg(), 100)
    assert ImagePreprocessor(RGB, 10**6, max_jpeg_scans=1000)([bomb]).shape == (1, 3, 4, 6)
    with pytest.raises(PayloadTooLarge):
        ImagePreprocessor(RGB, 10**6, max_jpeg_scans=64)([bomb])


def test_a_huge_image_quotes_our_limit_not_pillows():
    """Pillow refuses a 100000x100000 header itself (its own bomb check); the message names the
    gateway's limit, which is what the operator can change."""
    from ..conftest import huge_png_header

    png = huge_png_header()
    with pytest.raises(PayloadTooLarge) as err:
        ImagePreprocessor(GREY, 4096 * 4096)([png])
    assert "CASCADE_MAX_IMAGE_PIXELS" in err.value.message and "16777216" in err.value.message
    assert "10000000000 pixels" in err.value.message


def test_plan_decodes_inline_only_small_requests():
    small = encode(Image.new("L", (8, 8)))
    wide = encode(Image.new("L", (600, 600)))  # a few hundred bytes, 360,000 pixels
    pre = ImagePreprocessor(GREY, 10**7, inline_pixels=256 * 256, inline_bytes=64 * 1024)
    assert pre.plan([small]).inline
    assert len(wide) < 64 * 1024 and not pre.plan([wide]).inline  # pixels, not bytes, decide
    assert not ImagePreprocessor(GREY, 10**7, inline_bytes=len(small)).plan([small] * 2).inline
    assert pre.plan([small, small]).run().tensors["input"].shape == (2, 1, 8, 8)
