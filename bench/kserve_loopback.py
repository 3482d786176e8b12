"""Importing this binds KServe's servers to 127.0.0.1 (KServe 0.21 hard-codes 0.0.0.0 / [::]):
the benchmark's KServe processes (bench/kserve_onnx_server.py, bench/kserve_image_transformer.py)
listen on loopback only, like everything else the benchmark starts.
"""

import types

import kserve.model_server
import kserve.protocol.grpc.server as kserve_grpc_server
from kserve.protocol.rest.server import RESTServer

LOOPBACK = "127.0.0.1"


class LoopbackRESTServer(RESTServer):
    """KServe's REST server (uvicorn + FastAPI), listening on loopback only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.host = LOOPBACK


kserve.model_server.RESTServer = LoopbackRESTServer

_grpc_aio = kserve_grpc_server.aio


def _loopback_grpc_server(*args, **kwargs):
    server = _grpc_aio.server(*args, **kwargs)
    add_port = server.add_insecure_port
    server.add_insecure_port = lambda address: add_port(address.replace("[::]", LOOPBACK, 1))
    return server


kserve_grpc_server.aio = types.SimpleNamespace(server=_loopback_grpc_server)
