"""Runs a launcher (``python -m launch.main`` by default) as a subprocess,
as a user would, and returns its exit status and output."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, timeout: float = 300, module: str = "launch.main",
        **kw) -> tuple[int, str, str]:
  """``(exit status, stdout, stderr)`` of ``python -m module args``."""
  p = subprocess.run([sys.executable, "-m", module, *map(str, args)],
                     cwd=REPO, capture_output=True, text=True,
                     timeout=timeout, check=False, **kw)
  return p.returncode, p.stdout, p.stderr
