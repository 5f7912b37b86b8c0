/* kvm:kvm_page_fault (raw tracepoint, falling back to the tracepoint): only write or
 * fetch faults on pages in the kernel-side filter reach userspace, and repeats on one page
 * are counted here and reported at most once per HK_FAULT_INTERVAL_NS. Included by capture.c.
 *
 * Filter: a hash keyed by (tgid, 2 MiB bucket = gfn >> 9) whose value holds one bit per
 * page for write faults and one for fetch faults (userspace: Capture.protect_filter_update).
 * One hash lookup and a bit test per fault, no loop, no per-page entries; it measured
 * faster than an LPM trie of aligned prefixes (bench/bench_bpf_cost.py, BENCHMARKS.md).
 * Heki protects kernel text and rodata (tens to hundreds of MiB): a few hundred buckets
 * of 128 bytes per VM. Not preallocated, so an empty filter costs nothing.
 */

/* tracefs format of kvm:kvm_page_fault (checked by the loader, heki-kvm.md 3.2) */
struct hk_tp_page_fault {
    u64 common;
    u32 vcpu_id;
    u32 pad;
    u64 guest_rip;
    u64 fault_address;
    u64 error_code;
};

/* filter key: tgid << 32 | bucket, bucket = gfn >> 9 = gpa >> 21 (< 2^31 for 52-bit
 * GPAs). One u64 rather than a struct: an 8-byte key hashes faster (bench_bpf_cost.py). */

struct hk_filter_bucket {
    u64 write[8];    /* bit (gfn & 511): report write faults on that page */
    u64 fetch[8];    /* same for instruction fetches */
};
BPF_F_TABLE("hash", u64, struct hk_filter_bucket, hk_fault_filter, 65536,
            BPF_F_NO_PREALLOC);

/* storm key: tgid << 40 | gfn (gfn < 2^40 for 52-bit GPAs, tgid <= PID_MAX_LIMIT = 2^22) */
#define HK_STORM_GFN_BITS 40

struct hk_storm {
    u64 count;          /* faults not reported yet */
    u64 first_ns;       /* boot ns of the first of them */
    u64 last_report_ns; /* boot ns of the last report (userspace's flush reads it) */
    u64 last_report_jiffies;  /* the same instant in jiffies (the per-fault check) */
    /* the last reported fault, for userspace's flush of a storm that stopped
     * (engine.py: counts still pending after an interval are reported from there) */
    u64 gpa;
    u64 error_code;
    u64 rip;
    u32 vcpu;
    u32 access;
};
BPF_HASH(hk_storms, u64, struct hk_storm, 65536);

static __always_inline u32 hk_fault_access(u64 ec)
{
    u32 acc = 0;
#if HK_VENDOR == 2
    /* SVM #NPF EXITINFO1 (PFERR_*): bit 1 WRITE, bit 4 FETCH; otherwise a read */
    if (ec & (1ULL << 1))
        acc |= HK_ACC_WRITE;
    if (ec & (1ULL << 4))
        acc |= HK_ACC_FETCH;
    if (!acc)
        acc = HK_ACC_READ;
#else
    /* VMX EPT-violation exit qualification: bit 0 read, 1 write, 2 instruction fetch */
    if (ec & (1ULL << 0))
        acc |= HK_ACC_READ;
    if (ec & (1ULL << 1))
        acc |= HK_ACC_WRITE;
    if (ec & (1ULL << 2))
        acc |= HK_ACC_FETCH;
#endif
    return acc;
}

/* vcpu id and rip: from the tracepoint's fields, or (raw tracepoint) read from struct
 * kvm_vcpu at BTF offsets, lazily, only for a fault that is reported */
struct hk_vcpu_src {
    void *vcpu;      /* raw tracepoint: struct kvm_vcpu *, else NULL */
    u32 vcpu_id;
    u64 rip;
};

static __always_inline void hk_vcpu_read(struct hk_vcpu_src *v)
{
    if (!v->vcpu)
        return;
#if HK_VCPU_ID_OFF >= 0
    bpf_probe_read_kernel(&v->vcpu_id, sizeof(v->vcpu_id), v->vcpu + HK_VCPU_ID_OFF);
#endif
#if HK_VCPU_RIP_OFF >= 0
    bpf_probe_read_kernel(&v->rip, sizeof(v->rip), v->vcpu + HK_VCPU_RIP_OFF);
#endif
}

static __always_inline int hk_fault_emit(u32 tgid, struct hk_vcpu_src *v, u32 acc, u64 gpa,
                                         u64 ec, u64 count, u64 first_ns,
                                         struct hk_storm *st)
{
    hk_vcpu_read(v);
    if (st) {
        /* remembered for userspace's flush of a storm that stops (engine.py) */
        st->gpa = gpa;
        st->error_code = ec;
        st->rip = v->rip;
        st->vcpu = v->vcpu_id;
        st->access = acc;
    }
    struct hk_fault_rec *r = hk_telemetry.ringbuf_reserve(sizeof(*r));
    if (!r) {
        hk_count_loss(tgid, HK_RING_TELEMETRY, HK_HOOK_FAULT, HK_DROP_RING_FULL);
        return 0;
    }
    hk_fill_hdr(&r->hdr, HK_REC_FAULT);
    r->vcpu = v->vcpu_id;
    r->access = acc;
    r->gpa = gpa;
    r->error_code = ec;
    r->rip = v->rip;
    r->count = count;
    r->first_ns = first_ns ? first_ns : r->hdr.time_ns;
    hk_telemetry.ringbuf_submit(r, 0);
    return 0;
}

