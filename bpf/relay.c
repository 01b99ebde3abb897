/* SPDX-License-Identifier: GPL-2.0 */
/*
 * splitrelay XDP data plane.
 *
 * Client -> relay:      C -> R, payload P            (public port)
 * Relay  -> transceiver: Ri -> T, tunnel header + P   (encapsulate)
 * Transceiver -> relay:  T -> Ri, tunnel header + P'  (tunnel port)
 * Relay  -> client:      R -> C, payload P'           (decapsulate)
 *
 * A STUN Binding Request whose server ufrag carries the routing token of an
 * active transceiver creates the session here and is forwarded at once; later
 * packets of a known client follow the session. Anything this program cannot
 * decide alone (unknown clients, unknown transceivers, fragments, unresolved
 * next hops) is passed up to the userspace relay, which applies the same
 * rules; anything malformed is dropped. Every verdict is counted by reason.
 * The wire formats are in docs/wire-format.md.
 *
 * Compiled by bcc at load time; the controller defines PIN_DIR, MAX_SESSIONS,
 * MAX_TRANSCEIVERS and EVENT_PAGES.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

#include "splitrelay.h"

#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/splitrelay"
#endif
#ifndef MAX_SESSIONS
#define MAX_SESSIONS 65536
#endif
#ifndef MAX_TRANSCEIVERS
#define MAX_TRANSCEIVERS 1024
#endif
#ifndef EVENT_PAGES
#define EVENT_PAGES 64
#endif

/* How far into a STUN message the attribute walk may look; longer messages
 * go to userspace, which walks them without this bound. */
#define STUN_SCAN_MAX 1024

#define AF_INET 2
#define AF_INET6 10
#define IP_DF 0x4000
#define IP_MF_OFFSET 0x3fff
#define OUT_TTL 64

BPF_TABLE_PINNED("array", u32, struct relay_config, config, 1, PIN_DIR "/config");
BPF_TABLE_PINNED("hash", u32, struct transceiver, transceivers, MAX_TRANSCEIVERS,
                 PIN_DIR "/transceivers");
BPF_TABLE_PINNED("lru_hash", struct session_key, struct session, sessions, MAX_SESSIONS,
                 PIN_DIR "/sessions");
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, CTR_MAX, PIN_DIR "/counters");
BPF_RINGBUF_OUTPUT(events, EVENT_PAGES);

/* What the parser learned about a UDP datagram. Addresses are IPv4-mapped. */
struct packet {
    __u8 saddr[16];
    __u8 daddr[16];
    __be16 sport;
    __be16 dport;
    __u16 udp_csum;    /* raw, as on the wire */
    __u16 payload_len; /* UDP payload bytes */
    __u16 l3_len;      /* 20 or 40 */
    __u8 v6;
    __u8 tos;          /* DSCP/ECN or traffic class, kept on output */
};

/* The fields a UDP checksum covers besides the payload (RFC 768 pseudo
 * header + UDP header). IPv4 addresses sit in the first 4 bytes of a zeroed
 * 16-byte slot, which adds nothing to a one's complement sum. The protocol
 * number is the same before and after, so it is left out. */
struct csum_words {
    __u8 saddr[16];
    __u8 daddr[16];
    __be16 sport;
    __be16 dport;
    __be16 len_pseudo;
    __be16 len_udp;
};

struct csum_words_tunnel {
    struct csum_words w;
    __u8 tunnel[TUNNEL_HDR_LEN];
};

/* The headers an emitted packet starts with, built on the stack. */
struct out_headers {
    struct ethhdr eth;
    union {
        struct iphdr ip4;
        struct ipv6hdr ip6;
    };
    struct udphdr udp;
    __u8 tunnel[TUNNEL_HDR_LEN];
};

/* Per-CPU scratch space: the structures an emitted packet needs are too
 * large for the 512-byte BPF stack together. XDP runs to completion on one
 * CPU, so one slot per CPU is never shared. */
struct scratch {
    struct out_headers h;
    struct csum_words_tunnel ca;
    struct csum_words_tunnel cb;
    struct bpf_fib_lookup fib;
    struct session ns;
    struct session_event ev;
};

