"""A CPython HTTP service for the benchmark harness (bench/harness.py).

py_http.py PORT: a ThreadingHTTPServer on 127.0.0.1:PORT (HTTP/1.1, keep-alive, no access
log) whose handler builds a modest JSON response per request (a list of small dicts, about
2 KiB), so each request allocates like a small web handler. Prints "ready" once listening.
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def do_GET(self):
        rows = [{"id": i, "name": f"item-{i}", "path": self.path, "tags": ["a", "b", str(i)]}
                for i in range(24)]
        body = json.dumps({"rows": rows, "count": len(rows)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # wrk closing its connections
            super().handle_error(request, client_address)


def heartbeat():
    """A small malloc every 50 ms while idle: an injector that breaks on malloc to get in
    (memray attach through lldb) finds one."""
    while True:
        bytearray(1024)
        time.sleep(0.05)


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 18090
    srv = Server(("127.0.0.1", port), Handler)
    threading.Thread(target=heartbeat, daemon=True).start()
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
