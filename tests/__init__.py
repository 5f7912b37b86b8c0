"""hekitrace's test suite, a package so that shared helpers import by name.

Every test directory is a package and pyproject.toml puts the repository root on sys.path
(``pythonpath = ["."]``), so helpers are imported like any module: ``tests.vmm`` (a tiny
KVM VMM), ``tests.strategies`` (hypothesis strategies and profiles),
``tests.e2e.daemon_proc`` (a real daemon process), ``tests.fuzz.fuzzbudget``. Child Python
processes that import them get :func:`child_env`. Standard library only: the vm tier
imports this package inside a guest that has nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the repository root (the directory holding ``hekitrace/`` and ``tests/``)
REPO = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository root first on ``PYTHONPATH``, for a
    child ``python -c`` that imports ``tests.*`` or ``hekitrace``."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), **extra)
