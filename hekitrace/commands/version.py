"""``hekitrace version``: print the version and exit."""

from __future__ import annotations

import argparse

from hekitrace import __version__


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return subparsers.add_parser("version", help="print the hekitrace version",
                                 description="Print the hekitrace version.")


def run(args: argparse.Namespace) -> int:
    print(f"hekitrace {__version__}")
    return 0
