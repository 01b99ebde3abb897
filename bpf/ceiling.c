/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The benchmark ceiling: the least an XDP forwarder can do. It rewrites the
 * Ethernet addresses and redirects every IPv4/IPv6 frame to one interface,
 * with no parsing beyond the Ethernet type, no map lookup per session and no
 * checksum work. `make bench` runs the relay beside it with the same traffic,
 * so relay / ceiling is the cost of the relay's own logic.
 *
 * The controller sets EGRESS_IFINDEX, EGRESS_SMAC and EGRESS_DMAC (as
 * comma-separated byte lists) when it compiles this file.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>

static const __u8 smac[ETH_ALEN] = {EGRESS_SMAC};
static const __u8 dmac[ETH_ALEN] = {EGRESS_DMAC};

BPF_PERCPU_ARRAY(ceiling_packets, __u64, 1);

int xdp_ceiling(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    __u32 zero = 0;
    __u64 *n;

    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    if (eth->h_proto != bpf_htons(ETH_P_IP) && eth->h_proto != bpf_htons(ETH_P_IPV6))
        return XDP_PASS;
    n = ceiling_packets.lookup(&zero);
    if (n)
        *n += 1;
    __builtin_memcpy(eth->h_source, smac, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
    return bpf_redirect(EGRESS_IFINDEX, 0);
}
