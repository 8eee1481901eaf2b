"""Built-in handlers (vision.classify, text.classify, text.embed): networks exported with
`tensord export` and served from configuration alone, checked against the same networks run
in PyTorch directly; their limits, meanings and config errors; the same through a daemon."""

from __future__ import annotations

import io
from pathlib import Path

import builtin_fixtures
import builtin_models
import numpy as np
import pytest
import torch
from builtin_fixtures import IMAGENET_LABELS, SENTIMENT, BuiltinFiles, tensord_export
from conftest import start_daemon
from PIL import Image
from tokenizers import Tokenizer

from tensord.client import Client
from tensord.config import ConfigError, model_config
from tensord.contract.dtypes import ByteStrings
from tensord.contract.errors import BadInputError
from tensord.models.loader import LoadError, load_model

builtin_files = builtin_fixtures.builtin_files  # the session's exported networks and files
DATA = Path(__file__).resolve().parent / "data"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
TEXTS = ["the movie was great fun", "a terrible boring plot!", "cat",
         "the stock market fell sharply today"]


def load(files: BuiltinFiles, table: dict):
    return load_model(model_config({"device": "cpu", **table}, str(files.dir), "test"))


def run(model, *inputs):
    with torch.inference_mode():
        out = model.forward(list(inputs))
    model.signature.check_outputs(model.name, out)
    return list(out)


def strings(*items: bytes) -> ByteStrings:
    return ByteStrings(list(items), (len(items),))


def png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# ---- vision.classify ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet(builtin_files):
    return load(builtin_files, {"name": "resnet18", "source": "vision.classify",
                                "path": str(builtin_files.resnet), "labels": str(IMAGENET_LABELS),
                                "options": {"logits": True}})


