"""What importing the package loads: nothing a server without metrics has no use for.

prometheus_client (http.client, email, wsgiref, urllib with it) and importlib.metadata
(email, zipfile, csv) cost a server ~5 MiB of resident memory (docs/benchmarks.md,
"Issue 29: memory under load"): they load only when metrics are on or the version is
asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["prometheus_client", "importlib.metadata", "http.client", "email", "zipfile"]


def loaded_after(code: str) -> dict[str, bool]:
    """Which of HEAVY a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_importing_the_package_and_its_cli_loads_none_of_them():
    assert loaded_after("import warpsocket, warpsocket.cli") == dict.fromkeys(HEAVY, False)


def test_the_version_is_still_there_when_asked_for():
    code = "import warpsocket\nassert warpsocket.__version__ and warpsocket.__version__ != '0.0.0'"
    assert loaded_after(code)["importlib.metadata"]
