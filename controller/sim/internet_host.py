"""The simulated world's Internet host service, and the client that asks it who we are.

    python -m controller.sim.internet_host serve --port 80 --log FILE
        a small HTTP service (run inside the Internet host's namespace by World): every request
        is answered with the source address it came from ("seen 198.51.100.11") and that address
        is appended to FILE, one line per request, so tests see what the Internet sees.
    python -m controller.sim.internet_host get HOST [--port P] [--timeout S] [--source ADDR]
        run inside a workload's namespace: GET http://HOST:P/ (from ADDR), prints the answer,
        exits 1 if there is none.

Test scaffolding standing in for a host on the Internet, not part of the product.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(port: int, log_path: str) -> None:
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            source = self.client_address[0]
            with lock:
                log.write(source + "\n")
            body = f"seen {source}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: the log file is the record
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("ready", flush=True)  # the world waits for this line: the socket is listening
    server.serve_forever()


def get(host: str, port: int, timeout: float, source: str | None) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", "/")
        sys.stdout.write(conn.getresponse().read().decode())
        return 0
    except OSError as e:
        print(f"no answer: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller.sim.internet_host")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=80)
    s.add_argument("--log", required=True)
    g = sub.add_parser("get")
    g.add_argument("host")
    g.add_argument("--port", type=int, default=80)
    g.add_argument("--timeout", type=float, default=3.0)
    g.add_argument("--source", default=None)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port, args.log)
        return 0
    return get(args.host, args.port, args.timeout, args.source)


if __name__ == "__main__":
    sys.exit(main())
