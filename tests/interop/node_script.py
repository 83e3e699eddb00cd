"""Running a Node script of the interop tests and reading its answer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any


async def run_node_script(node_modules: Path, script: Path, *args: str) -> Any:
    """Run ``script`` with Node (its packages from ``node_modules``) and answer the JSON of the
    last line it prints; a non-zero exit fails the test with the script's stderr."""
    process = await asyncio.create_subprocess_exec(
        "node", str(script), *args,
        env={**os.environ, "NODE_PATH": str(node_modules)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])