BPF_PERCPU_ARRAY(scratch_space, struct scratch, 1);

static __always_inline void count(__u32 idx, __u64 n)
{
    __u64 *c = counters.lookup(&idx);
    if (c)
        *c += n;
}

static __always_inline int verdict(__u32 idx, int action)
{
    count(idx, 1);
    return action;
}

static __always_inline void map_v4(__u8 *out, const void *v4)
{
    __builtin_memset(out, 0, 10);
    out[10] = 0xff;
    out[11] = 0xff;
    __builtin_memcpy(out + 12, v4, 4);
}

static __always_inline int is_v4_mapped(const __u8 *a)
{
    const __u32 *w = (const __u32 *)a;
    return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

static __always_inline int addr_eq(const __u8 *a, const __u8 *b)
{
    const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int addr4_eq(const __u8 *mapped, const __u8 *v4)
{
    return *(const __u32 *)(mapped + 12) == *(const __u32 *)v4;
}

/* Session timestamps only feed idle expiry, so the coarse clock (one tick of
 * resolution, same base as CLOCK_MONOTONIC) is plenty, and cheaper to read.
 * Writing last_seen only when the tick changed keeps the session's cache line
 * from bouncing between CPUs on every packet. */
static __always_inline __u64 clock_ns(void)
{
    return bpf_ktime_get_coarse_ns();
}

static __always_inline __u16 fold16(__u32 s)
{
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (__u16)~s;
}

static __always_inline void csum_words_fill(struct csum_words *w, int v6, const __u8 *saddr,
                                            const __u8 *daddr, __be16 sport, __be16 dport,
                                            __u16 udp_len)
{
    if (v6) {
        __builtin_memcpy(w->saddr, saddr, 16);
        __builtin_memcpy(w->daddr, daddr, 16);
    } else {
        __builtin_memcpy(w->saddr, saddr + 12, 4);
        __builtin_memcpy(w->daddr, daddr + 12, 4);
    }
    w->sport = sport;
    w->dport = dport;
    w->len_pseudo = bpf_htons(udp_len);
    w->len_udp = bpf_htons(udp_len);
}

/* Parse Ethernet / IPv4 or IPv6 / UDP. Returns -1 to go on, or a verdict. */
static __always_inline int parse(struct xdp_md *ctx, struct packet *pk)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct udphdr *udp;
    __u16 ip_payload;

    if ((void *)(eth + 1) > data_end)
        return verdict(CTR_pass_not_ip, XDP_PASS);

    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        __u16 tot;

        if ((void *)(ip + 1) > data_end)
            return verdict(CTR_drop_truncated, XDP_DROP);
        if (ip->ihl != 5)
            return verdict(CTR_pass_ip_options, XDP_PASS);
        if (ip->frag_off & bpf_htons(IP_MF_OFFSET))
            return verdict(CTR_pass_ip_fragment, XDP_PASS);
        if (ip->protocol != IPPROTO_UDP)
            return verdict(CTR_pass_not_udp, XDP_PASS);
        tot = bpf_ntohs(ip->tot_len);
        if (tot < sizeof(*ip) + sizeof(*udp) || (void *)ip + tot > data_end)
            return verdict(CTR_drop_bad_ip_length, XDP_DROP);
        map_v4(pk->saddr, &ip->saddr);
        map_v4(pk->daddr, &ip->daddr);
        pk->l3_len = sizeof(*ip);
        pk->tos = ip->tos;
        pk->v6 = 0;
        ip_payload = tot - sizeof(*ip);
        udp = (void *)(ip + 1);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        __u8 nh;

        if ((void *)(ip6 + 1) > data_end)
            return verdict(CTR_drop_truncated, XDP_DROP);
        nh = ip6->nexthdr;
        if (nh == 44) /* fragment header */
            return verdict(CTR_pass_ip_fragment, XDP_PASS);
        if (nh == 0 || nh == 43 || nh == 60) /* hop-by-hop, routing, dest opts */
            return verdict(CTR_pass_ip_options, XDP_PASS);
        if (nh != IPPROTO_UDP)
            return verdict(CTR_pass_not_udp, XDP_PASS);
        ip_payload = bpf_ntohs(ip6->payload_len);
        if (ip_payload < sizeof(*udp) || (void *)(ip6 + 1) + ip_payload > data_end)
            return verdict(CTR_drop_bad_ip_length, XDP_DROP);
        __builtin_memcpy(pk->saddr, &ip6->saddr, 16);
        __builtin_memcpy(pk->daddr, &ip6->daddr, 16);
        pk->l3_len = sizeof(*ip6);
        pk->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
        pk->v6 = 1;
        udp = (void *)(ip6 + 1);
    } else {
        return verdict(CTR_pass_not_ip, XDP_PASS);
    }

    if ((void *)(udp + 1) > data_end)
        return verdict(CTR_drop_truncated, XDP_DROP);
    pk->sport = udp->source;
    pk->dport = udp->dest;
    pk->udp_csum = udp->check;
    if (bpf_ntohs(udp->len) != ip_payload)
        pk->payload_len = 0xffff; /* judged only if the datagram is ours */
    else
        pk->payload_len = ip_payload - sizeof(*udp);
    return -1;
}

