"""A loopback HTTP server for remote-shard tests: serves a directory on 127.0.0.1, with faults chosen
by the first path component: /ok/F serves F; /drop/F sends half of F (announcing its full length)
and closes; /stall/F sends half of F and then nothing until the server stops; /flaky/F drops the
first request for F and serves the next ones. Missing files are 404; a query string is ignored.
`requests[path]` counts the requests per path (query included); with `hold_after` = n, every request
after the n-th waits until `gate` is set."""
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer:
    def __init__(self, root):
        self.root = Path(root)
        self.requests: Counter = Counter()
        self.stopped = threading.Event()
        self.gate = threading.Event()
        self.hold_after = None
        self.held = threading.Event()  # set when a request is held
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests[self.path] += 1
                if server.hold_after is not None and sum(server.requests.values()) > server.hold_after:
                    server.held.set()
                    server.gate.wait()
                mode, _, name = self.path.lstrip("/").split("?")[0].partition("/")
                file = server.root / name
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                if mode == "flaky" and server.requests[self.path] > 1:
                    mode = "ok"
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if mode == "ok":
                        self.wfile.write(data)
                        return
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                except ConnectionError:  # the client was killed
                    return
                if mode == "stall":
                    server.stopped.wait()
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
