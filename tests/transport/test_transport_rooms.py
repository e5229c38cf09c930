"""The rooms stay apart: a site process loads no server code, and transport imports neither side."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import fedfms_secure.transport

TRANSPORT = Path(fedfms_secure.transport.__file__).parent


def _loaded_after(module: str) -> list[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_site_daemon_loads_no_server_module() -> None:
    loaded = _loaded_after("fedfms_secure.site.daemon")
    assert "fedfms_secure.site.daemon" in loaded and "fedfms_secure.transport.client" in loaded
    assert [m for m in loaded if m == "fedfms_secure.server" or m.startswith("fedfms_secure.server.")] == []


def test_transport_client_loads_neither_room() -> None:
    loaded = _loaded_after("fedfms_secure.transport.client")
    assert [m for m in loaded if m.split(".")[:2] in (["fedfms_secure", "server"], ["fedfms_secure", "site"])] == []


def test_no_transport_module_imports_server_or_site() -> None:
    offenders = []
    for path in sorted(TRANSPORT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[:2] in (["fedfms_secure", "server"], ["fedfms_secure", "site"])]
    assert len(list(TRANSPORT.glob("*.py"))) >= 5 and offenders == []
