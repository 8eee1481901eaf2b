"""`vision.classify`: image classification from configuration alone.

    [[models]]
    name = "resnet18"
    source = "vision.classify"
    path = "resnet18.pt"             # TorchScript or torch.export; or module = "pkg.mod:factory"
    labels = "imagenet_classes.txt"  # line i names class i

    [models.options]                 # every key is optional; these are the defaults
    input = "image"                  # "image": bytes [N] encoded files; "pixels": u8 [N,H,W,3] RGB
    resize = 256                     # the shorter side is scaled to this...
    crop = 224                       # ...and the centred crop x crop square goes to the network
    interpolation = "bilinear"       # bilinear | bicubic | nearest | lanczos | box
    mean = [0.485, 0.456, 0.406]     # per channel, on pixel / 255, in the order of `channels`
    std = [0.229, 0.224, 0.225]
    channels = "RGB"                 # RGB | BGR: the order the network takes
    layout = "NCHW"                  # NCHW | NHWC
    channels_last = false            # run the network in channels-last memory format
    top_k = 5
    scores = "softmax"               # softmax | sigmoid | none (the logits themselves)
    logits = false                   # also return the logits f32 [N, classes]
    output = 0                       # which of the network's outputs holds the logits
    max_batch = 64                   # images per request
    max_bytes = 33554432             # bytes of one encoded image
    max_pixels = 0                   # width x height of one image; 0: (16 x resize)^2, 16.7 Mpx
    max_request_pixels = 0           # pixels decoded for one request; 0: 4 x max_pixels
    formats = ["png", "jpeg", "webp"]

Outputs: labels bytes [N, K] (UTF-8 names, best first), scores f32 [N, K], classes i64 [N, K],
and logits f32 [N, C] when `logits = true`. The limits are published in the model's metadata.

What one request may cost is bounded by its size and these limits, never by what its bytes
claim: an image's width and height are read from its header and checked against max_pixels
before anything is decoded (a 7.8 KB PNG can claim 64 Mpx and take seconds and hundreds of
MB to decode), and the pixels all images of a request decode to (after the JPEG reduction
below) must stay within max_request_pixels. The default max_pixels is sized to the model:
(16 x resize)^2, 16.7 Mpx at resize 256, which takes any phone photo (12 Mpx) and decodes in
well under a second; raise it for models that need more. A request over either limit is
BAD_INPUT naming the input, the item and the limit.

The crop and the resize are one resampling step: the window of the original image that
`resize` then `crop` would keep is resampled straight to crop x crop pixels (torchvision's
Resize(256) + CenterCrop(224), TensorFlow's "crop 87.5% then resize" alike). JPEGs decode at a
reduced scale when the window still covers `crop` pixels, which makes large photos several
times faster. Decoded pixels stay uint8 until the network's device.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ...config import ConfigError, ModelConfig
from ...contract.dtypes import ByteStrings
from ...contract.errors import BadInputError
from ...contract.messages import ModelLimits
from ...ratelog import RateLimited
from ..handler import Handler
from ..signature import Spec, Value
from .common import (
    SCORES,
    Options,
    TopK,
    class_labels,
    first_output,
    load_network,
    split_rows,
)

INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                 "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
                 "box": Image.Resampling.BOX}
# Pillow's format names; "mpo" is how Pillow reports many cameras' JPEGs.
FORMATS = {"png": ("PNG",), "jpeg": ("JPEG", "MPO"), "webp": ("WEBP",), "gif": ("GIF",),
           "bmp": ("BMP",), "tiff": ("TIFF",)}

DEFAULTS: dict[str, Any] = {
    "input": "image", "resize": 256, "crop": 224, "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": "RGB",
    "layout": "NCHW", "channels_last": False, "top_k": 5, "scores": "softmax",
    "logits": False, "output": 0, "max_batch": 64, "max_bytes": 32 << 20,
    "max_pixels": 0, "max_request_pixels": 0, "formats": ["png", "jpeg", "webp"],
}
# The default max_pixels: the image's shorter side at most 16 times what the network keeps.
PIXELS_PER_RESIZE = 16
MAX_DEFAULT_PIXELS = 64_000_000
REQUEST_IMAGES = 4  # the default max_request_pixels: this many images of max_pixels

log = logging.getLogger(__name__)
# Why an image did not decode, for the operator: the caller gets a message of its own.
_undecodable = RateLimited(log)


class VisionClassify(Handler):
    def __init__(self, mc: ModelConfig, device: torch.device, dtype: torch.dtype):
        o = Options(mc, DEFAULTS)
        self.name = mc.name
        self.pixels_input = o.choice("input", ("image", "pixels")) == "pixels"
        self.resize = o.int("resize", 1, 16384)
        self.crop = o.int("crop", 1, 16384)
        if self.crop > self.resize:
            raise ConfigError(f"model {mc.name!r}: crop {self.crop} is larger than resize "
                              f"{self.resize}")
        self.resample = INTERPOLATION[o.choice("interpolation", tuple(INTERPOLATION))]
        mean, std = o.floats("mean", 3), o.floats("std", 3)
        if any(s <= 0 for s in std):
            raise ConfigError(f"model {mc.name!r}: std {std} must be positive")
        self.bgr = o.choice("channels", ("RGB", "BGR")) == "BGR"
        self.nhwc = o.choice("layout", ("NCHW", "NHWC")) == "NHWC"
        self.channels_last = o.bool("channels_last")
        top_k, scores, logits = o.int("top_k", 1), o.choice("scores", SCORES), o.bool("logits")
        self.output = o.int("output", 0, 63)
        max_pixels = o.int("max_pixels") or min((PIXELS_PER_RESIZE * self.resize) ** 2,
                                                MAX_DEFAULT_PIXELS)
        self.max_request_pixels = o.int("max_request_pixels") or REQUEST_IMAGES * max_pixels
        self.limits = ModelLimits(
            max_batch=o.int("max_batch"), max_bytes=o.int("max_bytes"), max_pixels=max_pixels,
            formats=[] if self.pixels_input else o.strings("formats", tuple(FORMATS)))
        self.pil_formats = {p for f in self.limits.formats for p in FORMATS[f]}
        self.device, self.dtype = device, dtype
        # x = (pixel / 255 - mean) / std = pixel * scale + shift, per channel
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=device)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device)
        self.net = load_network(mc, device, dtype)
        if self.channels_last and not self.nhwc:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.classes = self._probe()
        if top_k > self.classes:
            raise ConfigError(f"model {mc.name!r}: top_k {top_k} is more than the network's "
                              f"{self.classes} classes")
        self.head = TopK(class_labels(mc, self.classes), top_k, scores, logits)
        self.inputs = ((Spec("image", "u8", (-1, -1, -1, 3), "pixels"),) if self.pixels_input
                       else (Spec("image", "bytes", (-1,), "image"),))
        self.outputs = TopK.specs(top_k, self.classes, logits)

    def _probe(self) -> int:
        """Run the network once to learn how many classes it returns."""
        x = torch.zeros((1, self.crop, self.crop, 3), dtype=torch.uint8)
        with torch.inference_mode():
            logits = self._logits(x)
        if logits.dim() != 2 or logits.shape[0] != 1:
            raise ConfigError(f"model {self.name!r}: the network returned shape "
                              f"{list(logits.shape)} for one image; vision.classify needs "
                              "logits [N, classes] (choose them with option output = i)")
        return int(logits.shape[1])

    def example_inputs(self) -> list[Value]:
        """A valid request for warm-up: generated bytes are not an image."""
        im = Image.new("RGB", (self.resize + 40, self.resize), (120, 90, 60))
        if self.pixels_input:
            return [torch.from_numpy(np.asarray(im).copy())[None]]
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return [ByteStrings([buf.getvalue()], (1,))]

    # -- the handler interface ---------------------------------------------------------------

    def preprocess(self, inputs: list[Value]) -> torch.Tensor:
        """Every image decoded, cropped and resized: uint8 [N, crop, crop, 3] RGB."""
        (images,) = inputs
        n = len(images.items) if isinstance(images, ByteStrings) else images.shape[0]
        if n == 0:
            return torch.empty((0, self.crop, self.crop, 3), dtype=torch.uint8)
        if isinstance(images, ByteStrings):
            budget = [self.max_request_pixels]
            crops = [self._crop(self._open(data, i, budget), i)
                     for i, data in enumerate(images.items)]
        else:
            _, h, w, _ = images.shape
            self._check_pixels(0, w, h, n * w * h)
            crops = [self._crop(Image.fromarray(images[i].numpy(), "RGB"), i) for i in range(n)]
        return torch.from_numpy(np.stack(crops))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] == 0:
            return torch.empty((0, self.classes))
        return self._logits(batch)

    def postprocess(self, outputs: Any) -> list[Value]:
        if outputs.shape[0] == 0:
            return self.head.empty(self.classes)
        return self.head(outputs)

    def split(self, outputs: list[Value], sizes: list[int]) -> list[list[Value]]:
        """Joined requests' rows (labels are K items a row)."""
        return split_rows(outputs, sizes)

    # -- steps -------------------------------------------------------------------------------

    def _logits(self, hwc: torch.Tensor) -> torch.Tensor:
        x = hwc.to(self.device, non_blocking=True)
        if self.bgr:
            x = x.flip(-1)
        x = x.float() * self.scale + self.shift  # NHWC, float32
        if not self.nhwc:
            # The NCHW view of NHWC data is channels-last: no copy unless the network needs one.
            x = x.permute(0, 3, 1, 2)
            if not self.channels_last:
                x = x.contiguous()
        return first_output(self.net(x.to(self.dtype)), self.output, self.name)

    def _bad(self, index: int, what: str, limit: int | None = None) -> BadInputError:
        """BAD_INPUT about one image, in the caller's terms (SPEC §6 "Error fields")."""
        return BadInputError(f"input 'image' item {index}: {what}", input="image", item=index,
                             limit=limit)

    def _check_pixels(self, index: int, w: int, h: int, request_pixels: int) -> None:
        limit = self.limits.max_pixels
        if w * h > limit:
            raise self._bad(index, f"{w}x{h} pixels, model {self.name!r} takes at most {limit} "
                            "(limits.max_pixels)", limit)
        if request_pixels > self.max_request_pixels:
            raise self._bad(index, f"the request's images come to more than "
                            f"{self.max_request_pixels} pixels decoded, which model "
                            f"{self.name!r} takes per request (option max_request_pixels): "
                            "send fewer or smaller images per request",
                            self.max_request_pixels)

    def _open(self, data: bytes, index: int, budget: list[int]) -> Image.Image:
        """Decode one image after checking its header; budget[0]: pixels the request may
        still decode."""
        formats = "/".join(f.upper() for f in self.limits.formats)
        if self.limits.max_bytes and len(data) > self.limits.max_bytes:
            raise self._bad(index, f"{len(data)} bytes, model {self.name!r} takes at most "
                            f"{self.limits.max_bytes} (limits.max_bytes)", self.limits.max_bytes)
        try:
            im = Image.open(io.BytesIO(data), formats=None)  # reads the header only
        except Image.DecompressionBombError:  # Pillow's own bound, far above ours
            raise self._bad(index, f"more than {self.limits.max_pixels} pixels, model "
                            f"{self.name!r} takes at most {self.limits.max_pixels} "
                            "(limits.max_pixels)", self.limits.max_pixels) from None
        except UnidentifiedImageError:
            raise self._bad(index, f"not a {formats} image ({len(data)} bytes): model "
                            f"{self.name!r} decodes {formats}") from None
        except Exception as e:  # a recognised format with a broken header
            self._log(index, e)
            raise self._bad(index, f"not a decodable {formats} image ({_why(e)})") from None
        if im.format not in self.pil_formats:
            raise self._bad(index, f"a {im.format} image; model {self.name!r} decodes "
                            f"{formats} (limits.formats)")
        w, h = im.size
        self._check_pixels(index, w, h, 0)
        try:
            # JPEG only: decode at 1/2, 1/4 or 1/8 scale while the shorter side stays at
            # least `resize` pixels. What is decoded counts against the request's budget.
            im.draft("RGB", (self.resize, self.resize))
            dw, dh = im.size
            budget[0] -= dw * dh
            if budget[0] < 0:
                self._check_pixels(index, 0, 0, self.max_request_pixels + 1)
            return ImageOps.exif_transpose(im).convert("RGB")  # phones store rotation in EXIF
        except BadInputError:
            raise
        except Exception as e:  # truncated or corrupt data surfaces only when decoding
            self._log(index, e)
            raise self._bad(index, f"not a decodable {im.format} image ({_why(e)})") from None

    def _log(self, index: int, e: Exception) -> None:
        _undecodable.info("model %s: image %d did not decode: %s: %s", self.name, index,
                          type(e).__name__, e)

    def _crop(self, rgb: Image.Image, index: int) -> np.ndarray:
        """The centred window that `resize` then `crop` keep, resampled to crop x crop."""
        w, h = rgb.size
        if w == 0 or h == 0:
            raise self._bad(index, f"an empty image ({w}x{h} pixels)")
        side = self.crop * min(w, h) / self.resize
        left, top = (w - side) / 2, (h - side) / 2
        out = rgb.resize((self.crop, self.crop), self.resample,
                         box=(left, top, left + side, top + side))
        return np.asarray(out)


def _why(e: Exception) -> str:
    """Why Pillow could not decode, in the caller's words (its own go to the log)."""
    return "truncated" if "truncat" in str(e).lower() else "corrupt data"
