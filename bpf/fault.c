/* kvm:kvm_page_fault (raw tracepoint, falling back to the tracepoint): only write or
 * fetch faults on pages in the kernel-side filter reach userspace, and repeats on one page
 * are counted here and reported at most once per HK_FAULT_INTERVAL_NS. Included by capture.c.
 *
 * Filter: a hash keyed by (tgid, 2 MiB bucket = gfn >> 9) whose value holds one bit per
 * page for write faults and one for fetch faults (userspace: Capture.protect_filter_update).
 * One hash lookup and a bit test per fault, no loop, no per-page entries; it measured
 * faster than an LPM trie of aligned prefixes (bench/bench_bpf_cost.py, BENCHMARKS.md).
 * A per-CPU cache of the last filter word (hk_filter_cache below) skips that lookup for
 * a run of faults in one 64-page word, e.g. a storm.
 * Heki protects kernel text and rodata (tens to hundreds of MiB): a few hundred buckets
 * of 128 bytes per VM. Not preallocated, so an empty filter costs nothing.
 */

/* tracefs format of kvm:kvm_page_fault (checked by the loader, docs/heki-abi.md section 10.2) */
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

/* Per-CPU cache of the last filter word looked up, so a storm (or a run of faults in
 * one unprotected 2 MiB bucket) pays an inlined array read instead of the hash lookup
 * (~40 ns here, bench/bench_bpf_cost.py). hk_filter_gen is bumped by userspace after
 * every filter change (Capture.protect_filter_update) and read before the hash, so a
 * cached word is never used past a change: a fault racing an update sees the old or
 * the new filter, as it would without the cache. key = filter key | word << 61 (bits
 * 54-60 of a filter key are always 0); check = xor of the other fields and a salt, so an
 * entry torn by a same-CPU preemption (test runs) or still zeroed never matches. */
struct hk_filter_cache {
    u64 key;
    u64 gen;
    u64 write;
    u64 fetch;
    u64 check;
};
#define HK_FILTER_CACHE_SALT 0x9e3779b97f4a7c15ULL
BPF_PERCPU_ARRAY(hk_filter_cache, struct hk_filter_cache, 1);
BPF_ARRAY(hk_filter_gen, u64, 1);

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
    u64 hot_slot;       /* 1 + index of the hk_storm_hot slot this entry owns, 0: none */
};
BPF_HASH(hk_storms, u64, struct hk_storm, 65536);

/* Hot storm state: while a page owns a slot, its faults are counted here, and a fault
 * inside the interval costs an inlined array read and an atomic add instead of the
 * hk_storms lookup (~50 ns here, bench/bench_bpf_cost.py). Slot = hash of the storm
 * key; a page takes a free slot (key 0, compare-and-swap) when its hk_storms entry is
 * created, else it counts in hk_storms as before. The hk_storms entry stays the record
 * of the storm (last fault, last_report_ns); its pending count is its own count plus
 * the slot's while the slot's key is its key. Userspace (engine.py flush_storms) reads
 * both, and frees the slot (zeroes it) before deleting the entry. */
struct hk_storm_hot {
    u64 key;                  /* storm key of the owner, 0: free */
    u64 count;                /* faults not reported yet */
    u64 first_ns;             /* boot ns of the first of them */
    u64 last_report_jiffies;
};
#define HK_STORM_HOT_BITS 12
BPF_ARRAY(hk_storm_hot, struct hk_storm_hot, 1 << HK_STORM_HOT_BITS);

/* Count one fault of a storm in (count, first_ns, last_jiffies), the fields shared by a
 * hot slot and an hk_storms entry. Returns 1 when the report interval has passed: the
 * gate is moved to now and *first gets the first pending fault's time; the caller then
 * takes the count (exchange with 0) and sends it. */