/* Is addr:port (addr in the 16-byte form, v4 mapped) one of this relay's public endpoints? */
static __always_inline int is_public(const struct relay_config *cfg, int v6, const __u8 *addr,
                                     __be16 port)
{
    if (port != cfg->public_port)
        return 0;
    if (v6)
        return (cfg->flags & CFG_PUBLIC_V6) &&
               ((cfg->flags & CFG_PUBLIC_V6_ANY) || addr_eq(addr, cfg->public_v6));
    return (cfg->flags & CFG_PUBLIC_V4) &&
           ((cfg->flags & CFG_PUBLIC_V4_ANY) || addr4_eq(addr, cfg->public_v4));
}

static __always_inline int is_public_dst(const struct relay_config *cfg, const struct packet *pk)
{
    return is_public(cfg, pk->v6, pk->daddr, pk->dport);
}

static __always_inline int is_tunnel_dst(const struct relay_config *cfg, const struct packet *pk)
{
    if (pk->dport != cfg->tunnel_port)
        return 0;
    if (pk->v6)
        return (cfg->flags & CFG_TUNNEL_V6) && addr_eq(pk->daddr, cfg->tunnel_v6);
    return (cfg->flags & CFG_TUNNEL_V4) && addr4_eq(pk->daddr, cfg->tunnel_v4);
}

