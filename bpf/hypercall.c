/* kvm:kvm_hypercall (raw tracepoint, falling back to the tracepoint) and the Heki v2
 * PROTECT_MEMORY page-list walk. Included by capture.c.
 *
 * The guest is hostile: every loop is bounded by a -D constant, the chain is cut (and
 * flagged) when it is too long, loops, leaves every memslot, is misaligned, or a page
 * declares more than 169 entries. Entries are copied verbatim; judging them is userspace's job.
 */

/* tracefs format of kvm:kvm_hypercall (offsets checked by the loader;
 * docs/heki-abi.md section 10.1) */
struct hk_tp_hypercall {
    u64 common;
    u64 nr;
    u64 a0;
    u64 a1;
    u64 a2;
    u64 a3;
};

struct hk_walk {
    u64 seen[HK_MAX_LIST_PAGES];
};
BPF_PERCPU_ARRAY(hk_walk_scratch, struct hk_walk, 1);

/* GPA -> VMM address through the memslots learnt from the ioctl hook; 0 when the page
 * [gpa, gpa + 4096) lies in no address-space-0 memslot. */
static __always_inline u64 hk_gpa_to_hva(struct hk_slots *s, u64 gpa)
{
    for (int i = 0; i < HK_MAX_MEMSLOTS; i++) {
        struct hk_slot *e = &s->e[i];
        if (!e->used || (e->slot >> 16) != 0)
            continue;
        if (gpa >= e->gpa && gpa - e->gpa < e->size && e->size - (gpa - e->gpa) >= 4096)
            return e->hva + (gpa - e->gpa);
    }
    return 0;
}

static __always_inline int hk_protect_walk(u64 list_gpa)
{
    u32 tgid = hk_tgid();
    u32 zero = 0;
    u64 call_id = 0;
    u64 *seq = hk_seq.lookup(&zero);
    if (seq)
        call_id = __sync_fetch_and_add(seq, 1);
    struct hk_walk *w = hk_walk_scratch.lookup(&zero);
    if (!w)
        return 0;
    struct hk_slots *slots = hk_memslots.lookup(&tgid);
    u64 gpa = list_gpa;
    u32 flags = 0;
    u32 pages = 0;
    u64 declared = 0;
    int i;

    for (i = 0; i < HK_MAX_LIST_PAGES; i++) {
        if (gpa == 0)
            break;
        if (gpa & 0xfff) {
            flags |= HK_PF_MISALIGNED_LIST;
            break;
        }
        int looped = 0;
        for (int j = 0; j < HK_MAX_LIST_PAGES; j++) {
            if (j >= i)
                break;
            if (w->seen[j] == gpa) {
                looped = 1;
                break;
            }
        }
        if (looped) {
            flags |= HK_PF_LOOP;
            break;
        }
        w->seen[i] = gpa;
        u64 hva = slots ? hk_gpa_to_hva(slots, gpa) : 0;
        if (!hva) {
            flags |= HK_PF_OUTSIDE_MEMSLOT;
            break;
        }
        pages++;
        u64 next_pa = 0, npages = 0;
        int budget = hk_budget_take(tgid, sizeof(struct hk_protect_page_rec));
        struct hk_protect_page_rec *r = NULL;
        if (budget)
            r = hk_control.ringbuf_reserve(sizeof(*r));
        if (!r) {
            /* the page is lost, but the walk goes on so pages/flags stay true */
            hk_count_loss(tgid, HK_RING_CONTROL, HK_HOOK_PROTECT,
                          budget ? HK_DROP_RING_FULL : HK_DROP_VM_BUDGET);
            flags |= HK_PF_LOST_PAGES;
            u64 hdr3[3];
            if (bpf_probe_read_user(hdr3, sizeof(hdr3), (void *)hva) != 0) {
                flags |= HK_PF_READ_FAULT;
                break;
            }
            next_pa = hdr3[1];
            npages = hdr3[2];
        } else {
            hk_fill_hdr(&r->hdr, HK_REC_PROTECT_PAGE);
            r->call_id = call_id;
            r->page_gpa = gpa;
            r->index = i;
            r->flags = 0;
            /* header + every entry slot in one read: 4080 bytes, inside the list page */
            if (bpf_probe_read_user(&r->next_va, 24 + sizeof(r->entries), (void *)hva) != 0) {
                __builtin_memset(&r->next_va, 0, 24);
                r->flags = HK_PF_READ_FAULT;
                flags |= HK_PF_READ_FAULT;
                hk_control.ringbuf_submit(r, 0);
                break;
            }
            next_pa = r->next_pa;
            npages = r->npages;
            if (npages > HK_HEKI_MAX_ENTRIES)
                r->flags |= HK_PF_NPAGES_OVERSIZE;
            hk_control.ringbuf_submit(r, 0);
        }
        if (npages > HK_HEKI_MAX_ENTRIES)
            flags |= HK_PF_NPAGES_OVERSIZE;
        declared += npages;
        gpa = next_pa;
    }
    if (i == HK_MAX_LIST_PAGES && gpa != 0)
        flags |= HK_PF_TRUNCATED;

    if (!hk_budget_take(tgid, sizeof(struct hk_protect_end_rec))) {
        hk_count_loss(tgid, HK_RING_CONTROL, HK_HOOK_PROTECT, HK_DROP_VM_BUDGET);
        return 0;
    }
    struct hk_protect_end_rec *e = hk_control.ringbuf_reserve(sizeof(*e));
    if (!e) {
        hk_count_loss(tgid, HK_RING_CONTROL, HK_HOOK_PROTECT, HK_DROP_RING_FULL);
        return 0;
    }
    hk_fill_hdr(&e->hdr, HK_REC_PROTECT_END);
    e->call_id = call_id;
    e->list_gpa = list_gpa;
    e->pages = pages;
    e->flags = flags;
    e->declared_entries = declared;
    hk_control.ringbuf_submit(e, 0);
    return 0;
}

