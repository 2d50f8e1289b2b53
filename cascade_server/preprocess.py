"""Request inputs -> the student's input tensors, as the bundle's manifest declares.

Images: `normalize` is the single numeric definition shared with training (the trainer feeds
uint8 images through it, the gateway decoded uploads). Texts: `encode_texts` is the single
tokenisation path, used by the trainer and the gateway with the bundle's tokenizer.json.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .bundle import TEXT_INPUTS, ImagePreprocess, TextPreprocess
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


_ORIENTATION = 0x0112


def _upright(img: Image.Image) -> Image.Image:
    """Applies the EXIF orientation, if any. A broken EXIF block is ignored (the pixels are
    still an image), not a reason to refuse the upload."""
    try:
        if img.getexif().get(_ORIENTATION, 1) == 1:
            return img
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


_POSSIBLE_BOMB = re.compile(r"\((\d+) pixels\)")
_SOS = b"\xff\xda"  # JPEG start-of-scan marker


@dataclass
class Plan:
    """A request's inputs, checked (every size limit and format answered before any pixel is
    decoded) and ready to turn into a Batch. `inline`: cheap enough to run on the event loop;
    otherwise the caller runs `run` on a worker thread (Pillow and tokenizers release the GIL)."""

    run: Callable[[], Batch]
    inline: bool


class ImagePreprocessor:
    """Decodes uploads of any size, mode and common format into the manifest's geometry.

    The decode work of one request is bounded before it starts: pixels per image and per
    request, and (JPEG) the number of scans, since a progressive JPEG's cost is pixels times
    scans (a 178 KB file with 2,000 scans of 4096x4096 costs seconds). A request holding more
    than `inline_pixels` pixels or `inline_bytes` encoded bytes is decoded off the event loop.
    """

    modality = "image"

    def __init__(
        self,
        spec: ImagePreprocess,
        max_pixels: int,
        max_request_pixels: int | None = None,
        *,
        max_jpeg_scans: int = 64,
        inline_pixels: int = 256 * 256,
        inline_bytes: int = 64 * 1024,
    ) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        # Decoded pixels allowed across one request's images (a batch of large images costs
        # seconds of CPU even when each is under the per-image limit).
        self.max_request_pixels = max_request_pixels or max_pixels
        self.max_jpeg_scans = max_jpeg_scans
        self.inline_pixels = inline_pixels
        self.inline_bytes = inline_bytes
        self._resample = _RESAMPLE[spec.resample]

    def open(self, data: bytes, budget: list[int] | None = None) -> Image.Image:
        """One encoded image's header, checked against every limit; no pixel decoded yet.
        `budget`: the request's remaining pixel allowance, spent here (a one-element list)."""
        if not data:
            raise InvalidInput("image is empty")
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise InvalidInput(
                f"bytes are not a supported image ({', '.join(ALLOWED_FORMATS)})"
            ) from None
        except Image.DecompressionBombError as exc:
            # Pillow's own (much larger) limit answered first: quote ours, not Pillow's.
            found = _POSSIBLE_BOMB.search(str(exc))
            size = f"{found.group(1)} pixels" if found else "more pixels than Pillow allows"
            raise PayloadTooLarge(
                f"image holds {size}; the limit (CASCADE_MAX_IMAGE_PIXELS) is {self.max_pixels}"
            ) from None
        except Exception as exc:  # any other failure of a decoder on untrusted bytes
            raise InvalidInput(f"image could not be decoded: {exc}") from None
        width, height = img.size
        if width * height > self.max_pixels:
            raise PayloadTooLarge(
                f"image is {width}x{height} = {width * height} pixels; "
                f"the limit (CASCADE_MAX_IMAGE_PIXELS) is {self.max_pixels}"
            )
        if budget is not None:
            budget[0] -= width * height
            if budget[0] < 0:
                raise PayloadTooLarge(
                    f"the request's images hold more than {self.max_request_pixels} "
                    "pixels in all (CASCADE_MAX_REQUEST_PIXELS); send fewer or smaller images"
                )
        if img.format in ("JPEG", "MPO"):  # an MPO is a JPEG with an MPF header: frame 0 too
            # Counts start-of-scan markers anywhere in the file (an embedded EXIF thumbnail's
            # too): an upper bound on the scans, found without decoding.
            scans = data.count(_SOS)
            if scans > self.max_jpeg_scans:
                raise PayloadTooLarge(
                    f"JPEG has {scans} scans; the limit (CASCADE_MAX_JPEG_SCANS) is "
                    f"{self.max_jpeg_scans}"
                )
        return img

    def load(self, img: Image.Image) -> np.ndarray:
        """An opened image -> uint8 (H, W, C) at the manifest's size."""
        try:
            img.load()
            # Mode conversion and resizing stay inside: a file Pillow opened can still fail
            # there (odd modes, truncated data), and that is the client's bad input too.
            return self._to_array(img)
        except Image.DecompressionBombError as exc:
            raise PayloadTooLarge(str(exc)) from None
        except Exception as exc:  # any other failure of a decoder on untrusted bytes
            raise InvalidInput(f"image could not be decoded: {exc}") from None

    def decode(self, data: bytes, budget: list[int] | None = None) -> np.ndarray:
        """One encoded image -> uint8 (H, W, C) at the manifest's size."""
        with warnings.catch_warnings():
            _ignore_pillow_warnings()
            return self.load(self.open(data, budget))

    def _to_array(self, img: Image.Image) -> np.ndarray:
        img = _upright(img)
        img = self._flatten_alpha(img)
        img = img.convert("L" if self.spec.channels == 1 else "RGB")
        size = (self.spec.width, self.spec.height)
        if img.size != size:
            img = img.resize(size, self._resample)
        arr = np.frombuffer(img.tobytes(), dtype=np.uint8)
        return arr.reshape(img.height, img.width, self.spec.channels)

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

    def plan(self, items: list) -> Plan:
        """Checks every image's header and the request's limits now. Images are decoded as they
        are checked while the request stays cheap (`inline`); once it is not, the rest are
        left to `run`, for a thread."""
        if not all(isinstance(x, bytes) for x in items):
            raise InvalidInput("this cascade takes images")
        budget = [self.max_request_pixels]
        inline = sum(map(len, items)) <= self.inline_bytes
        opened: list[Image.Image] = []
        arrays: list[np.ndarray] = []
        n = len(items)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # see _ignore_pillow_warnings
            for i, blob in enumerate(items):
                try:
                    img = self.open(blob, budget)
                    if inline and self.max_request_pixels - budget[0] > self.inline_pixels:
                        inline = False  # from here on, decoding is for a thread
                    if inline:
                        arrays.append(self.load(img))
                    else:
                        opened.append(img)
                except (InvalidInput, PayloadTooLarge) as exc:
                    _name_input(exc, i, n)
                    raise
            if inline:
                batch = Batch({"input": normalize(np.stack(arrays), self.spec)}, None)
                return Plan(lambda: batch, inline=True)
        done = len(arrays)

        def run() -> Batch:
            with warnings.catch_warnings():
                _ignore_pillow_warnings()
                for j, img in enumerate(opened):
                    try:
                        arrays.append(self.load(img))
                    except (InvalidInput, PayloadTooLarge) as exc:
                        _name_input(exc, done + j, n)
                        raise
            return Batch({"input": normalize(np.stack(arrays), self.spec)}, None)

        return Plan(run, inline=False)

    def __call__(self, blobs: list[bytes]) -> np.ndarray:
        """Encoded images -> float32 NCHW batch. Raises on the first bad one, naming it."""
        return self.prepare(blobs).tensors["input"]

    def prepare(self, items: list) -> Batch:
        return self.plan(items).run()

    def sample(self) -> bytes:
        """A valid input, for warming up the codecs and the student."""
        buf = io.BytesIO()
        Image.new("L", (self.spec.width, self.spec.height)).save(buf, "PNG")
        return buf.getvalue()


