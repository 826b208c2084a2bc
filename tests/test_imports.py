"""What a default `generate` loads: not Pillow, hnswlib or OpenSSL (benchmarks/results/memory.md
counts what each costs in RSS), and numpy.random's import leaves the real `secrets` module."""

import json
import subprocess
import sys

PROBE = """
import json, sys
from rissole_edge.generator import Generator
import rissole_edge.cli
with Generator.open(threads=1) as gen:
    gen.generate(2, as_array=True)
loaded = {name: name in sys.modules for name in ("PIL", "hnswlib", "_hashlib", "secrets")}
import secrets
loaded["real secrets"] = len(secrets.token_hex(4)) == 8
print(json.dumps(loaded))
"""


def test_a_default_generation_loads_neither_pillow_nor_hnswlib_nor_openssl(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, check=True)
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == {"PIL": False, "hnswlib": False, "_hashlib": False, "secrets": False, "real secrets": True}