def reference_logits(data: bytes) -> torch.Tensor:
    """The ResNet-18 in PyTorch on the image prepared by hand: the centred window of
    Resize(256) + CenterCrop(224), bilinear, ImageNet mean/std, NCHW."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    side = 224 * min(w, h) / 256
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    x = np.asarray(im.resize((224, 224), Image.Resampling.BILINEAR, box=box)) / 255.0
    x = torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32))
    with torch.no_grad():
        return builtin_models.resnet18()(x)


def test_resnet_from_config_matches_pytorch(resnet):
    data = (DATA / "chelsea.png").read_bytes()
    labels, scores, classes, logits = run(resnet, strings(data))
    want = reference_logits(data)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    s, c = want.softmax(-1).topk(5)
    assert classes.tolist() == c.tolist()
    torch.testing.assert_close(scores, s, rtol=1e-4, atol=1e-6)
    names = IMAGENET_LABELS.read_text().splitlines()
    assert labels.items == [names[i].encode() for i in c[0].tolist()]
    assert labels.shape == scores.shape == classes.shape == (1, 5)


def test_resnet_metadata(resnet):
    info = resnet.info()
    assert info.kind == "vision.classify"
    assert [(s.name, s.dtype, s.shape, s.meaning) for s in info.inputs] == \
        [("image", "bytes", [-1], "image")]
    assert [(s.name, s.dtype, s.shape, s.meaning) for s in info.outputs] == [
        ("labels", "bytes", [-1, 5], "labels"), ("scores", "f32", [-1, 5], "scores"),
        ("classes", "i64", [-1, 5], "classes"), ("logits", "f32", [-1, 1000], "logits")]
    assert info.limits.formats == ["png", "jpeg", "webp"] and info.limits.max_batch == 64
    # max_pixels is sized to the model: (16 x resize)^2 for resize 256 (issue 17 item 7)
    assert info.limits.max_bytes == 32 << 20 and info.limits.max_pixels == 4096 * 4096


def test_pixels_input_equals_the_encoded_image(builtin_files, resnet):
    pixels = load(builtin_files, {"name": "px", "source": "vision.classify",
                                  "path": str(builtin_files.resnet),
                                  "options": {"input": "pixels", "logits": True}})
    assert [(s.dtype, s.shape, s.meaning) for s in pixels.info().inputs] == \
        [("u8", [-1, -1, -1, 3], "pixels")]
    assert pixels.info().limits.formats == []
    data = (DATA / "chelsea.png").read_bytes()
    hwc = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy())
    labels, _, classes, logits = run(pixels, hwc[None])
    assert labels.items[0] == str(classes[0, 0].item()).encode(), "no labels file: indices"
    torch.testing.assert_close(logits, run(resnet, strings(data))[3])


def test_formats_bytes_and_pixels_are_limits(builtin_files, resnet):
    gif = png(Image.new("RGB", (40, 30), (9, 9, 9)), "GIF")
    with pytest.raises(BadInputError, match=r"input 'image' item 1: a GIF image; model "
                                            r"'resnet18' decodes PNG/JPEG/WEBP "
                                            r"\(limits.formats\)"):
        run(resnet, strings(png(Image.new("RGB", (40, 30))), gif))
    small = load(builtin_files, {"name": "small", "source": "vision.classify", "warmup": False,
                                 "path": str(builtin_files.resnet),
                                 "options": {"max_bytes": 1000, "max_pixels": 50_000,
                                             "formats": ["gif", "png"]}})
    run(small, strings(gif))
    with pytest.raises(BadInputError, match=r"input 'image' item 0: \d+ bytes, model 'small' "
                                            r"takes at most 1000 \(limits.max_bytes\)"):
        run(small, strings((DATA / "chelsea.png").read_bytes()))
    with pytest.raises(BadInputError, match=r"input 'image' item 0: 300x200 pixels, model "
                                            r"'small' takes at most 50000") as e:
        run(small, strings(png(Image.new("RGB", (300, 200)))))
    assert (e.value.input, e.value.item, e.value.limit) == ("image", 0, 50_000)


def test_preprocessing_options(builtin_files):
    """BGR, NHWC, bicubic, other mean/std: the network sees what the options say."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 4)

    builtin_models.spy = Spy  # a factory for `module`: the class itself
    m = load(builtin_files, {"name": "spy", "source": "vision.classify", "warmup": False,
                             "module": "builtin_models:spy",
                             "options": {"resize": 8, "crop": 4, "channels": "BGR",
                                         "layout": "NHWC", "mean": [0, 0, 0], "std": [1, 1, 1],
                                         "interpolation": "nearest", "top_k": 2}})
    seen.clear()
    run(m, strings(png(Image.new("RGB", (16, 8), (255, 0, 51)))))
    (x,) = seen
    assert x.shape == (1, 4, 4, 3)
    torch.testing.assert_close(x[0, 0, 0], torch.tensor([0.2, 0.0, 1.0]))


@pytest.mark.parametrize("table,msg", [
    ({"options": {"sharpen": True}}, r"unknown options \['sharpen'\]"),
    ({"options": {"top_k": 2000}}, "top_k 2000 is more than the network's 1000 classes"),
    ({"options": {"crop": 300}}, "crop 300 is larger than resize 256"),
    ({"options": {"mean": [0.5, 0.5]}}, "mean = .* must be an array of 3 numbers"),
    ({"options": {"formats": ["png", "heic"]}}, "formats = .* must be an array of"),
    ({"labels": "SENTIMENT"}, "labels file .* has 3 lines, the network returns 1000 classes"),
    ({"inputs": [{"name": "x", "dtype": "f32"}]}, "declares its own inputs and outputs"),
])
def test_config_errors_say_what_is_wrong(builtin_files, table, msg):
    table = {"name": "bad", "source": "vision.classify", "path": str(builtin_files.resnet),
             **table}
    if table.get("labels") == "SENTIMENT":
        table["labels"] = str(builtin_files.sentiment_labels)
    with pytest.raises(LoadError, match=msg):
        load(builtin_files, table)


def test_path_or_module_is_required(builtin_files):
    with pytest.raises(ConfigError, match="needs a path .* or a module"):
        model_config({"name": "x", "source": "vision.classify"}, ".", "models[0]")
    with pytest.raises(ConfigError, match="not both"):
        model_config({"name": "x", "source": "text.embed", "path": "a.pt", "module": "m:f"},
                     ".", "models[0]")


# ---- text.classify / text.embed ----------------------------------------------------------


