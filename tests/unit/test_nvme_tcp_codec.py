"""The pure codec of the user-space NVMe/TCP attack initiator (tests/lab/nvme_tcp.py).

Expected bytes are spelled out from the specifications' field offsets (NVMe/TCP transport:
PDU headers; NVMe over Fabrics: Connect, Property Get/Set; NVMe base: SQE/CQE, Identify, Get
Log Page, Read), not produced by the codec itself.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.dhchap import encode_secret, generate_secret

if TYPE_CHECKING:
    from tests.lab import nvme_tcp as nt
else:  # the lab folder is not a package: load the file the lab tests copy into the guest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
    import nvme_tcp as nt

    sys.path.pop(0)


def u16(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", b, off)[0])


def u32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def u64(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", b, off)[0])


def test_icreq_layout() -> None:
    pdu = nt.encode_icreq()
    assert len(pdu) == 128
    assert pdu[:4] == bytes([0x00, 0x00, 128, 0])  # type ICReq, flags, HLEN, PDO
    assert u32(pdu, 4) == 128  # PLEN
    assert u16(pdu, 8) == 0 and pdu[10] == 0 and pdu[11] == 0 and u32(pdu, 12) == 0  # PFV, HPDA, DGST, MAXR2T
    assert pdu[16:] == bytes(112)
    assert nt.encode_icreq(hpda=3, digest=3, maxr2t=7)[10:16] == bytes([3, 3, 7, 0, 0, 0])


def test_icresp_decodes_and_rejects_other_pdus() -> None:
    raw = bytes([0x01, 0, 128, 0]) + struct.pack("<I", 128) + struct.pack("<HBBI", 0, 0, 0, 131072) + bytes(112)
    assert nt.decode_icresp(raw) == nt.IcResp(pfv=0, cpda=0, digest=0, maxh2cdata=131072)
    with pytest.raises(nt.CodecError):
        nt.decode_icresp(bytes([0x05, 0, 24, 0]) + struct.pack("<I", 24) + bytes(16))
    with pytest.raises(nt.CodecError):
        nt.decode_header(b"\x01\x00")
    with pytest.raises(nt.CodecError):  # PLEN smaller than HLEN
        nt.decode_header(bytes([0x05, 0, 24, 0]) + struct.pack("<I", 8))


def test_connect_command_and_data() -> None:
    sqe = nt.connect_sqe(cid=7, qid=1, sqsize=31, kato_ms=5000)
    assert len(sqe) == 64
    assert sqe[0] == 0x7F and sqe[1] == 0x40 and u16(sqe, 2) == 7 and sqe[4] == 0x01  # opcode, PSDT, CID, FCTYPE
    assert sqe[5:24] == bytes(19)
    # SGL1: Data Block descriptor, offset subtype, 1024 bytes of in-capsule data at offset 0.
    assert u64(sqe, 24) == 0 and u32(sqe, 32) == 1024 and sqe[36:39] == bytes(3) and sqe[39] == 0x01
    assert u16(sqe, 40) == 0 and u16(sqe, 42) == 1 and u16(sqe, 44) == 31  # RECFMT, QID, SQSIZE
    assert sqe[46] == 0 and u32(sqe, 48) == 5000 and sqe[52:] == bytes(12)  # CATTR, KATO

    hostid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    data = nt.connect_data(hostid.bytes, 0xFFFF, "nqn.2026-11.io.zvolt:storage-0:v1", "nqn.2014-08.org.x:h")
    assert len(data) == 1024
    assert data[:16] == hostid.bytes and u16(data, 16) == 0xFFFF and data[18:256] == bytes(238)
    assert data[256:256 + 33] == b"nqn.2026-11.io.zvolt:storage-0:v1" and data[256 + 33:512] == bytes(223)
    assert data[512:531] == b"nqn.2014-08.org.x:h" and data[531:] == bytes(493)
    with pytest.raises(nt.CodecError):
        nt.connect_data(b"short", 0xFFFF, "a", "b")
    with pytest.raises(nt.CodecError):
        nt.connect_data(hostid.bytes, 0xFFFF, "x" * 224, "b")
    with pytest.raises(nt.CodecError):
        nt.connect_data(hostid.bytes, 0xFFFF, "a\0b", "b")


def test_capsule_cmd_with_and_without_in_capsule_data() -> None:
    sqe = nt.identify_sqe(1, nt.CNS_CONTROLLER)
    bare = nt.encode_capsule_cmd(sqe)
    assert bare[:4] == bytes([0x04, 0, 72, 0]) and u32(bare, 4) == 72 and bare[8:] == sqe
    full = nt.encode_capsule_cmd(sqe, b"\xab" * 1024)
    assert full[:4] == bytes([0x04, 0, 72, 72]) and u32(full, 4) == 72 + 1024 and full[72:] == b"\xab" * 1024
    with pytest.raises(nt.CodecError):
        nt.encode_capsule_cmd(b"\0" * 63)


def test_property_get_and_set() -> None:
    get = nt.property_get_sqe(3, nt.PROP_CSTS)
    assert get[0] == 0x7F and get[4] == 0x04 and get[40] == 0 and u32(get, 44) == 0x1C
    assert get[39] == 0x5A and u32(get, 32) == 0  # no data: a zero-length transport descriptor
    cap = nt.property_get_sqe(4, nt.PROP_CAP, eight=True)
    assert cap[40] == 1 and u32(cap, 44) == 0
    cc = nt.property_set_sqe(5, nt.PROP_CC, nt.CC_EN | nt.CC_IOSQES_64 | nt.CC_IOCQES_16)
    assert cc[4] == 0x00 and cc[40] == 0 and u32(cc, 44) == 0x14 and u64(cc, 48) == 0x00460001


def test_identify_read_and_log_page_commands() -> None:
    ident = nt.identify_sqe(9, nt.CNS_NAMESPACE, nsid=1)
    assert ident[0] == 0x06 and ident[1] == 0x40 and u16(ident, 2) == 9 and u32(ident, 4) == 1
    assert u32(ident, 32) == 4096 and ident[39] == 0x5A and u32(ident, 40) == 0

    rd = nt.read_sqe(10, nsid=1, slba=0x1_0000_0002, nblocks=8, block_size=512)
    assert rd[0] == 0x02 and u32(rd, 4) == 1 and u32(rd, 32) == 4096 and rd[39] == 0x5A
    assert u32(rd, 40) == 2 and u32(rd, 44) == 1 and u32(rd, 48) == 7  # SLBA low/high, NLB 0's based
    with pytest.raises(nt.CodecError):
        nt.read_sqe(1, 1, 0, 0, 512)

    log = nt.get_log_page_sqe(11, nt.LID_DISCOVERY, 3072, offset=1024)
    assert log[0] == 0x02 and u32(log, 32) == 3072
    assert u32(log, 40) == 0x70 | (767 << 16) and u32(log, 44) == 0 and u32(log, 48) == 1024 and u32(log, 52) == 0
    with pytest.raises(nt.CodecError):
        nt.get_log_page_sqe(1, 0x70, 1022)


def test_completion_status_fields() -> None:
    # nvmet refusing a host: Connect Invalid Host (SCT 1, SC 84h) with DNR.
    raw = struct.pack("<IIHHHH", 0x0010_0200, 0, 0, 0, 7, 0x8308)
    c = nt.decode_completion(raw)
    assert (c.cid, c.sct, c.sc, c.dnr, c.ok) == (7, 1, 0x84, True, False)
    assert c.describe() == "Connect Invalid Host (SCT 0x1 Command Specific, SC 0x84, DNR)"
    assert nt.encode_completion(c) == raw
    assert nt.status_field(1, 0x84, dnr=True) == 0x8308
    ok = nt.decode_completion(struct.pack("<IIHHHH", 0x0002_0001, 0, 1, 0, 1, 0x0001))  # phase 1, success
    assert ok.ok and ok.dw0 & 0xFFFF == 1 and ok.dw0 & nt.AUTHREQ_ATR
    auth = nt.decode_completion(struct.pack("<IIHHHH", 0, 0, 0, 0, 2, nt.status_field(1, 0x91, True)))
    assert "Authentication Required" in auth.describe()
    resp = bytes([0x05, 0, 24, 0]) + struct.pack("<I", 24) + raw
    assert nt.decode_capsule_resp(resp) == c
    with pytest.raises(nt.CodecError):
        nt.decode_completion(raw[:15])


def test_c2h_data_and_term_req() -> None:
    payload = bytes(range(256)) * 2
    pdu = bytes([0x07, 0x0C, 24, 24]) + struct.pack("<I", 24 + 512) + struct.pack("<HHII4x", 5, 0, 1024, 512) + payload
    chunk = nt.decode_c2h_data(pdu)
    assert chunk == nt.C2HData(cid=5, offset=1024, data=payload, last=True, success=True)
    bad = bytes([0x07, 0x04, 24, 24]) + struct.pack("<I", 24 + 16) + struct.pack("<HHII4x", 5, 0, 0, 512) + bytes(16)
    with pytest.raises(nt.CodecError):
        nt.decode_c2h_data(bad)
    term = bytes([0x03, 0, 24, 0]) + struct.pack("<I", 24) + struct.pack("<HI", 0x01, 0x10) + bytes(10)
    assert nt.decode_term_req(term) == nt.TermReq(fes=1, fei=0x10)


def test_identify_controller_and_namespace_parsing() -> None:
    ctrl = bytearray(4096)
    struct.pack_into("<H", ctrl, 0, 0x1B96)
    ctrl[4:24] = b"abc123".ljust(20, b" ")
    ctrl[24:64] = b"Linux".ljust(40, b" ")
    ctrl[64:72] = b"6.12.95 "
    ctrl[77] = 5
    struct.pack_into("<H", ctrl, 78, 3)
    ctrl[768:768 + 9] = b"nqn.x:sub"
    struct.pack_into("<I", ctrl, 1792, 4)
    info = nt.parse_identify_controller(bytes(ctrl))
    assert info == nt.ControllerInfo(0x1B96, "abc123", "Linux", "6.12.95", 3, 5, "nqn.x:sub", 4)

    ns = bytearray(4096)
    struct.pack_into("<QQQ", ns, 0, 131072, 131072, 10)
    ns[25], ns[26] = 1, 1  # two LBA formats, the second in use
    struct.pack_into("<HBB", ns, 128, 0, 9, 0)
    struct.pack_into("<HBB", ns, 132, 0, 12, 0)
    ns[104:120] = bytes(range(16))
    got = nt.parse_identify_namespace(bytes(ns))
    assert (got.size_blocks, got.block_size, got.size_bytes) == (131072, 4096, 131072 * 4096)
    assert got.nguid == bytes(range(16)).hex()
    ns[26] = 2  # FLBAS beyond NLBAF
    with pytest.raises(nt.CodecError):
        nt.parse_identify_namespace(bytes(ns))


def test_discovery_log_parsing() -> None:
    page = bytearray(1024 + 2 * 1024)
    struct.pack_into("<QQH", page, 0, 9, 2, 0)
    for i, nqn in enumerate((b"nqn.2014-08.org.nvmexpress.discovery", b"nqn.2026-11.io.zvolt:storage-0:v1")):
        off = 1024 + i * 1024
        struct.pack_into("<BBBBHH", page, off, 3, 1, 2 - (i == 0), 0, 1, 0xFFFF)
        page[off + 32:off + 36] = b"4420"
        page[off + 256:off + 256 + len(nqn)] = nqn
        page[off + 512:off + 521] = b"10.42.0.1"
    log = nt.parse_discovery_log(bytes(page))
    assert (log.genctr, log.numrec, len(log.entries)) == (9, 2, 2)
    assert log.entries[1] == nt.DiscoveryEntry(3, 1, 2, 0, 1, 0xFFFF, "4420", "nqn.2026-11.io.zvolt:storage-0:v1",
                                               "10.42.0.1")
    assert len(nt.parse_discovery_log(bytes(page[:1024])).entries) == 0  # header only


def test_sysfs_address_and_listing(tmp_path: Path) -> None:
    assert nt.parse_address("traddr=10.42.0.1,trsvcid=4420,src_addr=10.42.0.2\n") == {
        "traddr": "10.42.0.1", "trsvcid": "4420", "src_addr": "10.42.0.2"}
    ctrl = tmp_path / "nvme0"
    ctrl.mkdir()
    (ctrl / "hostnqn").write_text("nqn.h\n")
    secret = ctrl / "dhchap_secret"
    secret.write_text("DHHC-1:01:xx:\n")
    secret.chmod(0o600)
    got = nt.sysfs_controllers(str(tmp_path))
    assert got[0]["name"] == "nvme0"
    assert got[0]["hostnqn"] == {"mode": "0o644", "value": "nqn.h"}
    assert got[0]["dhchap_secret"] == {"mode": "0o600", "value": "DHHC-1:01:xx:"}  # readable by its owner
    assert "error" in got[0]["subsysnqn"]  # type: ignore[operator]
    assert nt.sysfs_controllers(str(tmp_path / "none")) == []


def test_nvme_error_json_names_the_status() -> None:
    c = nt.Completion(0x00100200, 0, 0, 0, 1, nt.status_field(1, 0x84, True))
    err = nt.ConnectRefused("Connect qid 0", "host refused", c)
    out = err.to_json()
    assert out["kind"] == "ConnectRefused" and out["step"] == "Connect qid 0"
    assert out["status"] == {"sct": 1, "sc": 0x84, "dnr": True, "dw0": 0x00100200, "name": "Connect Invalid Host"}
    assert "Connect Invalid Host" in str(err)


# -- DH-HMAC-CHAP (NULL DH group) -------------------------------------------------------------


def test_authentication_send_and_receive_commands() -> None:
    send = nt.auth_send_sqe(4, 72)
    assert send[0] == 0x7F and send[4] == 0x05 and send[39] == 0x01 and u32(send, 32) == 72  # in-capsule
    assert send[40:44] == bytes([0, 0x01, 0x01, 0xE9]) and u32(send, 44) == 72  # SPSP0, SPSP1, SECP, TL
    recv = nt.auth_receive_sqe(5)
    assert recv[4] == 0x06 and recv[39] == 0x5A and u32(recv, 32) == 4096
    assert recv[40:44] == bytes([0, 0x01, 0x01, 0xE9]) and u32(recv, 44) == 4096  # AL


def test_negotiate_and_reply_messages() -> None:
    neg = nt.encode_negotiate(t_id=1)
    assert len(neg) == 8 + 64
    assert neg[:8] == bytes([0x00, 0x00, 0, 0, 1, 0, 0, 1])  # common msg, Negotiate, T_ID 1, SC_C 0, NAPD 1
    assert neg[8:12] == bytes([0x01, 0, 3, 6])  # DH-HMAC-CHAP, HALEN 3, DHLEN 6
    assert neg[12:15] == bytes([1, 2, 3]) and neg[15:42] == bytes(27)  # SHA-256/384/512
    assert neg[42:48] == bytes([0, 1, 2, 3, 4, 5]) and neg[48:] == bytes(24)  # NULL, ffdhe2048..8192

    response = bytes(range(32))
    reply = nt.encode_reply(7, response)
    assert len(reply) == 16 + 64
    assert reply[:2] == bytes([0x01, 0x02]) and u16(reply, 4) == 7 and reply[6] == 32
    assert reply[8] == 0 and u16(reply, 10) == 0 and u32(reply, 12) == 0  # CVALID 0, DHVLEN 0, SEQNUM 0
    assert reply[16:48] == response and reply[48:] == bytes(32)


def test_challenge_success_and_failure_decoding() -> None:
    cval = bytes(range(100, 132))
    raw = struct.pack("<BB2xHBxBBHI", 0x01, 0x01, 9, 32, 1, 0, 0, 0xDEADBEEF) + cval + bytes(4096 - 48)
    ch = nt.decode_challenge(raw)
    assert ch == nt.Challenge(t_id=9, hashid=1, dhgid=0, seqnum=0xDEADBEEF, cval=cval, dhvalue=b"")
    with pytest.raises(nt.CodecError):  # hl does not match the hash
        nt.decode_challenge(struct.pack("<BB2xHBxBBHI", 0x01, 0x01, 9, 20, 1, 0, 0, 1) + bytes(64))
    success = struct.pack("<BB2xHBxB7x", 0x01, 0x03, 9, 32, 0) + bytes(4096 - 16)
    assert nt.decode_success1(success) is False
    failure = struct.pack("<BB2xHBB", 0x00, 0xF1, 9, 0x01, 0x01) + bytes(100)
    with pytest.raises(nt.AuthFailure) as err:
        nt.decode_success1(failure)
    assert (err.value.reason, err.value.explanation) == (1, 1) and "authentication failed" in str(err.value)
    with pytest.raises(nt.CodecError):
        nt.decode_success1(raw)  # a Challenge where Success1 belongs


def test_secret_parsing_matches_the_agents_format() -> None:
    key = bytes(range(32))
    assert nt.parse_secret(encode_secret(key, 1)) == (1, key)
    hh, k = nt.parse_secret(generate_secret(3))
    assert hh == 3 and len(k) == 64
    good = encode_secret(key, 1)
    broken = good[:12] + ("A" if good[12] != "A" else "B") + good[13:]
    for bad in (broken, "DHHC-1:04:" + good[10:], good.rstrip(":"), "DHHC-1:01:!!!!:"):
        with pytest.raises(nt.CodecError):
            nt.parse_secret(bad)


def test_host_response_follows_the_dhchap_formula() -> None:
    key, hostnqn, subnqn = bytes(range(32)), "nqn.2014-08.org.nvmexpress:uuid:h", "nqn.2026-11.io.zvolt:s:v"
    kh = hmac.new(key, b"nqn.2014-08.org.nvmexpress:uuid:hNVMe-over-Fabrics", hashlib.sha256).digest()
    assert nt.transform_key(1, key, hostnqn) == kh
    assert nt.transform_key(0, key, hostnqn) == key
    c1 = bytes(32 * [7])
    message = (c1 + (0x01020304).to_bytes(4, "little") + (9).to_bytes(2, "little") + b"\x00" + b"HostHost"
               + hostnqn.encode() + b"\x00" + subnqn.encode())
    want = hmac.new(kh, message, hashlib.sha256).digest()
    assert nt.host_response(1, kh, c1, 0x01020304, 9, hostnqn, subnqn) == want
    assert len(nt.host_response(3, kh, bytes(64), 1, 1, hostnqn, subnqn)) == 64
