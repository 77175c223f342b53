#!/usr/bin/env python3
"""How many BPF instructions one established-flow packet executes in an XDP program of
a BPF object (README, "The established-flow budget, session 23"): the machine has no
PMU, so instructions are counted by running the object's own code in this small eBPF
interpreter (the code sections' raw bytes via llvm-objcopy, map references and calls
via llvm-objdump -r), on the packet and map contents of `xdplb-bench xdp`'s
established-flow row: TCP ACK 198.18.0.1:40000 -> VIP 198.18.1.1:80, its flow in
XDPLB_FLOWS_V4 -> backend 1 (198.18.2.11, active, the VIP's copy in its entry), next
hop valid, source 198.18.1.10, IPIP, no lists, mtu 1500; for the floors
FLOOR_BACKENDS[VIP] = backend.

Helper calls count one instruction each (what the kernel does in them, e.g. the hash
lookup or the verifier's inlined array lookups, is not counted); the output line shows
the verdict and the outer header written, to check the run took the forwarding path.

With a third argument `non-vip`: the non-VIP row's packet instead (TCP SYN
198.18.0.1:40000 -> 198.18.1.10:22, the LB's own address; same maps), passed up.
With `lists`: the established packet with the global deny and allow lists in use
(`filter_flags` DENY | ALLOW) and its flow entry on the current filter generation (5 in
XDPLB_FILT_GEN and in the entry): the "deny 1000 + allow 1000" row, no trie lookup.

With `6in6`: an established IPv6 flow to an IPv6 backend (TCP ACK [fd00:18::2]:40000 ->
VIP [fd00:18:100::1]:80, its flow in XDPLB_FLOWS -> backend 1 (fd00:18:1::11, active),
the service's entry in XDPLB_SVC_V6, next hop valid, source fd00:18:1::10, no lists).

Usage: tests/tools/bpf_path_count.py OBJECT PROGRAM [non-vip|lists|6in6]
  e.g. target/ebpf/bpfel-unknown-none/release/lb-ebpf xdp_lb
       target/ebpf/bpfel-unknown-none/release/lb-ebpf xdp_lb non-vip
       target/ebpf/bpfel-unknown-none/release/lb-floors floor_ipip
With TRACE=1 in the environment, every map lookup is printed (map, value address or 0).

Needs python3, llvm-objcopy and llvm-objdump (Debian's llvm)."""
import collections, os, re, struct, subprocess, sys, tempfile
obj, prog = sys.argv[1], sys.argv[2]
case = sys.argv[3] if len(sys.argv) > 3 else "established"
if case not in ("established", "non-vip", "lists", "6in6"):
    raise SystemExit(f"unknown case {case!r}: established, non-vip, lists or 6in6")
def section_bytes(name):
    out = tempfile.mktemp(suffix=".bin")
    subprocess.run(["llvm-objcopy", "-O", "binary", f"--only-section={name}", obj, out], check=True)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data
