"""The splitrelay wire codec: tunnel header, routing token, STUN USERNAME routing.

docs/wire-format.md is the specification. This module is its only Python
implementation: the relay's userspace path and the transceiver both import it,
and bpf/relay.c implements the same rules in the kernel. Tests feed both the
same vectors, so every check here mirrors a check there, in the same order, and
every rejection carries the XDP drop-counter name as its reason.

Pure standard library; every parser accepts bytes, bytearray or memoryview so a
receive buffer never has to be copied just to be judged.
"""

from __future__ import annotations

import base64
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview
IPAddress: TypeAlias = IPv4Address | IPv6Address

# Tunnel header, version 1.
TUNNEL_MAGIC = 0x5352
TUNNEL_VERSION = 1
TUNNEL_HEADER_LEN = 24

# STUN (RFC 8489).
STUN_MAGIC_COOKIE = 0x2112A442
STUN_HEADER_LEN = 20
STUN_TRANSACTION_ID_LEN = 12
STUN_BINDING_REQUEST = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_MESSAGE_INTEGRITY_SHA256 = 0x001C
ATTR_FINGERPRINT = 0x8028
STUN_MAX_ATTRIBUTES = 16

# Routing token in the server ufrag, version 1: "1" + %08x id + 8 random ICE chars.
TOKEN_VERSION = "1"
TOKEN_LEN = 17
TOKEN_RANDOM_LEN = 8
ICE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
CLIENT_UFRAG_MIN = 4
CLIENT_UFRAG_MAX = 256

_TUNNEL = struct.Struct("!HBBHH16s")
_STUN_HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_ICE_STR = frozenset(ICE_CHARS)
_ICE_BYTES = frozenset(ICE_CHARS.encode("ascii"))
_LOWER_HEX_BYTES = frozenset(b"0123456789abcdef")
_TOKEN_VERSION_BYTE = ord(TOKEN_VERSION)
_USERNAME_SEPARATOR = ord(":")
# RFC 8489 14.5: receivers ignore attributes after these, so a later USERNAME never counts.
_STOP_ATTRIBUTES = frozenset(
    {ATTR_MESSAGE_INTEGRITY, ATTR_MESSAGE_INTEGRITY_SHA256, ATTR_FINGERPRINT}
)

_REASONS = {
    "tunnel_truncated": "tunnel datagram is shorter than the 24-byte tunnel header",
    "tunnel_bad_header": "tunnel header has a wrong magic, an unknown version or nonzero flags",
    "stun_malformed": "payload starts like STUN but is not a well-formed STUN message",
    "stun_no_username": "STUN Binding Request has no USERNAME the relay may route by",
    "bad_token": "server ufrag is not a valid version-1 routing token",
}
#: Every WireError reason, in a stable order (for pre-creating metric labels).
WIRE_ERROR_REASONS: tuple[str, ...] = tuple(_REASONS)


class WireError(ValueError):
    """Input that the spec says to drop.

    ``reason`` is the drop-counter name the XDP program uses for the same input,
    so the userspace path can count drops under the same label.
    """

    reason: str

    def __init__(self, reason: str, message: str | None = None) -> None:
        if reason not in _REASONS:
            raise ValueError(f"unknown wire error reason {reason!r}")
        super().__init__(message or _REASONS[reason])
        self.reason = reason

    def __reduce__(self) -> tuple[type[WireError], tuple[str, str]]:
        # Keep the reason across pickling (multiprocessing workers re-raise these).
        return type(self), (self.reason, str(self))


# --- addresses ---------------------------------------------------------------


def to_mapped(addr: IPAddress | str) -> bytes:
    """Return the 16-byte form used on the wire and in BPF maps (IPv4 as ::ffff:a.b.c.d)."""
    if isinstance(addr, str):
        addr = ip_address(addr)
    if isinstance(addr, IPv4Address):
        return _V4_MAPPED_PREFIX + addr.packed
    return addr.packed


