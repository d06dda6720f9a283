"""Prepare one model with a ModelStore in its own process (for the two-process test).

Usage: python store_process.py CACHE_DIR URL SHA256 READY_FILE GO_FILE. Creates
READY_FILE once imported, waits for GO_FILE (so that processes start together),
prepares the model and prints its location.
"""

import logging
import sys
import time
from pathlib import Path

import trio

from lllms_core.config import Config, ModelConfig, ServerConfig
from lllms_core.store import ModelStore

cache, url, sha256, ready, go = sys.argv[1:]
logging.basicConfig(level=logging.INFO, format="%(message)s")
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
store = ModelStore(Config(server=ServerConfig(cache_dir=cache)), {})
print(trio.run(store.prepare, ModelConfig(id="shared", engine="none", url=url, sha256=sha256)))
