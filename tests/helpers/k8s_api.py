"""A recorded Kubernetes API on 127.0.0.1, for testing the calls trainyard makes through the
official client (the real client, its real HTTP, a kubeconfig naming this server).

It stores what is created, answers reads, lists (with label selectors) and deletes as the
API server does for these resources, records every request, and can be told to refuse
some (403, 500, ...). It runs no controllers and validates nothing: it is evidence of what
trainyard sends and how it reads answers, never that a job would run (that is
tests/integration/test_k8s_pods.py, and the schema checks of test_k8s_manifests.py).

A helper that tests import, not a test module: it asserts nothing itself; the tests that
use it (tests/integration/test_k8s_api.py) check the requests it recorded and the answers
trainyard made of its replies.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

_PATH = re.compile(
    r"^/(?P<gv>api/v1|apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>log|status))?$"
)


class RecordedApi:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, dict]] = {}
        self.requests: list[dict] = []
        self.uids = 0
        self.refuse = None  # (method, plural, body, dry_run) -> (code, reason) or None
        self.on_create = None  # (plural, stored object) -> None: a controller's part
        self.logs: dict[str, str] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self):
                api._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> RecordedApi:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                      "namespace": namespace}}],
        }))  # fmt: skip
        return path

    # --- what tests set up, as controllers would ---------------------------------------

    def put(self, gv: str, namespace: str, plural: str, obj: dict) -> None:
        self.objects.setdefault((gv, namespace, plural), {})[obj["metadata"]["name"]] = obj

    def stored(self, gv: str, namespace: str, plural: str) -> dict[str, dict]:
        return self.objects.get((gv, namespace, plural), {})

    def created(self, plural: str | None = None) -> list[dict]:
        """Bodies of the creations that were not dry runs, in order."""
        return [r["body"] for r in self.requests if r["method"] == "POST" and not r["dry_run"]
                and (plural is None or r["plural"] == plural)]  # fmt: skip

    # --- serving ----------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        match = _PATH.match(url.path)
        if not match:
            return self._send(h, 404, _status(404, "NotFound", f"no route {url.path}"))
        gv, ns, plural, name, sub = match.group("gv", "ns", "plural", "name", "sub")
        dry_run = query.get("dryRun") == "All"
        self.requests.append({"method": h.command, "plural": plural, "name": name,
                              "query": query, "body": body, "dry_run": dry_run,
                              "auth": h.headers.get("Authorization"),
                              "content_type": h.headers.get("Content-Type")})  # fmt: skip
        refused = self.refuse(h.command, plural, body, dry_run) if self.refuse else None
        if refused:
            code, reason = refused
            return self._send(h, code, _status(code, reason, f"{plural} refused: {reason}"))
        store = self.objects.setdefault((gv, ns, plural), {})
        if sub == "log":
            if name not in self.logs:  # as for a container still waiting to start
                message = f'container "trainer" in pod "{name}" is waiting to start'
                return self._send(h, 400, _status(400, "BadRequest", message))
            return self._send(h, 200, self.logs[name], text=True)
        if h.command == "POST":
            return self._create(h, store, body, dry_run)
        if h.command == "PUT":
            store[name] = body
            return self._send(h, 200, body)
        if h.command == "PATCH":  # a merge patch of the stored object
            if name not in store:
                return self._send(h, 404, _status(404, "NotFound", f"{plural} {name}"))
            store[name] = _merged(store[name], body)
            return self._send(h, 200, store[name])
        if h.command == "GET":
            if name:
                if name not in store:
                    return self._send(h, 404, _status(404, "NotFound", f"{plural} {name}"))
                return self._send(h, 200, store[name])
            items = [o for o in store.values() if _selected(o, query.get("labelSelector"))]
            return self._send(h, 200, {"kind": "List", "apiVersion": "v1", "metadata": {},
                                       "items": items})  # fmt: skip
        if h.command == "DELETE":
            names = [name] if name else [n for n, o in store.items()
                                         if _selected(o, query.get("labelSelector"))]  # fmt: skip
            if name and name not in store:
                return self._send(h, 404, _status(404, "NotFound", f"{plural} {name}"))
            deleted = [store.pop(n) for n in names]
            if name:  # one object: the API server answers with what it deleted
                return self._send(h, 200, deleted[0])
            return self._send(h, 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        return self._send(h, 405, _status(405, "MethodNotAllowed", h.command))

    def _create(self, h, store: dict, body: dict, dry_run: bool) -> None:
        name = body["metadata"]["name"]
        if name in store:  # a dry run is refused alike, as the API server refuses it
            return self._send(h, 409, _status(409, "AlreadyExists", f"{name} already exists"))
        self.uids += 1
        metadata = {**body["metadata"], "uid": f"uid-{self.uids}"}
        created = {**body, "metadata": metadata, "status": body.get("status") or {}}
        if not dry_run:
            store[name] = created
            if self.on_create:
                self.on_create(h.path.split("?")[0].rsplit("/", 1)[-1], created)
        self._send(h, 201, created)

    @staticmethod
    def _send(h, code: int, payload, text: bool = False) -> None:
        data = payload.encode() if text else json.dumps(payload).encode()
        h.send_response(code)
        h.send_header("Content-Type", "text/plain" if text else "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}  # fmt: skip


def _merged(stored: dict, patch: dict) -> dict:
    out = dict(stored)
    for key, value in patch.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _selected(obj: dict, selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels", {})
    for term in (selector or "").split(","):
        if term:
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
    return True
