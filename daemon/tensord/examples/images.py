"""Decoding encoded images (JPEG, PNG, anything Pillow reads) into fixed-size RGB tensors."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..contract.errors import BadInputError

# A 48-megapixel phone photo is 8000x6000; past this, decoding one image would take more
# memory and time than a serving process should spend on a single request item.
DEFAULT_MAX_PIXELS = 64_000_000


def decode_center_crop(
    data: bytes, size: int, crop_padding: int, index: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Decode `data` into a uint8 [size, size, 3] (HWC) tensor the way TensorFlow's EfficientNet
    evaluation does: a centred square crop of size/(size+crop_padding) of the shorter side,
    resized with bicubic filtering. `index` names the item in errors."""
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadInputError(f"image {index} ({len(data)} bytes, starting {data[:8]!r}): "
                            "unrecognised or corrupt image data (this model decodes JPEG, "
                            "PNG, WebP, GIF, BMP, TIFF)") from None
    except Exception as e:  # a recognised format with a broken header: OSError, SyntaxError...
        raise BadInputError(f"image {index} ({len(data)} bytes): not a decodable image: "
                            f"{_reason(e)}") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise BadInputError(f"image {index}: {w}x{h} pixels, more than the "
                                f"{max_pixels} this model decodes")
        try:
            # JPEG only: decode at 1/2, 1/4 or 1/8 scale while the crop still covers `size`
            # pixels; a 12-megapixel photo then decodes several times faster.
            im.draft("RGB", (size + crop_padding, size + crop_padding))
            rgb = ImageOps.exif_transpose(im).convert("RGB")  # phones store rotation in EXIF
        except Exception as e:  # truncated or corrupt data surfaces only when decoding
            raise BadInputError(f"image {index} ({im.format} {w}x{h}): cannot decode: "
                                f"{_reason(e)}") from None
    w, h = rgb.size
    crop = max(1, int(size / (size + crop_padding) * min(w, h)))
    left, top = (w - crop + 1) // 2, (h - crop + 1) // 2
    out = rgb.resize((size, size), Image.Resampling.BICUBIC,
                     box=(left, top, left + crop, top + crop))
    return torch.from_numpy(np.array(out))


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
