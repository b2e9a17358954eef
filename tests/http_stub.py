"""A real HTTP server on a loopback port for the download tests: files by path, HTTP Range requests, and
the faults the downloaders must survive (error codes, a connection dropped mid-file, slow answers).

    with StubServer() as server:
        server.add("/datasets/a.json", b"...", goog_md5=True)
        server.add("/zips/big.zip", data, drop_after=1000)      # the first answer stops after 1000 bytes
        server.add("/gone.jpg", status=404)
        url = server.url("/datasets/a.json")

`server.requests` lists (path, Range header or None) for every request, for assertions on resumes.
"""
from __future__ import annotations

import base64
import hashlib
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    drop_after: int | None = None  # answers this many times cut at this byte (the header promises all of it)
    drops_left: int = 1
    delay_s: float = 0.0  # wait before answering (a slow server)
    goog_md5: bool = False  # send Google Cloud Storage's x-goog-hash md5 header
    ranges: bool = True  # False: ignore Range headers (answer 200 with the whole file)
    extra_headers: dict | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, head_only: bool) -> None:
        server: StubServer = self.server.stub  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        with server.lock:
            server.requests.append((path, rng))
            route = server.routes.get(path)
        if route is None:
            return self._plain(404, b"not found")
        if route.delay_s:
            time.sleep(route.delay_s)
        if route.status != 200:
            return self._plain(route.status, b"error")
        body, start, status = route.body, 0, 200
        if rng and route.ranges and rng.startswith("bytes="):
            first = int(rng[6:].split("-", 1)[0])
            if first >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, status = first, 206
        self.send_response(status)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if route.goog_md5:
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
            self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={md5}")
        for key, value in (route.extra_headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if head_only:
            return
        payload = body[start:]
        with server.lock:
            drop = route.drop_after is not None and route.drops_left > 0 and start < route.drop_after
            if drop:
                route.drops_left -= 1
        if drop:
            self.wfile.write(payload[: route.drop_after - start])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def _plain(self, status: int, text: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(True)


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many downloads at once: the default backlog of 5 stalls connections past it
    daemon_threads = True


class StubServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.stub = self  # type: ignore[attr-defined]
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, path: str, body: bytes = b"", **kwargs) -> str:
        self.routes[path] = Route(body=body, **kwargs)
        return self.url(path)

    def url(self, path: str) -> str:
        return self.base + path

    def ranges_asked(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]

    def __enter__(self) -> "StubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def add_hub_repo(server: StubServer, repo: str, files: dict[str, bytes]) -> str:
    """Serve `files` as a Hugging Face model repository at `server` (what huggingface_hub's snapshot_download
    asks an HF_ENDPOINT for: the revision, the file tree, each file by commit); returns the commit id."""
    import json

    sha = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    oids = {name: hashlib.sha1(body).hexdigest() for name, body in files.items()}
    info = {"id": repo, "modelId": repo, "sha": sha, "private": False,
            "siblings": [{"rfilename": name} for name in files]}
    tree = [{"type": "file", "path": name, "size": len(body), "oid": oids[name]} for name, body in files.items()]
    server.add(f"/api/models/{repo}/revision/main", json.dumps(info).encode(), content_type="application/json")
    server.add(f"/api/models/{repo}/tree/{sha}", json.dumps(tree).encode(), content_type="application/json")
    for name, body in files.items():
        server.add(f"/{repo}/resolve/{sha}/{name}", body,
                   extra_headers={"X-Repo-Commit": sha, "ETag": f'"{oids[name]}"'})
    return sha