secs = {".text": section_bytes(".text"), "xdp": section_bytes("xdp")}
# relocations: section -> {insn index: symbol}
relocs = collections.defaultdict(dict)
cur = None
for line in subprocess.run(["llvm-objdump", "-r", obj], capture_output=True, text=True).stdout.splitlines():
    m = re.match(r"RELOCATION RECORDS FOR \[(.+)\]:", line)
    if m: cur = m.group(1); continue
    m = re.match(r"([0-9a-f]{16}) (\S+)\s+(\S+)", line)
    if m and cur in secs: relocs[cur][int(m.group(1), 16) // 8] = m.group(3)
syms = {}
for line in subprocess.run(["llvm-objdump", "-t", obj], capture_output=True, text=True).stdout.splitlines():
    m = re.match(r"([0-9a-f]{16})\s+\S*\s+F\s+(\S+)\s+[0-9a-f]+\s+(?:\.hidden )?(\S+)", line)
    if m: syms[(m.group(2), int(m.group(1), 16) // 8)] = m.group(3)
def fname(sec, idx):
    best = max((i for (s, i) in syms if s == sec and i <= idx), default=None)
    n = syms.get((sec, best), "?")
    return re.sub(r".*_ebpf\d*", "", n) or n
def insn(sec, i):
    b = secs[sec][i*8:i*8+8]
    op, regs, off, imm = struct.unpack("<BBhi", b)
    return op, regs & 0xf, regs >> 4, off, imm

MEM = bytearray(1 << 21)
def rd(a, n): return int.from_bytes(MEM[a:a+n], "little")
def wr(a, n, v): MEM[a:a+n] = (v & ((1 << (8*n)) - 1)).to_bytes(n, "little")
M64 = (1 << 64) - 1
CTX, PKT, MAPV = 0x1000, 0x3000, 0x40000
# maps: name -> (kind, value_size, {key bytes or index: value bytes})
maps = {}
def amap(name, vsize, entries): maps[name] = ("array", vsize, entries)
def hmap(name, vsize, entries): maps[name] = ("hash", vsize, entries)
map_ids = {}; map_base = {}
def map_handle(name):
    if name not in map_ids:
        map_ids[name] = len(map_ids) + 1
        map_base[name] = MAPV + map_ids[name] * 0x4000
        kind, vs, ents = maps.get(name, ("array", 64, {}))
        for k, v in ents.items():
            idx = k if isinstance(k, int) else 0
            wr(map_base[name] + idx * vs, len(v), int.from_bytes(v, "little")) if kind == "array" else None
        if kind == "hash":
            for j, (k, v) in enumerate(ents.items()):
                MEM[map_base[name] + j*vs: map_base[name] + j*vs + len(v)] = v
    return 0xF0000000 + map_ids[name]
def lookup(handle, keyaddr):
    name = [n for n, i in map_ids.items() if 0xF0000000 + i == handle][0]
    kind, vs, ents = maps.get(name, ("array", 64, {}))
    if kind == "array":
        idx = rd(keyaddr, 4)
        return map_base[name] + idx * vs if idx < 64 else 0
    for j, (k, v) in enumerate(ents.items()):
        if bytes(MEM[keyaddr:keyaddr+len(k)]) == k: return map_base[name] + j * vs
    return 0

def run(setup):
    setup()
    counts = collections.Counter(); helpers = collections.Counter()
    regs = [0]*11
    frames = [(0x100000, None)]  # stack tops
    regs[10] = 0x100000; regs[1] = CTX
    sec, pc = "xdp", [i for (s, i), n in syms.items() if s == "xdp" and n == prog][0]
    callstack = []
    while True:
        op, dst, src, off, imm = insn(sec, pc)
        counts[fname(sec, pc)] += 1
        cls = op & 7
        if op == 0x18:  # ld_imm64
            nxt = struct.unpack("<BBhi", secs[sec][(pc+1)*8:(pc+2)*8])[3]
            r = relocs[sec].get(pc)
            regs[dst] = map_handle(r) if r else ((imm & 0xffffffff) | (nxt << 32)) & M64
            pc += 2; continue
        if cls in (1, 2, 3):  # ldx st stx
            size = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}[op & 0x18]
            if cls == 1: regs[dst] = rd((regs[src] + off) & M64, size)
            elif cls == 2: wr((regs[dst] + off) & M64, size, imm)
            else: wr((regs[dst] + off) & M64, size, regs[src])
            pc += 1; continue
        if cls in (4, 7):
            is64 = cls == 7; code = op & 0xf0
            b = regs[src] if op & 8 else (imm & M64)
            a = regs[dst]
            if not is64: a &= 0xffffffff; b &= 0xffffffff
            mask = M64 if is64 else 0xffffffff
            bits = 64 if is64 else 32
            if code == 0xd0:  # endian
                v = regs[dst]
                if op & 8:  # to be
                    n = imm // 8; v = int.from_bytes((v & ((1 << imm) - 1)).to_bytes(n, "little"), "big")
                else: v &= (1 << imm) - 1
                regs[dst] = v; pc += 1; continue
            def sgn(x): return x - (1 << bits) if x >> (bits - 1) else x
            r = {0x00: lambda: a + b, 0x10: lambda: a - b, 0x20: lambda: a * b,
                 0x30: lambda: a // b if b else 0, 0x40: lambda: a | b, 0x50: lambda: a & b,
                 0x60: lambda: a << (b & (bits-1)), 0x70: lambda: a >> (b & (bits-1)),
                 0x80: lambda: -a, 0x90: lambda: a % b if b else a, 0xa0: lambda: a ^ b,
                 0xb0: lambda: b, 0xc0: lambda: sgn(a) >> (b & (bits-1))}[code]()
            regs[dst] = r & mask; pc += 1; continue
        if cls in (5, 6):
            code = op & 0xf0
            if code == 0x80:  # call
                if src == 1:
                    r = relocs[sec].get(pc)
                    tgt = imm + 1 if r else pc + imm + 1
                    callstack.append((sec, pc + 1, regs[6:10], regs[10]))
                    sec = ".text"; regs[10] -= 0x1000; pc = tgt; continue
                helpers[imm] += 1
                if imm == 1:
                    regs[0] = lookup(regs[1], regs[2])
                    if os.environ.get("TRACE"): print("lookup", [n for n, i in map_ids.items() if 0xF0000000 + i == regs[1]], hex(regs[0]))
                elif imm == 44:  # adjust_head
                    wr(CTX, 4, (rd(CTX, 4) + (regs[2] - (1 << 64) if regs[2] >> 63 else regs[2])) ); regs[0] = 0
                elif imm == 65: regs[0] = 0
                elif imm == 23: regs[0] = 4
                else: regs[0] = 0
                pc += 1; continue
            if code == 0x90:  # exit
                if not callstack: return regs[0], counts, helpers
                sec, pc, saved, r10 = callstack.pop(); regs[6:10] = saved; regs[10] = r10; continue
            if code == 0x00: pc += off + 1; continue
            b = regs[src] if op & 8 else (imm & M64)
            a = regs[dst]
            if cls == 6: a &= 0xffffffff; b &= 0xffffffff; bits = 32
            else: bits = 64
            def s(x): return x - (1 << bits) if x >> (bits - 1) else x
            t = {0x10: a == b, 0x20: a > b, 0x30: a >= b, 0x40: a & b != 0, 0x50: a != b,
                 0x60: s(a) > s(b), 0x70: s(a) >= s(b), 0xa0: a < b, 0xb0: a <= b,
                 0xc0: s(a) < s(b), 0xd0: s(a) <= s(b)}[code]
            pc += off + 1 if t else 1; continue
        raise SystemExit(f"unknown op {op:#x} at {sec}:{pc}")

# The benchmark's established flow: client 198.18.0.1:40000 -> VIP 198.18.1.1:80 TCP ACK, 64-byte frame.
VIP, CLIENT, BACKEND, SRC = bytes([198,18,1,1]), bytes([198,18,0,1]), bytes([198,18,2,11]), bytes([198,18,1,10])
def setup():
    frame = bytes(6) + bytes(6) + b"\x08\x00"
    # non-vip: the bench's non-VIP row, a SYN to the LB's own address, port 22.
    dst, dport, flags = (SRC, 22, 0x02) if case == "non-vip" else (VIP, 80, 0x10)
    ip = bytes([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]) + CLIENT + dst
    tcp = (40000).to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(8) + bytes([0x50, flags]) + bytes(6)
    pkt = frame + ip + tcp
    MEM[PKT:PKT+len(pkt)] = pkt
    wr(CTX, 4, PKT); wr(CTX + 4, 4, PKT + len(pkt)); wr(CTX + 12, 4, 2)
    # GlobalConfig: source_v4, source_v6, encap, filter_flags, mtu, ...
    flags, gen = (3, 5) if case == "lists" else (0, 0)
    cfg = SRC + bytes(16) + (0).to_bytes(4, "little") + flags.to_bytes(4, "little") + (1500).to_bytes(4, "little") + bytes(24)
    amap("XDPLB_CONFIG", 64, {0: cfg})
    amap("XDPLB_FILT_GEN", 4, {0: gen.to_bytes(4, "little")})
    fkey = CLIENT + VIP + (40000).to_bytes(2, "big") + (80).to_bytes(2, "big") + bytes([6, 0, 0, 0])
    hmap("XDPLB_FLOWS_V4", 8, {fkey: (1).to_bytes(4, "little") + gen.to_bytes(4, "little")})
    svc = VIP + (80).to_bytes(2, "big") + bytes([6, 0]) + (0).to_bytes(4, "little") + bytes(12)
    backend = BACKEND + bytes(12) + bytes([4, 1, 0, 0]) + (0).to_bytes(4, "little") + svc
    amap("XDPLB_BACKENDS", 48, {1: backend})
    hop = BACKEND + bytes(12) + (2).to_bytes(4, "little") + (1500).to_bytes(2, "little") + bytes([4, 1]) + bytes([2]*6) + bytes([4]*6)
    amap("XDPLB_NEXT_HOPS", 36, {1: hop})
    hmap("FLOOR_BACKENDS", 4, {VIP: BACKEND})
VIP6 = bytes.fromhex("fd000018010000000000000000000001")
CLIENT6 = bytes.fromhex("fd000018000000000000000000000002")
BACKEND6 = bytes.fromhex("fd000018000100000000000000000011")
SRC6 = bytes.fromhex("fd000018000100000000000000000010")
def setup6():
    tcp = (40000).to_bytes(2, "big") + (80).to_bytes(2, "big") + bytes(8) + bytes([0x50, 0x10]) + bytes(6)
    ip = bytes([0x60, 0, 0, 0]) + len(tcp).to_bytes(2, "big") + bytes([6, 64]) + CLIENT6 + VIP6
    pkt = bytes(6) + bytes(6) + b"\x86\xdd" + ip + tcp
    MEM[PKT:PKT+len(pkt)] = pkt
    wr(CTX, 4, PKT); wr(CTX + 4, 4, PKT + len(pkt)); wr(CTX + 12, 4, 2)
    cfg = bytes(4) + SRC6 + bytes(8) + (1500).to_bytes(4, "little") + bytes(24)
    amap("XDPLB_CONFIG", 64, {0: cfg})
    fkey = CLIENT6 + VIP6 + (40000).to_bytes(2, "big") + (80).to_bytes(2, "big") + bytes([6, 6, 0, 0])
    hmap("XDPLB_FLOWS", 8, {fkey: (1).to_bytes(4, "little") + bytes(4)})
    backend = BACKEND6 + bytes([6, 1, 0, 0]) + (0).to_bytes(4, "little") + bytes(24)
    amap("XDPLB_BACKENDS", 48, {1: backend})
    svc = VIP6 + (80).to_bytes(2, "big") + bytes([6, 6]) + bytes(16)
    amap("XDPLB_SVC_V6", 36, {0: svc})
    hop = BACKEND6 + (2).to_bytes(4, "little") + (1500).to_bytes(2, "little") + bytes([6, 1]) + bytes([2]*6) + bytes([4]*6)
    amap("XDPLB_NEXT_HOPS", 36, {1: hop})
if case == "6in6":
    v, counts, helpers = run(setup6)
    print(f"{obj} {prog}: verdict {v}, {sum(counts.values())} BPF instructions:", dict(counts), "helpers:", dict(helpers))
    d = rd(CTX, 4); out = bytes(MEM[d:d+54])
    print("  out: eth dst", out[0:6].hex(), "src", out[6:12].hex(), "type", out[12:14].hex(), "outer", out[22:38].hex(), "->", out[38:54].hex(), "next header", out[20])
    raise SystemExit(0)
v, counts, helpers = run(setup)
print(f"{obj} {prog}: verdict {v}, {sum(counts.values())} BPF instructions:", dict(counts), "helpers:", dict(helpers))
d = rd(CTX, 4); out = bytes(MEM[d:d+34])
print("  out: eth dst", out[0:6].hex(), "src", out[6:12].hex(), "outer", ".".join(map(str, out[26:30])), "->", ".".join(map(str, out[30:34])), "proto", out[23])
