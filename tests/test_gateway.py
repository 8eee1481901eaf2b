"""tensord-gateway (go/cmd/tensord-gateway): the daemon's models over the Open Inference
Protocol, called with Triton's own Python clients (tritonclient.http with binary data and
with JSON, tritonclient.grpc), with plain JSON requests as the KServe v2 document writes them,
and by hand with the binary tensor extension; errors, deadlines, readiness while the daemon
restarts, and a graceful shutdown."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import builtin_fixtures
import numpy as np
import pytest
import torch
from builtin_fixtures import IMAGENET_LABELS
from conftest import Daemon, start_daemon, stop_process
from handlers_for_tests import wait_for

from tensord.client import Client
from tensord.contract.dtypes import ByteStrings
from tensord.models.builtin import build_mlp

tritonhttp = pytest.importorskip("tritonclient.http", reason="the test extra is not installed")
tritongrpc = pytest.importorskip("tritonclient.grpc", reason="the test extra is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

builtin_files = builtin_fixtures.builtin_files  # the session's exported networks and files
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
TEXTS = ["the movie was great fun", "a terrible boring plot!", "cat", "héllo wörld 🙂"]


@pytest.fixture(scope="session")
def gateway_exe(tmp_path_factory) -> str:
    go = shutil.which("go")
    if go is None:
        pytest.fail("the Go toolchain is needed to build go/cmd/tensord-gateway")
    out = tmp_path_factory.mktemp("bin") / "tensord-gateway"
    subprocess.run([go, "build", "-o", str(out), "."], cwd=ROOT / "go/cmd/tensord-gateway",
                   check=True, env={**os.environ, "CGO_ENABLED": "0"})
    return str(out)


@dataclass
class Gateway:
    proc: subprocess.Popen
    http: str  # host:port
    grpc: str
    log: Path

    def stop(self, sig=signal.SIGTERM) -> int:
        return stop_process(self.proc, sig, timeout=30)

    def logs(self) -> str:
        return self.log.read_text()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        host, port = self.http.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def wait_ready(self, want: int = 200, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.request("GET", "/v2/health/ready")[0] == want:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"/v2/health/ready never answered {want}:\n{self.logs()}")


def start_gateway(exe: str, socket: str, tmp: Path, *args: str) -> Gateway:
    log = tmp / "gateway.log"
    proc = subprocess.Popen([exe, "-socket", socket, "-http", "127.0.0.1:0", "-grpc", "127.0.0.1:0",
                             *args], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    addrs: dict[str, str] = {}
    end = time.monotonic() + 30
    while len(addrs) < 2 and time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log.read_text()}")
        for kind, addr in re.findall(r"over (HTTP|gRPC)\" addr=(\S+)", log.read_text()):
            addrs[kind] = addr
        time.sleep(0.02)
    if len(addrs) < 2:
        proc.kill()
        raise RuntimeError(f"gateway did not listen:\n{log.read_text()}")
    return Gateway(proc, addrs["HTTP"], addrs["gRPC"], log)


GATE = """
[[models]]
name = "gate"
source = "handler"
handler = "handlers_for_tests:Gate"
warmup = false
device = "cpu"