@pytest.fixture(scope="module")
def sentiment(builtin_files):
    return load(builtin_files, {"name": "sentiment", "source": "text.classify",
                                "path": str(builtin_files.bert),
                                "tokenizer": str(builtin_files.tokenizer),
                                "labels": str(builtin_files.sentiment_labels),
                                "options": {"logits": True}})


def tokenize(files: BuiltinFiles, texts: list[str]):
    """Hugging Face style: pad to the longest with [PAD] (0), attention mask."""
    tok = Tokenizer.from_file(str(files.tokenizer))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return (torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc]))


def test_bert_classifier_from_config_matches_transformers(builtin_files, sentiment):
    labels, scores, classes, logits = run(sentiment, strings(*(t.encode() for t in TEXTS)))
    ids, mask = tokenize(builtin_files, TEXTS)
    with torch.no_grad():
        want = builtin_models.bert_classifier()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
    s, c = want.softmax(-1).topk(3)
    assert classes.tolist() == c.tolist()
    torch.testing.assert_close(scores, s, rtol=1e-4, atol=1e-6)
    assert labels.items == [SENTIMENT[i].encode() for i in c.flatten().tolist()]
    assert len({tuple(r) for r in classes.tolist()}) > 1, "texts should not all look alike"
    info = sentiment.info()
    assert info.kind == "text.classify" and info.limits.max_tokens == 48
    assert [(s.name, s.dtype, s.meaning) for s in info.inputs] == [("text", "bytes", "text")]


def test_padding_in_a_batch_changes_nothing(sentiment):
    *_, alone = run(sentiment, strings(b"cat"))
    *_, batched = run(sentiment, strings(TEXTS[3].encode() * 3, b"cat"))
    torch.testing.assert_close(batched[1], alone[0], rtol=1e-4, atol=1e-5)


def test_long_texts_are_truncated_and_limits_hold(builtin_files, sentiment):
    run(sentiment, strings(("good " * 500).encode()))  # 500 words -> max_tokens 48
    small = load(builtin_files, {"name": "s", "source": "text.classify", "warmup": False,
                                 "path": str(builtin_files.bert),
                                 "tokenizer": str(builtin_files.tokenizer),
                                 "options": {"max_bytes": 10, "top_k": 1}})
    with pytest.raises(BadInputError, match=r"input 'text' item 1: 11 bytes, model 's' takes "
                                            r"at most 10 \(limits.max_bytes\)"):
        run(small, strings(b"cat", b"a" * 11))
    with pytest.raises(BadInputError, match=r"input 'text' item 0: not valid UTF-8 \(invalid "
                                            r"start byte at byte 0: 0xff\)"):
        run(small, strings(b"\xff"))
    labels, scores, classes = run(small, strings())
    assert labels.shape == (0, 1) and scores.shape == classes.shape == (0, 1)


def test_text_embed_matches_mean_pooling(builtin_files):
    m = load(builtin_files, {"name": "sentences", "source": "text.embed",
                             "path": str(builtin_files.encoder),
                             "tokenizer": str(builtin_files.tokenizer)})
    (got,) = run(m, strings(*(t.encode() for t in TEXTS)))
    ids, mask = tokenize(builtin_files, TEXTS)
    with torch.no_grad():
        states = builtin_models.bert_encoder()(input_ids=ids, attention_mask=mask)[0]
    mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(got, torch.nn.functional.normalize(mean, dim=1),
                               rtol=1e-4, atol=1e-5)
    assert m.info().outputs[0].shape == [-1, 32] and m.info().outputs[0].meaning == "embedding"
    cls = load(builtin_files, {"name": "cls", "source": "text.embed", "warmup": False,
                               "path": str(builtin_files.encoder),
                               "tokenizer": str(builtin_files.tokenizer),
                               "options": {"pooling": "cls", "normalize": False}})
    (first,) = run(cls, strings(*(t.encode() for t in TEXTS)))
    torch.testing.assert_close(first, states[:, 0], rtol=1e-4, atol=1e-5)


