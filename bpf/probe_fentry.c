// fentry (BPF_PROG_TYPE_TRACING) feature probe for `hekitrace check`.
//
// HK_PROBE_FN is the kernel function, given as a -D cflag (settings are cflags, never
// edits of the C text, so the file is what runs). bcc loads and attaches KFUNC_PROBE
// programs when the module is created, so this lives apart from probe_hooks.c: a refusal
// here must not hide the other probes. The extra macro level makes the preprocessor
// expand HK_PROBE_FN before KFUNC_PROBE pastes it into a name.

#define HK_FENTRY(fn) KFUNC_PROBE(fn)

HK_FENTRY(HK_PROBE_FN)
{
    return 0;
}