[models.options]
dir = "{dir}"
"""


@pytest.fixture(scope="module")
def served(builtin_files, gateway_exe, tmp_path_factory):
    """A daemon serving the built-in handler models, mlp and a gate; a gateway in front."""
    tmp = tmp_path_factory.mktemp("gateway")
    gate = tmp / "gate"
    gate.mkdir()
    d = start_daemon(tmp, config=builtin_files.config() + GATE.format(dir=gate))
    g = start_gateway(gateway_exe, d.path, tmp)
    g.wait_ready()
    yield d, g, gate
    assert g.stop() == 0, g.logs()
    assert d.stop() == 0, d.logs()


def image_input(mod, data: list[bytes], binary: bool = True):
    inp = mod.InferInput("image", [len(data)], "BYTES")
    if mod is tritonhttp:
        inp.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    else:
        inp.set_data_from_numpy(np.array(data, dtype=np.object_))
    return inp


# ---- the "done when": config-only models, same scores from Go and tritonclient ---


def go_classify(daemon: Daemon, tmp: Path, model: str, *args: str) -> list[tuple[str, float]]:
    exe = tmp / "classify"
    if not exe.exists():
        subprocess.run(["go", "build", "-o", str(exe), "./examples/classify"], cwd=ROOT / "go",
                       check=True)
    r = subprocess.run([str(exe), "-socket", daemon.path, "-model", model, "-precise", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = []
    for line in r.stdout.splitlines():
        if "  " in line:
            score, label = line.split("  ", 1)
            out.append((label, np.float32(score)))
    return out


def test_resnet_scores_identical_from_go_and_tritonclient(served, tmp_path):
    daemon, gw, _ = served
    photo = (DATA / "chelsea.jpg").read_bytes()
    want = go_classify(daemon, tmp_path, "resnet18", str(DATA / "chelsea.jpg"))
    assert len(want) == 5
    names = IMAGENET_LABELS.read_text().splitlines()
    assert all(label in names for label, _ in want)
    for mod, url, binary in ((tritonhttp, gw.http, True), (tritonhttp, gw.http, False),
                             (tritongrpc, gw.grpc, True)):
        c = mod.InferenceServerClient(url)
        outputs = None
        if mod is tritonhttp and not binary:
            outputs = [mod.InferRequestedOutput(n, binary_data=False) for n in ("labels", "scores")]
        # JSON cannot carry image files (they are not UTF-8): the JSON case is the outputs
        r = c.infer("resnet18", [image_input(mod, [photo])], outputs=outputs)
        labels = [b if isinstance(b, str) else b.decode() for b in r.as_numpy("labels")[0]]
        scores = r.as_numpy("scores")[0]
        assert scores.dtype == np.float32
        assert list(zip(labels, scores.tolist())) == [(lab, float(s)) for lab, s in want], \
            (mod.__name__, binary)


def test_bert_scores_identical_from_go_and_tritonclient(served, tmp_path):
    daemon, gw, _ = served
    want = [go_classify(daemon, tmp_path, "sentiment", t) for t in TEXTS]
    for mod, url in ((tritonhttp, gw.http), (tritongrpc, gw.grpc)):
        c = mod.InferenceServerClient(url)
        inp = mod.InferInput("text", [len(TEXTS)], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_))
        r = c.infer("sentiment", [inp])
        for i, text in enumerate(TEXTS):
            got = [(lab.decode(), float(s)) for lab, s in zip(r.as_numpy("labels")[i],
                                                             r.as_numpy("scores")[i])]
            # one text alone (Go) and in a padded batch (here): the same, to float rounding
            assert [g[0] for g in got] == [w[0] for w in want[i]], text
            np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want[i]], rtol=1e-5)
    # in one batch, the identical request through the daemon's Python client: identical
    with Client(daemon.path) as c:
        ref = c.infer("sentiment", {"text": ByteStrings([t.encode() for t in TEXTS],
                                                        (len(TEXTS),))})
    r = tritonhttp.InferenceServerClient(gw.http).infer("sentiment", [inp_json(TEXTS)])
    assert np.array_equal(r.as_numpy("scores"), ref["scores"].numpy())


def inp_json(texts):
    inp = tritonhttp.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array(texts, dtype=np.object_), binary_data=False)
    return inp


def test_embeddings_through_grpc_equal_the_daemon(served):
    daemon, gw, _ = served
    with Client(daemon.path) as c:
        ref = c.infer("sentences", {"text": ByteStrings([t.encode() for t in TEXTS],
                                                        (len(TEXTS),))})["embedding"]
    inp = tritongrpc.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(np.array(TEXTS, dtype=np.object_))
    got = tritongrpc.InferenceServerClient(gw.grpc).infer("sentences", [inp]).as_numpy("embedding")
    assert np.array_equal(got, ref.numpy())


def test_metadata_carries_limits_and_meanings(served):
    _, gw, _ = served
    c = tritonhttp.InferenceServerClient(gw.http)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("resnet18")
    md = c.get_model_metadata("resnet18")
    assert md["platform"] == "tensord/vision.classify" and md["versions"] == ["1"]
    assert md["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1],
                             "parameters": {"meaning": "image"}}]
    assert md["parameters"]["limits"]["formats"] == ["png", "jpeg", "webp"]
    assert md["parameters"]["limits"]["max_batch"] == 64
    g = tritongrpc.InferenceServerClient(gw.grpc).get_model_metadata("sentiment")
    assert g.platform == "tensord/text.classify"
    assert [(t.name, t.datatype, list(t.shape)) for t in g.outputs] == [
        ("labels", "BYTES", [-1, 3]), ("scores", "FP32", [-1, 3]), ("classes", "INT64", [-1, 3])]
    assert tritonhttp.InferenceServerClient(gw.http).get_server_metadata()["name"] == \
        "tensord-gateway"


# ---- JSON as the KServe v2 document writes it ------------------------------------------


def test_kserve_document_json_requests(served):
    """Requests shaped like the examples of the KServe v2 REST protocol document."""
    _, gw, _ = served
    assert gw.request("GET", "/v2/health/live")[0] == 200
    assert gw.request("GET", "/v2/health/ready")[0] == 200
    assert gw.request("GET", "/v2/models/mlp/ready")[0] == 200
    assert gw.request("GET", "/v2/models/mlp/versions/1/ready")[0] == 200
    status, _, body = gw.request("GET", "/v2/models/mlp")
    assert status == 200 and json.loads(body) == {
        "name": "mlp", "versions": ["1"], "platform": "tensord/torchscript",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "parameters": {"device": "cpu", "limits": {"max_batch": 0, "max_bytes": 0,
                                                   "max_pixels": 0, "max_tokens": 0,
                                                   "formats": []}}}
    x = torch.linspace(-1, 1, 32).reshape(2, 16)
    request = {"id": "42", "inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32",
                                       "data": x.tolist()}],  # nested, row-major
               "outputs": [{"name": "y"}]}
    status, headers, body = gw.request("POST", "/v2/models/mlp/infer", json.dumps(request).encode(),
                                       {"Content-Type": "application/json"})
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    r = json.loads(body)
    assert r["model_name"] == "mlp" and r["model_version"] == "1" and r["id"] == "42"
    (y,) = r["outputs"]
    assert y["name"] == "y" and y["datatype"] == "FP32" and y["shape"] == [2, 4]
    with torch.no_grad():
        want = build_mlp()(x)
    got = torch.tensor(y["data"], dtype=torch.float32).reshape(2, 4)
    assert torch.equal(got, want), "JSON floats must read back to the same float32"
    # flat data, a version in the path
    request = {"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32",
                           "data": x.flatten().tolist()}]}
    status, _, body = gw.request("POST", "/v2/models/mlp/versions/1/infer",
                                 json.dumps(request).encode())
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == y["data"]


@pytest.mark.parametrize("path,request_,status,message", [
    ("/v2/models/mlp/infer", {"inputs": [{"name": "x", "shape": [1, 15], "datatype": "FP32",
                                          "data": [0.0] * 15}]}, 400, "must have shape"),
    ("/v2/models/mlp/infer", {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "INT64",
                                          "data": [0] * 16}]}, 400, "must be f32"),
    ("/v2/models/nope/infer", {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                           "data": [0.0]}]}, 404, "no model named \"nope\""),
    ("/v2/models/mlp/versions/7/infer", {"inputs": [{"name": "x", "shape": [1, 16],
                                                     "datatype": "FP32", "data": [0.0] * 16}]},
     404, "version 7 is not served"),
    ("/v2/models/sentiment/infer", {"inputs": [{"name": "text", "shape": [65], "datatype": "BYTES",
                                                "data": ["cat"] * 65}]}, 400,
     "at most 64 items per request"),
])
def test_errors_are_json_with_status(served, path, request_, status, message):
    _, gw, _ = served
    got, headers, body = gw.request("POST", path, json.dumps(request_).encode())
    assert got == status, body
    assert message in json.loads(body)["error"]


def test_binary_extension_by_hand(served):
    _, gw, _ = served
    x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(3, 16)
    header = json.dumps({"inputs": [{"name": "x", "shape": [3, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    status, headers, body = gw.request(
        "POST", "/v2/models/mlp/infer", header + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)),
         "Content-Type": "application/octet-stream"})
    assert status == 200, body
    n = int(headers["Inference-Header-Content-Length"])
    (y,) = json.loads(body[:n])["outputs"]
    assert y["parameters"]["binary_data_size"] == 3 * 4 * 4 and "data" not in y
    got = np.frombuffer(body[n:], dtype=np.float32).reshape(3, 4)
    with torch.no_grad():
        assert np.array_equal(got, build_mlp()(torch.from_numpy(x)).numpy())


def test_bad_images_are_400_and_invalid_argument(served):
    _, gw, _ = served
    gif = b"GIF89a" + b"\0" * 30
    for mod, url, want in ((tritonhttp, gw.http, "400"), (tritongrpc, gw.grpc,
                                                          "StatusCode.INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException) as e:
            mod.InferenceServerClient(url).infer("resnet18", [image_input(mod, [b"not an image"])])
        assert e.value.status() == want and "input 'image' item 0" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            mod.InferenceServerClient(url).infer("resnet18", [image_input(mod, [gif])])
        assert e.value.status() == want


def test_deadlines_reach_the_caller(served):
    """The gate model blocks until its test opens it: the request's deadline ends it first."""
    _, gw, gate = served
    x = np.ones(2, dtype=np.float32)
    try:
        inp = tritongrpc.InferInput("x", [2], "FP32")
        inp.set_data_from_numpy(x)
        t0 = time.monotonic()
        with pytest.raises(InferenceServerException) as e:
            tritongrpc.InferenceServerClient(gw.grpc).infer("gate", [inp], client_timeout=0.5)
        assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert time.monotonic() - t0 < 10
        wait_for(gate / "started")
        # the protocol's timeout parameter (microseconds) over HTTP: 504
        request = {"parameters": {"timeout": 300_000},
                   "inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
        status, _, body = gw.request("POST", "/v2/models/gate/infer", json.dumps(request).encode())
        assert status == 504, body
    finally:
        (gate / "open").touch()
    status, _, body = gw.request("POST", "/v2/models/gate/infer", json.dumps(
        {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}).encode())
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [1, 2]


# ---- readiness and shutdown ----------------------------------------------------------------


def test_readiness_follows_the_daemon_through_a_restart(gateway_exe, tmp_path):
    d = start_daemon(tmp_path)
    g = start_gateway(gateway_exe, d.path, tmp_path, "-hold", "0")  # 503 at once, no holding
    try:
        g.wait_ready(200)
        grpc_client = tritongrpc.InferenceServerClient(g.grpc)
        assert grpc_client.is_server_ready()
        assert d.stop() == 0
        g.wait_ready(503, timeout=10)
        assert g.request("GET", "/v2/health/live")[0] == 200, "live while the daemon is away"
        assert not grpc_client.is_server_ready() and grpc_client.is_server_live()
        request = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                          "data": [1.0]}]}).encode()
        status, _, body = g.request("POST", "/v2/models/identity/infer", request)
        assert status == 503 and "not connected" in json.loads(body)["error"]
        inp = tritongrpc.InferInput("x", [1], "FP32")
        inp.set_data_from_numpy(np.ones(1, dtype=np.float32))
        with pytest.raises(InferenceServerException) as e:
            grpc_client.infer("identity", [inp])
        assert e.value.status() == "StatusCode.UNAVAILABLE"
        d = start_daemon(tmp_path)  # the same socket path
        g.wait_ready(200, timeout=15)
        status, _, body = g.request("POST", "/v2/models/identity/infer", request)
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [1.0]
        assert grpc_client.infer("identity", [inp]).as_numpy("y").tolist() == [1.0]
    finally:
        assert g.stop() == 0, g.logs()
        d.stop()
    assert "reconnecting" in g.logs() and g.logs().count("connected to the tensord daemon") == 2