def test_exported_program_of_fixed_length_needs_fixed_padding(builtin_files):
    pt2 = tensord_export("bert_classifier", builtin_files.dir / "bert16.pt2",
                         "input_ids:i64:2,16", "attention_mask:i64:2,16", method="export")
    table = {"name": "fixed", "source": "text.classify", "path": str(pt2),
             "tokenizer": str(builtin_files.tokenizer)}
    with pytest.raises(LoadError, match=r"padding = \"max\" and max_tokens = that length"):
        load(builtin_files, table)
    m = load(builtin_files, {**table, "options": {"padding": "max", "max_tokens": 16}})
    labels, _, _ = run(m, strings(b"cat", b"the movie was great fun"))
    assert labels.shape == (2, 3)


def test_text_config_errors(builtin_files):
    base = {"name": "t", "source": "text.classify", "path": str(builtin_files.bert)}
    with pytest.raises(LoadError, match="needs tokenizer = a tokenizer.json"):
        load(builtin_files, base)
    with pytest.raises(LoadError, match="is not a tokenizer.json"):
        load(builtin_files, {**base, "tokenizer": str(builtin_files.sentiment_labels)})
    with pytest.raises(LoadError, match=r"tokenizer 'package:no_such_pkg/t.json': no installed"):
        load(builtin_files, {**base, "tokenizer": "package:no_such_pkg/t.json"})
    with pytest.raises(LoadError, match=r"unknown options \['pooling'\]"):
        load(builtin_files, {**base, "tokenizer": str(builtin_files.tokenizer),
                             "options": {"pooling": "mean"}})


# ---- through a daemon --------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_daemon(builtin_files, tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("builtin-daemon"), config=builtin_files.config())
    yield d
    assert d.stop() == 0, d.logs()


def test_daemon_publishes_limits_and_serves(builtin_daemon):
    with Client(builtin_daemon.path) as c:
        infos = {m.name: m for m in c.models()}
        assert infos["resnet18"].kind == "vision.classify"
        assert infos["resnet18"].limits.formats == ["png", "jpeg", "webp"]
        assert infos["sentiment"].limits.max_tokens == 48
        assert infos["mlp"].kind == "torchscript" and infos["identity"].kind == "builtin"
        out = c.infer("sentiment", {"text": strings(*(t.encode() for t in TEXTS))})
        assert out["labels"].shape == (4, 3) and out["scores"].shape == (4, 3)
        out = c.infer("resnet18", {"image": strings((DATA / "chelsea.jpg").read_bytes())})
        assert out["logits"].shape == (1, 1000)


def test_daemon_refuses_more_than_max_batch_per_request(builtin_daemon):
    with Client(builtin_daemon.path) as c:
        with pytest.raises(BadInputError, match=r"at most 64 items per request "
                                                r"\(limits.max_batch\), the request has 65"):
            c.infer("sentiment", {"text": strings(*[b"cat"] * 65)})


def test_batched_texts_pad_together_and_each_gets_its_rows(builtin_daemon, builtin_files):
    """With batching on, requests from several clients join one forward pass: the texts of
    all of them are tokenized and padded together, and each request gets its own rows back,
    equal to what it gets alone."""
    import threading

    config = {"source": "text.classify", "path": str(builtin_files.bert), "device": "cpu",
              "tokenizer": str(builtin_files.tokenizer),
              "labels": str(builtin_files.sentiment_labels),
              "max_batch_size": 16, "max_queue_delay_us": 200_000}
    requests = [[TEXTS[i % 4].encode()] * (1 + i % 3) for i in range(6)]
    with Client(builtin_daemon.path) as c:
        c.load("batched", config)
        alone = [c.infer("sentiment", {"text": strings(*r)})["scores"] for r in requests]
        results: dict[int, torch.Tensor] = {}

        def call(i: int) -> None:
            with Client(builtin_daemon.path) as ci:
                results[i] = ci.infer("batched", {"text": strings(*requests[i])})["scores"]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = {s.name: s for s in c.stats()}["batched"]
        c.unload("batched")
    for i, want in enumerate(alone):
        torch.testing.assert_close(results[i], want, rtol=1e-4, atol=1e-5)
    assert stats.served == len(requests) and stats.batches < len(requests), stats
