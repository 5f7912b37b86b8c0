"""``hekitrace config validate|show``: check configuration files, print the effective one.

``validate`` exists so that ExecStartPre, CI and operators can reject a bad file before a
daemon (re)loads it: exit 0 when every file is valid, 3 (via ConfigError, mapped by cli.py)
at the first invalid one, with file, line, key and what was expected.
"""

from __future__ import annotations

import argparse
import json

import yaml

from hekitrace.config import settings
from hekitrace.errors import ConfigError

EPILOG = """examples:
  hekitrace config validate /etc/hekitrace/hekitrace.yaml
  hekitrace config validate -O policy.rules.wx_request.severity=warning my.yaml
  hekitrace config show --config configs/hekitrace.yaml -o json
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "config", help="validate configuration files or show the effective one",
        description="Validate hekitrace configuration files, or print the effective "
                    "configuration (defaults filled in). Exit status 3 when invalid.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    validate = actions.add_parser(
        "validate", help="check files; exit 0 if all are valid, 3 otherwise",
        description="Check each FILE; print 'FILE: ok' or the first error (file, line, "
                    "key, what was expected) and exit 3.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    validate.add_argument("files", nargs="+", metavar="FILE", help="YAML config files")
    _add_overrides(validate)
    show = actions.add_parser(
        "show", help="print the effective configuration",
        description="Print the effective configuration: the file (default: "
                    f"{settings.DEFAULT_CONFIG_PATH} if it exists, else the built-in "
                    "defaults) with every default filled in.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("--config", metavar="FILE", default=None,
                      help=f"config file (default: {settings.DEFAULT_CONFIG_PATH} "
                           "if it exists, else built-in defaults)")
    show.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml",
                      help="output format (default: yaml)")
    _add_overrides(show)
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-O", "--set", dest="overrides", action="append", default=[],
                        metavar="KEY.PATH=VALUE",
                        help="override one key, value parsed as YAML (repeatable)")


def _load(path: str, overrides: list[str]) -> settings.Config:
    if not overrides:
        return settings.load_config(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the file: {error}", path=path) from None
    return settings.parse_config(text, path, overrides)


def run(args: argparse.Namespace) -> int:
    if args.action == "validate":
        for path in args.files:
            _load(path, args.overrides)
            print(f"{path}: ok")
        return 0
    if args.config is None and not args.overrides:
        cfg = settings.resolve_config(None)
    elif args.config is None:
        cfg = settings.parse_config("", "<defaults>", args.overrides)
    else:
        cfg = _load(args.config, args.overrides)
    data = cfg.to_dict()
    source = cfg.path or "built-in defaults"
    if args.output == "json":
        print(json.dumps({"source": source, "sha256": cfg.sha256,
                          "abi_profile": cfg.abi_profile().name, "config": data},
                         indent=2))
    else:
        print(f"# effective configuration from {source} (sha256 {cfg.sha256})")
        print(f"# effective ABI profile: {cfg.abi_profile().name}")
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
    return 0
