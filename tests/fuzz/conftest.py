"""Fuzz tier: tests/fuzz/fuzzbudget.py sets each target's budget; this puts it importable."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
