"""Tests for ctl/wire.py against docs/wire-format.md and the RFC 5769 STUN vectors."""

from __future__ import annotations

import binascii
import hashlib
import hmac
import pickle
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ctl import wire
from ctl.wire import (
    ATTR_FINGERPRINT,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_MESSAGE_INTEGRITY_SHA256,
    ATTR_USERNAME,
    ICE_CHARS,
    STUN_BINDING_REQUEST,
    STUN_MAGIC_COOKIE,
    TunnelHeader,
    WireError,
    build_binding_request,
    build_stun_message,
    decap,
    encap,
    find_username,
    from_mapped,
    is_stun,
    make_server_ufrag,
    parse_server_ufrag,
    parse_stun_header,
    parse_username,
    route_binding_request,
    to_mapped,
)

ATTR_SOFTWARE = 0x8022
ATTR_PRIORITY = 0x0024
STOP_ATTRIBUTES = (ATTR_MESSAGE_INTEGRITY, ATTR_MESSAGE_INTEGRITY_SHA256, ATTR_FINGERPRINT)
TID = bytes(range(12))
TOKEN = "100000001abcdEFGH"  # transceiver id 1
GOOD_USERNAME = b"1deadbeefAb+/0zZ9:clnt"


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


@contextmanager
def raises(reason: str) -> Iterator[None]:
    """pytest.raises(WireError) that also checks the drop reason."""
    with pytest.raises(WireError) as info:
        yield
    assert info.value.reason == reason, str(info.value)


# --- RFC 5769 test vectors, byte-exact ----------------------------------------

RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"

# 2.1 Sample Request (USERNAME "evtj:h6vY", padded with spaces).
RFC5769_REQUEST = h("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
""")

# 2.2 Sample IPv4 Response (XOR-MAPPED-ADDRESS 192.0.2.1:32853).
RFC5769_RESPONSE_V4 = h("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
""")