static __always_inline int hex_digit(__u8 c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

static __always_inline int ice_char(__u8 c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '+' || c == '/';
}

enum stun_result { STUN_ROUTE, STUN_OTHER, STUN_DROP, STUN_PASS };

/* Judge a STUN message (first byte 0..3). STUN_ROUTE sets *tid from the
 * Binding Request's server ufrag; STUN_DROP and STUN_PASS set *reason. */
static __always_inline int stun_route(__u8 *p, void *data_end, __u32 len, __u32 *tid,
                                      __u32 *reason)
{
    __u32 off = STUN_HDR_LEN, ulen = 0, id = 0;
    __u16 type, mlen;
    __u8 *u = NULL;
    int i;

    *reason = CTR_drop_stun_malformed;
    if (len < STUN_HDR_LEN || (void *)p + STUN_HDR_LEN > data_end)
        return STUN_DROP;
    type = (p[0] << 8) | p[1];
    mlen = (p[2] << 8) | p[3];
    if ((type & 0xc000) || (mlen & 3) || mlen + STUN_HDR_LEN != len ||
        *(__be32 *)(p + 4) != bpf_htonl(STUN_MAGIC_COOKIE))
        return STUN_DROP;
    if (type != STUN_BINDING_REQUEST)
        return STUN_OTHER;

    for (i = 0; i < STUN_MAX_ATTRIBUTES; i++) {
        __u16 at, al;
        __u8 *a;

        if (off == len)
            break;
        if (off + 4 > len)
            return STUN_DROP;
        if (off > STUN_SCAN_MAX) {
            *reason = CTR_pass_stun_too_long;
            return STUN_PASS;
        }
        a = p + off;
        if ((void *)a + 4 > data_end)
            return STUN_DROP;
        at = (a[0] << 8) | a[1];
        al = (a[2] << 8) | a[3];
        if (off + 4 + ((al + 3) & ~3) > len)
            return STUN_DROP;
        if (at == STUN_ATTR_USERNAME) {
            u = a + 4; /* a packet pointer the verifier has bounded */
            ulen = al;
            break;
        }
        if (at == STUN_ATTR_MESSAGE_INTEGRITY || at == STUN_ATTR_MESSAGE_INTEGRITY_SHA256 ||
            at == STUN_ATTR_FINGERPRINT)
            break;
        off += 4 + ((al + 3) & ~3);
    }
    if (!u) {
        *reason = CTR_drop_stun_no_username;
        return STUN_DROP;
    }

    *reason = CTR_drop_bad_token;
    if (ulen < TOKEN_LEN + 1 + CLIENT_UFRAG_MIN || ulen > TOKEN_LEN + 1 + CLIENT_UFRAG_MAX)
        return STUN_DROP;
    if ((void *)u + TOKEN_LEN + 1 > data_end)
        return STUN_DROP;
    if (u[0] != TOKEN_VERSION_CHAR || u[TOKEN_LEN] != ':')
        return STUN_DROP;
#pragma unroll
    for (i = 1; i <= 8; i++) {
        int d = hex_digit(u[i]);
        if (d < 0)
            return STUN_DROP;
        id = (id << 4) | d;
    }
#pragma unroll
    for (i = 9; i < TOKEN_LEN; i++) {
        if (!ice_char(u[i]))
            return STUN_DROP;
    }
    if (!id)
        return STUN_DROP;
    *tid = id;
    return STUN_ROUTE;
}

/* The IP packet length the FIB compares with the egress MTU: it counts from
 * the network header for both families (uapi bpf_fib_lookup.tot_len), so an
 * IPv6 packet counts its 40-byte header too. */
static __always_inline __u16 l3_total(int v6, __u16 udp_len)
{
    return udp_len + (v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr));
}

/* Resolve the next hop for a packet we are about to emit. Returns 0 and
 * fills fib, or the pass counter to use. */
static __always_inline int next_hop(struct xdp_md *ctx, struct bpf_fib_lookup *fib, int v6,
                                    const __u8 *saddr, const __u8 *daddr, __be16 sport,
                                    __be16 dport, __u16 tot_len)
{
    int rc;

    __builtin_memset(fib, 0, sizeof(*fib));
    fib->l4_protocol = IPPROTO_UDP;
    fib->sport = sport;
    fib->dport = dport;
    fib->tot_len = tot_len;
    fib->ifindex = ctx->ingress_ifindex;
    if (v6) {
        fib->family = AF_INET6;
        __builtin_memcpy(fib->ipv6_src, saddr, 16);
        __builtin_memcpy(fib->ipv6_dst, daddr, 16);
    } else {
        fib->family = AF_INET;
        fib->ipv4_src = *(const __u32 *)(saddr + 12);
        fib->ipv4_dst = *(const __u32 *)(daddr + 12);
    }
    rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
    if (rc == BPF_FIB_LKUP_RET_SUCCESS)
        return 0;
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
        return CTR_pass_fib_no_neigh;
    if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
        return CTR_pass_fib_frag_needed;
    return CTR_pass_fib_failed;
}

