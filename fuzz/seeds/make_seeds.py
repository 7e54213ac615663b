#!/usr/bin/env python3
"""Writes the committed seed inputs under fuzz/corpus/<target>/seed-*.

Each target's input format is described at the top of its fuzz target.
Run from anywhere: python3 fuzz/seeds/make_seeds.py
"""
import hashlib
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")
PORT = b"PORT"


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- vsock -----------------------------------------------------------------
def hdr(op, length, dst_port=PORT, src_port=1024, src_cid=3, dst_cid=2, flags=0,
        buf_alloc=256 * 1024, fwd_cnt=0):
    dst = dst_port if isinstance(dst_port, bytes) else struct.pack("<I", dst_port)
    return (struct.pack("<QQI", src_cid, dst_cid, src_port) + dst +
            struct.pack("<IHHIII", length, 1, op, flags, buf_alloc, fwd_cnt))


REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)


def packet(h, available, payload=b"", room=16):
    return h + struct.pack("<H", available) + payload + bytes([room])


put("vsock_header", "connected-rw-credit-shutdown", bytes([3]) +
    packet(hdr(RW, 5), 2, b"hello") +
    packet(hdr(CREDIT_REQUEST, 0), 0) +
    packet(hdr(CREDIT_UPDATE, 0, fwd_cnt=5), 0) +
    packet(hdr(SHUTDOWN, 0, flags=3), 0))
put("vsock_header", "unconnected-request", bytes([0]) +
    packet(hdr(REQUEST, 0, dst_port=80), 0) +
    packet(hdr(RW, 4, dst_port=80), 1, b"abcd"))


def layout(n, count):
    at, out = 0, []
    for _ in range(count):
        desc = at
        avail = desc + 16 * n
        used = (avail + 6 + 2 * n + 3) // 4 * 4
        end = (used + 6 + 8 * n + 15) // 16 * 16
        out.append((desc, avail, used))
        at = end
    return out


class Mem:
    def __init__(self, size):
        self.b = bytearray(size)

    def put(self, at, data):
        self.b[at:at + len(data)] = data


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


def avail(heads):
    return struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)


def virtq_seed(flags, with_event):
    n = 4
    (txd, txa, _), (rxd, rxa, _), (evd, eva, _) = layout(n, 3)
    m = Mem(0x500)
    m.put(txd, desc(0x200, 44, F_NEXT, 1) + desc(0x240, 5, 0, 0) + desc(0x280, 44, 0, 0))
    m.put(txa, avail([0, 2]))
    m.put(0x200, hdr(RW, 5))
    m.put(0x240, b"hello")
    m.put(0x280, hdr(REQUEST, 0, dst_port=80))
    m.put(rxd, desc(0x300, 256, F_WRITE, 0) + desc(0x400, 20, F_WRITE | F_NEXT, 2) +
          desc(0x420, 200, F_WRITE, 0))
    m.put(rxa, avail([0, 1]))
    if with_event:
        m.put(evd, desc(0x4f0, 8, F_WRITE, 0))
        m.put(eva, avail([0]))
    return bytes([2, flags, 0, 0]) + bytes(m.b)


put("virtq_chain", "connected", virtq_seed(3, False))
put("virtq_chain", "reset-pending", virtq_seed(4, True))

# --- virtio-blk --------------------------------------------------------------
def blk_seed(req_type, sector):
    n = 4
    (d, a, _), = layout(n, 1)
    m = Mem(0x500)
    m.put(d, desc(0x100, 16, F_NEXT, 1) + desc(0x200, 512, F_NEXT | F_WRITE, 2) +
          desc(0x4f0, 1, F_WRITE, 0))
    m.put(a, avail([0]))
    m.put(0x100, struct.pack("<IIQ", req_type, 0, sector))
    return bytes([2, 0, 0, 0]) + bytes(m.b)


put("blk_request", "read", blk_seed(0, 1))
put("blk_request", "get-id", blk_seed(8, 0))
put("blk_request", "write", blk_seed(1, 0))

# --- protocol ----------------------------------------------------------------
KINDS = dict(hello=0x01, hello_ok=0x02, error=0x03, cancel=0x04, done=0x05, ping=0x10,
             pong=0x11, shutdown=0x12, shutdown_ok=0x13, exec=0x20, output=0x21,
             image=0x22, exec_result=0x23, run_code=0x24, run_code_result=0x25,
             reset_interpreter=0x26, warm_status=0x27, warm_status_reply=0x28,
             refresh=0x29, refresh_reply=0x2A, set_limits=0x2B, limits=0x2C,
             write_file=0x40, read_file=0x41, file_data=0x42, list_files=0x43,
             file_list=0x44, remove_file=0x45, stat_file=0x46, file_stat=0x47)


def frame(kind, rid, header=None, payload=b""):
    h = b"" if header is None else json.dumps(header, separators=(",", ":")).encode()
    k = KINDS[kind] if isinstance(kind, str) else kind
    body = bytes([k]) + struct.pack("<QI", rid, len(h)) + h + payload
    return struct.pack("<I", len(body)) + body