# 2.3 Sample IPv6 Response (XOR-MAPPED-ADDRESS [2001:db8:1234:5678:11:2233:4455:6677]:32853).
RFC5769_RESPONSE_V6 = h("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
""")

# 2.4 Sample Request with Long-Term Authentication (USERNAME U+30DE U+30C8 U+30EA
# U+30C3 U+30AF U+30B9, NONCE, REALM "example.org", MESSAGE-INTEGRITY, no FINGERPRINT).
RFC5769_REQUEST_LONG_TERM = h("""
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46
                53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
""")
RFC5769_LONG_TERM_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
# MD5(username ":" realm ":" SASLprep(password)); the password SASLpreps to "TheMatrIX".
RFC5769_LONG_TERM_KEY = hashlib.md5(
    f"{RFC5769_LONG_TERM_USERNAME}:example.org:TheMatrIX".encode()
).digest()

RFC5769_VECTORS = [
    pytest.param(RFC5769_REQUEST, RFC5769_PASSWORD, 0x0001, b"evtj:h6vY", id="2.1-request"),
    pytest.param(RFC5769_RESPONSE_V4, RFC5769_PASSWORD, 0x0101, None, id="2.2-ipv4-response"),
    pytest.param(RFC5769_RESPONSE_V6, RFC5769_PASSWORD, 0x0101, None, id="2.3-ipv6-response"),
    pytest.param(
        RFC5769_REQUEST_LONG_TERM,
        RFC5769_LONG_TERM_KEY,
        0x0001,
        RFC5769_LONG_TERM_USERNAME.encode(),
        id="2.4-long-term-request",
    ),
]


def _check_integrity(message: bytes, key: bytes) -> None:
    """Verify MESSAGE-INTEGRITY and FINGERPRINT, proving the vectors are copied exactly."""
    has_fingerprint = message[-8:-6] == b"\x80\x28"
    if has_fingerprint:
        crc = binascii.crc32(message[:-8]) ^ 0x5354554E
        assert message[-4:] == struct.pack("!I", crc)
    mi = len(message) - 24 - (8 if has_fingerprint else 0)
    assert message[mi : mi + 4] == b"\x00\x08\x00\x14"
    covered = message[:2] + struct.pack("!H", mi + 24 - 20) + message[4:mi]
    assert hmac.new(key, covered, hashlib.sha1).digest() == message[mi + 4 : mi + 24]


@pytest.mark.parametrize(("message", "key", "msg_type", "username"), RFC5769_VECTORS)
def test_rfc5769_vectors_parse(
    message: bytes, key: bytes, msg_type: int, username: bytes | None
) -> None:
    _check_integrity(message, key)
    assert is_stun(message)
    assert parse_stun_header(message) == (msg_type, message[8:20])
    assert find_username(message) == username
    assert find_username(memoryview(message)) == username
    assert find_username(bytearray(message)) == username


def test_rfc5769_vector_transaction_ids() -> None:
    assert parse_stun_header(RFC5769_REQUEST)[1] == h("b7e7a701 bc34d686 fa87dfae")
    assert parse_stun_header(RFC5769_REQUEST_LONG_TERM)[1] == h("78ad3433 c6ad72c0 29da412e")


@pytest.mark.parametrize("message", [RFC5769_REQUEST, RFC5769_REQUEST_LONG_TERM])
def test_rfc5769_requests_carry_no_token(message: bytes) -> None:
    with raises("bad_token"):
        route_binding_request(message)


@pytest.mark.parametrize("message", [RFC5769_RESPONSE_V4, RFC5769_RESPONSE_V6])
def test_rfc5769_responses_are_not_routed(message: bytes) -> None:
    assert route_binding_request(message) is None


def test_rfc5769_request_with_a_token_routes() -> None:
    # Same layout as 2.1 with a 9-byte USERNAME swapped for a routable one.
    username = b"1000004d2AbCd+/9z:h6vY"
    message = build_binding_request(
        username,
        RFC5769_REQUEST[8:20],
        [(ATTR_SOFTWARE, b"STUN test client"), (ATTR_MESSAGE_INTEGRITY, bytes(20))],
    )
    assert route_binding_request(message) == 1234


# --- STUN framing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", False),
        (b"\x00", True),
        (b"\x01\x01", True),
        (b"\x03", True),
        (b"\x04", False),
        (b"\x14", False),  # DTLS ChangeCipherSpec
        (b"\x16\xfe\xfd", False),  # DTLS handshake
        (b"\x80\x00", False),  # RTP
        (b"\xbf", False),  # RTCP range
        (b"\xff", False),
    ],
)
def test_is_stun(payload: bytes, expected: bool) -> None:
    assert is_stun(payload) is expected
    assert is_stun(memoryview(payload)) is expected


def _with_length(message: bytes, length: int) -> bytes:
    return message[:2] + struct.pack("!H", length) + message[4:]


@pytest.mark.parametrize("size", range(20))
def test_stun_shorter_than_header_is_malformed(size: int) -> None:
    message = build_binding_request(GOOD_USERNAME, TID)
    with raises("stun_malformed"):
        parse_stun_header(message[:size])
    if size:
        with raises("stun_malformed"):
            route_binding_request(message[:size])


def test_stun_truncated_body_is_malformed() -> None:
    message = build_binding_request(GOOD_USERNAME, TID)
    for size in range(20, len(message)):
        with raises("stun_malformed"):
            route_binding_request(message[:size])
        with raises("stun_malformed"):
            find_username(message[:size])


def test_stun_bad_cookie_is_malformed() -> None:
    message = bytearray(build_binding_request(GOOD_USERNAME, TID))
    assert route_binding_request(message) == 0xDEADBEEF
    message[4] ^= 0x01
    with raises("stun_malformed"):
        route_binding_request(message)


@pytest.mark.parametrize("top", [0x40, 0x80, 0xC0])
def test_stun_type_top_bits_are_malformed(top: int) -> None:
    message = bytearray(build_stun_message(0x0101, [], TID))
    message[0] |= top
    with raises("stun_malformed"):
        parse_stun_header(message)


def test_stun_length_not_multiple_of_four_is_malformed() -> None:
    # Length matches the bytes present, but is not a multiple of 4.
    message = build_stun_message(0x0101, [], TID) + b"\x00\x04\x00"
    message = _with_length(message, 3)
    with raises("stun_malformed"):
        parse_stun_header(message)
    with raises("stun_malformed"):
        route_binding_request(_with_length(build_stun_message(0x0001, [], TID) + b"abc", 3))


@pytest.mark.parametrize("delta", [-8, -4, 4, 8])
def test_stun_length_mismatch_is_malformed(delta: int) -> None:
    message = build_binding_request(GOOD_USERNAME, TID)
    with raises("stun_malformed"):
        route_binding_request(_with_length(message, len(message) - 20 + delta))


def test_stun_trailing_bytes_are_malformed() -> None:
    message = build_binding_request(GOOD_USERNAME, TID)
    for extra in (b"\x00", b"\x00" * 4):
        with raises("stun_malformed"):
            route_binding_request(message + extra)


def test_stun_attribute_overrunning_the_end_is_malformed() -> None:
    # A PRIORITY attribute that claims 8 bytes but has 4.
    message = build_stun_message(STUN_BINDING_REQUEST, [(ATTR_PRIORITY, b"\x00" * 4)], TID)
    overrun = message[:22] + b"\x00\x08" + message[24:]
    with raises("stun_malformed"):
        find_username(overrun)
    with raises("stun_malformed"):
        route_binding_request(overrun)


def test_stun_attribute_padding_overrunning_the_end_is_malformed() -> None:
    # A 5-byte value needs 8 bytes with its padding, but only 4 follow the header.
    body = struct.pack("!HH", ATTR_USERNAME, 5) + b"abcd"
    message = _with_length(build_stun_message(1, [], TID) + body, len(body))
    with raises("stun_malformed"):
        route_binding_request(message)


@pytest.mark.parametrize("stop", STOP_ATTRIBUTES)
def test_stun_overrunning_stop_attribute_is_malformed(stop: int) -> None:
    message = build_stun_message(STUN_BINDING_REQUEST, [(stop, bytes(4))], TID)
    overrun = message[:22] + b"\x00\x14" + message[24:]
    with raises("stun_malformed"):
        route_binding_request(overrun)


def test_non_binding_stun_is_not_routed() -> None:
    for msg_type in (0x0011, 0x0101, 0x0111, 0x0003, 0x0004, 0x0016):
        assert route_binding_request(build_stun_message(msg_type, [], TID)) is None
        tagged = build_stun_message(msg_type, [(ATTR_USERNAME, GOOD_USERNAME)], TID)
        assert route_binding_request(tagged) is None
        assert find_username(tagged) == GOOD_USERNAME


def test_malformed_non_binding_stun_is_malformed() -> None:
    message = build_stun_message(0x0101, [(ATTR_SOFTWARE, b"x")], TID)
    with raises("stun_malformed"):
        route_binding_request(message[:-1])


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x16\xfe\xfd" + bytes(40), b"\x80\x6f" + bytes(30), b"\x14", b"\x04" + bytes(19)],
)
def test_non_stun_payloads_are_opaque(payload: bytes) -> None:
    assert route_binding_request(payload) is None


# --- USERNAME walk -------------------------------------------------------------


def test_binding_request_routes() -> None:
    assert route_binding_request(build_binding_request(GOOD_USERNAME)) == 0xDEADBEEF
    message = build_binding_request(GOOD_USERNAME, TID)
    assert route_binding_request(memoryview(message)) == 0xDEADBEEF
    assert route_binding_request(bytearray(message)) == 0xDEADBEEF


def test_binding_request_without_attributes_has_no_username() -> None:
    with raises("stun_no_username"):
        route_binding_request(build_stun_message(STUN_BINDING_REQUEST, [], TID))
    assert find_username(build_stun_message(STUN_BINDING_REQUEST, [], TID)) is None


def test_username_after_other_attributes_routes() -> None:
    attrs = [(ATTR_SOFTWARE, b"client"), (ATTR_PRIORITY, b"\x6e\x00\x01\xff")]
    message = build_stun_message(1, [*attrs, (ATTR_USERNAME, GOOD_USERNAME)], TID)
    assert route_binding_request(message) == 0xDEADBEEF


@pytest.mark.parametrize("count", [0, 1, 15])
def test_username_within_sixteen_attributes_routes(count: int) -> None:
    attrs = [(ATTR_PRIORITY, bytes(4))] * count + [(ATTR_USERNAME, GOOD_USERNAME)]
    message = build_stun_message(STUN_BINDING_REQUEST, attrs, TID)
    assert find_username(message) == GOOD_USERNAME
    assert route_binding_request(message) == 0xDEADBEEF


@pytest.mark.parametrize("count", [16, 17, 30])
def test_username_beyond_sixteen_attributes_is_not_found(count: int) -> None:
    attrs = [(ATTR_SOFTWARE, b"abcde")] * count + [(ATTR_USERNAME, GOOD_USERNAME)]
    message = build_stun_message(STUN_BINDING_REQUEST, attrs, TID)
    assert find_username(message) is None
    with raises("stun_no_username"):
        route_binding_request(message)


def test_seventeenth_attribute_is_never_read() -> None:
    # An overrunning 17th attribute is beyond the bound, so it is not judged.
    message = build_stun_message(1, [(ATTR_PRIORITY, bytes(4))] * 16, TID)
    message = _with_length(message + b"\x00\x06\x00\x40", len(message) - 16)
    with raises("stun_no_username"):
        route_binding_request(message)
    # The same overrun as the 16th attribute is malformed.
    message = build_stun_message(1, [(ATTR_PRIORITY, bytes(4))] * 15, TID)
    message = _with_length(message + b"\x00\x06\x00\x40", len(message) - 16)
    with raises("stun_malformed"):
        route_binding_request(message)


@pytest.mark.parametrize("stop", STOP_ATTRIBUTES)
def test_username_after_integrity_or_fingerprint_does_not_count(stop: int) -> None:
    attrs = [(stop, bytes(20 if stop != ATTR_FINGERPRINT else 4)), (ATTR_USERNAME, GOOD_USERNAME)]
    message = build_stun_message(STUN_BINDING_REQUEST, attrs, TID)
    assert find_username(message) is None
    with raises("stun_no_username"):
        route_binding_request(message)


def test_only_the_first_username_counts() -> None:
    message = build_stun_message(
        1, [(ATTR_USERNAME, b"evtj:h6vY"), (ATTR_USERNAME, GOOD_USERNAME)], TID
    )
    assert find_username(message) == b"evtj:h6vY"
    with raises("bad_token"):
        route_binding_request(message)
    message = build_stun_message(
        1, [(ATTR_USERNAME, GOOD_USERNAME), (ATTR_USERNAME, b"evtj:h6vY")], TID
    )
    assert route_binding_request(message) == 0xDEADBEEF


def test_empty_username_is_found_and_is_a_bad_token() -> None:
    message = build_binding_request(b"", TID)
    assert find_username(message) == b""
    with raises("bad_token"):
        route_binding_request(message)


@pytest.mark.parametrize(
    ("client", "routes"),
    [
        (b"abc", False),
        (b"abcd", True),
        (b"a" * 256, True),
        (b"a" * 257, False),
        (b"\xff\x00:\xfe", True),  # client ufrag characters are not judged
        (b"::::", True),
    ],
)
def test_client_ufrag_length_bounds(client: bytes, routes: bool) -> None:
    username = TOKEN.encode() + b":" + client
    message = build_binding_request(username, TID)
    if routes:
        assert route_binding_request(message) == 1
        assert parse_username(username) == 1
    else:
        with raises("bad_token"):
            route_binding_request(message)


@pytest.mark.parametrize(
    "username",
    [
        b"100000001abcdEFG:clnt",  # 16-char server ufrag
        b"100000001abcdEFGHI:clnt",  # 18-char server ufrag: no ':' at offset 17
        b"100000001abcdEFGH;clnt",
        b"100000001abcdEFGHclnt",
        b"1000000A1abcdEFGH:clnt",  # uppercase hex
        b"100000000abcdEFGH:clnt",  # id 0
        b"200000001abcdEFGH:clnt",  # version 2
        b"100000001abcd-FGH:clnt",  # bad random char
        b"evtj:h6vY",
    ],
)
def test_bad_usernames(username: bytes) -> None:
    with raises("bad_token"):
        parse_username(username)
    with raises("bad_token"):
        route_binding_request(build_binding_request(username, TID))


# --- routing token -------------------------------------------------------------

TOKEN_RE = re.compile(r"1([0-9a-f]{8})[A-Za-z0-9+/]{8}")


def test_ice_alphabet() -> None:
    assert len(ICE_CHARS) == len(set(ICE_CHARS)) == 64
    assert re.fullmatch(r"[A-Za-z0-9+/]+", ICE_CHARS)


@pytest.mark.parametrize("tid", [1, 2, 0x1234ABCD, 0xDEADBEEF, 0xFFFFFFFF])
def test_token_round_trip(tid: int) -> None:
    ufrag = make_server_ufrag(tid)
    assert len(ufrag) == wire.TOKEN_LEN == 17
    assert TOKEN_RE.fullmatch(ufrag)
    assert ufrag[1:9] == f"{tid:08x}"
    assert parse_server_ufrag(ufrag) == tid
    assert parse_server_ufrag(ufrag.encode()) == tid
    assert parse_server_ufrag(memoryview(ufrag.encode())) == tid


def test_token_known_value() -> None:
    assert make_server_ufrag(0x1234ABCD, "Ab+/09zZ") == "11234abcdAb+/09zZ"
    assert parse_server_ufrag("11234abcdAb+/09zZ") == 0x1234ABCD


def test_token_random_part_is_random() -> None:
    ufrags = {make_server_ufrag(7) for _ in range(50)}
    assert len(ufrags) == 50
    assert all(TOKEN_RE.fullmatch(u) and u.startswith("100000007") for u in ufrags)


@pytest.mark.parametrize("tid", [0, -1, 0x1_0000_0000, 2**64])
def test_make_token_rejects_bad_ids(tid: int) -> None:
    with pytest.raises(ValueError, match="transceiver id"):
        make_server_ufrag(tid)


@pytest.mark.parametrize("tid", [True, 1.0, "1"])
def test_make_token_rejects_non_int_ids(tid: object) -> None:
    with pytest.raises(TypeError):
        make_server_ufrag(tid)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "random_part", ["", "abcdefg", "abcdefghi", "abcd-fgh", "abcdefg=", "abcdéfgh"]
)
def test_make_token_rejects_bad_random_parts(random_part: str) -> None:
    with pytest.raises(ValueError, match="random part"):
        make_server_ufrag(1, random_part)


@pytest.mark.parametrize(
    "ufrag",
    [
        "",
        "1",
        "100000001abcdEFG",  # 16 chars
        "100000001abcdEFGHI",  # 18 chars
        "1DEADBEEFabcdEFGH",  # uppercase hex
        "1deadBeefabcdEFGH",
        "100000000abcdEFGH",  # id 0
        "000000001abcdEFGH",  # version 0
        "200000001abcdEFGH",  # version 2
        "a00000001abcdEFGH",
        "10000000gabcdEFGH",  # not hex
        "1000_0001abcdEFGH",  # int(x, 16) would accept these three
        "1 0000001abcdEFGH",
        "1+0000001abcdEFGH",
        "1\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff11abcdEFGH",  # fullwidth digits
        "100000001abcd-FGH",  # '-' is not an ICE char
        "100000001abcd=FGH",
        "100000001abcd:FGH",
        "100000001abcd\x00FGH",
        "100000001abcdéFG",  # 17 chars, but not ASCII
    ],
)
def test_bad_tokens(ufrag: str) -> None:
    with raises("bad_token"):
        parse_server_ufrag(ufrag)
    with raises("bad_token"):
        parse_server_ufrag(ufrag.encode())


@pytest.mark.parametrize("position", range(17))
def test_every_token_character_is_checked(position: int) -> None:
    bad_chars = "02a-" if position == 0 else "-=:_GA\u00ff" if position < 9 else "-=:_.\u00ff"
    for bad in bad_chars:
        ufrag = TOKEN[:position] + bad + TOKEN[position + 1 :]
        with raises("bad_token"):
            parse_server_ufrag(ufrag)
        with raises("bad_token"):
            parse_username(ufrag.encode("latin-1") + b":clnt")


def test_bad_token_bytes() -> None:
    assert parse_server_ufrag(b"1" * 17) == 0x11111111
    for raw in (b"100000001abcd\xffFGH", b"\xb10000001abcdEFGH", b"1" * 9 + b"\x80" * 8):
        with raises("bad_token"):
            parse_server_ufrag(raw)


# --- addresses -------------------------------------------------------------------


def test_to_mapped() -> None:
    assert to_mapped(IPv4Address("198.51.100.7")) == h("00000000 00000000 0000ffff c6336407")
    assert to_mapped("198.51.100.7") == to_mapped(IPv4Address("198.51.100.7"))
    assert to_mapped("2001:db8:c::5") == h("20010db8 000c0000 00000000 00000005")
    assert to_mapped(IPv6Address("::ffff:1.2.3.4")) == to_mapped("1.2.3.4")


def test_from_mapped() -> None:
    assert from_mapped(h("00000000 00000000 0000ffff c6336407")) == IPv4Address("198.51.100.7")
    assert from_mapped(to_mapped("2001:db8:c::5")) == IPv6Address("2001:db8:c::5")
    assert from_mapped(bytes(16)) == IPv6Address("::")
    # IPv4-compatible (::a.b.c.d, deprecated) is not IPv4-mapped.
    assert from_mapped(to_mapped("::1.2.3.4")) == IPv6Address("::1.2.3.4")
    with pytest.raises(ValueError):
        from_mapped(bytes(15))
    with pytest.raises(ValueError):
        from_mapped(bytes(17))


# --- tunnel header -------------------------------------------------------------

V4_HEADER = TunnelHeader(IPv4Address("198.51.100.7"), 50000, 3478)
V4_HEADER_BYTES = h("5352 01 00 c350 0d96 00000000 00000000 0000ffff c6336407")
V6_HEADER = TunnelHeader(IPv6Address("2001:db8:c::5"), 40000, 443)
V6_HEADER_BYTES = h("5352 01 00 9c40 01bb 20010db8 000c0000 00000000 00000005")


@pytest.mark.parametrize(
    ("header", "raw"), [(V4_HEADER, V4_HEADER_BYTES), (V6_HEADER, V6_HEADER_BYTES)]
)
def test_tunnel_header_known_bytes(header: TunnelHeader, raw: bytes) -> None:
    assert len(raw) == wire.TUNNEL_HEADER_LEN
    assert header.pack() == raw
    assert TunnelHeader.unpack(raw) == header
    assert TunnelHeader.unpack(memoryview(raw)) == header


def test_tunnel_header_types() -> None:
    assert type(TunnelHeader.unpack(V4_HEADER_BYTES).client_addr) is IPv4Address
    assert type(TunnelHeader.unpack(V6_HEADER_BYTES).client_addr) is IPv6Address
    mapped = TunnelHeader(IPv6Address("::ffff:198.51.100.7"), 50000, 3478)
    assert mapped == V4_HEADER
    assert mapped.pack() == V4_HEADER_BYTES


def test_tunnel_header_is_frozen() -> None:
    with pytest.raises(AttributeError):
        V4_HEADER.client_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("client_port", "relay_port"), [(-1, 3478), (65536, 3478), (1, -1), (1, 65536)]
)
def test_tunnel_header_rejects_bad_ports(client_port: int, relay_port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        TunnelHeader(IPv4Address("192.0.2.1"), client_port, relay_port)


def test_tunnel_header_rejects_non_addresses() -> None:
    with pytest.raises(TypeError):
        TunnelHeader("192.0.2.1", 1, 2)  # type: ignore[arg-type]


def test_tunnel_header_port_extremes() -> None:
    header = TunnelHeader(IPv4Address("0.0.0.0"), 0, 65535)
    assert TunnelHeader.unpack(header.pack()) == header


@pytest.mark.parametrize("size", range(24))
def test_tunnel_truncated(size: int) -> None:
    with raises("tunnel_truncated"):
        TunnelHeader.unpack(V4_HEADER_BYTES[:size])
    with raises("tunnel_truncated"):
        decap(V4_HEADER_BYTES[:size])


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (0, 0x00),
        (0, 0x52),
        (1, 0x53),
        (1, 0x00),
        (2, 0),
        (2, 2),
        (2, 0xFF),
        *[(3, 1 << bit) for bit in range(8)],
    ],
)
def test_tunnel_bad_header(offset: int, value: int) -> None:
    raw = bytearray(V4_HEADER_BYTES + b"payload")
    raw[offset] = value
    with raises("tunnel_bad_header"):
        TunnelHeader.unpack(raw)
    with raises("tunnel_bad_header"):
        decap(raw)


def test_encap_decap() -> None:
    stun = build_binding_request(GOOD_USERNAME, TID)
    datagram = encap(V6_HEADER, stun)
    assert datagram == V6_HEADER_BYTES + stun
    assert decap(datagram) == (V6_HEADER, stun)
    assert decap(memoryview(datagram)) == (V6_HEADER, stun)
    assert encap(V4_HEADER, memoryview(b"xyz")) == V4_HEADER_BYTES + b"xyz"
    assert decap(V4_HEADER_BYTES) == (V4_HEADER, b"")  # empty payload is valid
    assert type(decap(memoryview(datagram))[1]) is bytes


# --- errors and builders -----------------------------------------------------------


def test_wire_error() -> None:
    assert set(wire.WIRE_ERROR_REASONS) == {
        "tunnel_truncated",
        "tunnel_bad_header",
        "stun_malformed",
        "stun_no_username",
        "bad_token",
    }
    for reason in wire.WIRE_ERROR_REASONS:
        error = WireError(reason)
        assert isinstance(error, ValueError)
        assert error.reason == reason
        assert str(error) and "\n" not in str(error)
        copy = pickle.loads(pickle.dumps(error))
        assert (copy.reason, str(copy)) == (reason, str(error))
    assert str(WireError("bad_token", "custom")) == "custom"
    with pytest.raises(ValueError, match="unknown"):
        WireError("nope")


@pytest.mark.parametrize("size", range(9))
def test_build_binding_request_padding(size: int) -> None:
    username = b"u" * size
    message = build_binding_request(username, TID, [(ATTR_PRIORITY, b"\x01\x02\x03\x04")])
    padded = (size + 3) // 4 * 4
    assert len(message) == 20 + 4 + padded + 8
    assert message[:20] == struct.pack("!HHI", 1, len(message) - 20, STUN_MAGIC_COOKIE) + TID
    assert message[20:24] == struct.pack("!HH", ATTR_USERNAME, size)
    assert message[24 : 24 + size] == username
    assert message[24 + size : 24 + padded] == bytes(padded - size)
    assert message[24 + padded :] == h("0024 0004 01020304")
    assert find_username(message) == username


def test_build_binding_request_defaults() -> None:
    a = build_binding_request(GOOD_USERNAME)
    b = build_binding_request(GOOD_USERNAME)
    assert parse_stun_header(a)[0] == STUN_BINDING_REQUEST
    assert parse_stun_header(a)[1] != parse_stun_header(b)[1]
    assert len(a) == 20 + 4 + 24


def test_builders_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        build_binding_request(b"x", bytes(11))
    with pytest.raises(ValueError):
        build_binding_request(b"x", extra_attributes=[(0x10000, b"")])
    with pytest.raises(ValueError):
        build_binding_request(b"x" * 0x10000)
    with pytest.raises(ValueError):
        build_stun_message(0x4001)
    with pytest.raises(ValueError):
        build_stun_message(1, [(ATTR_SOFTWARE, bytes(0x8000))] * 2)


# --- properties ----------------------------------------------------------------

ERROR_PRONE = [
    route_binding_request,
    find_username,
    parse_stun_header,
    is_stun,
    parse_server_ufrag,
    parse_username,
    TunnelHeader.unpack,
    decap,
]


def _judge(fn: object, data: bytes) -> object:
    try:
        return fn(data)  # type: ignore[operator]
    except WireError as error:
        assert error.reason in wire.WIRE_ERROR_REASONS
        return error


def _stun_framed(msg_type: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    return struct.pack("!HHI", msg_type, len(body), STUN_MAGIC_COOKIE) + TID + body


@given(st.binary(max_size=600))
@example(b"")
@example(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12))
def test_random_bytes_only_raise_wire_error(data: bytes) -> None:
    for fn in ERROR_PRONE:
        _judge(fn, data)
        _judge(fn, memoryview(data))


@given(st.sampled_from([0x0001, 0x0101, 0x0011]), st.binary(max_size=400))
def test_random_attributes_only_raise_wire_error(msg_type: int, body: bytes) -> None:
    message = _stun_framed(msg_type, body)
    routed = _judge(route_binding_request, message)
    found = _judge(find_username, message)
    if msg_type != STUN_BINDING_REQUEST:
        assert routed is None
    elif isinstance(routed, int):
        assert 1 <= routed <= 0xFFFFFFFF
        assert isinstance(found, bytes)
        assert parse_username(found) == routed
    if isinstance(found, WireError):
        assert found.reason == "stun_malformed"


@given(st.text(max_size=40))
def test_random_text_tokens_only_raise_wire_error(text: str) -> None:
    _judge(parse_server_ufrag, text)


TOKEN_ALPHABET = "0123456789abcdefABCDEF+/_-:= \x00\u0661\u00e9gxyzGXYZ"


@given(st.text(alphabet=TOKEN_ALPHABET, min_size=15, max_size=19))
@example("100000001abcdEFGH")
def test_parse_server_ufrag_matches_regex_oracle(ufrag: str) -> None:
    match = TOKEN_RE.fullmatch(ufrag)
    expected = int(match[1], 16) if match and int(match[1], 16) else None
    result = _judge(parse_server_ufrag, ufrag)
    if expected is None:
        assert isinstance(result, WireError) and result.reason == "bad_token"
    else:
        assert result == expected


ice_text = st.text(alphabet=ICE_CHARS, min_size=8, max_size=8)
ids = st.integers(1, 0xFFFFFFFF)


@given(ids, ice_text)
def test_token_round_trip_property(tid: int, random_part: str) -> None:
    ufrag = make_server_ufrag(tid, random_part)
    assert ufrag.endswith(random_part)
    assert parse_server_ufrag(ufrag) == tid


def _usernames() -> st.SearchStrategy[bytes]:
    routable = st.builds(
        lambda tid, rnd, client: make_server_ufrag(tid, rnd).encode() + b":" + client,
        ids,
        ice_text,
        st.binary(min_size=2, max_size=260),
    )
    mutated = st.builds(
        lambda name, i, byte: name[:i] + bytes([byte]) + name[i + 1 :],
        routable,
        st.integers(0, 18),
        st.sampled_from(b"0aA:+/-=\x00\xff"),
    )
    return st.one_of(routable, mutated, st.binary(max_size=40))


attribute_types = st.one_of(
    st.sampled_from([ATTR_USERNAME, *STOP_ATTRIBUTES, ATTR_SOFTWARE, ATTR_PRIORITY]),
    st.integers(0, 0xFFFF),
)
attributes = st.lists(
    st.one_of(
        st.tuples(st.just(ATTR_USERNAME), _usernames()),
        st.tuples(attribute_types, st.binary(max_size=24)),
    ),
    max_size=20,
)

USERNAME_RE = re.compile(rb"1([0-9a-f]{8})[A-Za-z0-9+/]{8}:.{4,256}", re.DOTALL)


def _oracle(attrs: list[tuple[int, bytes]]) -> int | str:
    """The routing rules of docs/wire-format.md, applied to the attribute list itself."""
    for attr_type, value in attrs[:16]:
        if attr_type == ATTR_USERNAME:
            match = USERNAME_RE.fullmatch(value)
            if match is None or int(match[1], 16) == 0:
                return "bad_token"
            return int(match[1], 16)
        if attr_type in STOP_ATTRIBUTES:
            break
    return "stun_no_username"


@given(attributes)
def test_route_binding_request_matches_oracle(attrs: list[tuple[int, bytes]]) -> None:
    message = build_stun_message(STUN_BINDING_REQUEST, attrs, TID)
    result = _judge(route_binding_request, message)
    if isinstance(result, WireError):
        result = result.reason
    assert result == _oracle(attrs)


@given(st.ip_addresses(), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=64))
@example(IPv6Address("::ffff:192.0.2.1"), 1, 2, b"")
def test_tunnel_round_trip(
    addr: IPv4Address | IPv6Address, client_port: int, relay_port: int, payload: bytes
) -> None:
    header = TunnelHeader(addr, client_port, relay_port)
    raw = header.pack()
    assert len(raw) == 24
    assert raw[8:] == to_mapped(addr)
    assert TunnelHeader.unpack(raw) == header
    assert decap(encap(header, payload)) == (header, payload)
    canonical = addr.ipv4_mapped if isinstance(addr, IPv6Address) else None
    assert header.client_addr == from_mapped(to_mapped(addr)) == (canonical or addr)


@given(st.binary(min_size=24, max_size=64))
def test_valid_tunnel_headers_re_encode_exactly(data: bytes) -> None:
    data = b"\x53\x52\x01\x00" + data[4:]
    header, payload = decap(data)
    assert header.pack() + payload == data
