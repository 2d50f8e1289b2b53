"""Image bytes -> the student's input tensor, as the bundle's manifest declares.

`normalize` is the single numeric definition shared with training: the trainer feeds uint8
images through it, the gateway feeds decoded uploads through it, so both see the same floats.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .bundle import ImagePreprocess
from .errors import InvalidInput, PayloadTooLarge

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def normalize(images: np.ndarray, spec: ImagePreprocess) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W): (x / 255 - mean) / std per channel."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class ImagePreprocessor:
    """Decodes uploads of any size, mode and common format into the manifest's geometry."""

    def __init__(self, spec: ImagePreprocess, max_pixels: int) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        self._resample = _RESAMPLE[spec.resample]

    def decode(self, data: bytes) -> np.ndarray:
        """One encoded image -> uint8 (H, W, C) at the manifest's size."""
        if not data:
            raise InvalidInput("image is empty")
        try:
            with warnings.catch_warnings():
                # Pillow warns before it raises on huge images; our own limit answers first.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
                width, height = img.size
                if width * height > self.max_pixels:
                    raise PayloadTooLarge(
                        f"image is {width}x{height} = {width * height} pixels; "
                        f"the limit is {self.max_pixels}"
                    )
                img.load()
        except UnidentifiedImageError:
            raise InvalidInput(
                f"bytes are not a supported image ({', '.join(ALLOWED_FORMATS)})"
            ) from None
        except Image.DecompressionBombError as exc:
            raise PayloadTooLarge(str(exc)) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidInput(f"image could not be decoded: {exc}") from None
        return self._to_array(img)

    def _to_array(self, img: Image.Image) -> np.ndarray:
        img = ImageOps.exif_transpose(img)
        img = self._flatten_alpha(img)
        img = img.convert("L" if self.spec.channels == 1 else "RGB")
        size = (self.spec.width, self.spec.height)
        if img.size != size:
            img = img.resize(size, self._resample)
        arr = np.asarray(img, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def _flatten_alpha(self, img: Image.Image) -> Image.Image:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (self.spec.background,) * 3 + (255,))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # 16-bit / float images: scale to 8 bits by their own range.
            arr = np.asarray(img, dtype=np.float64)
            hi = arr.max() if arr.size and arr.max() > 0 else 1.0
            return Image.fromarray((arr / hi * 255).clip(0, 255).astype(np.uint8), "L")
        return img

    def __call__(self, blobs: list[bytes]) -> np.ndarray:
        """Encoded images -> float32 NCHW batch. Raises on the first bad one, naming it."""
        arrays = []
        for i, blob in enumerate(blobs):
            try:
                arrays.append(self.decode(blob))
            except (InvalidInput, PayloadTooLarge) as exc:
                if len(blobs) > 1:
                    exc.message = f"inputs[{i}]: {exc.message}"
                raise
        return normalize(np.stack(arrays), self.spec)
