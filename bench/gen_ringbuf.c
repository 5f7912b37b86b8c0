/* In-kernel ring-buffer record generator (bcc dialect), for benchmarks and tests.
 *
 * Why XDP: BPF_PROG_TEST_RUN accepts `repeat` for XDP programs (not for raw
 * tracepoints), so one bpf(2) call makes the kernel run this program N times and write N
 * records at kernel speed, with no guest and no tracepoint firing (about 6.5 M records/s:
 * docs/kernel-support.md section 5). The program always returns XDP_PASS; the packet is
 * ignored.
 *
 * Settings (cflags, never edits of the C text):
 *   -DGEN_RING_PAGES=n     pages of the ring buffer `ring` (power of 2; default 1024)
 *   -DGEN_MIRROR           also write every record, identically, to a second ring `mirror`
 *                          (same size), so two consumers can be compared on the same records
 *   -DGEN_DISCARD_EVERY=n  reserve then discard every n-th record (0: never; default 0)
 *   -DGEN_VARLEN           three record sizes in turn (16, 40, 72 bytes) instead of 40 only,
 *                          so records wrap at every possible offset
 *
 * Records: `seq` counts every record generated (discarded ones included), so a consumer
 * can check order and gaps; `gen_lost[0]` counts failed reserves (ring full), so a test can
 * check sent = received + lost exactly.
 */
#include <uapi/linux/bpf.h>

#ifndef GEN_RING_PAGES
#define GEN_RING_PAGES 1024
#endif
#ifndef GEN_DISCARD_EVERY
#define GEN_DISCARD_EVERY 0
#endif

#define GEN_KIND_SMALL 1
#define GEN_KIND_MEDIUM 2
#define GEN_KIND_LARGE 3

struct gen_small {          /* 16 bytes */
    u64 seq;
    u32 kind;
    u32 cpu;
};

struct gen_record {         /* 40 bytes, the size of docs/kernel-support.md's baselines */
    u64 seq;
    u32 kind;
    u32 cpu;
    u64 a;
    u64 b;
    u64 c;
};

struct gen_large {          /* 72 bytes */
    u64 seq;
    u32 kind;
    u32 cpu;
    u64 a;
    u64 b;
    u64 c;
    u64 d;
    u64 e;
    u64 f;
    u64 g;
};

BPF_RINGBUF_OUTPUT(ring, GEN_RING_PAGES);
#ifdef GEN_MIRROR
BPF_RINGBUF_OUTPUT(mirror, GEN_RING_PAGES);
#endif
BPF_ARRAY(gen_seq, u64, 1);
BPF_ARRAY(gen_lost, u64, 1);

static __always_inline void count_lost(void)
{
    int zero = 0;
    u64 *lost = gen_lost.lookup(&zero);
    if (lost)
        __sync_fetch_and_add(lost, 1);
}

/* Size of the record number `seq` gets: 16, 40 or 72 bytes with GEN_VARLEN, else 40. */
static __always_inline u64 gen_kind(u64 seq)
{
#ifdef GEN_VARLEN
    return GEN_KIND_SMALL + seq % 3;
#else
    return GEN_KIND_MEDIUM;
#endif
}

static __always_inline void gen_fill(void *p, u64 kind, u64 seq)
{
    struct gen_small *s = p;
    s->seq = seq;
    s->kind = kind;
    s->cpu = bpf_get_smp_processor_id();
    if (kind == GEN_KIND_SMALL)
        return;
    struct gen_record *r = p;
    r->a = seq * 3;
    r->b = ~seq;
    r->c = 0x6865 + seq;
    if (kind == GEN_KIND_MEDIUM)
        return;
    struct gen_large *l = p;
    l->d = seq + 1;
    l->e = seq + 2;
    l->f = seq + 3;
    l->g = seq + 4;
}

/* bcc rewrites map methods only outside macros, hence one function per ring. */
static __always_inline void gen_emit_ring(u64 kind, u64 seq, int discard)
{
    void *p;
    if (kind == GEN_KIND_SMALL)
        p = ring.ringbuf_reserve(sizeof(struct gen_small));
    else if (kind == GEN_KIND_MEDIUM)
        p = ring.ringbuf_reserve(sizeof(struct gen_record));
    else
        p = ring.ringbuf_reserve(sizeof(struct gen_large));
    if (!p) {
        count_lost();
        return;
    }
    gen_fill(p, kind, seq);
    if (discard)
        ring.ringbuf_discard(p, 0);
    else
        ring.ringbuf_submit(p, 0);
}

#ifdef GEN_MIRROR
static __always_inline void gen_emit_mirror(u64 kind, u64 seq, int discard)
{
    void *p;
    if (kind == GEN_KIND_SMALL)
        p = mirror.ringbuf_reserve(sizeof(struct gen_small));
    else if (kind == GEN_KIND_MEDIUM)
        p = mirror.ringbuf_reserve(sizeof(struct gen_record));
    else
        p = mirror.ringbuf_reserve(sizeof(struct gen_large));
    if (!p) {
        count_lost();
        return;
    }
    gen_fill(p, kind, seq);
    if (discard)
        mirror.ringbuf_discard(p, 0);
    else
        mirror.ringbuf_submit(p, 0);
}
#endif

int gen(struct xdp_md *ctx)
{
    int zero = 0;
    u64 *counter = gen_seq.lookup(&zero);
    if (!counter)
        return XDP_PASS;
    u64 seq = __sync_fetch_and_add(counter, 1);
    int discard = GEN_DISCARD_EVERY > 0 && (seq % (GEN_DISCARD_EVERY ?: 1)) ==
                  (GEN_DISCARD_EVERY ?: 1) - 1;
    u64 kind = gen_kind(seq);
    gen_emit_ring(kind, seq, discard);
#ifdef GEN_MIRROR
    gen_emit_mirror(kind, seq, discard);
#endif
    return XDP_PASS;
}
