"""The SYN probe's packets, against bytes captured from Linux 6.1 on loopback (a listener's
SYN-ACK, a closed port's RST, the ICMP host unreachable of an nftables reject)."""

from __future__ import annotations

import struct

import pytest

from pop.checks import tcpwire
from pop.checks.tcpwire import Answer, Key

LOOPBACK = bytes([127, 0, 0, 1])

SYN_ACK = bytes.fromhex("4500002c0000400040063cca7f0000017f000001b283c713b6f64550000003e96012ffd7fe2000000204ffd7")
RST = bytes.fromhex("450000280000400040063cce7f0000017f00000188d7c71300000000000007d1501400005a120000")
UNREACHABLE = bytes.fromhex("45c00048b48b00004001c7677f0000017f0000010301fb1f000000004500002ca4564000400698737f00"
                            "00017f000001c713000900000bb8000000006002faf0cc5e0000020405b4")


@pytest.mark.parametrize(("port", "sequence", "captured"), [
    # the kernel answered these SYNs, so their checksums held
    (45699, 1000, "c713b283000003e8000000006002faf021b40000020405b4"),
    (35031, 2000, "c71388d7000007d0000000006002faf047780000020405b4"),
    (9, 3000, "c713000900000bb8000000006002faf0cc5e0000020405b4"),
])
def test_syn_is_byte_for_byte_what_the_kernel_answered(port: int, sequence: int, captured: str) -> None:
    assert tcpwire.syn(LOOPBACK, LOOPBACK, 50963, port, sequence).hex() == captured


def test_a_syn_checksums_to_zero_with_its_pseudo_header() -> None:
    segment = tcpwire.syn(bytes([10, 7, 0, 1]), bytes([10, 7, 0, 2]), 40000, 443, 0xFFFFFFFF)
    pseudo = bytes([10, 7, 0, 1, 10, 7, 0, 2, 0, 6]) + struct.pack("!H", len(segment))
    assert tcpwire.checksum(pseudo + segment) == 0


@pytest.mark.parametrize(("read", "packet", "expected"), [
    (tcpwire.read_tcp, SYN_ACK, Answer(Key(LOOPBACK, 45699, 50963, 1001), "syn-ack")),
    (tcpwire.read_tcp, RST, Answer(Key(LOOPBACK, 35031, 50963, 2001), "rst")),
    (tcpwire.read_icmp, UNREACHABLE, Answer(Key(LOOPBACK, 9, 50963, 3001), "unreachable", 1)),
    # our own SYN seen on the way in (loopback): neither SYN-ACK nor RST
    (tcpwire.read_tcp, SYN_ACK[:20] + tcpwire.syn(LOOPBACK, LOOPBACK, 50963, 9, 1), None),
    (tcpwire.read_tcp, SYN_ACK[:33], None),  # cut short in the TCP header
    (tcpwire.read_tcp, b"\x60" + SYN_ACK[1:], None),  # not IPv4
    (tcpwire.read_tcp, SYN_ACK[:9] + b"\x11" + SYN_ACK[10:], None),  # UDP
    (tcpwire.read_icmp, UNREACHABLE[:20] + b"\x0b" + UNREACHABLE[21:], None),  # time exceeded, not unreachable
    (tcpwire.read_icmp, UNREACHABLE[:20 + 8 + 9] + b"\x11" + UNREACHABLE[20 + 8 + 10:], None),  # quotes UDP
    (tcpwire.read_icmp, UNREACHABLE[:20 + 8 + 20 + 7], None),  # quotes less than 8 bytes of TCP
])
def test_answers_are_read_and_keyed_to_their_probe(read: object, packet: bytes, expected: Answer | None) -> None:
    assert read(packet) == expected  # type: ignore[operator]


def test_the_filters_are_classic_bpf_programs_ending_in_a_return() -> None:
    for program in (tcpwire.tcp_filter(50000, 50015), tcpwire.icmp_filter()):
        instructions = [struct.unpack("HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
        assert instructions[-1] == (0x06, 0, 0, 0)  # everything not accepted is dropped
        for index, (code, jt, jf, _) in enumerate(instructions):
            if code & 0x07 == 0x05:  # a jump stays inside the program
                assert index + 1 + max(jt, jf) < len(instructions)


@pytest.mark.parametrize(("source_port", "sequence"), [(0, 0), (65535, 0xFFFFFFFF), (50963, 1000), (1, 0xFFFF0000)])
def test_the_incremental_checksum_is_the_whole_one(source_port: int, sequence: int) -> None:
    source, server = bytes([192, 0, 2, 1]), bytes([198, 51, 100, 255])
    segment = tcpwire.syn_from(tcpwire.fixed_sum(source, server, 443), source_port, 443, sequence)
    pseudo = source + server + bytes([0, 6]) + struct.pack("!H", len(segment))
    assert tcpwire.checksum(pseudo + segment) == 0
