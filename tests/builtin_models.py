"""Networks and files for the built-in handler and gateway tests, all built here with fixed
random weights: nothing is downloaded.

- `resnet18()`: torchvision's ResNet-18 architecture (BasicBlock, [2, 2, 2, 2]), 1000 classes.
- `bert_classifier()`: a tiny Hugging Face BertForSequenceClassification (3 labels) taking
  (input_ids, attention_mask); `bert_encoder()`: the same body as a BertModel.
- `write_tokenizer(path)`: a WordPiece tokenizer.json whose vocabulary fits those BERTs.
"""

from __future__ import annotations

import torch
from torch import nn

# ---- ResNet-18 ---------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (y + (x if self.down is None else self.down(x))).relu()


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def resnet18() -> nn.Module:
    torch.manual_seed(18)
    m = ResNet18()
    with torch.no_grad():  # spread the logits, so the top classes are far from ties
        m.fc.weight.mul_(20)
    return m.eval()


# ---- BERT --------------------------------------------------------------------------------

WORDS = ("the a an is was are and or of to in on for with this that it he she they we you "
         "good bad great terrible movie film book story plot actor music song cat dog bird "
         "man woman child play plays playing guitar piano stock market fell rose today sharply "
         "love hate like not very really quite boring fun amazing awful tensord warms up its "
         "models before serving them twice").split()


def vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", "'"]
    tokens += letters + ["##" + c for c in letters] + list(WORDS)
    return list(dict.fromkeys(tokens))


def write_tokenizer(path: str) -> None:
    """A lower-casing BERT WordPiece tokenizer.json ([CLS] ... [SEP]) over `vocab()`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    v = {t: i for i, t in enumerate(vocab())}
    tok = Tokenizer(models.WordPiece(v, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", v["[CLS]"]), ("[SEP]", v["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    tok.enable_truncation(48)
    tok.save(path)


def _bert_config(labels: int = 3):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(vocab()), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                      num_labels=labels, initializer_range=0.5)


def bert_classifier() -> nn.Module:
    """forward(input_ids, attention_mask) -> SequenceClassifierOutput (logits [N, 3])."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(7)
    return BertForSequenceClassification(_bert_config()).eval()


def bert_encoder() -> nn.Module:
    """forward(input_ids, attention_mask) -> last_hidden_state [N, L, 32], pooler_output."""
    from transformers import BertModel

    torch.manual_seed(8)
    return BertModel(_bert_config(), add_pooling_layer=True).eval()