def from_mapped(raw: Buffer) -> IPAddress:
    """Inverse of to_mapped: an IPv4-mapped address comes back as IPv4Address.

    Returning IPv4 for mapped addresses keeps one canonical form, so a client
    seen over IPv4 compares equal however its address travelled.
    """
    raw = bytes(raw)
    if len(raw) != 16:
        raise ValueError(f"a mapped address is 16 bytes, got {len(raw)}")
    if raw[:12] == _V4_MAPPED_PREFIX:
        return IPv4Address(raw[12:])
    return IPv6Address(raw)


# --- tunnel header -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TunnelHeader:
    """The 24-byte header in front of every client payload on the relay <-> transceiver hop.

    An IPv4-mapped IPv6 ``client_addr`` is stored as IPv4Address, the form
    unpack() returns, so that pack/unpack round trips compare equal.
    """

    client_addr: IPAddress
    client_port: int
    relay_port: int

    def __post_init__(self) -> None:
        addr = self.client_addr
        if not isinstance(addr, IPv4Address | IPv6Address):
            raise TypeError(f"client_addr must be an IP address, got {type(addr).__name__}")
        if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
            object.__setattr__(self, "client_addr", addr.ipv4_mapped)
        for name in ("client_port", "relay_port"):
            port = getattr(self, name)
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"{name} {port} is not a UDP port")

    def pack(self) -> bytes:
        """Serialize with flags 0, the only value a version-1 sender may use."""
        return _TUNNEL.pack(
            TUNNEL_MAGIC,
            TUNNEL_VERSION,
            0,
            self.client_port,
            self.relay_port,
            to_mapped(self.client_addr),
        )

    @classmethod
    def unpack(cls, data: Buffer) -> TunnelHeader:
        """Parse the header at the start of ``data`` (anything after it is ignored).

        Strict, like the XDP program: a wrong magic or version, or any flag bit,
        is rejected so that a future flag can never be silently misread.
        """
        if len(data) < TUNNEL_HEADER_LEN:
            raise WireError(
                "tunnel_truncated",
                f"tunnel datagram of {len(data)} bytes is shorter than the "
                f"{TUNNEL_HEADER_LEN}-byte header",
            )
        magic, version, flags, client_port, relay_port, addr = _TUNNEL.unpack_from(data)
        if magic != TUNNEL_MAGIC:
            raise WireError("tunnel_bad_header", f"tunnel magic 0x{magic:04x} is not 0x5352")
        if version != TUNNEL_VERSION:
            raise WireError("tunnel_bad_header", f"tunnel version {version} is not 1")
        if flags:
            raise WireError("tunnel_bad_header", f"tunnel flags 0x{flags:02x} set; v1 has none")
        return cls(from_mapped(addr), client_port, relay_port)


def encap(header: TunnelHeader, payload: Buffer) -> bytes:
    """Build a tunnel datagram: header followed by the unchanged client payload."""
    return b"".join((header.pack(), payload))


def decap(datagram: Buffer) -> tuple[TunnelHeader, bytes]:
    """Split a tunnel datagram into its header and the client payload."""
    return TunnelHeader.unpack(datagram), bytes(datagram[TUNNEL_HEADER_LEN:])


# --- routing token -----------------------------------------------------------


def make_server_ufrag(transceiver_id: int, random_part: str | None = None) -> str:
    """Build a version-1 server ufrag that routes to ``transceiver_id``.

    The random part defaults to 48 bits from ``secrets`` (RFC 8445 asks for at
    least 24): six random bytes in base64 are exactly 8 ICE characters.
    """
    if isinstance(transceiver_id, bool) or not isinstance(transceiver_id, int):
        raise TypeError(f"transceiver id must be an int, got {type(transceiver_id).__name__}")
    if not 1 <= transceiver_id <= 0xFFFFFFFF:
        raise ValueError(f"transceiver id {transceiver_id} is outside 1..0xFFFFFFFF")
    if random_part is None:
        random_part = base64.b64encode(secrets.token_bytes(6)).decode("ascii")
    elif len(random_part) != TOKEN_RANDOM_LEN or not all(c in _ICE_STR for c in random_part):
        raise ValueError(f"random part {random_part!r} is not {TOKEN_RANDOM_LEN} ICE characters")
    return f"{TOKEN_VERSION}{transceiver_id:08x}{random_part}"


