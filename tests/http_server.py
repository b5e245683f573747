"""A controllable local HTTP file server for download tests (stdlib only).

    with serve({"hparams.json": data}, status={"hparams.json": [500]}) as server:
        requests.get(f"{server.url}/hparams.json")  # 500, then the next GET gets 200
        server.requests  # [("/hparams.json", None)]
"""

import contextlib
import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_SOCKET_TIMEOUT_S = 10  # a stuck client never holds a handler thread longer than this
_JOIN_TIMEOUT_S = 5


class Server:
    """Shared state of one serve() context: files, remaining one-shot behaviours, request log."""

    def __init__(self, files, *, drop_after=None, ignore_range=False, status=None, wrong_length=None, delay=0.0, hub_commit=None):
        self.url = ""
        self.hub_commit = hub_commit
        self.requests = []  # [(path, range_header_or_None)] in arrival order
        self.files = dict(files)
        self.ignore_range = ignore_range
        self.delay = delay
        self._drop_after = dict(drop_after or {})
        self._status = {name: list(codes) for name, codes in (status or {}).items()}
        self._wrong_length = dict(wrong_length or {})
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def record(self, path, range_header):
        with self._lock:
            self.requests.append((path, range_header))

    def next_status(self, name):
        """Pop the next forced status code for name, or None."""
        with self._lock:
            codes = self._status.get(name)
            return codes.pop(0) if codes else None

    def take_body_behaviour(self, name):
        """Pop the one-shot (drop_after, wrong_length) for the first body sent of name."""
        with self._lock:
            return self._drop_after.pop(name, None), self._wrong_length.pop(name, None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = _SOCKET_TIMEOUT_S
    server_state: Server  # set per serve() via a subclass

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self._respond(send_body=True)

    def do_HEAD(self):
        self._respond(send_body=False)

    def _respond(self, send_body):
        state = self.server_state
        range_header = self.headers.get("Range")
        state.record(self.path, range_header)
        if state.delay and state.stopping.wait(state.delay):
            return
        name = unquote(urlsplit(self.path).path).lstrip("/")
        code = state.next_status(name)
        if name not in state.files:
            code = 404
        if code is not None:
            self._send_error(code, send_body, self._hub_headers(name, None) if code == 404 else None)
            return
        data = state.files[name]
        match = None if state.ignore_range or range_header is None else _RANGE.match(range_header)
        if match and int(match[1]) >= len(data):
            self._send_error(416, send_body, {"Content-Range": f"bytes */{len(data)}"})
            return
        start, end = (int(match[1]), int(match[2] or len(data) - 1)) if match else (0, len(data) - 1)
        body = data[start:min(end, len(data) - 1) + 1]
        drop_after, wrong_length = state.take_body_behaviour(name) if send_body else (None, None)
        self.send_response(206 if match else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) if wrong_length is None else wrong_length))
        if match:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        if not state.ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        for key, value in self._hub_headers(name, data).items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if send_body:
            self._write(body if drop_after is None else body[:drop_after])

    def _hub_headers(self, name, data):
        """What huggingface_hub reads from /{repo_id}/resolve/{revision}/{filename}: the commit and an
        ETag; a 404 says whether the repo or only the file is missing."""
        state = self.server_state
        if state.hub_commit is None:
            return {}
        if data is not None:
            return {"X-Repo-Commit": state.hub_commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        repo = name.split("/resolve/")[0] + "/resolve/"
        if any(other.startswith(repo) for other in state.files):
            return {"X-Repo-Commit": state.hub_commit, "X-Error-Code": "EntryNotFound"}
        return {"X-Error-Code": "RepoNotFound"}

    def _send_error(self, code, send_body, extra_headers=None):
        body = f"{code}\n".encode()
        self.send_response(code)
        for key, value in (extra_headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if send_body:
            self._write(body)

    def _write(self, body):
        """Write body; a client that hung up (e.g. after its timeout) is not an error."""
        with contextlib.suppress(ConnectionError):
            self.wfile.write(body)
            self.wfile.flush()

    def handle_one_request(self):
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle_one_request()
        self.close_connection = True


@contextlib.contextmanager
def serve(files, **behaviour):
    """Serve files ({name: bytes}) at {server.url}/{name} on 127.0.0.1 until the context exits.

    Every GET/HEAD is logged in server.requests as (raw request path, Range header or None), then:
    delay=s            sleep s seconds first (cut short when the context exits);
    status={name: [c]} the next len([c]) requests of name answer these codes (plain-text body);
    unknown name       404;
    Range: bytes=N-[M] 206 + Content-Range (416 if N >= size), unless ignore_range=True (always 200);
    drop_after={name: n}   the first body-sending GET of name sends full headers, n body bytes, hangs up;
    wrong_length={name: n} the first body-sending GET of name advertises Content-Length n;
    hub_commit="40 hex" answers as the Hugging Face hub does (files named OWNER/NAME/resolve/main/FILE):
                       X-Repo-Commit and ETag headers, and X-Error-Code on a 404.
    """
    state = Server(files, **behaviour)
    handler = type("Handler", (_Handler,), {"server_state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.url = f"http://127.0.0.1:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(_JOIN_TIMEOUT_S)
