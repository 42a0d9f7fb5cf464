"""A Python web app with a global cache that is never evicted (issue 21's CPython case).

GET /user?id=N caches a 48 KiB bytearray per user in the module-level dict `cache`.
Prints "listening on 127.0.0.1:PORT pid PID", then serves until killed."""
import http.server
import os
import sys

cache = {}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        user = self.path.rsplit("=", 1)[-1]
        cache[user] = bytearray(48 * 1024)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on 127.0.0.1:{server.server_address[1]} pid {os.getpid()}", flush=True)
server.serve_forever()