static __always_inline int hk_storm_count(u64 *count, u64 *first_ns, u64 *last_jiffies,
                                          u64 now, u64 *first)
{
    if (__sync_fetch_and_add(count, 1) == 0)
        *first_ns = bpf_ktime_get_boot_ns();
    if (now - *last_jiffies < HK_FAULT_INTERVAL_JIFFIES)
        return 0;
    *first = *first_ns;
    *last_jiffies = now;
    return 1;
}

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
    u32 word = (gpa >> 18) & 7;          /* (gfn & 511) / 64 */
    u64 bit = 1ULL << ((gpa >> 12) & 63);
    u64 ck = fk | (u64)word << 61;
    u32 zero = 0;
    u64 *genp = hk_filter_gen.lookup(&zero);
    struct hk_filter_cache *c = hk_filter_cache.lookup(&zero);
    if (!genp || !c)
        return 0;
    u64 gen = *genp;
    u64 w, f;
    if (c->key == ck && c->gen == gen &&
        (c->check ^ ck ^ gen ^ c->write ^ c->fetch) == HK_FILTER_CACHE_SALT) {
        w = c->write;
        f = c->fetch;
    } else {
        struct hk_filter_bucket *b = hk_fault_filter.lookup(&fk);
        w = 0;
        f = 0;
        if (b) {
            w = b->write[word];
            f = b->fetch[word];
        }
        c->key = ck;
        c->gen = gen;
        c->write = w;
        c->fetch = f;
        c->check = ck ^ gen ^ w ^ f ^ HK_FILTER_CACHE_SALT;
    }
    u64 want = 0;
    if (acc & HK_ACC_WRITE)
        want |= w;
    if (acc & HK_ACC_FETCH)
        want |= f;
    if (!(want & bit))
        return 0;

    u64 sk = (u64)tgid << HK_STORM_GFN_BITS |
             ((gpa >> 12) & ((1ULL << HK_STORM_GFN_BITS) - 1));
    /* The interval is checked in jiffies: reading the clocksource cost ~100 ns per fault
     * on the build host (bench/bench_bpf_cost.py), jiffies a few ns, and jiffy
     * resolution is plenty for a report interval. Boot-clock stamps are taken only where
     * a record or the flush needs them. */
    u64 now = bpf_jiffies64();
    u32 hs = (u32)((sk * 0x9e3779b97f4a7c15ULL) >> (64 - HK_STORM_HOT_BITS));
    struct hk_storm_hot *hot = hk_storm_hot.lookup(&hs);
    if (!hot)
        return 0;
    if (hot->key == sk) {
        /* the storm path: one array read, one atomic add */
        u64 first = 0;
        if (!hk_storm_count(&hot->count, &hot->first_ns, &hot->last_report_jiffies, now,
                            &first))
            return 0;
        u64 count = __sync_lock_test_and_set(&hot->count, 0);
        struct hk_storm *st = hk_storms.lookup(&sk);
        if (st) {
            /* faults counted in the entry (before the slot was taken) */
            u64 first2 = st->first_ns;
            u64 more = __sync_lock_test_and_set(&st->count, 0);
            if (more) {
                if (!count || first2 < first)
                    first = first2;
                count += more;
            }
            st->last_report_jiffies = now;
            st->last_report_ns = bpf_ktime_get_boot_ns();
        }
        if (!count)
            return 0;
        return hk_fault_emit(tgid, v, acc, gpa, ec, count, first, st);
    }
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
        if (st && hot->key == 0) {
            /* take the free slot; the gate is set first so a fault on another CPU that
             * sees the new key does not report at once */
            hot->last_report_jiffies = now;
            if (__sync_val_compare_and_swap(&hot->key, 0, sk) == 0)
                st->hot_slot = hs + 1;
        }
        return hk_fault_emit(tgid, v, acc, gpa, ec, 1, boot, st);
    }
    u64 first = 0;
    if (!hk_storm_count(&st->count, &st->first_ns, &st->last_report_jiffies, now, &first))
        return 0;
    u64 count = __sync_lock_test_and_set(&st->count, 0);
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

/* tracefs format of kvm:kvm_cr (docs/heki-abi.md section 10.3) */
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