/* Fill the Ethernet, IP and UDP headers of an emitted packet on the stack. */
static __always_inline void build_headers(struct out_headers *h, const struct bpf_fib_lookup *fib,
                                          int v6, __u8 tos, const __u8 *saddr, const __u8 *daddr,
                                          __be16 sport, __be16 dport, __u16 udp_len)
{
    __builtin_memcpy(h->eth.h_dest, fib->dmac, ETH_ALEN);
    __builtin_memcpy(h->eth.h_source, fib->smac, ETH_ALEN);
    if (v6) {
        h->eth.h_proto = bpf_htons(ETH_P_IPV6);
        h->ip6.version = 6;
        h->ip6.priority = tos >> 4;
        h->ip6.flow_lbl[0] = (tos & 0xf) << 4;
        h->ip6.payload_len = bpf_htons(udp_len);
        h->ip6.nexthdr = IPPROTO_UDP;
        h->ip6.hop_limit = OUT_TTL;
        __builtin_memcpy(&h->ip6.saddr, saddr, 16);
        __builtin_memcpy(&h->ip6.daddr, daddr, 16);
    } else {
        h->eth.h_proto = bpf_htons(ETH_P_IP);
        h->ip4.version = 4;
        h->ip4.ihl = 5;
        h->ip4.tos = tos;
        h->ip4.tot_len = bpf_htons(sizeof(struct iphdr) + udp_len);
        h->ip4.frag_off = bpf_htons(IP_DF);
        h->ip4.ttl = OUT_TTL;
        h->ip4.protocol = IPPROTO_UDP;
        __builtin_memcpy(&h->ip4.saddr, saddr + 12, 4);
        __builtin_memcpy(&h->ip4.daddr, daddr + 12, 4);
        h->ip4.check = 0;
        h->ip4.check = fold16(bpf_csum_diff(0, 0, (__be32 *)&h->ip4, sizeof(h->ip4), 0));
    }
    h->udp.source = sport;
    h->udp.dest = dport;
    h->udp.len = bpf_htons(udp_len);
}

/* Replace the packet's headers: old_hdr bytes of Ethernet + IP + UDP (+ tunnel)
 * become the headers in h, the payload stays where it is. */
static __always_inline int rewrite(struct xdp_md *ctx, const struct packet *pk, __u32 old_hdr,
                                   int v6, int with_tunnel, const struct out_headers *h)
{
    __u32 new_hdr = sizeof(struct ethhdr) + (v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) +
                    sizeof(struct udphdr) + (with_tunnel ? TUNNEL_HDR_LEN : 0);
    __u32 frame = old_hdr + pk->payload_len - (with_tunnel ? 0 : TUNNEL_HDR_LEN);
    void *data, *data_end;
    __u8 *p;

    /* Short frames carry Ethernet padding after the datagram: cut it. */
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    if (data + frame < data_end && bpf_xdp_adjust_tail(ctx, (int)(frame - (data_end - data))))
        return -1;
    if (bpf_xdp_adjust_head(ctx, (int)old_hdr - (int)new_hdr))
        return -1;

    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    p = data;
    if ((void *)p + sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) >
        data_end)
        return -1;
    __builtin_memcpy(p, &h->eth, sizeof(h->eth));
    p += sizeof(h->eth);
    if (v6) {
        if ((void *)p + sizeof(h->ip6) + sizeof(h->udp) > data_end)
            return -1;
        __builtin_memcpy(p, &h->ip6, sizeof(h->ip6));
        p += sizeof(h->ip6);
    } else {
        __builtin_memcpy(p, &h->ip4, sizeof(h->ip4));
        p += sizeof(h->ip4);
    }
    __builtin_memcpy(p, &h->udp, sizeof(h->udp));
    p += sizeof(h->udp);
    if (with_tunnel) {
        if ((void *)p + TUNNEL_HDR_LEN > data_end)
            return -1;
        __builtin_memcpy(p, h->tunnel, TUNNEL_HDR_LEN);
    }
    return 0;
}

static __always_inline int emit(struct xdp_md *ctx, const struct bpf_fib_lookup *fib)
{
    if (fib->ifindex == ctx->ingress_ifindex)
        return XDP_TX;
    return bpf_redirect(fib->ifindex, 0);
}

/* Client -> transceiver: encapsulate P toward T. sess is NULL for a new
 * session (event_kind then says created or rerouted). */
