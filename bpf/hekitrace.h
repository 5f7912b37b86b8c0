/* hekitrace ring records: the binary layout shared by every BPF program and by
 * hekitrace/capture/records.py (which declares the same structs, field by field, and
 * whose tests/unit/test_records.py + tests/kernel/test_bpf_layout.py prove they agree).
 *
 * Rules: little-endian, naturally aligned, explicit padding (no implicit holes), every
 * record starts with struct hk_hdr whose first byte is the record type, so userspace can
 * dispatch on one byte and decode with one struct.unpack_from per record.
 * Never reorder or renumber: a trace recorded by `hekitrace record` keeps decoded events,
 * not these records, but a mismatch between C and Python would corrupt every event.
 */
#ifndef HEKITRACE_H
#define HEKITRACE_H

/* record types (first byte of every record) */
#define HK_REC_IOCTL          1
#define HK_REC_HYPERCALL      2
#define HK_REC_PROTECT_PAGE   3
#define HK_REC_PROTECT_END    4
#define HK_REC_ATTR           5
#define HK_REC_FAULT          6
#define HK_REC_CR             7

/* rings, as counted in the loss map */
#define HK_RING_CONTROL       1
#define HK_RING_TELEMETRY     2

/* hooks, as counted in the loss map (names in records.py HOOK_NAMES) */
#define HK_HOOK_HYPERCALL     1
#define HK_HOOK_PROTECT       2
#define HK_HOOK_IOCTL         3
#define HK_HOOK_ATTR          4
#define HK_HOOK_FAULT         5
#define HK_HOOK_CR            6
#define HK_HOOK_FLOOD         7   /* test-only generator (HK_WITH_FLOOD) */

/* why something was dropped in the kernel */
#define HK_DROP_RING_FULL     1   /* ringbuf_reserve returned NULL */
#define HK_DROP_MEMSLOT_FULL  2   /* per-VM memslot table full: slot not learnt */
#define HK_DROP_PENDING_FULL  3   /* per-thread ioctl argument table full */
#define HK_DROP_VM_BUDGET     4   /* the VM used up its control-ring budget (a flood) */

/* ProtectFlags (hekitrace/state/events.py) */
#define HK_PF_TRUNCATED        (1 << 0)
#define HK_PF_LOOP             (1 << 1)
#define HK_PF_OUTSIDE_MEMSLOT  (1 << 2)
#define HK_PF_NPAGES_OVERSIZE  (1 << 3)
#define HK_PF_READ_FAULT       (1 << 4)
#define HK_PF_MISALIGNED_LIST  (1 << 5)
#define HK_PF_LOST_PAGES       (1 << 6)

/* FaultAccess (hekitrace/state/events.py) */
#define HK_ACC_READ   (1 << 0)
#define HK_ACC_WRITE  (1 << 1)
#define HK_ACC_FETCH  (1 << 2)

/* Heki v2 page list: (4096 - 24-byte header) / 24-byte entries = 169
 * (docs/heki-abi.md section 4) */
#define HK_HEKI_MAX_ENTRIES   169

/* 24 bytes, first in every record */
struct hk_hdr {
    u8  type;        /* HK_REC_* */
    u8  version;     /* 1 */
    u16 reserved;
    u32 tgid;        /* VMM process */
    u32 tid;         /* thread (vCPU thread for hypercalls and faults) */
    u32 cpu;
    u64 time_ns;     /* bpf_ktime_get_boot_ns() */
};

/* KVM ioctl on /dev/kvm or a VM fd, emitted at sys_exit_ioctl with the result.
 * arg[] is the ioctl's argument struct as the VMM passed it (first 32 bytes):
 *   KVM_CREATE_VM: arg[0] = VM type (the ioctl argument itself, not a pointer)
 *   KVM_SET_USER_MEMORY_REGION(2): arg[0] = slot | flags << 32, [1] gpa, [2] size, [3] hva
 *   KVM_SET_MEMORY_ATTRIBUTES: address, size, attributes, flags
 * 72 bytes */
struct hk_ioctl_rec {
    struct hk_hdr hdr;
    u32 cmd;
    s32 fd;
    s64 ret;         /* fd of the new VM, 0, or -errno */
    u64 arg[4];
};

/* kvm:kvm_hypercall (other than PROTECT_MEMORY, which sends page records). 64 bytes */
struct hk_hypercall_rec {
    struct hk_hdr hdr;
    u64 nr;
    u64 a0;
    u64 a1;
    u64 a2;
    u64 a3;
};

/* struct heki_pages: one guest range, verbatim guest input. 24 bytes */
struct hk_heki_pages {
    u64 pa;
    u64 epa;
    u64 permissions;
};

/* One Heki v2 list page as read from the VMM's memory, header + all 169 entry slots
 * (only min(npages, 169) are meaningful). 24 + 24 + 24 + 4056 = 4128 bytes */
struct hk_protect_page_rec {
    struct hk_hdr hdr;
    u64 call_id;     /* matches the end record of the same hypercall */
    u64 page_gpa;    /* GPA this list page was read from */
    u32 index;       /* 0 = the page the hypercall named */
    u32 flags;       /* HK_PF_* found on this page */
    u64 next_va;     /* struct heki_page_list, verbatim: */
    u64 next_pa;
    u64 npages;
    struct hk_heki_pages entries[HK_HEKI_MAX_ENTRIES];
};

/* End of one PROTECT_MEMORY hypercall's walk. 56 bytes */
struct hk_protect_end_rec {
    struct hk_hdr hdr;
    u64 call_id;
    u64 list_gpa;    /* a0 of the hypercall */
    u32 pages;       /* list pages read (records sent or lost) */
    u32 flags;       /* HK_PF_*, union over the walk */
    u64 declared_entries;  /* sum of the guest's npages, before any cut */
};

/* kvm_arch_post_set_memory_attributes: [gfn_start, gfn_end) now hold attributes. 48 bytes */
struct hk_attr_rec {
    struct hk_hdr hdr;
    u64 gfn_start;
    u64 gfn_end;
    u64 attributes;
};

/* kvm:kvm_page_fault on a filtered page; count faults since first_ns. 72 bytes */
struct hk_fault_rec {
    struct hk_hdr hdr;
    u32 vcpu;
    u32 access;      /* HK_ACC_* decoded for the vendor */
    u64 gpa;
    u64 error_code;  /* raw: VMX exit qualification or SVM #NPF EXITINFO1 */
    u64 rip;
    u64 count;
    u64 first_ns;    /* boot ns of the first fault counted */
};

/* kvm:kvm_cr, writes to CR0/CR4 only. 40 bytes */
struct hk_cr_rec {
    struct hk_hdr hdr;
    u32 cr;
    u32 reserved;
    u64 value;
};

/* loss map key (per-CPU hash); value: u64 count */
struct hk_loss_key {
    u32 tgid;
    u8  ring;        /* HK_RING_* (0: none, e.g. table full) */
    u8  hook;        /* HK_HOOK_* */
    u8  reason;      /* HK_DROP_* */
    u8  reserved;
};

#endif /* HEKITRACE_H */