def test_graceful_shutdown_finishes_requests_in_flight(gateway_exe, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    d = start_daemon(tmp_path, config=GATE.format(dir=gate))
    g = start_gateway(gateway_exe, d.path, tmp_path)
    try:
        g.wait_ready()
        result = {}

        def call():
            result["r"] = g.request("POST", "/v2/models/gate/infer", json.dumps(
                {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                             "data": [5]}]}).encode())
        t = threading.Thread(target=call)
        t.start()
        wait_for(gate / "started")
        g.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        while "shutting down" not in g.logs() and time.monotonic() < end:
            time.sleep(0.02)
        assert g.proc.poll() is None, "the gateway waits for the request in flight"
        (gate / "open").touch()
        t.join(30)
        status, _, body = result["r"]
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [5.0]
        assert g.proc.wait(timeout=30) == 0, g.logs()
    finally:
        g.stop()
        d.stop()



def test_proto_field_numbers_are_tritons():
    """Every message, field and enum value of the gateway's grpc_predict_v2.proto and
    model_config.proto exists in Triton's grpc_service.proto and model_config.proto (as
    tritonclient ships them) with the same number and type, and the service's methods are
    Triton's: what lets tritonclient.grpc talk to the gateway."""
    from google.protobuf.descriptor import FieldDescriptor
    from tritonclient.grpc import model_config_pb2, service_pb2

    scalar = {"bool": FieldDescriptor.TYPE_BOOL, "string": FieldDescriptor.TYPE_STRING,
              "bytes": FieldDescriptor.TYPE_BYTES, "int32": FieldDescriptor.TYPE_INT32,
              "int64": FieldDescriptor.TYPE_INT64, "uint32": FieldDescriptor.TYPE_UINT32,
              "uint64": FieldDescriptor.TYPE_UINT64, "float": FieldDescriptor.TYPE_FLOAT,
              "double": FieldDescriptor.TYPE_DOUBLE}
    checked = 0
    for proto, tritons in (("grpc_predict_v2.proto", service_pb2.DESCRIPTOR),
                           ("model_config.proto", model_config_pb2.DESCRIPTOR)):
        text = (ROOT / "go/cmd/tensord-gateway/proto" / proto).read_text()
        text = re.sub(r"//[^\n]*", "", text)
        stack: list[str] = []
        for tok in re.finditer(r"(message|service|oneof|enum)\s+(\w+)\s*\{|\}|"
                               r"(repeated\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;|"
                               r"rpc\s+(\w+)\s*\((\w+)\)\s*returns\s*\((\w+)\)\s*(?:\{\s*\}|;)|"
                               r"(\w+)\s*=\s*(\d+)\s*;", text):
            if tok.group(1):
                stack.append(tok.group(1) + " " + tok.group(2))
            elif tok.group(0) == "}":
                stack.pop()
            elif tok.group(7):
                method = tritons.services_by_name["GRPCInferenceService"] \
                    .methods_by_name[tok.group(7)]
                assert (method.input_type.name, method.output_type.name) == \
                    (tok.group(8), tok.group(9))
                checked += 1
            elif tok.group(10):  # an enum value
                kind, name = stack[-1].split()
                assert kind == "enum", tok.group(0)
                enum = tritons.enum_types_by_name[name] if len(stack) == 1 else \
                    _message(tritons, stack[:-1]).enum_types_by_name[name]
                assert enum.values_by_name[tok.group(10)].number == int(tok.group(11)), \
                    (name, tok.group(10))
                checked += 1
            elif tok.group(6) and stack and not stack[-1].startswith("service"):
                desc = _message(tritons, stack)
                field = desc.fields_by_name[tok.group(5)]
                where = (desc.name, tok.group(5))
                assert field.number == int(tok.group(6)), where
                assert field.is_repeated == bool(tok.group(3) or tok.group(4).startswith("map<")), \
                    where
                if tok.group(4) in scalar:
                    assert field.type == scalar[tok.group(4)], where
                elif not tok.group(4).startswith("map<"):
                    named = field.message_type or field.enum_type
                    assert named is not None and named.name == tok.group(4), where
                checked += 1
    assert checked >= 120