/* Fast path first: the access decode and the filter cost a few ns and drop almost every
 * fault; the storm table is touched only for protected pages, and a record (with the
 * vcpu reads) is made only once per page per interval. */
static __always_inline int hk_fault(struct hk_vcpu_src *v, u64 gpa, u64 ec)
{
    u32 acc = hk_fault_access(ec);
    if (!(acc & (HK_ACC_WRITE | HK_ACC_FETCH)))
        return 0;
    u32 tgid = hk_tgid();
    u64 fk = (u64)tgid << 32 | ((gpa >> 21) & 0xffffffffULL);
    struct hk_filter_bucket *b = hk_fault_filter.lookup(&fk);
    if (!b)
        return 0;
    u32 word = (gpa >> 18) & 7;          /* (gfn & 511) / 64 */
    u64 bit = 1ULL << ((gpa >> 12) & 63);
    u64 want = 0;
    if (acc & HK_ACC_WRITE)
        want |= b->write[word];
    if (acc & HK_ACC_FETCH)
        want |= b->fetch[word];
    if (!(want & bit))
        return 0;

    u64 sk = (u64)tgid << HK_STORM_GFN_BITS |
             ((gpa >> 12) & ((1ULL << HK_STORM_GFN_BITS) - 1));
    /* The interval is checked in jiffies: reading the clocksource cost ~100 ns per fault
     * on the build host (bench/bench_bpf_cost.py), jiffies a few ns, and jiffy
     * resolution is plenty for a report interval. Boot-clock stamps are taken only where
     * a record or the flush needs them. */
    u64 now = bpf_jiffies64();
    struct hk_storm *st = hk_storms.lookup(&sk);
    if (!st) {
        struct hk_storm fresh = {};
        u64 boot = bpf_ktime_get_boot_ns();
        fresh.first_ns = boot;
        fresh.last_report_ns = boot;
        fresh.last_report_jiffies = now;
        /* if the storm table is full every fault is sent: costly but nothing is hidden */
        hk_storms.update(&sk, &fresh);
        st = hk_storms.lookup(&sk);
        return hk_fault_emit(tgid, v, acc, gpa, ec, 1, boot, st);
    }
    if (__sync_fetch_and_add(&st->count, 1) == 0)
        st->first_ns = bpf_ktime_get_boot_ns();
    if (now - st->last_report_jiffies < HK_FAULT_INTERVAL_JIFFIES)
        return 0;
    u64 first = st->first_ns;
    u64 count = __sync_lock_test_and_set(&st->count, 0);
    st->last_report_jiffies = now;
    st->last_report_ns = bpf_ktime_get_boot_ns();
    if (!count)
        return 0;
    return hk_fault_emit(tgid, v, acc, gpa, ec, count, first, st);
}

/* raw tracepoint: args = (struct kvm_vcpu *vcpu, u64 fault_address, u64 error_code) */
int hk_fault_raw(struct bpf_raw_tracepoint_args *ctx)
{
    struct hk_vcpu_src v = {};
    v.vcpu = (void *)ctx->args[0];
    return hk_fault(&v, ctx->args[1], ctx->args[2]);
}

int hk_fault_tp(struct hk_tp_page_fault *ctx)
{
    struct hk_vcpu_src v = {};
    v.vcpu_id = ctx->vcpu_id;
    v.rip = ctx->guest_rip;
    return hk_fault(&v, ctx->fault_address, ctx->error_code);
}

/* ---- kvm:kvm_cr: guest writes to CR0 and CR4 ------------------------------------------ */

/* tracefs format of kvm:kvm_cr (heki-kvm.md 3.3) */
struct hk_tp_cr {
    u64 common;
    u32 rw;
    u32 cr;
    u64 val;
};

static __always_inline int hk_cr(u32 rw, u32 cr, u64 val)
{
    if (rw != 1 || (cr != 0 && cr != 4))
        return 0;
    struct hk_cr_rec *r = hk_telemetry.ringbuf_reserve(sizeof(*r));
    if (!r) {
        hk_count_loss(hk_tgid(), HK_RING_TELEMETRY, HK_HOOK_CR, HK_DROP_RING_FULL);
        return 0;
    }
    hk_fill_hdr(&r->hdr, HK_REC_CR);
    r->cr = cr;
    r->reserved = 0;
    r->value = val;
    hk_telemetry.ringbuf_submit(r, 0);
    return 0;
}

/* raw tracepoint: args = (unsigned int rw, unsigned int cr, unsigned long val) */
int hk_cr_raw(struct bpf_raw_tracepoint_args *ctx)
{
    return hk_cr((u32)ctx->args[0], (u32)ctx->args[1], ctx->args[2]);
}

int hk_cr_tp(struct hk_tp_cr *ctx)
{
    return hk_cr(ctx->rw, ctx->cr, ctx->val);
}
