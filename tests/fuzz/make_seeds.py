#!/usr/bin/env python3
"""Writes the binary seed inputs of tests/fuzz/corpus (protobuf messages, safetensors files,
KV notify/ack payloads) and the text ones with a mode byte in front. Run from anywhere:
    python3 tests/fuzz/make_seeds.py
Hand-written text seeds live in the corpus folders as plain files; this script only
(re)writes the files named gen-*. The protobuf encoding is done by hand (no protobuf module
needed): varints, length-delimited fields, fixed32 for floats, fixed64 for doubles."""
import json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))

def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "gen-" + name), "wb") as f:
        f.write(data)

def varint(v):
    if v < 0: v += 1 << 64
    out = b""
    while True:
        b = v & 0x7F; v >>= 7
        if v: out += bytes([b | 0x80])
        else: return out + bytes([b])

def fv(n, v): return varint(n << 3) + varint(v)                    # varint field
def fb(n, b): return varint(n << 3 | 2) + varint(len(b)) + b       # bytes / string / message
def ff(n, x): return varint(n << 3 | 5) + struct.pack("<f", x)     # float
def fd(n, x): return varint(n << 3 | 1) + struct.pack("<d", x)     # double
def packed(n, vals): return fb(n, b"".join(varint(v) for v in vals))

# ---- protobuf messages (fuzz_node_proto: byte 0 = index in its table) ----
speed = fv(1, 16) + fv(2, 1) + fv(3, 1)
speed_frac = fd(5, 0.5)
sampling = fv(1, 32) + ff(2, 0.7) + ff(3, 0.9) + fv(4, 40) + fv(5, 1234) + fv(6, 2) + fv(7, 1) + fb(8, b"\n\n") + fb(8, b"END")
token = fv(1, 42) + ff(2, -0.5) + fb(3, fv(1, 42) + ff(2, -0.5)) + fb(3, fv(1, 7) + ff(2, -2.0)) + fb(4, b"hi")

def kv_desc(B=16, heads=2, hd=8, dtype="bf16", layers=4, entries=20, blocks=(3, 5), stride=None, region_len=None):
    unit = 2 * B * heads * hd * 2
    stride = stride or unit * layers
    region_len = region_len or stride * 8
    base = 0x10000
    m = fb(1, b"\x01\x02\x03\x04") + fb(2, b"shm")
    m += fb(3, fv(1, base) + fv(2, region_len) + fb(3, b"rkey"))
    m += fb(4, fv(1, 0) + fv(2, base) + fv(3, stride) + packed(4, blocks))
    for l in range(layers):
        m += fb(5, fv(1, 0) + fv(2, l * unit) + fv(3, entries))
    m += fv(6, B) + fv(7, heads) + fv(8, hd) + fv(9, 0) + fv(10, heads) + fb(11, dtype.encode())
    m += fv(12, unit) + fv(13, layers * entries * 2 * heads * hd * 2) + fv(14, 99) + fv(15, 1700000000000)
    m += fv(16, 2) + fv(17, 1) + fv(18, 1) + fv(19, heads)
    return m

kv = kv_desc()
msgs = {
    "reserve": (0, fb(1, b"req-1") + fv(2, 20) + fv(3, 16) + fb(4, speed)),
    "reserve-frac": (0, fb(1, b"req-2") + fv(2, 5) + fv(3, 1) + fb(4, speed_frac)),
    "generate": (1, fb(1, b"req-1") + fb(2, token) + fb(4, sampling) + fv(6, 99)),
    "generate-decode-only": (1, fb(1, b"req-3") + packed(3, [1, 2, 3, 4]) + fb(4, sampling) + fb(5, speed)),
    "cancel": (2, fb(1, b"req-1")),
    "prefill": (3, fb(1, b"req-1") + packed(2, [1, 2, 3, 4, 5]) + fb(3, speed) + fb(4, sampling) + fb(5, kv)),
    "drain": (4, fv(1, 5000)),
    "reserve-reply": (5, fb(1, kv)),
    "prefill-reply": (6, fb(1, token) + fv(2, 4096) + fd(3, 1.5) + fd(4, 0.25)),
    "generate-event": (7, fb(1, token) + fb(1, token) + fb(2, b"stop") + fb(4, fv(1, 5) + fv(2, 3) + fv(3, 100)) + fb(5, fd(1, 1.0))),
    "health-reply": (8, fv(1, 1) + fb(2, b"decode") + fv(3, 99) + fb(4, b"speed")),
    "node-status": (9, fv(1, 2) + fv(2, 1) + fb(3, fb(1, b"lower") + fv(2, 100) + fv(3, 50)) + ff(4, 0.5) + fv(5, 64) + fv(6, 1)),
}
for name, (idx, body) in msgs.items():
    put("node_proto", name, bytes([idx]) + body)

put("kv_desc", "valid", kv)
put("kv_desc", "f32-one-layer", kv_desc(dtype="f32", layers=1, entries=1, blocks=(0,)))
put("kv_desc", "block-out-of-region", kv_desc(blocks=(3, 500)))
put("kv_desc", "huge-stride", kv_desc(stride=(1 << 63)))

# ---- KV notify / ack payloads (fuzz_kv_notify: byte 0 even = notify, odd = ack) ----
MAGIC, VERSION = 0x4B565846, 3  # transfer/kv_notify_wire.h
def notify_msg(flags=0, tags=b"", rid=b"req-1", version=VERSION):
    n_tags = len(tags) // 16
    return (struct.pack("<IIIIQQQQii", MAGIC, version, flags, n_tags, 7, 42, 65536, 99, 0, 2)
            + rid.ljust(64, b"\0") + bytes(range(16)) + tags)
put("kv_notify", "notify", b"\x00" + notify_msg())
put("kv_notify", "notify-abort", b"\x00" + notify_msg(flags=1))
put("kv_notify", "notify-tags", b"\x00" + notify_msg(tags=bytes(range(48))))
put("kv_notify", "notify-long-id", b"\x00" + notify_msg(rid=b"x" * 64))
put("kv_notify", "notify-old-version", b"\x00" + notify_msg(version=2))
put("kv_notify", "ack-ok", b"\x01" + struct.pack("<IiQ", MAGIC, 0, 7))
put("kv_notify", "ack-refused", b"\x01" + struct.pack("<IiQ", MAGIC, -5, 7))
put("kv_notify", "ack-unknown-status", b"\x01" + struct.pack("<IiQ", MAGIC, 123456, 7))

# ---- safetensors files ----
def st(entries, data, pad_to=None):
    h = json.dumps(entries, separators=(",", ":")).encode()
    if pad_to: h = h.ljust(pad_to, b" ")
    return struct.pack("<Q", len(h)) + h + data

put("safetensors", "two-tensors", st({"__metadata__": {"format": "pt"},
    "a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b.bias": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}, bytes(24), pad_to=64))
put("safetensors", "empty-tensor", st({"e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [0, 0]}}, b""))
put("safetensors", "overlap", st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), pad_to=64))
put("safetensors", "bad-dtype", st({"a": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}, bytes(2)))
put("safetensors", "header-past-end", struct.pack("<Q", 1 << 40) + b"{}")
