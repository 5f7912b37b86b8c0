/* kvm_arch_post_set_memory_attributes(struct kvm *kvm, struct kvm_gfn_range *range):
 * the attributes KVM actually applied, once per memslot overlapping the request
 * (docs/heki-abi.md section 8). fentry first, then kprobe; a raw-tracepoint twin shares the logic
 * so BPF_PROG_TEST_RUN can drive it on kernels without the function. struct kvm_gfn_range
 * offsets come from the running kernel's BTF (HK_GFN_RANGE_*_OFF). Included by capture.c. */

static __always_inline int hk_attr_emit(u64 start, u64 end, u64 attributes)
{
    if (!hk_budget_take(hk_tgid(), sizeof(struct hk_attr_rec))) {
        hk_count_loss(hk_tgid(), HK_RING_CONTROL, HK_HOOK_ATTR, HK_DROP_VM_BUDGET);
        return 0;
    }
    struct hk_attr_rec *r = hk_control.ringbuf_reserve(sizeof(*r));
    if (!r) {
        hk_count_loss(hk_tgid(), HK_RING_CONTROL, HK_HOOK_ATTR, HK_DROP_RING_FULL);
        return 0;
    }
    hk_fill_hdr(&r->hdr, HK_REC_ATTR);
    r->gfn_start = start;
    r->gfn_end = end;
    r->attributes = attributes;
    hk_control.ringbuf_submit(r, 0);
    return 0;
}

static __always_inline int hk_attr_kernel(void *range)
{
    u64 start = 0, end = 0, attributes = 0;
    bpf_probe_read_kernel(&start, sizeof(start), range + HK_GFN_RANGE_START_OFF);
    bpf_probe_read_kernel(&end, sizeof(end), range + HK_GFN_RANGE_END_OFF);
    bpf_probe_read_kernel(&attributes, sizeof(attributes), range + HK_GFN_RANGE_ATTR_OFF);
    return hk_attr_emit(start, end, attributes);
}

int hk_attr_kprobe(struct pt_regs *ctx)
{
    return hk_attr_kernel((void *)PT_REGS_PARM2(ctx));
}

/* Test twin: args = (kvm, range). A test-run caller can only point at its own memory, so
 * a user address is read with bpf_probe_read_user; a kernel one as the real hook does. */
int hk_attr_raw(struct bpf_raw_tracepoint_args *ctx)
{
    void *range = (void *)ctx->args[1];
    if ((u64)range >= 0xffff800000000000ULL)
        return hk_attr_kernel(range);
    u64 start = 0, end = 0, attributes = 0;
    bpf_probe_read_user(&start, sizeof(start), range + HK_GFN_RANGE_START_OFF);
    bpf_probe_read_user(&end, sizeof(end), range + HK_GFN_RANGE_END_OFF);
    bpf_probe_read_user(&attributes, sizeof(attributes), range + HK_GFN_RANGE_ATTR_OFF);
    return hk_attr_emit(start, end, attributes);
}

#ifdef HK_WITH_FENTRY
/* fentry flavour: compiled only when BTF has the function (loader.py), because bcc
 * attaches KFUNC_PROBE programs as soon as the object is compiled. */
struct kvm;
struct kvm_gfn_range;
KFUNC_PROBE(kvm_arch_post_set_memory_attributes, struct kvm *kvm, struct kvm_gfn_range *range)
{
    return hk_attr_kernel((void *)range);
}
#endif