def _ignore_pillow_warnings() -> None:
    """Inside a warnings context: Pillow warns before it raises on huge images (our own limit
    answers first) and on corrupt metadata such as a broken EXIF block (ignored: the pixels
    are fine)."""
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    warnings.simplefilter("ignore", UserWarning)


def _name_input(exc: InvalidInput | PayloadTooLarge, i: int, n: int) -> None:
    """Prefixes an input error with `inputs[i]: ` when the request was a batch."""
    if n > 1:
        exc.message = f"inputs[{i}]: {exc.message}"


@dataclass
class Batch:
    """Model inputs for a batch (canonical names: `input` for images, `input_ids` and
    `attention_mask` for texts) and, for texts, which inputs were truncated."""

    tensors: dict[str, np.ndarray]
    truncated: list[bool] | None

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.tensors.items()}

    @classmethod
    def concat(cls, batches: Sequence[Batch]) -> Batch:
        """Several requests' batches as one (same preprocessing, so same shapes)."""
        if len(batches) == 1:
            return batches[0]
        tensors = {k: np.concatenate([b.tensors[k] for b in batches]) for k in batches[0].tensors}
        truncated = None
        if batches[0].truncated is not None:
            truncated = [t for b in batches for t in (b.truncated or ())]
        return cls(tensors, truncated)


