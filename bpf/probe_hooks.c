// Feature probes for `hekitrace check` (hekitrace/capture/probe.py).
//
// Each function does nothing: the point is whether the kernel lets a program of that type
// load and attach at a given hook. They are loaded one by one with an explicit program
// type and attached explicitly, so the names carry no bcc auto-attach prefix.

int hk_probe_raw_tracepoint(void *ctx) { return 0; }

int hk_probe_tracepoint(void *ctx) { return 0; }

int hk_probe_kprobe(struct pt_regs *ctx) { return 0; }
