"""The rule catalogue: every rule id, its default severity, what it means, and whether
hekitrace evaluates it. The one source of these facts.

Configuration validation (``policy.rules``, ``policy.exceptions``), the policy engine,
``policy.status()`` and the docs test (docs/findings.md's rule table) all read it. It
imports nothing, so the configuration layer below the policy can read it too.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple

#: finding severities, lowest first
SEVERITIES = ("info", "warning", "critical")


class Rule(NamedTuple):
    """One rule: ``id``, default ``severity``, ``fires_when`` (the one-line meaning of
    docs/findings.md's rule table) and, for a rule hekitrace cannot or need not evaluate,
    ``not_evaluated``: why (the id stays valid in configurations)."""

    id: str
    severity: str
    fires_when: str
    not_evaluated: str = ""


#: every rule, in the order configuration and status list them. Severity: critical when
#: the guest's protection is broken or attacked, warning when the evidence is indirect or
#: the monitor itself is impaired.
RULES: tuple[Rule, ...] = (
    Rule("wx_request", "critical",
         "a protect request entry asks for WRITE and EXEC together"),
    Rule("immutable_change", "critical",
         "a request touches an immutable range (host refuses, `-EPERM`), or the applied "
         "map changes an immutable page without relaxing it"),
    Rule("immutable_relaxed", "critical",
         "the **applied** map lost a protection on an immutable page (host bug or "
         "compromise)"),
    Rule("request_not_applied", "warning",
         "what the guest requested is not what the host applied, `pairing_window_seconds` "
         "after the request"),
    Rule("applied_without_request", "warning",
         "the host applied Heki bits the guest did not request (or requested otherwise)"),
    Rule("protected_write", "critical",
         "a write fault on a page that is protected against writes"),
    Rule("protected_fetch", "critical",
         "a kernel instruction fetch from a page that is not executable (MBEC)"),
    Rule("cr_pin_violation", "critical",
         "a guest CR0/CR4 write clears a pinned bit"),
    Rule("malformed_request", "warning",
         "a page list or entry is malformed (misaligned, end before start, unknown bits, "
         "cycles, oversize, outside memory...) or a CR pin request is invalid"),
    Rule("protection_unsupported", "warning",
         "the guest issues Heki protection requests but the host, with the applied hook "
         "attached, never applied any"),
    Rule("map_degraded", "warning",
         "the VM's state may be incomplete (events lost, running before monitoring "
         "started, incomplete page list, journal gap)"),
    Rule("relax_after_lockdown", "critical",
         "after lockdown, a request would make immutable memory writable (or, with MBEC, "
         "make non-executable immutable memory executable)"),
    Rule("cr_pin_cleared", "critical",
         "its evidence is exactly `cr_pin_violation`'s; kept as a valid id for "
         "configuration compatibility",
         not_evaluated="same evidence as cr_pin_violation (a CR write clearing a pinned "
                       "bit, reported whether or not the host blocked it)"),
    Rule("privileged_hypercall_from_user", "warning",
         "`kvm:kvm_hypercall` carries no CPL, so hekitrace cannot see it",
         not_evaluated="events carry no CPL: kvm:kvm_hypercall has no privilege field "
                       "(docs/heki-abi.md section 10.1)"),
)

#: every rule id (configuration keys, exception lists, metrics labels)
RULE_IDS: tuple[str, ...] = tuple(r.id for r in RULES)
#: rule id -> default severity
DEFAULT_SEVERITY = MappingProxyType({r.id: r.severity for r in RULES})
#: rule id -> why it is not evaluated, for the rules the policy never runs
NOT_EVALUATED = MappingProxyType({r.id: r.not_evaluated for r in RULES if r.not_evaluated})
#: the rules that compare the requested and applied maps: they need the attr_applied hook
PAIRING_RULES: tuple[str, ...] = ("request_not_applied", "applied_without_request",
                                  "protection_unsupported")
