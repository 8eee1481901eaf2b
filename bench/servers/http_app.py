"""HTTP+JSON baseline: a Flask WSGI app speaking KServe-v2-style JSON (tensor data as JSON
lists of numbers), served by gunicorn as Flask's deployment guide shows:

    gunicorn -w 1 -k gthread --threads 8 -b 127.0.0.1:PORT http_app:app

One worker process, like tensord's one daemon process (run.sh passes the same flags)."""

from __future__ import annotations

import torch
from flask import Flask, jsonify, request

import models

app = Flask(__name__)
models.warm_up()

_TORCH = {"f32": torch.float32, "f64": torch.float64, "i64": torch.int64, "i32": torch.int32}


@app.post("/v2/models/<name>/infer")
def infer(name: str):
    body = request.get_json(force=True)
    try:
        inputs = [
            torch.tensor(t["data"], dtype=_TORCH[t["datatype"]]).reshape(t["shape"])
            for t in body["inputs"]
        ]
        outputs = models.run(name, inputs)
    except models.UnknownModel:
        return jsonify(error=f"unknown model {name!r}"), 404
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        return jsonify(error=f"{type(e).__name__}: {e}"), 400
    return jsonify(outputs=[
        {"name": n, "datatype": dt, "shape": list(t.shape), "data": t.reshape(-1).tolist()}
        for n, dt, t in outputs
    ])


@app.get("/v2/health/ready")
def ready():
    return "ok"
