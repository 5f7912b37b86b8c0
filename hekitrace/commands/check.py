"""``hekitrace check``: can this host run hekitrace, and how would each hook attach?

In the spirit of ``bpftool feature`` and ``tetra probe``: it really compiles, loads and
attaches a do-nothing program per hook and method (hekitrace/capture/probe.py), so the
answer is the kernel's, not a guess from its version. Exit status 0 when every required
hook (config ``hooks:``) can attach, 1 otherwise, with the reason on that hook's line.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from hekitrace.capture import probe
from hekitrace.commands.common import dump
from hekitrace.config import settings

EPILOG = """examples:
  hekitrace check                      # table, default config
  hekitrace check -o json              # the same facts as data (docs/check.md)
  hekitrace check --config /etc/hekitrace/hekitrace.yaml --no-mount

exit status: 0 every required hook can attach; 1 one cannot (reason on its line);
3 invalid config.
"""

WIDTH = 80
HOOK_COLUMN = 40      # the longest hook name, syscalls:sys_enter_ioctl/sys_exit_ioctl, + 1
NEED_COLUMN = 9


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check", help="report whether this host can run hekitrace and how hooks attach",
        description="Report privileges, kernel, BTF, tracefs, bcc, kernel headers and, "
                    "for every hook, whether it exists and by which method it attaches "
                    "(by really loading and attaching a probe program, then detaching).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                        help="output format (default: table)")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="config whose hooks: section says which hooks are required "
                             f"(default: {settings.DEFAULT_CONFIG_PATH} if it exists, "
                             "else built-in defaults)")
    parser.add_argument("--no-mount", action="store_true",
                        help="do not mount tracefs when it is not mounted (default: mount)")
    return parser


def run(args: argparse.Namespace) -> int:
    cfg = settings.resolve_config(args.config)
    report = probe.probe_environment(cfg, may_mount=not args.no_mount)
    if args.output == "table":
        print(render_table(report, cfg.path or "built-in defaults"))
    else:
        data = report.to_dict()
        data["config"] = {"path": cfg.path, "sha256": cfg.sha256}
        sys.stdout.write(dump(data, args.output))
    return 0 if report.ok else 1


def _wrap(text: str, first: str, indent: int) -> list[str]:
    lines = textwrap.wrap(text, WIDTH - indent, break_on_hyphens=False) or [""]
    return [first + lines[0]] + [" " * indent + line for line in lines[1:]]


def render_table(report: probe.EnvironmentReport, config_source: str) -> str:
    """The 80-column report: environment facts, then one block per hook."""
    out = [f"hekitrace check: kernel {report.kernel_release}, config {config_source}", ""]
    priv = report.privileges
    have = [name for name, ok in priv.capabilities.items() if ok]
    lack = [name for name, ok in priv.capabilities.items() if not ok]
    facts = [
        ("privileges", f"euid {priv.euid}; {' '.join(have) or 'no BPF capabilities'}"
                       + (f"; without {' '.join(lack)}" if lack else "")
                       + ("" if priv.can_bpf else
                          "; cannot load BPF (need CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN)")),
        ("btf", "/sys/kernel/btf/vmlinux present" if report.btf_vmlinux else
                "no /sys/kernel/btf/vmlinux: struct offsets cannot be resolved"),
        ("lockdown", report.lockdown or "unknown (no /sys/kernel/security/lockdown)"),
        ("tracefs", f"{report.tracefs.path}: {report.tracefs.action}"),
        ("bcc", _bcc_text(report.bcc)),
        ("headers", f"{report.headers.source}: {report.headers.detail}"),
        ("bpf_stats", {True: "on (kernel.bpf_stats_enabled=1)",
                       False: "off (kernel.bpf_stats_enabled=0: no per-program cost)",
                       None: "unknown"}[report.bpf_stats_enabled]),
    ]
    for name, text in facts:
        out.extend(_wrap(text, f"  {name:<12}", 14))
    out.append("")
    out.append(f"{'HOOK':<{HOOK_COLUMN}}{'NEED':<{NEED_COLUMN}} STATUS")
    status_indent = HOOK_COLUMN + NEED_COLUMN + 1
    for hook in report.hooks:
        need = hook.need
        if hook.attachable:
            status = f"ok: {hook.method}"
        elif hook.required:
            status = f"FAIL: {hook.reason}"
        else:
            status = f"unavailable: {hook.reason}"
        first = f"{hook.hook:<{HOOK_COLUMN}}{need:<{NEED_COLUMN}} "
        out.extend(_wrap(status, first, status_indent))
        for m in hook.methods:
            label = f"  {m.method} {m.target}" + (" (stand-in)" if m.stand_in else "")
            text = "attachable" if m.attachable else m.reason or "no"
            out.extend(_wrap(text, f"{label:<{status_indent}}", status_indent))
    out.append("")
    failing = [h.hook for h in report.hooks if h.required and not h.attachable]
    out.append("result: every required hook can attach" if not failing else
               "result: required hook(s) cannot attach: " + ", ".join(failing))
    return "\n".join(out)


def _bcc_text(info: probe.Bcc) -> str:
    if not info.importable:
        return f"not importable: {info.error}"
    if not info.compiles:
        return f"{info.version}: cannot compile: {info.error}"
    text = f"{info.version}: compiles ({info.compile_seconds:.2f} s)"
    return text + (f"; {info.error}" if info.error else "")