static __always_inline int to_transceiver(struct xdp_md *ctx, struct scratch *s,
                                          const struct relay_config *cfg,
                                          const struct packet *pk, const struct session_key *key,
                                          struct session *sess, __u32 tid,
                                          const struct transceiver *t, __u32 event_kind)
{
    struct out_headers *h = &s->h;
    struct csum_words *from = &s->ca.w;
    struct csum_words_tunnel *to = &s->cb;
    struct bpf_fib_lookup *fib = &s->fib;
    const __u8 *src;
    __u8 src_mapped[16];
    int v6 = !is_v4_mapped(t->addr);
    __u16 udp_len = sizeof(struct udphdr) + TUNNEL_HDR_LEN + pk->payload_len;
    __u16 csum;
    __u64 now;
    int rc;

    if (v6) {
        if (!(cfg->flags & CFG_TUNNEL_V6))
            return verdict(CTR_drop_no_tunnel_source, XDP_DROP);
        src = cfg->tunnel_v6;
    } else {
        if (!(cfg->flags & CFG_TUNNEL_V4))
            return verdict(CTR_drop_no_tunnel_source, XDP_DROP);
        map_v4(src_mapped, cfg->tunnel_v4);
        src = src_mapped;
    }
    if (v6 && pk->udp_csum == 0)
        return verdict(CTR_pass_no_checksum, XDP_PASS);
    rc = next_hop(ctx, fib, v6, src, t->addr, cfg->tunnel_port, t->port, l3_total(v6, udp_len));
    if (rc)
        return verdict(rc, XDP_PASS);

    /* The tunnel header, then the checksum update it and the new addresses
     * make (RFC 1624): payload bytes are never summed again. */
    __builtin_memset(h, 0, sizeof(*h));
    h->tunnel[0] = TUNNEL_MAGIC >> 8;
    h->tunnel[1] = TUNNEL_MAGIC & 0xff;
    h->tunnel[2] = TUNNEL_VERSION;
    __builtin_memcpy(&h->tunnel[4], &pk->sport, 2);
    __builtin_memcpy(&h->tunnel[6], &pk->dport, 2);
    __builtin_memcpy(&h->tunnel[8], pk->saddr, 16);
    build_headers(h, fib, v6, pk->tos, src, t->addr, cfg->tunnel_port, t->port, udp_len);
    if (pk->udp_csum) {
        __builtin_memset(from, 0, sizeof(*from));
        __builtin_memset(to, 0, sizeof(*to));
        csum_words_fill(from, pk->v6, pk->saddr, pk->daddr, pk->sport, pk->dport,
                        sizeof(struct udphdr) + pk->payload_len);
        csum_words_fill(&to->w, v6, src, t->addr, cfg->tunnel_port, t->port, udp_len);
        __builtin_memcpy(to->tunnel, h->tunnel, TUNNEL_HDR_LEN);
        csum = fold16(bpf_csum_diff((__be32 *)from, sizeof(*from), (__be32 *)to, sizeof(*to),
                                    (__u16)~pk->udp_csum));
        h->udp.check = csum ? csum : 0xffff;
    }

    now = clock_ns();
    if (sess) {
        if (sess->last_seen_ns != now)
            sess->last_seen_ns = now;
        __sync_fetch_and_add(&sess->packets_to_transceiver, 1);
        __sync_fetch_and_add(&sess->bytes_to_transceiver, pk->payload_len);
    } else {
        struct session *ns = &s->ns;
        struct session_event *ev = &s->ev;

        __builtin_memset(ns, 0, sizeof(*ns));
        ns->tid = tid;
        ns->relay_port = pk->dport;
        ns->origin = ORIGIN_XDP;
        __builtin_memcpy(ns->relay_addr, pk->daddr, 16);
        ns->created_ns = now;
        ns->last_seen_ns = now;
        ns->packets_to_transceiver = 1;
        ns->bytes_to_transceiver = pk->payload_len;
        sessions.update((struct session_key *)key, ns);

        __builtin_memset(ev, 0, sizeof(*ev));
        __builtin_memcpy(ev->client_addr, key->addr, 16);
        ev->client_port = key->port;
        ev->relay_port = pk->dport;
        __builtin_memcpy(ev->relay_addr, pk->daddr, 16);
        ev->tid = tid;
        ev->kind = event_kind;
        ev->ts_ns = now;
        if (events.ringbuf_output(ev, sizeof(*ev), 0))
            count(CTR_events_lost, 1);
        count(event_kind == EVENT_CREATED ? CTR_sessions_created : CTR_sessions_rerouted, 1);
    }

    if (rewrite(ctx, pk, sizeof(struct ethhdr) + pk->l3_len + sizeof(struct udphdr), v6, 1, h))
        return verdict(CTR_drop_internal, XDP_DROP);
    count(CTR_fwd_to_transceiver_packets, 1);
    count(CTR_fwd_to_transceiver_bytes, pk->payload_len);
    return emit(ctx, fib);
}

