"""Every example runs."""

import importlib.util
import io
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from rissole_edge.generator import Generator

EXAMPLES = Path(__file__).parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_progress_api_example(tiny_bundle, tmp_path):
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "progress_api.py"), str(tiny_bundle), str(out),
                           "--n", "4", "--steps", "5"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("images 4/4") and Image.open(out).size == (32, 32)


def test_http_server_answers_concurrent_requests(tiny_bundle):
    module = _load("http_server")
    with Generator.open(tiny_bundle, threads=1) as gen:
        server = module.make_server(gen, port=0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.server_address[1]
        results = {}

        def fetch(seed):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/image?seed={seed}&steps=4") as r:
                results[seed] = np.asarray(Image.open(io.BytesIO(r.read())))

        clients = [threading.Thread(target=fetch, args=(s,)) for s in range(6)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/image?steps=0")
            raise AssertionError("steps=0 was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 400
        server.shutdown()
        server.server_close()
        for seed in range(6):
            alone = np.asarray(gen.generate(1, seed=seed, steps=4)[0])
            assert np.array_equal(results[seed], alone)