static __always_inline int hk_hypercall(u64 nr, u64 a0, u64 a1, u64 a2, u64 a3)
{
    int control = 0;
#ifdef HK_NR_PROTECT_MEMORY
    if (nr == HK_NR_PROTECT_MEMORY)
        return hk_protect_walk(a0);
#endif
#ifdef HK_NR_LOCK_CR_UPDATE
    if (nr == HK_NR_LOCK_CR_UPDATE)
        control = 1;
#endif
#ifdef HK_NR_LOCK_MEM_PAGE_RANGES
    if (nr == HK_NR_LOCK_MEM_PAGE_RANGES)
        control = 1;
#endif
#ifdef HK_NR_MAP_GPA_RANGE
    if (nr == HK_NR_MAP_GPA_RANGE)
        control = 1;
#endif
    struct hk_hypercall_rec *r;
    if (control && !hk_budget_take(hk_tgid(), sizeof(*r))) {
        hk_count_loss(hk_tgid(), HK_RING_CONTROL, HK_HOOK_HYPERCALL, HK_DROP_VM_BUDGET);
        return 0;
    }
    if (control)
        r = hk_control.ringbuf_reserve(sizeof(*r));
    else
        r = hk_telemetry.ringbuf_reserve(sizeof(*r));
    if (!r) {
        hk_count_loss(hk_tgid(), control ? HK_RING_CONTROL : HK_RING_TELEMETRY,
                      HK_HOOK_HYPERCALL, HK_DROP_RING_FULL);
        return 0;
    }
    hk_fill_hdr(&r->hdr, HK_REC_HYPERCALL);
    r->nr = nr;
    r->a0 = a0;
    r->a1 = a1;
    r->a2 = a2;
    r->a3 = a3;
    if (control)
        hk_control.ringbuf_submit(r, 0);
    else
        hk_telemetry.ringbuf_submit(r, 0);
    return 0;
}

/* raw tracepoint: args = (nr, a0, a1, a2, a3) (TP_PROTO of kvm_hypercall) */
int hk_hypercall_raw(struct bpf_raw_tracepoint_args *ctx)
{
    return hk_hypercall(ctx->args[0], ctx->args[1], ctx->args[2], ctx->args[3], ctx->args[4]);
}

int hk_hypercall_tp(struct hk_tp_hypercall *ctx)
{
    return hk_hypercall(ctx->nr, ctx->a0, ctx->a1, ctx->a2, ctx->a3);
}
