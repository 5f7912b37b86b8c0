/* Test- and bench-only flood generator (compiled with -DHK_WITH_FLOOD): an XDP program
 * that BPF_PROG_TEST_RUN runs `repeat` times, writing hypercall records (nr 0xF100D,
 * a0 = sequence) into the telemetry ring at kernel speed (docs/kernel-support.md section 5),
 * counting what it sent and what it lost exactly like the real hooks do. Included by
 * capture.c. */

#ifdef HK_WITH_FLOOD
#define HK_FLOOD_NR 0xF100D

BPF_ARRAY(hk_flood_sent, u64, 1);

int hk_flood(struct xdp_md *ctx)
{
    u32 zero = 0;
    u64 *sent = hk_flood_sent.lookup(&zero);
    if (!sent)
        return XDP_PASS;
    u64 seq = __sync_fetch_and_add(sent, 1);
    struct hk_hypercall_rec *r = hk_telemetry.ringbuf_reserve(sizeof(*r));
    if (!r) {
        hk_count_loss(0, HK_RING_TELEMETRY, HK_HOOK_FLOOD, HK_DROP_RING_FULL);
        return XDP_PASS;
    }
    r->hdr.type = HK_REC_HYPERCALL;
    r->hdr.version = 1;
    r->hdr.reserved = 0;
    r->hdr.tgid = 0;
    r->hdr.tid = 0;
    r->hdr.cpu = bpf_get_smp_processor_id();
    r->hdr.time_ns = bpf_ktime_get_boot_ns();
    r->nr = HK_FLOOD_NR;
    r->a0 = seq;
    r->a1 = 0;
    r->a2 = 0;
    r->a3 = 0;
    hk_telemetry.ringbuf_submit(r, 0);
    return XDP_PASS;
}
#endif /* HK_WITH_FLOOD */
