"""gRPC baseline: Triton-style Infer RPC (tensor metadata in the message, tensor bytes in
`raw_input_contents`) over a Unix socket, a grpcio server with a thread pool as grpcio's
examples set it up. One process, like tensord.

    python grpc_server.py --socket PATH [--threads 8]"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc

import infer_pb2
import infer_pb2_grpc
import models

MAX_MESSAGE = 1 << 30  # gRPC's default 4 MiB receive limit would refuse the large payloads


class Inference(infer_pb2_grpc.InferenceServicer):
    def Infer(self, request, context):  # noqa: N802 (the generated method name)
        try:
            inputs = [models.tensor_from_buffer(raw, m.datatype, list(m.shape))
                      for m, raw in zip(request.inputs, request.raw_input_contents)]
            outputs = models.run(request.model, inputs)
        except models.UnknownModel:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}")
        except Exception as e:  # the caller gets every failure as a status
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")
        return infer_pb2.InferResponse(
            outputs=[infer_pb2.TensorMeta(name=n, datatype=dt, shape=list(t.shape))
                     for n, dt, t in outputs],
            raw_output_contents=[t.numpy().tobytes() for _, _, t in outputs],
        )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args()
    models.warm_up()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.threads),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                 ("grpc.max_send_message_length", MAX_MESSAGE)],
    )
    infer_pb2_grpc.add_InferenceServicer_to_server(Inference(), server)
    server.add_insecure_port("unix:" + args.socket)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("grpc_server: ready", file=sys.stderr, flush=True)
    stop.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