class Preprocessor(Protocol):
    """The preprocessing stage: request inputs -> a Batch; raises InvalidInput (naming the
    input) or PayloadTooLarge before any model runs."""

    modality: str

    def plan(self, items: list) -> Plan: ...
    def prepare(self, items: list) -> Batch: ...
    def sample(self) -> bytes | str: ...


def load_tokenizer(path: Path, spec: TextPreprocess) -> Any:
    """The bundle's tokenizer, truncating and padding as the manifest says."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(spec.max_length)
    tok.enable_padding(
        length=spec.max_length,
        pad_id=spec.pad_id,
        pad_token=tok.id_to_token(spec.pad_id) or "[PAD]",
    )
    return tok


def encode_texts(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """Texts -> (input_ids, attention_mask) int64 (N, max_length), and which were truncated."""
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask, [bool(e.overflowing) for e in encodings]


class TextPreprocessor:
    modality = "text"

    def __init__(
        self,
        spec: TextPreprocess,
        tokenizer_path: Path,
        max_chars: int,
        inline_chars: int = 4096,
    ) -> None:
        self.spec = spec
        self.max_chars = max_chars
        self.inline_chars = inline_chars
        self.tokenizer = load_tokenizer(tokenizer_path, spec)
        # Ids that carry no word: padding, unknown, and the special tokens the tokenizer adds.
        specials = [self.tokenizer.token_to_id(t) for t in ("[UNK]", "[CLS]", "[SEP]", "<unk>")]
        self._wordless = np.array(
            sorted({spec.pad_id, *(i for i in specials if i is not None)}), dtype=np.int64
        )

    def validate(self, text: object) -> str:
        if not isinstance(text, str):
            raise InvalidInput("text must be a string")
        if not text.strip():
            raise InvalidInput("text is empty or whitespace only")
        if len(text) > self.max_chars:
            raise PayloadTooLarge(f"text has {len(text)} characters; the limit is {self.max_chars}")
        return text

    def prepare(self, items: list) -> Batch:
        return self._tokenize(self._validated(items), len(items))

    def _validated(self, items: list) -> list[str]:
        texts = []
        for i, item in enumerate(items):
            try:
                texts.append(self.validate(item))
            except (InvalidInput, PayloadTooLarge) as exc:
                _name_input(exc, i, len(items))
                raise
        return texts

    def _tokenize(self, texts: list[str], n: int) -> Batch:
        ids, mask, truncated = encode_texts(self.tokenizer, texts)
        # A text with no word the tokenizer knows ("12345", emoji, "...") is all [UNK] to the
        # student and the teacher alike: any answer would be a guess with a confident margin.
        wordless = np.isin(ids, self._wordless).all(axis=1)
        if wordless.any():
            i = int(np.flatnonzero(wordless)[0])
            where = f"inputs[{i}]: " if n > 1 else ""
            raise InvalidInput(
                f"{where}text has no word this cascade's vocabulary knows (only unknown "
                "tokens: digits, symbols, emoji or another script?)"
            )
        return Batch(dict(zip(TEXT_INPUTS, (ids, mask), strict=True)), truncated)

    def plan(self, items: list) -> Plan:
        """Every text checked now; short requests tokenised at once (cheaper than a thread
        hop), longer ones (`inline_chars` in all: up to CASCADE_MAX_BATCH x
        CASCADE_MAX_TEXT_CHARS) on a thread (the tokenizer releases the GIL)."""
        texts = self._validated(items)
        if sum(map(len, texts)) <= self.inline_chars:
            batch = self._tokenize(texts, len(texts))
            return Plan(lambda: batch, inline=True)
        return Plan(lambda: self._tokenize(texts, len(texts)), inline=False)

    def sample(self) -> str:
        return "warm up"