static __always_inline int from_client(struct xdp_md *ctx, struct scratch *s,
                                       const struct relay_config *cfg, const struct packet *pk)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct session_key key = {};
    struct session *sess;
    struct transceiver *t;
    __u8 *payload;
    __u32 tid = 0, reason = 0, kind = 0;
    int res = STUN_OTHER;

    payload = data + sizeof(struct ethhdr) + pk->l3_len + sizeof(struct udphdr);
    if ((void *)payload + 1 > data_end) /* empty datagram: nothing to relay */
        return verdict(CTR_drop_truncated, XDP_DROP);
    __builtin_memcpy(key.addr, pk->saddr, 16);
    key.port = pk->sport;
    sess = sessions.lookup(&key);

    if (payload[0] <= 3) {
        res = stun_route(payload, data_end, pk->payload_len, &tid, &reason);
        if (res == STUN_DROP)
            return verdict(reason, XDP_DROP);
        if (res == STUN_PASS)
            return verdict(reason, XDP_PASS);
    }
    if (res == STUN_ROUTE && !(sess && sess->tid == tid)) {
        /* A new session, or a known client now routed to another owner. */
        t = transceivers.lookup(&tid);
        if (!t)
            return verdict(CTR_pass_unknown_transceiver, XDP_PASS);
        if (t->state != TRANSCEIVER_ACTIVE)
            return verdict(CTR_drop_transceiver_draining, XDP_DROP);
        kind = sess ? EVENT_REROUTED : EVENT_CREATED;
        sess = NULL;
    } else {
        if (!sess)
            return verdict(CTR_pass_unknown_client, XDP_PASS);
        tid = sess->tid;
        t = transceivers.lookup(&tid);
        if (!t)
            return verdict(CTR_pass_orphan_session, XDP_PASS);
    }
    return to_transceiver(ctx, s, cfg, pk, &key, sess, tid, t, kind);
}

/* Transceiver -> client: check the sender owns the session, decapsulate,
 * and send from the exact public address and port the client used. */
