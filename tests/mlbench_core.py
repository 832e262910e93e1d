"""mlbench-core 3.0.0's own API client, taken from its wheel at test time.

Its package ``__init__`` imports torch, so ``mlbench_core/api.py`` is loaded alone.  That
file imports ``from kubernetes import client, config`` at module level; with ``url=``
given the client never uses them, so a stand-in ``kubernetes`` module (an empty
``client.ApiClient`` to subclass) is put in ``sys.modules`` while it loads.  The wheel is
downloaded once (``pip download --no-deps``) into a cache under the test state root and
reused.

    api_client(url) -> ApiClient      # url: "HOST:PORT", as mlbench's --dashboard-url
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

from tests.cluster.cluster import STATE_ROOT

VERSION = "3.0.0"
CACHE = STATE_ROOT / "mlbench-core-wheel"
_loaded: dict[str, Any] = {}


def wheel() -> Path:
    """The mlbench-core wheel, downloaded into CACHE the first time."""
    found = sorted(CACHE.glob(f"mlbench_core-{VERSION}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(CACHE),
         f"mlbench-core=={VERSION}"],
        check=True, timeout=300,
    )  # fmt: skip
    return sorted(CACHE.glob(f"mlbench_core-{VERSION}-*.whl"))[0]


def api_module() -> types.ModuleType:
    """``mlbench_core/api.py`` of the wheel, loaded alone (once)."""
    if "api" in _loaded:
        return _loaded["api"]
    source = CACHE / f"api-{VERSION}.py"
    if not source.exists():
        with zipfile.ZipFile(wheel()) as z:
            source.write_bytes(z.read("mlbench_core/api.py"))
    stand_in = types.ModuleType("kubernetes")
    stand_in.client = types.SimpleNamespace(ApiClient=type("ApiClient", (), {}))
    stand_in.config = types.SimpleNamespace()
    saved = sys.modules.get("kubernetes")
    sys.modules["kubernetes"] = stand_in
    try:
        spec = importlib.util.spec_from_file_location("mlbench_core_api", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("kubernetes", None)
        else:
            sys.modules["kubernetes"] = saved
    _loaded["api"] = module
    return module


def api_client(url: str) -> Any:
    """mlbench-core's ``ApiClient(in_cluster=False, url=url)``."""
    return api_module().ApiClient(in_cluster=False, url=url)
