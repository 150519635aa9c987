#!/usr/bin/env python3
"""Soak driver for chatloop (issue 8), run by benches/soak.sh. Python 3 standard library only.

Runs these workloads at once against a running server, for --duration seconds:

- chatty rooms: ROOMS rooms of MEMBERS well-behaved members each (big socket buffers, reading
  all the time, answering PINGs); every member SAYs "S<seq> <padding>" at a steady pace, and
  every member checks that it gets every other member's MESSAGEs with consecutive seqs (no
  loss, no reordering) and strictly increasing msg_ids; at the end, after a PING barrier, each
  one has exactly the last seq each sender sent;
- connection churn: connect, HELLO, JOIN, SAY (own echo awaited), then QUIT, FIN, RST, or a
  WHO; plus connections that close before HELLO and ones that stay silent until hello_timeout;
- slow consumers: join chat0 (where one member is a firehose of 8 KB SAYs) with a tiny
  SO_RCVBUF, read, stop reading for 1-15 s, read
  again: either they are cut off (slow_consumer) or they catch up; what they got must be a
  gap-free prefix of each sender's stream;
- garbage senders: bad magic, bad version, oversized lengths, unknown opcodes, bad payloads,
  JOIN before HELLO, invalid UTF-8, half frames then RST, garbage after JOIN; each must get
  its ERROR code (or, for fatal ones, at least the close);
- resume storms: sessions in room "resume" are taken over by new connections with their
  tokens, up to three times in a row, all sessions at once, every few seconds; the old
  connection must get session_taken_over, the new one keeps the membership (already_in_room),
  and a watcher in the room sees no PRESENCE for any of it and every session's MESSAGEs in order.

Every second it samples the server's RSS (/proc/PID/status), open descriptors (/proc/PID/fd)
and /metrics into OUT/samples.csv. At the end every client leaves and the server's state
must return to empty. Exit status 0 on success, 1 with the reasons on stderr otherwise;
OUT/summary.json holds the figures.
"""

import argparse
import asyncio
import csv
import json
import os
import random
import socket
import struct
import sys
import time

# ------------------------------------------------------------------------------------------
# Protocol (docs/PROTOCOL.md)
# ------------------------------------------------------------------------------------------

HELLO, JOIN, LEAVE, SAY, WHISPER, WHO, PING, PONG, QUIT = range(1, 10)
S_WELCOME, S_MESSAGE, S_WHISPER, S_PRESENCE, S_ROSTER, S_PING, S_PONG = range(0x81, 0x88)
S_ERROR = 0x8F
P_JOIN, P_LEAVE, P_QUIT, P_GONE = 1, 2, 3, 4
MAX_SERVER_PAYLOAD = 65536 + 128


def frame(op, payload=b""):
    return b"CL\x01" + bytes([op]) + struct.pack(">I", len(payload)) + payload


def pstr(s):
    if isinstance(s, str):
        s = s.encode()
    return struct.pack(">H", len(s)) + s


class Rd:
    def __init__(self, b):
        self.b, self.i = b, 0

    def take(self, n):
        if self.i + n > len(self.b):
            raise ProtocolViolation("payload too short")
        v = self.b[self.i:self.i + n]
        self.i += n
        return v

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def u64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def str(self):
        return self.take(self.u16()).decode()

    def rest(self):
        v = self.b[self.i:]
        self.i = len(self.b)
        return v


def welcome(p):
    r = Rd(p)
    return {"conn_id": r.u64(), "token": r.take(16), "max_frame": r.u32(),
            "heartbeat_ms": r.u32(), "nick": r.str()}


def message(p):
    r = Rd(p)
    return r.u64(), r.str(), r.str(), r.rest().decode()


def presence(p):
    r = Rd(p)
    return r.u8(), r.str(), r.str()


def roster(p):
    r = Rd(p)
    room, more, n = r.str(), r.u8(), r.u32()
    return room, more, [r.str() for _ in range(n)]


def error(p):
    r = Rd(p)
    return r.u16(), r.u8(), r.rest().decode(errors="replace")


class ProtocolViolation(Exception):
    pass


class Closed(Exception):
    """The server closed the connection (EOF or reset); `partial` bytes of a frame were pending."""

    def __init__(self, partial=0, how="eof"):
        super().__init__(f"closed by {how} ({partial} bytes of a partial frame)")
        self.partial, self.how = partial, how