static __always_inline int from_tunnel(struct xdp_md *ctx, struct scratch *s,
                                       const struct relay_config *cfg, const struct packet *pk)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct out_headers *h = &s->h;
    struct csum_words_tunnel *from = &s->ca;
    struct csum_words *to = &s->cb.w;
    struct bpf_fib_lookup *fib = &s->fib;
    struct session_key key = {};
    struct session *sess;
    struct transceiver *t;
    __u8 *tun;
    __u16 payload_len, udp_len, csum;
    __u64 now;
    __u32 tid;
    int v6, rc;

    if (pk->payload_len < TUNNEL_HDR_LEN)
        return verdict(CTR_drop_tunnel_truncated, XDP_DROP);
    tun = data + sizeof(struct ethhdr) + pk->l3_len + sizeof(struct udphdr);
    if ((void *)tun + TUNNEL_HDR_LEN > data_end)
        return verdict(CTR_drop_tunnel_truncated, XDP_DROP);
    if (tun[0] != (TUNNEL_MAGIC >> 8) || tun[1] != (TUNNEL_MAGIC & 0xff) ||
        tun[2] != TUNNEL_VERSION || tun[3] != 0)
        return verdict(CTR_drop_tunnel_bad_header, XDP_DROP);

    __builtin_memcpy(key.addr, tun + 8, 16);
    __builtin_memcpy(&key.port, tun + 4, 2);
    sess = sessions.lookup(&key);
    if (!sess)
        return verdict(CTR_pass_reply_unknown_client, XDP_PASS);
    tid = sess->tid;
    t = transceivers.lookup(&tid);
    if (!t || t->port != pk->sport || !addr_eq(t->addr, pk->saddr))
        return verdict(CTR_drop_reply_not_owner, XDP_DROP);
    if (*(__be16 *)(tun + 6) != sess->relay_port)
        return verdict(CTR_drop_reply_port_mismatch, XDP_DROP);
    /* A session put in by hand or recovered from another relay's record may name a
     * relay address this host does not serve: never send from it (that would spoof
     * another host). Userspace applies the same rule and counts the drop. */
    if (!is_public(cfg, !is_v4_mapped(sess->relay_addr), sess->relay_addr, sess->relay_port))
        return verdict(CTR_pass_foreign_relay, XDP_PASS);

    v6 = !is_v4_mapped(key.addr);
    payload_len = pk->payload_len - TUNNEL_HDR_LEN;
    udp_len = sizeof(struct udphdr) + payload_len;
    if (v6 && pk->udp_csum == 0)
        return verdict(CTR_pass_no_checksum, XDP_PASS);
    rc = next_hop(ctx, fib, v6, sess->relay_addr, key.addr, sess->relay_port, key.port,
                  l3_total(v6, udp_len));
    if (rc)
        return verdict(rc, XDP_PASS);

    __builtin_memset(h, 0, sizeof(*h));
    build_headers(h, fib, v6, pk->tos, sess->relay_addr, key.addr, sess->relay_port, key.port,
                  udp_len);
    if (pk->udp_csum) {
        __builtin_memset(from, 0, sizeof(*from));
        __builtin_memset(to, 0, sizeof(*to));
        csum_words_fill(&from->w, pk->v6, pk->saddr, pk->daddr, pk->sport, pk->dport,
                        sizeof(struct udphdr) + pk->payload_len);
        __builtin_memcpy(from->tunnel, tun, TUNNEL_HDR_LEN);
        csum_words_fill(to, v6, sess->relay_addr, key.addr, sess->relay_port, key.port,
                        udp_len);
        csum = fold16(bpf_csum_diff((__be32 *)from, sizeof(*from), (__be32 *)to, sizeof(*to),
                                    (__u16)~pk->udp_csum));
        h->udp.check = csum ? csum : 0xffff;
    }

    now = clock_ns();
    if (sess->last_seen_ns != now)
        sess->last_seen_ns = now;
    __sync_fetch_and_add(&sess->packets_to_client, 1);
    __sync_fetch_and_add(&sess->bytes_to_client, payload_len);

    if (rewrite(ctx, pk,
                sizeof(struct ethhdr) + pk->l3_len + sizeof(struct udphdr) + TUNNEL_HDR_LEN, v6,
                0, h))
        return verdict(CTR_drop_internal, XDP_DROP);
    count(CTR_fwd_to_client_packets, 1);
    count(CTR_fwd_to_client_bytes, payload_len);
    return emit(ctx, fib);
}

int xdp_relay(struct xdp_md *ctx)
{
    struct packet pk = {};
    struct relay_config *cfg;
    struct scratch *s;
    __u32 zero = 0;
    int rc;

    cfg = config.lookup(&zero);
    s = scratch_space.lookup(&zero);
    if (!cfg || !s || !cfg->public_port)
        return verdict(CTR_pass_unconfigured, XDP_PASS);
    rc = parse(ctx, &pk);
    if (rc >= 0)
        return rc;
    if (is_public_dst(cfg, &pk)) {
        if (pk.payload_len == 0xffff)
            return verdict(CTR_drop_bad_udp_length, XDP_DROP);
        return from_client(ctx, s, cfg, &pk);
    }
    if (is_tunnel_dst(cfg, &pk)) {
        if (pk.payload_len == 0xffff)
            return verdict(CTR_drop_bad_udp_length, XDP_DROP);
        return from_tunnel(ctx, s, cfg, &pk);
    }
    return verdict(CTR_pass_not_relay, XDP_PASS);
}
