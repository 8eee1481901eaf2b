"""tensord-gateway (go/cmd/tensord-gateway): the daemon's models over the Open Inference
Protocol, called with Triton's own Python clients (tritonclient.http with binary data and
with JSON, tritonclient.grpc), with plain JSON requests as the KServe v2 document writes them,
and by hand with the binary tensor extension; errors, deadlines, readiness while the daemon
restarts, and a graceful shutdown."""

from __future__ import annotations

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
        assert e.value.status() == want and "image 0" in e.value.message()
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
    g = start_gateway(gateway_exe, d.path, tmp_path)
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
    """Every message and field of the gateway's grpc_predict_v2.proto exists in Triton's
    grpc_service.proto (as tritonclient ships it) with the same number and type, and the
    service's methods are Triton's: what lets tritonclient.grpc talk to the gateway."""
    from google.protobuf.descriptor import FieldDescriptor
    from tritonclient.grpc import service_pb2

    text = (ROOT / "go/cmd/tensord-gateway/proto/grpc_predict_v2.proto").read_text()
    text = re.sub(r"//[^\n]*", "", text)
    scalar = {"bool": FieldDescriptor.TYPE_BOOL, "string": FieldDescriptor.TYPE_STRING,
              "bytes": FieldDescriptor.TYPE_BYTES, "int32": FieldDescriptor.TYPE_INT32,
              "int64": FieldDescriptor.TYPE_INT64, "uint32": FieldDescriptor.TYPE_UINT32,
              "uint64": FieldDescriptor.TYPE_UINT64, "float": FieldDescriptor.TYPE_FLOAT,
              "double": FieldDescriptor.TYPE_DOUBLE}
    stack: list[str] = []
    checked = 0
    for tok in re.finditer(r"(message|service|oneof)\s+(\w+)\s*\{|\}|"
                           r"(repeated\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;|"
                           r"rpc\s+(\w+)\s*\((\w+)\)\s*returns\s*\((\w+)\)\s*(?:\{\s*\}|;)", text):
        if tok.group(1):
            stack.append(tok.group(1) + " " + tok.group(2))
        elif tok.group(0) == "}":
            stack.pop()
        elif tok.group(7):
            method = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"] \
                .methods_by_name[tok.group(7)]
            assert (method.input_type.name, method.output_type.name) == \
                (tok.group(8), tok.group(9))
            checked += 1
        elif tok.group(6) and stack and not stack[-1].startswith("service"):
            names = [s.split()[1] for s in stack if s.startswith("message")]
            desc = service_pb2.DESCRIPTOR.message_types_by_name[names[0]]
            for n in names[1:]:
                desc = desc.nested_types_by_name[n]
            field = desc.fields_by_name[tok.group(5)]
            assert field.number == int(tok.group(6)), (names, tok.group(5))
            assert field.is_repeated == bool(tok.group(3) or tok.group(4).startswith("map<")), \
                (names, tok.group(5))
            if tok.group(4) in scalar:
                assert field.type == scalar[tok.group(4)], (names, tok.group(5))
            checked += 1
    assert checked > 60