def parse_server_ufrag(ufrag: str | Buffer) -> int:
    """Return the transceiver id in a version-1 server ufrag, or raise bad_token.

    Every character is checked explicitly, as in the XDP program: int(x, 16)
    would also accept uppercase, "_", whitespace and non-ASCII digits.
    """
    if isinstance(ufrag, str):
        try:
            raw = ufrag.encode("ascii")
        except UnicodeEncodeError:
            raise WireError("bad_token", "server ufrag has non-ASCII characters") from None
    else:
        raw = bytes(ufrag)
    if len(raw) != TOKEN_LEN:
        raise WireError("bad_token", f"server ufrag is {len(raw)} characters, not {TOKEN_LEN}")
    return _token_id(raw)


def _token_id(raw: bytes) -> int:
    """Validate the 17 token bytes and return the id (the relay's 8 bounded conversions)."""
    if raw[0] != _TOKEN_VERSION_BYTE:
        raise WireError("bad_token", f"token version {raw[:1]!r} is not {TOKEN_VERSION!r}")
    id_hex = raw[1:9]
    if not _LOWER_HEX_BYTES.issuperset(id_hex):
        raise WireError("bad_token", f"token id {id_hex!r} is not 8 lowercase hex digits")
    transceiver_id = int(id_hex, 16)
    if transceiver_id == 0:
        raise WireError("bad_token", "token names transceiver id 0")
    if not _ICE_BYTES.issuperset(raw[9:TOKEN_LEN]):
        raise WireError("bad_token", f"token random part {raw[9:]!r} has non-ICE characters")
    return transceiver_id


def parse_username(username: Buffer) -> int:
    """Route a STUN USERNAME value ``serverUfrag:clientUfrag``; return the transceiver id.

    The client ufrag's characters are not judged: the relay holds no ICE
    password, and the transceiver's ICE agent checks the whole USERNAME anyway.
    """
    n = len(username)
    if not TOKEN_LEN + 1 + CLIENT_UFRAG_MIN <= n <= TOKEN_LEN + 1 + CLIENT_UFRAG_MAX:
        raise WireError(
            "bad_token",
            f"USERNAME of {n} bytes cannot be a {TOKEN_LEN}-char token, ':' and a "
            f"{CLIENT_UFRAG_MIN}..{CLIENT_UFRAG_MAX}-byte client ufrag",
        )
    if username[TOKEN_LEN] != _USERNAME_SEPARATOR:
        raise WireError("bad_token", f"USERNAME has no ':' right after the {TOKEN_LEN}-char token")
    return _token_id(bytes(username[:TOKEN_LEN]))


# --- STUN --------------------------------------------------------------------


def is_stun(payload: Buffer) -> bool:
    """RFC 7983 demultiplexing: a first byte of 0..3 means STUN."""
    return len(payload) > 0 and payload[0] <= 3


def parse_stun_header(payload: Buffer) -> tuple[int, bytes]:
    """Check the whole-message framing; return (message type, 12-byte transaction id).

    The length must match the datagram exactly: that, and the length being a
    multiple of 4, is what lets the attribute walk trust every offset.
    """
    size = len(payload)
    if size < STUN_HEADER_LEN:
        raise WireError(
            "stun_malformed", f"STUN message of {size} bytes is shorter than its 20-byte header"
        )
    msg_type, length, cookie, transaction_id = _STUN_HEADER.unpack_from(payload)
    if msg_type & 0xC000:
        raise WireError("stun_malformed", f"STUN type 0x{msg_type:04x} has a top bit set")
    if cookie != STUN_MAGIC_COOKIE:
        raise WireError("stun_malformed", f"STUN magic cookie 0x{cookie:08x} is wrong")
    if length != size - STUN_HEADER_LEN:
        raise WireError(
            "stun_malformed",
            f"STUN length {length} does not match the {size - STUN_HEADER_LEN} bytes present",
        )
    if length % 4:
        raise WireError("stun_malformed", f"STUN length {length} is not a multiple of 4")
    return msg_type, transaction_id