def _message(file, stack: list[str]):
    """The descriptor of the message nested as the stack of open blocks says."""
    names = [s.split()[1] for s in stack if s.startswith("message")]
    desc = file.message_types_by_name[names[0]]
    for n in names[1:]:
        desc = desc.nested_types_by_name[n]
    return desc


# ---- what a Triton user and an operator need (issue 17 items 11-13, issue 19 item 4) --------


def test_model_config_and_statistics_through_tritonclient(served):
    d, gw, _ = served
    c = tritonhttp.InferenceServerClient(gw.http)
    x = tritonhttp.InferInput("x", [2, 16], "FP32")
    x.set_data_from_numpy(np.ones((2, 16), dtype=np.float32))
    for _ in range(3):
        c.infer("mlp", [x])
    cfg = c.get_model_config("mlp")
    assert cfg["name"] == "mlp" and cfg["platform"] == "tensord/torchscript"
    assert cfg["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 16]}]
    assert cfg["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1, 4]}]
    (st,) = c.get_inference_statistics("mlp")["model_stats"]
    with Client(d.path) as direct:
        (want,) = [m for m in direct.stats() if m.name == "mlp"]
    assert st["name"] == "mlp" and st["inference_count"] >= 3
    assert st["inference_count"] <= want.served and st["execution_count"] <= want.batches
    assert st["inference_stats"]["success"]["count"] == st["inference_count"]
    everything = c.get_inference_statistics()["model_stats"]
    assert {m["name"] for m in everything} >= {"mlp", "identity", "resnet18"}
    with pytest.raises(InferenceServerException) as e:  # JSON, not "Parse error at offset 4"
        c.get_model_config("nope")
    assert "nope" in e.value.message()
    status, headers, body = gw.request("GET", "/v2/no/such/route")
    assert status == 404 and "error" in json.loads(body)


def test_model_config_and_statistics_through_tritonclient_grpc(served):
    """gRPC ModelConfig and ModelStatistics, as tritonclient.grpc asks for them: the daemon's
    signature as Triton's config, and its counters, which move by exactly the requests made."""
    from tritonclient.grpc import model_config_pb2

    d, gw, _ = served
    c = tritongrpc.InferenceServerClient(gw.grpc)

    def tensors(ts):
        return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in ts]

    cfg = c.get_model_config("mlp").config
    assert (cfg.name, cfg.platform, cfg.backend, cfg.max_batch_size) == \
        ("mlp", "tensord/torchscript", "tensord", 0)
    assert tensors(cfg.input) == [("x", "TYPE_FP32", [-1, 16])]
    assert tensors(cfg.output) == [("y", "TYPE_FP32", [-1, 4])]
    assert cfg.parameters["device"].string_value == "cpu"
    cfg = c.get_model_config("sentiment", "1").config  # BYTES is Triton's TYPE_STRING
    assert tensors(cfg.input) == [("text", "TYPE_STRING", [-1])]
    assert tensors(cfg.output) == [("labels", "TYPE_STRING", [-1, 3]),
                                   ("scores", "TYPE_FP32", [-1, 3]),
                                   ("classes", "TYPE_INT64", [-1, 3])]
    assert cfg.platform == "tensord/text.classify"
    assert c.get_model_config("mlp", as_json=True)["config"]["input"][0]["data_type"] == \
        "TYPE_FP32"

    def stat(model="mlp"):
        (s,) = c.get_inference_statistics(model).model_stats
        return s

    before = stat()
    x = tritongrpc.InferInput("x", [2, 16], "FP32")
    x.set_data_from_numpy(np.ones((2, 16), dtype=np.float32))
    for _ in range(5):  # one after the other: each is a forward pass of its own
        c.infer("mlp", [x])
    after = stat()
    assert (after.name, after.version) == ("mlp", "1")
    assert after.inference_count - before.inference_count == 5
    assert after.execution_count - before.execution_count == 5
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count - s0.success.count == 5 and s1.fail.count == s0.fail.count
    assert s1.queue.count - s0.queue.count == 5
    assert s1.compute_infer.count - s0.compute_infer.count == 5
    assert s1.compute_infer.ns > s0.compute_infer.ns and s1.queue.ns >= s0.queue.ns
    assert s1.success.ns == s1.queue.ns + s1.compute_infer.ns
    ones = {b.batch_size: b.compute_infer.count for b in after.batch_stats}[1] - \
        {b.batch_size: b.compute_infer.count for b in before.batch_stats}.get(1, 0)
    assert ones == 5

    # Every model's counters are the daemon's own (read first: nothing runs in between).
    with Client(d.path) as direct:
        want = {m.name: m for m in direct.stats()}
    got = {s.name: s for s in c.get_inference_statistics().model_stats}
    assert set(got) == set(want) >= {"mlp", "identity", "resnet18", "sentiment", "gate"}
    for name, w in want.items():
        g = got[name]
        assert (g.version, g.inference_count, g.execution_count) == \
            (str(w.version), w.served, w.batches), name
        assert g.inference_stats.fail.count == w.failed + w.rejected + w.expired, name
        assert g.inference_stats.queue.ns == w.queue_us * 1000, name
        assert g.inference_stats.compute_infer.ns == w.compute_us * 1000, name
        assert {b.batch_size: b.compute_infer.count for b in g.batch_stats} == \
            dict(map(tuple, w.batch_sizes)), name

    for call, says in ((lambda: c.get_model_config("nope"), 'no model named "nope"'),
                       (lambda: c.get_inference_statistics("nope"), 'no model named "nope"'),
                       (lambda: c.get_model_config("mlp", "7"), "version 7 is not served")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "StatusCode.NOT_FOUND" and says in e.value.message(), e.value


def test_gateway_listens_on_loopback_by_default(gateway_exe, tmp_path):
    log = tmp_path / "gw.log"
    proc = subprocess.Popen([gateway_exe, "-socket", str(tmp_path / "none.sock"),
                             "-http", "", "-grpc", "127.0.0.1:0"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        help_text = subprocess.run([gateway_exe, "-h"], capture_output=True, text=True).stderr
        assert '-http string' in help_text and '(default "127.0.0.1:8000")' in help_text
        assert '(default "127.0.0.1:8001")' in help_text
    finally:
        stop_process(proc, signal.SIGTERM, timeout=10)
    exposed = subprocess.Popen([gateway_exe, "-socket", str(tmp_path / "none.sock"),
                                "-http", "0.0.0.0:0", "-grpc", ""],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 10
        while "without TLS or authentication" not in log.read_text():
            assert time.monotonic() < end, log.read_text()
            time.sleep(0.02)
    finally:
        stop_process(exposed, signal.SIGTERM, timeout=10)


def test_requests_are_held_across_a_daemon_restart(gateway_exe, tmp_path):
    """A SIGTERM restart of the daemon: requests made meanwhile wait for the new daemon
    (within -hold and their deadline) instead of getting 503."""
    d = start_daemon(tmp_path)
    g = start_gateway(gateway_exe, d.path, tmp_path)
    statuses: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def caller(k: int) -> None:
        i = 0
        while not stop.is_set():
            data = [float(k), float(i)]
            status, _, body = g.request("POST", "/v2/models/identity/infer", json.dumps(
                {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": data}]}
            ).encode())
            ok = status == 200 and json.loads(body)["outputs"][0]["data"] == data
            statuses.append((200 if ok else status, body))
            i += 1
    try:
        g.wait_ready()
        threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert d.stop() == 0
        d = start_daemon(tmp_path)
        n = len(statuses)
        end = time.monotonic() + 30
        while len(statuses) < n + 40 and time.monotonic() < end:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        assert g.stop() == 0, g.logs()
        d.stop()
    bad = [(s, b[:200]) for s, b in statuses if s != 200]
    assert not bad and len(statuses) > 40, (len(statuses), bad[:5])


def _rss_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_memory_stays_within_the_budget(gateway_exe, tmp_path):
    """Lying Content-Lengths, bodies that trickle or stall, gzip that expands 1000 times:
    the gateway's memory stays within its -max-inflight budget (issue 19 item 4)."""
    import gzip as gz
    import socket as so

    d = start_daemon(tmp_path)
    g = start_gateway(gateway_exe, d.path, tmp_path, "-max-body", str(8 << 20),
                      "-max-inflight", str(32 << 20), "-body-timeout", "3s")
    host, port = g.http.rsplit(":", 1)
    socks = []

    def send(head: bytes, body: bytes = b"") -> so.socket:
        """Head now, body from a thread in 64 KiB pieces; a gateway that answers before the
        body is all sent (413, 429) may close the connection under the sender."""
        s = so.create_connection((host, int(port)), timeout=30)
        s.sendall(head)

        def rest() -> None:
            with contextlib.suppress(OSError):
                for i in range(0, len(body), 65536):
                    s.sendall(body[i:i + 65536])
        threading.Thread(target=rest, daemon=True).start()
        socks.append(s)
        return s

    def answer(s: so.socket) -> int:
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return int(data.split(b" ", 2)[1]) if data else 0

    try:
        g.wait_ready()
        base = _rss_kib(g.proc.pid, "VmRSS")
        path = b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n"
        # 12 connections announcing 256 MiB and sending 1 byte: refused from the header.
        liars = [send(path + b"Content-Length: 268435456\r\n\r\n", b"{") for _ in range(12)]
        assert [answer(s) for s in liars] == [413] * 12
        # 12 that send 6 MiB of an 8 MiB body and stall: the budget takes some, the rest 429.
        stallers = [send(path + b"Content-Length: 8388608\r\n\r\n", b" " * (6 << 20))
                    for _ in range(12)]
        # 12 gzip bodies of ~64 KiB that expand to 64 MiB each.
        bomb = gz.compress(b" " * (64 << 20))
        bombs = [send(path + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                      % len(bomb), bomb) for _ in range(12)]
        codes = [answer(s) for s in stallers + bombs]  # stalled ones: 408 at -body-timeout
        peak = _rss_kib(g.proc.pid, "VmHWM")
        assert set(codes) <= {408, 413, 429} and 429 in codes and 408 in codes, codes
        assert all(c in (413, 429) for c in codes[12:]), codes
        # Within the 32 MiB budget, plus what the Go runtime and the connections take.
        assert peak - base < (32 + 24) << 10, (base, peak)
        # And it still serves.
        status, _, body = g.request("POST", "/v2/models/identity/infer", json.dumps(
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [3]}]}).encode())
        assert status == 200, body
    finally:
        for s in socks:
            s.close()
        assert g.stop() == 0, g.logs()
        d.stop()