class Conn:
    def __init__(self, r, w, label):
        self.r, self.w, self.label = r, w, label

    @classmethod
    async def open(cls, addr, label, rcvbuf=None):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, addr), 10)
            r, w = await asyncio.open_connection(sock=sock, limit=1 << 20)
        except BaseException:
            sock.close()
            raise
        return cls(r, w, label)

    def send(self, op, payload=b""):
        self.w.write(frame(op, payload))

    def send_raw(self, b):
        self.w.write(b)

    async def flush(self):
        try:
            await asyncio.wait_for(self.w.drain(), 15)
        except (ConnectionError, BrokenPipeError) as e:
            raise Closed(0, f"write error {e!r}")

    async def recv(self, timeout=10.0):
        """The next frame as (op, payload). Raises Closed, or asyncio.TimeoutError."""
        try:
            hdr = await asyncio.wait_for(self.r.readexactly(8), timeout)
        except asyncio.IncompleteReadError as e:
            raise Closed(len(e.partial))
        except ConnectionError:
            raise Closed(0, "reset")
        if hdr[:3] != b"CL\x01":
            raise ProtocolViolation(f"{self.label}: bad server header {hdr!r}")
        n = struct.unpack(">I", hdr[4:])[0]
        if n > MAX_SERVER_PAYLOAD:
            raise ProtocolViolation(f"{self.label}: server payload of {n} bytes")
        try:
            payload = await asyncio.wait_for(self.r.readexactly(n), timeout)
        except asyncio.IncompleteReadError as e:
            raise Closed(8 + len(e.partial))
        except ConnectionError:
            raise Closed(8, "reset")
        return hdr[3], payload

    async def until_closed(self, timeout=10.0):
        """Frames until the close (bounded overall)."""
        frames = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError()
                frames.append(await self.recv(left))
            except Closed:
                return frames
            except asyncio.TimeoutError:
                # Say what did arrive: no frame at all points at the server (or a starved
                # driver), a steady stream at output that never ends.
                ops = {}
                for op, _ in frames:
                    ops[f"{op:#x}"] = ops.get(f"{op:#x}", 0) + 1
                raise asyncio.TimeoutError(
                    f"{self.label}: not closed within {timeout}s; got {len(frames)} frames "
                    f"meanwhile (by opcode: {ops})"
                ) from None

    def close(self):
        try:
            self.w.close()
        except Exception:
            pass

    def reset(self):
        try:
            sock = self.w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except Exception:
            pass
        self.w.transport.abort()


# ------------------------------------------------------------------------------------------
# Shared state
# ------------------------------------------------------------------------------------------