def find_username(payload: Buffer) -> bytes | None:
    """Return the first USERNAME value of a well-formed STUN message, or None.

    None also when MESSAGE-INTEGRITY(-SHA256) or FINGERPRINT comes first, since
    nothing after them is covered, or when the first 16 attributes hold none:
    the bound keeps the kernel walk (and this one) constant-time.
    """
    parse_stun_header(payload)
    return _walk_username(payload)


def _walk_username(payload: Buffer) -> bytes | None:
    # Offsets stay multiples of 4 inside a length-checked message, so an
    # attribute header always fits once off < end.
    end = len(payload)
    off = STUN_HEADER_LEN
    for _ in range(STUN_MAX_ATTRIBUTES):
        if off == end:
            return None
        attr_type, attr_len = _ATTR_HEADER.unpack_from(payload, off)
        value = off + 4
        next_off = value + ((attr_len + 3) & ~3)
        if next_off > end:
            raise WireError(
                "stun_malformed",
                f"STUN attribute 0x{attr_type:04x} at offset {off} runs past the message end",
            )
        if attr_type == ATTR_USERNAME:
            return bytes(payload[value : value + attr_len])
        if attr_type in _STOP_ATTRIBUTES:
            return None
        off = next_off
    return None


def route_binding_request(payload: Buffer) -> int | None:
    """Judge a client payload as the relay does; return the transceiver id to route to.

    None means "nothing to route by": the payload is not STUN (first byte > 3,
    opaque to the relay) or is a well-formed STUN message other than a Binding
    Request. Raises WireError stun_malformed, stun_no_username or bad_token for
    what the relay drops.
    """
    if not is_stun(payload):
        return None
    msg_type, _ = parse_stun_header(payload)
    if msg_type != STUN_BINDING_REQUEST:
        return None
    username = _walk_username(payload)
    if username is None:
        raise WireError(
            "stun_no_username",
            "STUN Binding Request has no USERNAME before integrity attributes "
            f"within its first {STUN_MAX_ATTRIBUTES} attributes",
        )
    return parse_username(username)


def _attribute(attr_type: int, value: bytes) -> bytes:
    if not 0 <= attr_type <= 0xFFFF:
        raise ValueError(f"STUN attribute type {attr_type} does not fit 16 bits")
    if len(value) > 0xFFFF:
        raise ValueError(f"STUN attribute value of {len(value)} bytes is too long")
    return _ATTR_HEADER.pack(attr_type, len(value)) + value + bytes(-len(value) % 4)


def build_stun_message(
    message_type: int,
    attributes: Iterable[tuple[int, bytes]] = (),
    transaction_id: bytes | None = None,
) -> bytes:
    """Build a STUN message with the given attributes, zero-padded, in order.

    No MESSAGE-INTEGRITY or FINGERPRINT is computed: the relay never checks
    them, and callers that need them (an ICE agent) use their own stack.
    """
    if not 0 <= message_type <= 0x3FFF:
        raise ValueError(f"STUN message type 0x{message_type:x} does not fit 14 bits")
    if transaction_id is None:
        transaction_id = secrets.token_bytes(STUN_TRANSACTION_ID_LEN)
    elif len(transaction_id) != STUN_TRANSACTION_ID_LEN:
        raise ValueError(f"STUN transaction id is {len(transaction_id)} bytes, not 12")
    body = b"".join(_attribute(t, v) for t, v in attributes)
    if len(body) > 0xFFFF:
        raise ValueError(f"STUN attributes of {len(body)} bytes do not fit the length field")
    return _STUN_HEADER.pack(message_type, len(body), STUN_MAGIC_COOKIE, transaction_id) + body


def build_binding_request(
    username: bytes,
    transaction_id: bytes | None = None,
    extra_attributes: list[tuple[int, bytes]] | None = None,
) -> bytes:
    """Build a Binding Request with USERNAME first, then ``extra_attributes`` in order."""
    attributes = [(ATTR_USERNAME, username), *(extra_attributes or ())]
    return build_stun_message(STUN_BINDING_REQUEST, attributes, transaction_id)
