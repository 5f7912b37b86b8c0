/* syscalls:sys_enter_ioctl / sys_exit_ioctl, filtered in the kernel to the four KVM
 * ioctls that shape a VM's memory: the arguments are saved per thread at enter and sent
 * with the result at exit; the memslot table used by the page-list walk is updated only
 * when the kernel accepted the memslot. Included by capture.c. */

/* tracefs formats of syscalls:sys_enter_ioctl / sys_exit_ioctl (checked by the loader) */
struct hk_tp_sys_enter_ioctl {
    u64 common;
    s32 syscall_nr;
    u32 pad;
    u64 fd;
    u64 cmd;
    u64 arg;
};

struct hk_tp_sys_exit_ioctl {
    u64 common;
    s32 syscall_nr;
    u32 pad;
    s64 ret;
};

struct hk_pending_ioctl {
    u32 cmd;
    s32 fd;
    u64 arg[4];
};

/* tid -> ioctl in flight; LRU so that entries of threads killed inside the ioctl
 * (they never reach sys_exit) age out instead of filling the table */
BPF_TABLE("lru_hash", u32, struct hk_pending_ioctl, hk_pending, 4096);

int hk_ioctl_enter(struct hk_tp_sys_enter_ioctl *ctx)
{
    u32 cmd = (u32)ctx->cmd;
    if (cmd != HK_KVM_CREATE_VM && cmd != HK_KVM_SET_USER_MEMORY_REGION &&
        cmd != HK_KVM_SET_USER_MEMORY_REGION2 && cmd != HK_KVM_SET_MEMORY_ATTRIBUTES)
        return 0;
    struct hk_pending_ioctl p = {};
    p.cmd = cmd;
    p.fd = (s32)ctx->fd;
    if (cmd == HK_KVM_CREATE_VM) {
        p.arg[0] = ctx->arg;            /* the VM type, passed by value */
    } else if (bpf_probe_read_user(p.arg, sizeof(p.arg), (void *)ctx->arg) != 0) {
        /* unreadable: the kernel will fail the ioctl with -EFAULT too */
        __builtin_memset(p.arg, 0, sizeof(p.arg));
    }
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (hk_pending.update(&tid, &p) != 0)
        hk_count_loss(hk_tgid(), 0, HK_HOOK_IOCTL, HK_DROP_PENDING_FULL);
    return 0;
}

static __always_inline void hk_memslot_learn(u32 tgid, u32 slot, u64 gpa, u64 size, u64 hva)
{
    struct hk_slots *s = hk_memslots.lookup(&tgid);
    if (!s) {
        if (size == 0)
            return;
        u32 zero = 0;
        struct hk_slots *z = hk_zero_slots.lookup(&zero);
        if (!z)
            return;
        hk_memslots.update(&tgid, z);
        s = hk_memslots.lookup(&tgid);
        if (!s) {
            hk_count_loss(tgid, 0, HK_HOOK_IOCTL, HK_DROP_MEMSLOT_FULL);
            return;
        }
    }
    int free = -1;
    for (int i = 0; i < HK_MAX_MEMSLOTS; i++) {
        struct hk_slot *e = &s->e[i];
        if (e->used && e->slot == slot) {
            if (size == 0) {
                e->used = 0;
            } else {
                e->gpa = gpa;
                e->size = size;
                e->hva = hva;
            }
            return;
        }
        if (!e->used && free < 0)
            free = i;
    }
    if (size == 0)
        return;
    if (free < 0 || free >= HK_MAX_MEMSLOTS) {
        hk_count_loss(tgid, 0, HK_HOOK_IOCTL, HK_DROP_MEMSLOT_FULL);
        return;
    }
    struct hk_slot *e = &s->e[free];
    e->slot = slot;
    e->gpa = gpa;
    e->size = size;
    e->hva = hva;
    e->used = 1;
}

int hk_ioctl_exit(struct hk_tp_sys_exit_ioctl *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct hk_pending_ioctl *p = hk_pending.lookup(&tid);
    if (!p)
        return 0;
    struct hk_pending_ioctl a = *p;
    hk_pending.delete(&tid);
    s64 ret = ctx->ret;
    u32 tgid = hk_tgid();
    int memslot = a.cmd == HK_KVM_SET_USER_MEMORY_REGION ||
                  a.cmd == HK_KVM_SET_USER_MEMORY_REGION2;
    if (memslot || a.cmd == HK_KVM_CREATE_VM) {
        if (ret < 0)
            return 0;      /* a memslot or VM that does not exist is not worth a record */
        if (a.cmd == HK_KVM_CREATE_VM)
            hk_memslots.delete(&tgid);      /* a new VM in this VMM: forget old slots */
        else
            hk_memslot_learn(tgid, (u32)a.arg[0], a.arg[1], a.arg[2], a.arg[3]);
    }
    struct hk_ioctl_rec *r = hk_control.ringbuf_reserve(sizeof(*r));
    if (!r) {
        hk_count_loss(tgid, HK_RING_CONTROL, HK_HOOK_IOCTL, HK_DROP_RING_FULL);
        return 0;
    }
    hk_fill_hdr(&r->hdr, HK_REC_IOCTL);
    r->cmd = a.cmd;
    r->fd = a.fd;
    r->ret = ret;
    r->arg[0] = a.arg[0];
    r->arg[1] = a.arg[1];
    r->arg[2] = a.arg[2];
    r->arg[3] = a.arg[3];
    hk_control.ringbuf_submit(r, 0);
    return 0;
}