class Ctx:
    def __init__(self, args):
        self.args = args
        self.addr = (args.host, args.port)
        self.failures = []
        self.counts = {}
        self.stop_load = asyncio.Event()
        self.stop_chat = asyncio.Event()
        self.all_joined = asyncio.Event()
        self.senders_done = asyncio.Event()
        self.joined = 0
        self.done_senders = 0
        self.final = {}  # chat nick -> last seq sent
        self.rooms = {}  # chat room -> nicks

    def fail(self, msg):
        if len(self.failures) < 200:
            self.failures.append(msg)
        print(f"FAIL: {msg}", file=sys.stderr, flush=True)

    def count(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n


def text_for(seq, rng, size=None):
    return f"S{seq} " + "x" * (size or rng.randint(50, 500))


def seq_of(text):
    head = text.split(" ", 1)[0]
    if not head.startswith("S"):
        return None
    try:
        return int(head[1:])
    except ValueError:
        return None


class SeqCheck:
    """Per-sender sequence tracking: consecutive from `start` (1, or the first seen)."""

    def __init__(self, ctx, who, from_first_seen):
        self.ctx, self.who, self.from_first_seen = ctx, who, from_first_seen
        self.last = {}
        self.msg_id = 0

    def see(self, msg_id, room, frm, text):
        if msg_id <= self.msg_id:
            self.ctx.fail(f"{self.who}: msg_id {msg_id} after {self.msg_id}")
        self.msg_id = msg_id
        seq = seq_of(text)
        if seq is None:
            return False
        key = (room, frm)
        if key in self.last:
            want = self.last[key] + 1
        else:
            want = seq if self.from_first_seen else 1
        if seq != want:
            self.ctx.fail(f"{self.who}: from {frm} in {room}: seq {seq}, expected {want} "
                          f"({'lost' if seq > want else 'reordered or repeated'})")
        self.last[key] = seq
        return True


# ------------------------------------------------------------------------------------------
# Chatty rooms (the well-behaved clients whose every message is accounted for)
# ------------------------------------------------------------------------------------------

async def chat_member(ctx, room, nick, rng):
    total = ctx.args.rooms * ctx.args.members
    c = await Conn.open(ctx.addr, nick, rcvbuf=4 << 20)
    c.send(HELLO, pstr(nick))
    c.send(JOIN, pstr(room))
    op, p = await c.recv()
    if op != S_WELCOME or welcome(p)["nick"] != nick:
        ctx.fail(f"{nick}: expected WELCOME, got {op:#x}")
        return
    op, p = await c.recv()
    if op != S_PRESENCE or presence(p) != (P_JOIN, room, nick):
        ctx.fail(f"{nick}: expected own PRESENCE join, got {op:#x}")
        return
    ctx.joined += 1
    if ctx.joined == total:
        ctx.all_joined.set()
    await ctx.all_joined.wait()

    check = SeqCheck(ctx, nick, from_first_seen=False)
    own_echo = asyncio.Event()
    sent = 0
    final_pong = asyncio.Event()

    async def reader():
        while True:
            try:
                op, p = await c.recv(timeout=60)
            except Closed as e:
                ctx.fail(f"{nick}: closed by the server: {e}")
                return
            except asyncio.TimeoutError:
                ctx.fail(f"{nick}: nothing received for 60 s")
                return
            if op == S_MESSAGE:
                msg_id, rm, frm, text = message(p)
                if rm == room and frm.startswith("chat"):
                    check.see(msg_id, rm, frm, text)
                    if frm != nick:
                        ctx.count("chat_deliveries_verified")
                    elif ctx.stop_chat.is_set() and check.last.get((room, nick)) == ctx.final.get(nick):
                        own_echo.set()
                else:
                    check.msg_id = max(check.msg_id, msg_id)
            elif op == S_PING:
                c.send(PONG, p)
            elif op == S_PONG:
                if p == b"final":
                    final_pong.set()
                    return
            elif op == S_ERROR:
                ctx.fail(f"{nick}: ERROR {error(p)}")
            elif op in (S_PRESENCE, S_ROSTER, S_WHISPER):
                pass
            else:
                ctx.fail(f"{nick}: unexpected opcode {op:#x}")

    rtask = asyncio.create_task(reader())
    # The first member of chat0 is a firehose (8 KB SAYs by default), so that the slow
    # consumers, which join chat0, fall behind by more than max-pending within seconds.
    firehose = nick == "chat0m0"
    interval = 1.0 / (ctx.args.firehose if firehose else ctx.args.rate)
    while not ctx.stop_chat.is_set() and not rtask.done():
        sent += 1
        c.send(SAY, pstr(room) + text_for(sent, rng, ctx.args.firehose_size if firehose else None).encode())
        try:
            await c.flush()
        except Closed as e:
            ctx.fail(f"{nick}: {e}")
            break
        await asyncio.sleep(interval * rng.uniform(0.5, 1.5))  # the chat's pace
    ctx.final[nick] = sent
    ctx.count("chat_sent", sent)
    if check.last.get((room, nick)) == sent:
        own_echo.set()
    try:
        await asyncio.wait_for(own_echo.wait(), 20)
    except asyncio.TimeoutError:
        ctx.fail(f"{nick}: own last MESSAGE S{sent} never echoed "
                 f"(last seen {check.last.get((room, nick))})")
    ctx.done_senders += 1
    if ctx.done_senders == total:
        ctx.senders_done.set()
    await ctx.senders_done.wait()
    # Every SAY of every member has been handled: what was queued for us arrives before this PONG.
    c.send(PING, b"final")
    try:
        await asyncio.wait_for(final_pong.wait(), 20)
    except asyncio.TimeoutError:
        ctx.fail(f"{nick}: no final PONG")
    for other in ctx.rooms[room]:
        if other != nick and check.last.get((room, other), 0) != ctx.final.get(other):
            ctx.fail(f"{nick}: from {other}: got up to S{check.last.get((room, other), 0)}, "
                     f"{other} sent S{ctx.final.get(other)}")
    rtask.cancel()
    c.send(QUIT, b"soak over")
    try:
        await c.until_closed(20)
    except asyncio.TimeoutError as e:
        ctx.fail(str(e))
    c.close()


# ------------------------------------------------------------------------------------------
# Connection churn
# ------------------------------------------------------------------------------------------

async def await_own_echo(c, nick, room, text, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError(f"{nick}: own MESSAGE never came back")
        op, p = await c.recv(left)
        if op == S_MESSAGE:
            _, rm, frm, t = message(p)
            if (rm, frm, t) == (room, nick, text):
                return
        elif op == S_PING:
            c.send(PONG, p)
        elif op == S_ERROR:
            raise ProtocolViolation(f"{nick}: ERROR {error(p)}")


async def silent_conn(ctx):
    """Connects and says nothing: hello_timeout (fatal), then the close."""
    c = await Conn.open(ctx.addr, "silent")
    try:
        frames = await c.until_closed(ctx.args.hello_timeout + 10)
        codes = [error(p)[0] for op, p in frames if op == S_ERROR]
        if codes not in ([17], []):
            ctx.fail(f"silent connection got {codes}")
        ctx.count("churn_hello_timeout" if codes == [17] else "churn_hello_timeout_noerror")
    finally:
        c.close()


async def churner(ctx, k, rng):
    rooms = [f"chat{r}" for r in range(ctx.args.rooms)] + ["churnA", "churnB"]
    cycle = 0
    spawned = []
    while not ctx.stop_load.is_set():
        cycle += 1
        kind = rng.choices(["quit", "fin", "rst", "who", "nohello", "silent"],
                           [30, 25, 25, 8, 10, 0.5])[0]
        try:
            if kind == "silent":
                spawned.append(asyncio.create_task(silent_conn(ctx)))
                continue
            c = await Conn.open(ctx.addr, f"churn{k}")
            if kind == "nohello":
                c.close() if rng.random() < 0.5 else c.reset()
                ctx.count("churn_nohello")
                continue
            nick = f"ch{k}n{cycle}"
            room = rng.choice(rooms)
            c.send(HELLO, pstr(nick))
            op, p = await c.recv()
            if op != S_WELCOME or welcome(p)["nick"] != nick:
                ctx.fail(f"{nick}: expected WELCOME, got {op:#x} {p[:40]!r}")
                c.reset()
                continue
            if kind == "who":
                c.send(WHO, pstr(room))
                while True:
                    op, p = await c.recv()
                    if op == S_ROSTER:
                        if roster(p)[1] == 0:
                            break
                    elif op != S_PING:
                        ctx.fail(f"{nick}: expected ROSTER, got {op:#x}")
                        break
                c.reset() if rng.random() < 0.5 else c.close()
                ctx.count("churn_who")
                continue
            c.send(JOIN, pstr(room))
            text = f"churn {cycle}"
            c.send(SAY, pstr(room) + text.encode())
            await await_own_echo(c, nick, room, text)
            ctx.count("churn_says")
            if kind == "quit":
                c.send(QUIT, b"bye")
                await c.until_closed(20)
                c.close()
            elif kind == "fin":
                c.close()
            else:
                c.reset()
            ctx.count(f"churn_{kind}")
        except (Closed, ProtocolViolation, asyncio.TimeoutError, OSError) as e:
            ctx.fail(f"churner {k} ({kind}): {e!r}")
        await asyncio.sleep(rng.uniform(0, ctx.args.churn_pause))  # the churn's pace
    for t in spawned:
        try:
            await asyncio.wait_for(t, ctx.args.hello_timeout + 15)
        except Exception as e:
            ctx.fail(f"silent connection: {e!r}")


# ------------------------------------------------------------------------------------------
# Slow consumers
# ------------------------------------------------------------------------------------------

async def slow_consumer(ctx, k, rng):
    gen = 0
    while not ctx.stop_load.is_set():
        gen += 1
        nick = f"slow{k}g{gen}"
        room = "chat0"  # the room with the firehose
        check = SeqCheck(ctx, nick, from_first_seen=True)
        c = await Conn.open(ctx.addr, nick, rcvbuf=4096)
        outcome = None
        try:
            c.send(HELLO, pstr(nick))
            c.send(JOIN, pstr(room))
            op, p = await c.recv()
            if op != S_WELCOME:
                ctx.fail(f"{nick}: expected WELCOME, got {op:#x}")
                continue

            async def read_for(secs):
                end = time.monotonic() + secs
                while (left := end - time.monotonic()) > 0:
                    try:
                        op, p = await c.recv(left)
                    except asyncio.TimeoutError:
                        return
                    if op == S_MESSAGE:
                        msg_id, rm, frm, text = message(p)
                        if frm.startswith("chat"):
                            check.see(msg_id, rm, frm, text)
                        else:
                            check.msg_id = max(check.msg_id, msg_id)
                    elif op == S_PING:
                        c.send(PONG, p)
                    elif op == S_ERROR:
                        code = error(p)[0]
                        if code != 15:
                            ctx.fail(f"{nick}: ERROR {error(p)}")
                        ctx.count("slow_error_frame_seen")

            await read_for(rng.uniform(1, 3))
            c.send(PING, b"pausing")  # activity, so the pause is not an idle timeout
            await c.flush()
            await asyncio.sleep(rng.uniform(1, 15))  # not reading: that is the point
            try:
                # Catch up: everything queued before this PING arrives before its PONG.
                c.send(PING, b"caught up?")
                await c.flush()
                while True:
                    op, p = await c.recv(30)
                    if op == S_PONG and p == b"caught up?":
                        break
                    if op == S_MESSAGE:
                        msg_id, rm, frm, text = message(p)
                        if frm.startswith("chat"):
                            check.see(msg_id, rm, frm, text)
                        else:
                            check.msg_id = max(check.msg_id, msg_id)
                    elif op == S_PING:
                        c.send(PONG, p)
                    elif op == S_ERROR and error(p)[0] != 15:
                        ctx.fail(f"{nick}: ERROR {error(p)}")
                outcome = "caught_up"
            except Closed:
                outcome = "cut"
            if outcome == "caught_up":
                c.send(QUIT, b"caught up")
                await c.until_closed(20)
            ctx.count(f"slow_{outcome}")
        except ProtocolViolation as e:
            ctx.fail(f"{nick}: {e}")
        except (Closed, asyncio.TimeoutError, OSError) as e:
            ctx.fail(f"{nick}: {e!r} (outcome {outcome})")
        finally:
            c.close()


# ------------------------------------------------------------------------------------------
# Garbage senders
# ------------------------------------------------------------------------------------------

def garbage_cases(rng):
    rnd = lambda n: bytes(rng.randrange(256) for _ in range(n))
    bad_first = bytes([rng.choice([b for b in range(256) if b != 0x43])])
    return {
        "bad_magic": (bad_first + rnd(rng.randint(0, 2000)), 1),
        "bad_magic2": (b"C" + bytes([rng.choice([b for b in range(256) if b != 0x4C])]) + rnd(50), 1),
        "bad_version": (b"CL" + bytes([rng.choice([0, 2, 3, 0xFF])]) + rnd(30), 2),
        "too_large": (b"CL\x01" + bytes([rng.randrange(256)]) + struct.pack(">I", rng.randint(65537, 1 << 31)) + rnd(100), 3),
        "unknown_op": (frame(rng.choice([0, 0x0A, 0x42, 0x81, 0x8F, 0xFF]), rnd(rng.randint(0, 300))), 4),
        "bad_payload": (frame(HELLO, b"\x00\x20ab"), 5),
        "hello_required": (frame(JOIN, pstr("chat0")), 6),
        "bad_nick": (frame(HELLO, pstr("has space")), 8),
    }


async def garbage(ctx, k, rng):
    n = 0
    while not ctx.stop_load.is_set():
        n += 1
        kind = rng.choice(["bad_magic", "bad_magic2", "bad_version", "too_large", "unknown_op",
                           "bad_payload", "hello_required", "bad_nick", "half_rst",
                           "after_join", "bad_utf8"])
        try:
            c = await Conn.open(ctx.addr, f"garbage{k}")
        except OSError as e:
            ctx.fail(f"garbage {k}: connect: {e!r}")
            continue
        try:
            if kind == "half_rst":
                c.send_raw(frame(SAY, pstr("chat0") + b"never finished")[:rng.randint(1, 20)])
                await c.flush()
                c.reset()
            elif kind in ("after_join", "bad_utf8"):
                nick = f"gb{k}n{n}"
                room = f"chat{rng.randrange(ctx.args.rooms)}"
                c.send(HELLO, pstr(nick))
                c.send(JOIN, pstr(room))
                if kind == "bad_utf8":
                    c.send(SAY, pstr(room) + b"\xff\xfe bad")
                    want, fatal = 5, False
                else:
                    c.send_raw(b"\x00garbage" * rng.randint(1, 20))
                    want, fatal = 1, True
                await c.flush()
                await expect_error(ctx, c, f"{kind}", want, fatal, skip_chat=True)
            else:
                data, want = garbage_cases(rng)[kind]
                c.send_raw(data)
                await c.flush()
                await expect_error(ctx, c, kind, want, want in (1, 2, 3), skip_chat=False)
            ctx.count(f"garbage_{kind}")
        except (Closed, asyncio.TimeoutError, OSError) as e:
            ctx.fail(f"garbage {kind}: {e!r}")
        except ProtocolViolation as e:
            ctx.fail(f"garbage {kind}: {e}")
        finally:
            c.close()
        await asyncio.sleep(rng.uniform(0, ctx.args.garbage_pause))  # the garbage's pace


async def expect_error(ctx, c, kind, want, fatal, skip_chat):
    """Reads until the ERROR `want` (fatal: then the close; otherwise a PING round trip)."""
    deadline = time.monotonic() + 15
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError(f"{kind}: no ERROR {want}")
        try:
            op, p = await c.recv(left)
        except Closed:
            if fatal:
                ctx.count("garbage_closed_without_error")  # allowed: a reset may beat the ERROR
                return
            raise
        if op == S_ERROR:
            code, is_fatal, _ = error(p)
            if code != want or bool(is_fatal) != fatal:
                ctx.fail(f"garbage {kind}: ERROR {code} fatal={is_fatal}, expected {want}")
                return
            break
        if op == S_PING:
            c.send(PONG, p)
        elif skip_chat and op in (S_WELCOME, S_PRESENCE, S_MESSAGE):
            continue
        else:
            ctx.fail(f"garbage {kind}: unexpected opcode {op:#x} before ERROR {want}")
            return
    if fatal:
        frames = await c.until_closed(15)
        if frames:
            ctx.fail(f"garbage {kind}: frames after a fatal ERROR: {[f[0] for f in frames]}")
    else:
        c.send(PING, b"still there")
        while True:
            op, p = await c.recv()
            if op == S_PONG and p == b"still there":
                break


# ------------------------------------------------------------------------------------------
# Resume storms
# ------------------------------------------------------------------------------------------

class Session:
    def __init__(self, nick):
        self.nick, self.conn, self.token, self.seq = nick, None, None, 0


async def resume_watcher(ctx, watcher, nicks, ready):
    """In room "resume": sees every session's MESSAGEs in order and no PRESENCE."""
    check = SeqCheck(ctx, "reswatch", from_first_seen=False)
    joined = set()
    while True:
        try:
            op, p = await watcher.recv(timeout=120)
        except (Closed, asyncio.TimeoutError) as e:
            ctx.fail(f"reswatch: {e!r}")
            return check
        if op == S_PRESENCE:
            kind, room, nick = presence(p)
            if not ready.is_set() and kind == P_JOIN:
                joined.add(nick)
                if joined >= set(nicks):
                    ready.set()
            elif not ctx.stop_chat.is_set():
                ctx.fail(f"reswatch: PRESENCE {kind} for {nick} during the storms")
        elif op == S_MESSAGE:
            msg_id, rm, frm, text = message(p)
            if rm == "resume":
                check.see(msg_id, rm, frm, text)
        elif op == S_PING:
            watcher.send(PONG, p)
        elif op == S_PONG:
            if p == b"final":
                return check
        elif op == S_ERROR:
            ctx.fail(f"reswatch: ERROR {error(p)}")


async def take_over(ctx, s):
    old = s.conn
    new = await Conn.open(ctx.addr, s.nick)
    new.send(HELLO, pstr(s.nick) + s.token)
    op, p = await new.recv()
    if op != S_WELCOME:
        raise ProtocolViolation(f"{s.nick}: resume got {op:#x} {p[:60]!r}")
    w = welcome(p)
    if w["nick"] != s.nick or w["token"] == s.token:
        raise ProtocolViolation(f"{s.nick}: resume WELCOME {w}")
    frames = await old.until_closed(15)
    errs = [error(p)[0] for op, p in frames if op == S_ERROR]
    if errs != [18]:
        if errs:
            ctx.fail(f"{s.nick}: old connection got ERRORs {errs}, expected [18]")
        else:
            ctx.count("resume_closed_without_error")
    old.close()
    s.conn, s.token = new, w["token"]
    new.send(JOIN, pstr("resume"))
    op, p = await new.recv()
    while op in (S_PING, S_MESSAGE):  # other sessions talk in "resume" meanwhile
        if op == S_PING:
            new.send(PONG, p)
        op, p = await new.recv()
    if op != S_ERROR or error(p)[0] != 12:
        raise ProtocolViolation(f"{s.nick}: re-JOIN after resume got {op:#x} {p[:60]!r}, "
                                "expected already_in_room")
    s.seq += 1
    text = f"S{s.seq} after takeover"
    new.send(SAY, pstr("resume") + text.encode())
    await await_own_echo(new, s.nick, "resume", text)
    ctx.count("resume_takeovers")


async def resume_storms(ctx, rng):
    n = ctx.args.resume_sessions
    nicks = [f"res{i}" for i in range(n)]
    watcher = await Conn.open(ctx.addr, "reswatch", rcvbuf=1 << 20)
    watcher.send(HELLO, pstr("reswatch"))
    watcher.send(JOIN, pstr("resume"))
    op, p = await watcher.recv()
    op, p = await watcher.recv()  # own join
    ready = asyncio.Event()
    wtask = asyncio.create_task(resume_watcher(ctx, watcher, nicks, ready))
    sessions = [Session(nk) for nk in nicks]
    for s in sessions:
        s.conn = await Conn.open(ctx.addr, s.nick)
        s.conn.send(HELLO, pstr(s.nick))
        s.conn.send(JOIN, pstr("resume"))
        op, p = await s.conn.recv()
        s.token = welcome(p)["token"]
        op, p = await s.conn.recv()
    await asyncio.wait_for(ready.wait(), 20)
    storms = 0
    while not ctx.stop_load.is_set():
        storms += 1
        rounds = rng.randint(1, 3)
        for _ in range(rounds):
            res = await asyncio.gather(*(take_over(ctx, s) for s in sessions),
                                       return_exceptions=True)
            for s, r in zip(sessions, res):
                if isinstance(r, BaseException):
                    ctx.fail(f"{s.nick}: takeover: {r!r}")
        ctx.count("resume_storms")
        try:
            await asyncio.wait_for(ctx.stop_load.wait(), rng.uniform(2, 5))
        except asyncio.TimeoutError:
            pass
    # Quiet down: every session's last SAY is handled; the watcher then checks the final seqs.
    watcher.send(PING, b"final")
    check = await asyncio.wait_for(wtask, 30)
    for s in sessions:
        got = check.last.get(("resume", s.nick), 0)
        if got != s.seq:
            ctx.fail(f"reswatch: {s.nick} said up to S{s.seq}, watcher got S{got}")
    for c in [s.conn for s in sessions] + [watcher]:
        c.send(QUIT, b"")
        try:
            await c.until_closed(20)
        except asyncio.TimeoutError as e:
            ctx.fail(str(e))
        c.close()


# ------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------

GAUGES = ["connections", "sessions", "rooms", "buffers_in_use",
          "queued_output_bytes"]
COUNTERS = ["connections_accepted_total", "messages_total", "deliveries_total",
            "resumes_total", "pings_sent_total"]
CLOSES = ["quit", "eof", "reset", "broken_pipe", "idle_timeout", "hello_timeout",
          "slow_consumer", "session_taken_over"]


async def scrape(ctx):
    r, w = await asyncio.wait_for(
        asyncio.open_connection(ctx.args.metrics_host, ctx.args.metrics_port), 5)
    try:
        w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = await asyncio.wait_for(r.read(), 5)
    finally:
        w.close()
    text = body.decode()
    head, _, body = text.partition("\r\n\r\n")
    if not head.startswith("HTTP/1.1 200"):
        raise RuntimeError(f"metrics: {head.splitlines()[:1]}")
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def proc_sample(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def row_from(m, t, phase, rss, fds):
    row = {"t": round(t, 1), "phase": phase, "rss_kb": rss, "fds": fds}
    for g in GAUGES + COUNTERS:
        row[g] = int(m.get(f"chatloop_{g}", 0))
    for c in CLOSES:
        row[f"closed_{c}"] = int(m.get(f'chatloop_connections_closed_total{{reason="{c}"}}', 0))
    row["closed_protocol_error"] = int(sum(v for k, v in m.items()
                                           if 'reason="protocol_error"' in k))
    return row


async def sampler(ctx, samples, t0, phase, server_gone):
    path = os.path.join(ctx.args.out, "samples.csv")
    with open(path, "w", newline="") as f:
        wr = None
        while True:
            t = time.monotonic() - t0
            try:
                rss, fds = proc_sample(ctx.args.pid)
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                ctx.fail(f"the server (pid {ctx.args.pid}) exited at t={t:.1f}s")
                server_gone.set()
                return
            try:
                m = await scrape(ctx)
            except Exception as e:
                ctx.fail(f"scrape failed at t={t:.1f}s: {e!r}")
                m = {}
            row = row_from(m, t, phase[0], rss, fds)
            samples.append(row)
            if wr is None:
                wr = csv.DictWriter(f, fieldnames=list(row))
                wr.writeheader()
            wr.writerow(row)
            f.flush()
            await asyncio.sleep(1)  # one sample per second


def growth_check(ctx, samples, warmup):
    """Fails if RSS or fds grow without bound: after warm-up, the max of the last third of the
    load phase may not exceed the max of the first third by more than the tolerance."""
    load = [s for s in samples if s["phase"] == "load" and s["t"] >= warmup]
    if len(load) < 9:
        ctx.fail(f"only {len(load)} samples after warm-up: run longer")
        return {}
    third = len(load) // 3
    first, last = load[:third], load[-third:]
    res = {}
    for key, rel, abs_ in (("rss_kb", 0.10, 2 * 1024), ("fds", 0.25, 64)):
        a = max(s[key] for s in first)
        b = max(s[key] for s in last)
        limit = a * (1 + rel) + abs_
        res[key] = {"first_third_max": a, "last_third_max": b, "limit": int(limit)}
        if b > limit:
            ctx.fail(f"{key} grows: last third max {b} > first third max {a} "
                     f"+ {int(rel * 100)}% + {abs_}")
    return res


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------

async def main(args):
    rng = random.Random(args.seed)
    ctx = Ctx(args)
    samples, phase = [], ["load"]
    server_gone = asyncio.Event()
    t0 = time.monotonic()
    sample_task = asyncio.create_task(sampler(ctx, samples, t0, phase, server_gone))

    members = []
    for r in range(args.rooms):
        room = f"chat{r}"
        ctx.rooms[room] = [f"chat{r}m{i}" for i in range(args.members)]
        for nick in ctx.rooms[room]:
            members.append(asyncio.create_task(
                chat_member(ctx, room, nick, random.Random(rng.random()))))
    await asyncio.wait_for(ctx.all_joined.wait(), 30)
    load = [asyncio.create_task(churner(ctx, k, random.Random(rng.random())))
            for k in range(args.churners)]
    load += [asyncio.create_task(slow_consumer(ctx, k, random.Random(rng.random())))
             for k in range(args.slow)]
    load += [asyncio.create_task(garbage(ctx, k, random.Random(rng.random())))
             for k in range(args.garbage)]
    storm = asyncio.create_task(resume_storms(ctx, random.Random(rng.random())))

    # The load phase: until the duration is up or the server dies.
    try:
        await asyncio.wait_for(server_gone.wait(), args.duration)
    except asyncio.TimeoutError:
        pass
    load_end = time.monotonic() - t0
    phase[0] = "stop"
    ctx.stop_load.set()
    stopped = True
    if not server_gone.is_set():
        done, pending = await asyncio.wait(load, timeout=60)
        for t in pending:
            ctx.fail(f"load task still running 60 s after the stop: {t.get_coro().__name__}")
            t.cancel()
        for t in done:
            if t.exception():
                ctx.fail(f"load task {t.get_coro().__name__} failed: {t.exception()!r}")
        ctx.stop_chat.set()
        done, pending = await asyncio.wait(members + [storm], timeout=90)
        for t in pending:
            ctx.fail(f"chat task still running 90 s after the stop: {t.get_coro().__name__}")
            t.cancel()
        for t in done:
            if t.exception():
                ctx.fail(f"task {t.get_coro().__name__} failed: {t.exception()!r}")
    else:
        stopped = False

    final = None
    if stopped and not server_gone.is_set():
        # Everyone has left: the state must return to empty.
        deadline = time.monotonic() + 20
        while True:
            m = await scrape(ctx)
            final = row_from(m, time.monotonic() - t0, "end", *proc_sample(args.pid))
            if all(final[g] == 0 for g in ("connections", "sessions", "rooms",
                                            "buffers_in_use", "queued_output_bytes")):
                break
            if time.monotonic() > deadline:
                ctx.fail("state not empty 20 s after every client left: " +
                         " ".join(f"{g}={final[g]}" for g in GAUGES))
                break
            await asyncio.sleep(0.2)  # scrape pace
    sample_task.cancel()
    try:
        await sample_task
    except (asyncio.CancelledError, Exception):
        pass

    warmup = max(10.0, 0.1 * args.duration)
    growth = growth_check(ctx, samples, warmup) if stopped else {}
    load_samples = [s for s in samples if s["phase"] == "load"]
    summary = {
        "duration_s": args.duration,
        "load_phase_s": round(load_end, 1),
        "samples": len(samples),
        "rss_kb": {"min": min(s["rss_kb"] for s in load_samples),
                   "max": max(s["rss_kb"] for s in load_samples)} if load_samples else None,
        "fds": {"min": min(s["fds"] for s in load_samples),
                "max": max(s["fds"] for s in load_samples)} if load_samples else None,
        "connections_max": max((s["connections"] for s in load_samples), default=0),
        "growth": growth,
        "driver": dict(sorted(ctx.counts.items())),
        "server_final": final,
        "failures": ctx.failures,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 1 if ctx.failures else 0


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--addr", required=True, help="chat server HOST:PORT")
    ap.add_argument("--metrics", required=True, help="metrics HOST:PORT")
    ap.add_argument("--pid", type=int, required=True, help="server pid (for /proc sampling)")
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--out", required=True, help="directory for samples.csv and summary.json")
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--rooms", type=int, default=4)
    ap.add_argument("--members", type=int, default=6)
    ap.add_argument("--rate", type=float, default=10, help="SAYs per second per member")
    ap.add_argument("--firehose", type=float, default=100,
                    help="SAYs per second of the firehose member of chat0")
    ap.add_argument("--firehose-size", type=int, default=8000, help="bytes per firehose SAY")
    ap.add_argument("--churners", type=int, default=8)
    ap.add_argument("--churn-pause", type=float, default=0.05)
    ap.add_argument("--slow", type=int, default=4)
    ap.add_argument("--garbage", type=int, default=3)
    ap.add_argument("--garbage-pause", type=float, default=0.1)
    ap.add_argument("--resume-sessions", type=int, default=6)
    ap.add_argument("--hello-timeout", type=float, default=5)
    a = ap.parse_args()
    a.host, _, port = a.addr.rpartition(":")
    a.port = int(port)
    a.metrics_host, _, mport = a.metrics.rpartition(":")
    a.metrics_port = int(mport)
    return a


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
