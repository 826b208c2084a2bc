"""A tiny image service: one shared Generator answering concurrent HTTP requests with PNGs.

    python examples/http_server.py BUNDLE [--port 8000] [--memory-budget 128MB]
    curl 'http://127.0.0.1:8000/image?seed=3&steps=25' > image.png

Only the standard library besides rissole_edge. The Generator is opened once and shared by
every request thread: it is thread-safe and keeps the whole process within its memory budget.
"""

from __future__ import annotations

import argparse
import io
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from rissole_edge.errors import RissoleError
from rissole_edge.generator import Generator, Query


def make_server(gen: Generator, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            if url.path != "/image":
                self.send_error(404, "try /image?seed=N&steps=K[&label=NAME]")
                return
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                image = gen.generate(1, seed=int(q.get("seed", 0)), steps=int(q.get("steps", 25)),
                                     query=Query(label=q.get("label")))[0]
            except (RissoleError, ValueError) as e:
                self.send_error(400, str(e))
                return
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(buf.tell()))
            self.end_headers()
            self.wfile.write(buf.getvalue())

        def log_message(self, *args: object) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--memory-budget", default=None)
    args = parser.parse_args(argv)
    with Generator.open(args.bundle, memory_budget=args.memory_budget) as gen:
        server = make_server(gen, port=args.port)
        print(f"serving on http://127.0.0.1:{server.server_address[1]}/image", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
