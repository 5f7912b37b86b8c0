"""The hook table (hekitrace.capture.hooks) agrees with the config's hook defaults and
with the programs bpf/*.c defines: one table, checked against its two readers."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from hekitrace.capture import hooks
from hekitrace.config.settings import HooksConfig

BPF = Path(__file__).resolve().parents[2] / "bpf"


def test_config_hook_keys_and_defaults_are_the_table():
    fields = [f.name for f in dataclasses.fields(HooksConfig)]
    assert tuple(fields) == hooks.NAMES
    defaults = HooksConfig()
    assert {h: getattr(defaults, h) == "required" for h in hooks.NAMES} == \
        hooks.DEFAULT_REQUIRED


def test_every_program_in_the_table_is_defined_in_bpf():
    source = "\n".join(p.read_text() for p in BPF.glob("*.c"))
    for hook in hooks.HOOKS:
        assert hook.methods, hook.name
        for method in hook.methods:
            for _point, fn in method.programs:
                assert re.search(rf"\bint {fn}\(", source), f"{hook.name}: {fn}"
    assert f"KFUNC_PROBE({hooks.ATTR_FUNCTION}," in source
