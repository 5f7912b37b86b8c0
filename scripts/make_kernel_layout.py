#!/usr/bin/env python3
"""Build hekitrace/data/kernel-layout-*.json from a real Debian kernel's System.map.

The simulated Heki guest (hekitrace/sim/scenarios.py) protects the sections of a real kernel
rather than invented ranges, so its page lists have the sizes and alignments a real
guest produces. Debian's linux-image package ships only a stub System.map ("The real
System.map is in the linux-image-<version>-dbg package"), so the symbols come from the
matching -dbg package, which holds /usr/lib/debug/boot/System.map-<version>.

Usage (run once at build time; the output is committed with its provenance):

    apt-get download linux-image-6.1.0-56-amd64-dbg
    scripts/make_kernel_layout.py --deb linux-image-6.1.0-56-amd64-dbg_*.deb \\
        -o hekitrace/data/kernel-layout-debian-6.1.json

or, with a System.map already extracted, ``--system-map FILE --package NAME --version V
--sha256 HEX`` to state where it came from.

Physical addresses: Debian's x86-64 kernel is linked at 0xffffffff81000000
(__START_KERNEL_map 0xffffffff80000000 + CONFIG_PHYSICAL_START 0x1000000) and, without
KASLR, loaded at physical 0x1000000 (16 MiB), so phys = virt - 0xffffffff80000000.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile

#: arch/x86/include/asm/page_64_types.h: __START_KERNEL_map
START_KERNEL_MAP = 0xFFFFFFFF80000000
#: the section boundary symbols the simulator uses (vmlinux.lds.S names)
SYMBOLS = ("_text", "_stext", "_etext", "__start_rodata", "__start_ro_after_init",
           "__end_ro_after_init", "__end_rodata", "__end_rodata_aligned",
           "__end_rodata_hpage_align", "_sdata", "_edata", "__init_begin", "_sinittext",
           "_einittext", "__init_end", "__bss_start", "__bss_stop", "__brk_base",
           "__brk_limit", "_end")


def parse_system_map(text: str) -> dict[str, int]:
    """Section symbols (name -> virtual address) found in a System.map's text."""
    wanted = set(SYMBOLS)
    found: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in wanted:
            found[parts[2]] = int(parts[0], 16)
    return found


def system_map_from_deb(deb: str) -> tuple[str, str, str, str]:
    """(System.map text, its path, package name, version) from a -dbg .deb."""
    fields = subprocess.run(["dpkg-deb", "-f", deb, "Package", "Version"], check=True,
                            capture_output=True, text=True).stdout
    meta = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], check=True,
                               capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            if re.search(r"/boot/System\.map-", member.name):
                data = tar.extractfile(member)
                if data is None:
                    continue
                return (data.read().decode(), member.name.lstrip("."), meta["Package"],
                        meta["Version"])
    raise SystemExit(f"{deb}: no boot/System.map-* inside (use the -dbg package)")


def build(symbols: dict[str, int], provenance: dict) -> dict:
    missing = [s for s in ("_text", "_etext", "__start_rodata", "__end_rodata", "_sdata",
                           "_edata", "__init_begin", "__init_end", "__bss_start",
                           "__bss_stop", "_end") if s not in symbols]
    if missing:
        raise SystemExit(f"System.map lacks {', '.join(missing)} (is it the stub?)")
    return {
        "provenance": provenance,
        "kernel_map_base": hex(START_KERNEL_MAP),
        "note": "phys = virt - kernel_map_base (linked at 0xffffffff81000000, loaded at "
                "16 MiB without KASLR)",
        "symbols": {name: {"virt": hex(addr), "phys": hex(addr - START_KERNEL_MAP)}
                    for name, addr in sorted(symbols.items(), key=lambda kv: kv[1])},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deb", help="linux-image-*-dbg .deb to read the System.map from")
    parser.add_argument("--system-map", help="an already extracted System.map")
    parser.add_argument("--package", help="package name (with --system-map)")
    parser.add_argument("--version", help="package version (with --system-map)")
    parser.add_argument("--sha256", help="sha256 of the .deb (with --system-map)")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    if args.deb:
        text, member, package, version = system_map_from_deb(args.deb)
        with open(args.deb, "rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
    elif args.system_map and args.package and args.version and args.sha256:
        with open(args.system_map) as f:
            text = f.read()
        member, package, version, sha = args.system_map, args.package, args.version, args.sha256
    else:
        parser.error("give --deb, or --system-map with --package, --version and --sha256")
    provenance = {"package": package, "version": version, "deb_sha256": sha,
                  "file": member, "generated": datetime.date.today().isoformat(),
                  "generator": "scripts/make_kernel_layout.py"}
    layout = build(parse_system_map(text), provenance)
    with open(args.output, "w") as out:
        json.dump(layout, out, indent=1)
        out.write("\n")
    print(f"wrote {args.output}: {len(layout['symbols'])} symbols from {package} {version}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
