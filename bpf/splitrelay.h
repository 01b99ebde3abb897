/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * splitrelay: the data structures the XDP program shares with its controller.
 *
 * ctl/layout.py mirrors every struct here with ctypes, and a test compares the
 * two through the types bcc derives from this file, so a field cannot drift.
 * Addresses are always 16 bytes; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d),
 * the form the tunnel header uses too. Ports are in network byte order.
 */
#ifndef SPLITRELAY_H
#define SPLITRELAY_H

/* Tunnel header, version 1 (docs/wire-format.md). */
#define TUNNEL_MAGIC 0x5352
#define TUNNEL_VERSION 1
#define TUNNEL_HDR_LEN 24

/* Routing token inside the server ufrag, version 1. */
#define TOKEN_VERSION_CHAR '1'
#define TOKEN_LEN 17
#define CLIENT_UFRAG_MIN 4
#define CLIENT_UFRAG_MAX 256

/* STUN (RFC 8489). */
#define STUN_HDR_LEN 20
#define STUN_MAGIC_COOKIE 0x2112A442
#define STUN_BINDING_REQUEST 0x0001
#define STUN_ATTR_USERNAME 0x0006
#define STUN_ATTR_MESSAGE_INTEGRITY 0x0008
#define STUN_ATTR_MESSAGE_INTEGRITY_SHA256 0x001C
#define STUN_ATTR_FINGERPRINT 0x8028
#define STUN_MAX_ATTRIBUTES 16

/* Transceiver states. */
#define TRANSCEIVER_ACTIVE 1
#define TRANSCEIVER_DRAINING 2

/* Who created a session. */
#define ORIGIN_XDP 1
#define ORIGIN_USERSPACE 2
#define ORIGIN_REDIS 3
#define ORIGIN_OPERATOR 4

/* Session event kinds. */
#define EVENT_CREATED 1
#define EVENT_REROUTED 2

/* relay_config.flags */
#define CFG_PUBLIC_V4 (1u << 0)     /* accept IPv4 clients */
#define CFG_PUBLIC_V6 (1u << 1)     /* accept IPv6 clients */
#define CFG_PUBLIC_V4_ANY (1u << 2) /* any local IPv4 destination */
#define CFG_PUBLIC_V6_ANY (1u << 3) /* any local IPv6 destination */
#define CFG_TUNNEL_V4 (1u << 4)     /* tunnel_v4 is set */
#define CFG_TUNNEL_V6 (1u << 5)     /* tunnel_v6 is set */

struct relay_config {
    __u8 public_v4[4];
    __u8 tunnel_v4[4];
    __u8 public_v6[16];
    __u8 tunnel_v6[16];
    __be16 public_port;
    __be16 tunnel_port;
    __u32 flags;
};

struct transceiver {
    __u8 addr[16];
    __be16 port;
    __u8 state;
    __u8 pad;
};

struct session_key {
    __u8 addr[16];
    __be16 port;
    __u16 pad;
};

struct session {
    __u32 tid;
    __be16 relay_port;
    __u8 origin;
    __u8 pad;
    __u8 relay_addr[16];
    __u64 created_ns;   /* CLOCK_MONOTONIC_COARSE */
    __u64 last_seen_ns; /* CLOCK_MONOTONIC_COARSE */
    __u64 packets_to_transceiver;
    __u64 bytes_to_transceiver;
    __u64 packets_to_client;
    __u64 bytes_to_client;
};

struct session_event {
    __u8 client_addr[16];
    __be16 client_port;
    __be16 relay_port;
    __u8 relay_addr[16];
    __u32 tid;
    __u32 kind;
    __u64 ts_ns;
};

/*
 * Counters, one per-CPU slot each. The controller reads the names from this
 * list (ctl/layout.py parses it), so adding a line here is all it takes.
 * Byte counters count UDP payload bytes on the client side (P or P').
 */
#define SPLITRELAY_COUNTERS(X)          \
    X(fwd_to_transceiver_packets)       \
    X(fwd_to_transceiver_bytes)         \
    X(fwd_to_client_packets)            \
    X(fwd_to_client_bytes)              \
    X(sessions_created)                 \
    X(sessions_rerouted)                \
    X(events_lost)                      \
    X(drop_truncated)                   \
    X(drop_bad_ip_length)               \
    X(drop_bad_udp_length)              \
    X(drop_stun_malformed)              \
    X(drop_stun_no_username)            \
    X(drop_bad_token)                   \
    X(drop_transceiver_draining)        \
    X(drop_no_tunnel_source)            \
    X(drop_tunnel_truncated)            \
    X(drop_tunnel_bad_header)           \
    X(drop_reply_not_owner)             \
    X(drop_reply_port_mismatch)         \
    X(drop_internal)                    \
    X(pass_unconfigured)                \
    X(pass_not_ip)                      \
    X(pass_not_udp)                     \
    X(pass_not_relay)                   \
    X(pass_ip_options)                  \
    X(pass_ip_fragment)                 \
    X(pass_unknown_client)              \
    X(pass_unknown_transceiver)         \
    X(pass_orphan_session)              \
    X(pass_reply_unknown_client)        \
    X(pass_stun_too_long)               \
    X(pass_no_checksum)                 \
    X(pass_fib_no_neigh)                \
    X(pass_fib_frag_needed)             \
    X(pass_fib_failed)                  \
    X(pass_foreign_relay)

#define SPLITRELAY_COUNTER_ENUM(name) CTR_##name,
enum splitrelay_counter { SPLITRELAY_COUNTERS(SPLITRELAY_COUNTER_ENUM) CTR_MAX };

#endif /* SPLITRELAY_H */