STATS = {"total_bytes": 10, "kept_bytes": 5}
EXEC_RESULT = {"exit_code": 0, "duration_ms": 3, "stdout": STATS, "stderr": STATS}
host = (frame("hello_ok", 0, {"agent_version": "1", "protocol_version": 1}) +
        frame("output", 1, {"stream": "stdout"}, b"hi\xff\xe2\x82") +
        frame("output", 1, {"stream": "stderr"}, b"err") +
        frame("exec_result", 1, EXEC_RESULT) +
        frame("image", 2, {"format": "png", "width": 1}, b"\x89PNG") +
        frame("run_code_result", 2, dict(EXEC_RESULT, error={"name": "E", "value": "v",
              "traceback": "t"}, state_lost=True, images=1)) +
        frame("warm_status_reply", 3, {"interpreters": [{"language": "python",
              "state": "warm", "starts": 1}]}) +
        frame("error", 4, {"code": "not_found", "message": "no"}) +
        frame(0x99, 5) +
        frame("file_data", 6, {"size": 3, "offset": 0, "eof": True}, b"abc") +
        frame("pong", 7, {"agent_version": "1", "uptime_ms": 9}))
put("protocol_frames_host", "responses", bytes([7, 1, 3, 64, 255]) + host)
guest = (frame("hello", 0, {"protocol_version": 1, "client": "c"}) +
         frame("exec", 1, {"command": {"argv": ["ls", "-l"]}, "env": [["A", "b"]],
               "timeout_ms": 5, "output": {"stdout_max": 10}}, b"stdin") +
         frame("run_code", 2, {"language": "python"}, b"print(1)") +
         frame("cancel", 2) +
         frame("write_file", 3, {"path": "/a", "mode": 420}, b"data") +
         frame("read_file", 4, {"path": "/a", "offset": 1, "length": 2}) +
         frame("list_files", 5, {"path": "/", "recursive": True}) +
         frame("set_limits", 6, {"memory_max_bytes": 1}) +
         frame("reset_interpreter", 7, {"language": "bash"}) +
         frame("ping", 8, {}) +
         frame(0x7f, 9, {}))
put("protocol_frames_guest", "requests", bytes([1, 5, 64, 255]) + guest)

# --- agent client ------------------------------------------------------------
put("agent_client", "exec", bytes([1, 1, 4]) +
    frame("output", 1, {"stream": "stdout"}, b"x" * 300) + frame("exec_result", 1, EXEC_RESULT))
put("agent_client", "run-code-image", bytes([2, 1, 4]) +
    frame("image", 1, {"format": "png"}, b"img") +
    frame("run_code_result", 1, dict(EXEC_RESULT, images=1)))
put("agent_client", "read-file", bytes([3, 1, 1]) +
    frame("file_data", 1, {"size": 100, "offset": 0, "eof": False}, b"a" * 64))
put("agent_client", "bad-hello", bytes([0, 0, 0]) +
    frame("hello_ok", 0, {"agent_version": "1", "protocol_version": 2}))

# --- state.json and seal.json --------------------------------------------------
transport = lambda t, nq: {"device_type": t, "status": 15, "device_features_sel": 0,
                           "driver_features_sel": 0, "driver_features": 1 << 32,
                           "queue_sel": 0, "activated": True, "interrupt_status": 0,
                           "queues": [{"size": 16, "ready": True, "desc_table": 0x1000 * (i + 1),
                                       "avail_ring": 0x1000 * (i + 1) + 256,
                                       "used_ring": 0x1000 * (i + 1) + 512}
                                      for i in range(nq)]}
state = {"image": {"recipe_hash": "r", "kernel_fingerprint": "k", "rootfs_fingerprint": "f"},
         "memory_bytes": 1 << 20,
         "vcpus": [{"cpuid": [[1, 0, 0, 0]], "mp_state": [], "regs": [1, 2], "sregs": [],
                    "xsave": [], "xcrs": [], "debug_regs": [], "lapic": [], "msrs": [[16, 0]],
                    "events": []}],
         "vm": {"irqchips": [[0], [1], [2]], "pit": [], "clock": []},
         "serial": {"baud_divisor_low": 12, "baud_divisor_high": 0, "interrupt_enable": 0,
                    "interrupt_identification": 1, "line_control": 3, "line_status": 96,
                    "modem_control": 8, "modem_status": 176, "scratch": 0,
                    "in_buffer": [65]},
         "transports": [transport(2, 1), transport(4, 1), transport(19, 3)],
         "cmdline": "console=ttyS0"}
body = json.dumps(state, separators=(",", ":"))
put("state_json", "body", bytes([1]) + body.encode())
checksum = hashlib.sha256(body.encode()).hexdigest()
put("state_json", "file", bytes([0]) + json.dumps(
    {"format_version": 1, "checksum": checksum, "state": state},
    separators=(",", ":")).encode())
seal = {"version": 1, "entries": [{"path": "memory", "stamp": {"ino": 1, "size": 2,
        "mtime_ns": -1, "ctime_ns": 170000000000000000000}, "sha256": "ab"}], "mac": "00"}
put("state_json", "seal", bytes([2]) + json.dumps(seal).encode())
