/* hekitrace capture: maps and helpers shared by every hook; the hooks are in the files
 * appended after it. Compiled once by hekitrace/capture/loader.py, which passes every
 * setting as a -D flag (never string replacement):
 *   HK_CTRL_PAGES, HK_TELE_PAGES       ring sizes in pages (power of two)
 *   HK_MAX_LIST_PAGES                  page-list chain bound (capture.max_list_pages)
 *   HK_MAX_MEMSLOTS                    memslots remembered per VM (power of two)
 *   HK_NR_PROTECT_MEMORY, HK_NR_LOCK_CR_UPDATE, HK_NR_LOCK_MEM_PAGE_RANGES,
 *   HK_NR_MAP_GPA_RANGE                hypercall numbers of the ABI profile (absent: none)
 *   HK_KVM_CREATE_VM, HK_KVM_SET_USER_MEMORY_REGION(2), HK_KVM_SET_MEMORY_ATTRIBUTES
 *   HK_VENDOR                          1 = VMX exit qualification, 2 = SVM PFERR
 *   HK_FAULT_INTERVAL_JIFFIES          storm report interval (in kernel jiffies)
 *   HK_GFN_RANGE_{START,END,ATTR}_OFF  struct kvm_gfn_range offsets (BTF)
 *   HK_VCPU_ID_OFF, HK_VCPU_RIP_OFF    struct kvm_vcpu offsets (BTF; -1 = unknown)
 *   HK_VM_BUDGET_BURST, HK_VM_BUDGET_PER_JIFFY   per-VM control-ring budget (bytes)
 *   HK_WITH_FLOOD                      add the test-only XDP flood generator
 *   HK_LAYOUT_MAPS                     add one array per record type (layout test)
 */
/* struct pt_regs for the kprobe flavour: the x86-64 UAPI register frame, an ABI, not a
 * kernel-internal layout (so safe with the build host's mismatched headers) */
#include <uapi/linux/ptrace.h>
#include "hekitrace.h"

BPF_RINGBUF_OUTPUT(hk_control, HK_CTRL_PAGES);
BPF_RINGBUF_OUTPUT(hk_telemetry, HK_TELE_PAGES);

/* every failed reserve, by (tgid, ring, hook, reason); per-CPU so counting is lock-free */
BPF_PERCPU_HASH(hk_loss, struct hk_loss_key, u64, 4096);

/* call ids of PROTECT_MEMORY walks (ties page records to their end record) */
BPF_ARRAY(hk_seq, u64, 1);

struct hk_slot {
    u32 slot;        /* KVM slot id (as_id << 16 | id); only as_id 0 is used */
    u32 used;
    u64 gpa;
    u64 size;
    u64 hva;
};

struct hk_slots {
    struct hk_slot e[HK_MAX_MEMSLOTS];
};

/* tgid -> memslots learnt from successful KVM_SET_USER_MEMORY_REGION(2). LRU: a VMM that
 * exits without the daemon calling Capture.forget_vm() ages out rather than filling it */
BPF_TABLE("lru_hash", u32, struct hk_slots, hk_memslots, 1024);
/* a zeroed value to create hk_memslots entries from (too big for the BPF stack) */
BPF_ARRAY(hk_zero_slots, struct hk_slots, 1);

static __always_inline void hk_fill_hdr(struct hk_hdr *h, u8 type)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    h->type = type;
    h->version = 1;
    h->reserved = 0;
    h->tgid = pid_tgid >> 32;
    h->tid = (u32)pid_tgid;
    h->cpu = bpf_get_smp_processor_id();
    h->time_ns = bpf_ktime_get_boot_ns();
}

static __always_inline void hk_count_loss(u32 tgid, u8 ring, u8 hook, u8 reason)
{
    struct hk_loss_key k = {};
    k.tgid = tgid;
    k.ring = ring;
    k.hook = hook;
    k.reason = reason;
    u64 *v = hk_loss.lookup(&k);
    if (v) {
        *v += 1;
        return;
    }
    u64 one = 1;
    if (hk_loss.update(&k, &one) != 0) {
        /* map full: still count it, without the VM */
        k.tgid = 0;
        v = hk_loss.lookup(&k);
        if (v)
            *v += 1;
        else
            hk_loss.update(&k, &one);
    }
}

static __always_inline u32 hk_tgid(void)
{
    return bpf_get_current_pid_tgid() >> 32;
}

/* Per-VM budget for guest-triggered control records (hypercalls, page lists, applied
 * attributes): a token bucket in bytes, HK_VM_BUDGET_BURST deep, refilled by
 * HK_VM_BUDGET_PER_JIFFY each jiffy. The control ring is shared by every VM; without
 * this a guest looping on PROTECT_MEMORY with 16-page chains (64 KiB of records per
 * hypercall) could fill it and push out other VMs' records (docs/internals.md, principle 5).
 * Over budget, the record is counted lost for that VM only (reason vm_budget), which
 * marks that VM degraded. Updates from several vCPUs race benignly: the budget is
 * approximate, never unbounded. VMM ioctls are not budgeted (the VMM is not the guest). */
struct hk_budget {
    u64 tokens;
    u64 last_jiffies;
};
BPF_TABLE("lru_hash", u32, struct hk_budget, hk_vm_budget, 4096);

static __always_inline int hk_budget_take(u32 tgid, u64 bytes)
{
    u64 now = bpf_jiffies64();
    struct hk_budget *b = hk_vm_budget.lookup(&tgid);
    if (!b) {
        struct hk_budget fresh = {};
        fresh.tokens = HK_VM_BUDGET_BURST - bytes;
        fresh.last_jiffies = now;
        hk_vm_budget.update(&tgid, &fresh);
        return 1;
    }
    u64 elapsed = now - b->last_jiffies;
    if (elapsed) {
        u64 tokens = b->tokens;
        if (elapsed >= HK_VM_BUDGET_BURST / HK_VM_BUDGET_PER_JIFFY + 1)
            tokens = HK_VM_BUDGET_BURST;
        else
            tokens += elapsed * HK_VM_BUDGET_PER_JIFFY;
        if (tokens > HK_VM_BUDGET_BURST)
            tokens = HK_VM_BUDGET_BURST;
        b->tokens = tokens;
        b->last_jiffies = now;
    }
    if (b->tokens < bytes)
        return 0;
    b->tokens -= bytes;
    return 1;
}

/* The hooks follow: loader.py appends hypercall.c, ioctl.c, fault.c, attr.c and flood.c
 * to this file and compiles the result as one text (bcc only takes BPF programs from its
 * main file, not from #included ones). */
#ifdef HK_LAYOUT_MAPS
BPF_ARRAY(hk_layout_hdr, struct hk_hdr, 1);
BPF_ARRAY(hk_layout_ioctl, struct hk_ioctl_rec, 1);
BPF_ARRAY(hk_layout_hypercall, struct hk_hypercall_rec, 1);
BPF_ARRAY(hk_layout_protect_page, struct hk_protect_page_rec, 1);
BPF_ARRAY(hk_layout_protect_end, struct hk_protect_end_rec, 1);
BPF_ARRAY(hk_layout_attr, struct hk_attr_rec, 1);
BPF_ARRAY(hk_layout_fault, struct hk_fault_rec, 1);
BPF_ARRAY(hk_layout_cr, struct hk_cr_rec, 1);
BPF_ARRAY(hk_layout_loss_key, struct hk_loss_key, 1);
#endif
