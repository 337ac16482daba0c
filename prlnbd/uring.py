"""Reads and writes through Linux io_uring, driven from the event loop: no thread per request.

The binding is a few raw system calls through ctypes (io_uring_setup 425,
io_uring_enter 426, io_uring_register 427) and the rings mapped with mmap,
laid out as struct io_uring_params says. liburing is not used: its SQE and CQE
helpers are inline functions of its headers, which ctypes cannot call.

The loop queues read and write SQEs, hands them to the kernel once per turn
(one io_uring_enter for everything queued in that turn) and learns of completions
through an eventfd registered with the ring, which it watches with
add_reader(); it reaps the completion queue itself.

Memory ordering: the rings are shared with the kernel without locks. On x86-64
(TSO) stores are seen in program order and loads are not reordered with older
loads, so writing the SQEs before the SQ tail, and reading the CQ tail before
the CQEs, is enough; other architectures would need barriers Python cannot
express, so the ring refuses to start there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

# Syscall numbers and constants of <linux/io_uring.h> (x86-64).
_SYS_SETUP = 425
_SYS_ENTER = 426
_SYS_REGISTER = 427
_SETUP_CLAMP = 1 << 4
_FEAT_SINGLE_MMAP = 1 << 0
_OFF_SQ_RING = 0
_OFF_CQ_RING = 0x8000000
_OFF_SQES = 0x10000000
_ENTER_GETEVENTS = 1 << 0
_SQ_CQ_OVERFLOW = 1 << 1
_REGISTER_EVENTFD = 4
_OP_READ = 22
_OP_WRITE = 23

# struct io_uring_params: 10 u32 (the last three reserved), then io_sqring_offsets and
# io_cqring_offsets, 8 u32 and a u64 each.
_PARAMS = struct.Struct("<10I8IQ8IQ")
# struct io_uring_sqe as a plain read or write uses it: opcode, flags, ioprio, fd, off, addr, len,
# rw_flags, user_data, buf_index, personality, splice_fd_in, addr3, pad.
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
# struct io_uring_cqe: user_data, res, flags.
_CQE = struct.Struct("<QiI")
_U32 = struct.Struct("<I")

DEFAULT_ENTRIES = 256
# How long a submission the kernel refused for want of resources (EAGAIN) waits to be retried,
# when nothing in flight will end and retry it sooner.
RETRY_DELAY = 0.001
# While I/O is in flight, the ring is also looked at this often. A completion the kernel puts in
# its overflow list instead of the CQ comes with no eventfd signal (the CQ's tail does not move),
# and every later one follows it there until the list is flushed: without a look, the loop would
# wait for them forever. Seen on Linux 6.18 with buffered writes through the ring and fdatasync
# beside them, the CQ empty and never more than 16 in flight.
CHECK_INTERVAL = 0.05
# One SQE moves at most this much: the kernel's limit for one read or write (MAX_RW_COUNT) is a little
# under 2 GiB; requests are far smaller, this only keeps len within its u32.
_MAX_LEN = 1 << 30

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def why_unavailable(err: OSError) -> str:
    """A reason io_uring_setup failed, for a person: the errno and, when it says, the sysctl."""
    reason = err.strerror or str(err)
    if err.errno in (errno.EPERM, errno.EACCES):
        try:
            with open("/proc/sys/kernel/io_uring_disabled") as f:
                reason += f" (/proc/sys/kernel/io_uring_disabled = {f.read().strip()})"
        except OSError:
            pass
    elif err.errno == errno.ENOSYS:
        reason += " (this kernel has no io_uring)"
    return reason


class Ring:
    """One io_uring instance: queue reads and writes, submit them, reap completions (sans asyncio)."""

    def __init__(self, entries: int = DEFAULT_ENTRIES) -> None:
        machine = platform.machine()
        if machine not in ("x86_64", "AMD64"):
            raise OSError(errno.ENOTSUP, f"the io_uring binding needs x86-64 memory ordering, not {machine}")
        params = bytearray(_PARAMS.size)
        _U32.pack_into(params, 8, _SETUP_CLAMP)
        cparams = (ctypes.c_char * len(params)).from_buffer(params)
        self.fd = _check(_syscall(_SYS_SETUP, ctypes.c_uint(entries), cparams), "io_uring_setup")
        del cparams
        self._maps: list[mmap.mmap] = []
        try:
            self._map(params)
        except BaseException:
            self.close()
            raise

    def _map(self, params: bytearray) -> None:
        p = _PARAMS.unpack(params)
        sq_entries, cq_entries, _flags, _cpu, _idle, features = p[:6]
        sq_head, sq_tail, sq_mask, _sq_n, sq_flags, _dropped, sq_array = p[10:17]
        cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes = p[19:25]
        self.sq_entries: int = sq_entries
        self.cq_entries: int = cq_entries
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        sq_size = sq_array + sq_entries * 4
        cq_size = cqes + cq_entries * _CQE.size
        if features & _FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
        sq = mmap.mmap(self.fd, sq_size, flags, prot, offset=_OFF_SQ_RING)
        self._maps.append(sq)
        if features & _FEAT_SINGLE_MMAP:
            cq = sq
        else:
            cq = mmap.mmap(self.fd, cq_size, flags, prot, offset=_OFF_CQ_RING)
            self._maps.append(cq)
        sqes = mmap.mmap(self.fd, sq_entries * _SQE.size, flags, prot, offset=_OFF_SQES)
        self._maps.append(sqes)
        self._sq = memoryview(sq)
        self._cq = memoryview(cq)
        self._sqes = memoryview(sqes)
        self._sq_head = sq_head
        self._sq_flags = sq_flags
        self._sq_tail = sq_tail
        self._sq_mask = _U32.unpack_from(sq, sq_mask)[0]
        self._cq_head = cq_head
        self._cq_tail = cq_tail
        self._cq_mask = _U32.unpack_from(cq, cq_mask)[0]
        self._cqes = cqes
        # The SQ array maps ring slots to SQEs: slot i always names SQE i.
        for i in range(sq_entries):
            _U32.pack_into(sq, sq_array + 4 * i, i)
        self._tail: int = _U32.unpack_from(sq, sq_tail)[0]  # ours; the kernel sees it once published
        self._unsubmitted = 0

    @property
    def unsubmitted(self) -> int:
        """How many queued SQEs the kernel has not taken yet."""
        return self._unsubmitted

    def space(self) -> int:
        """How many SQEs can be queued now."""
        head: int = _U32.unpack_from(self._sq, self._sq_head)[0]
        return self.sq_entries - ((self._tail - head) & 0xFFFFFFFF)

    def queue_read(self, fd: int, addr: int, length: int, offset: int, user_data: int) -> None:
        """Queue a read of LENGTH bytes at OFFSET of FD into memory at ADDR (call space() first)."""
        self._queue(_OP_READ, fd, addr, length, offset, user_data)

    def queue_write(self, fd: int, addr: int, length: int, offset: int, user_data: int) -> None:
        """Queue a write of LENGTH bytes from memory at ADDR to OFFSET of FD (call space() first)."""
        self._queue(_OP_WRITE, fd, addr, length, offset, user_data)

    def _queue(self, opcode: int, fd: int, addr: int, length: int, offset: int, user_data: int) -> None:
        slot = self._tail & self._sq_mask
        _SQE.pack_into(self._sqes, slot * _SQE.size, opcode, 0, 0, fd, offset, addr, length, 0, user_data,
                       0, 0, 0, 0, 0)
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        # The SQE is written before the tail that publishes it (TSO keeps the order).
        _U32.pack_into(self._sq, self._sq_tail, self._tail)
        self._unsubmitted += 1

    def unqueue(self) -> int:
        """Take back the SQEs queued since the last submission (the kernel has not seen their tail
        move through an io_uring_enter); how many. The newest queued are the ones taken back."""
        n = self._unsubmitted
        self._tail = (self._tail - n) & 0xFFFFFFFF
        _U32.pack_into(self._sq, self._sq_tail, self._tail)
        self._unsubmitted = 0
        return n

    def submit(self, wait: int = 0) -> int:
        """Hand the queued SQEs to the kernel (and wait for WAIT completions); how many it took."""
        if not self._unsubmitted and not wait:
            return 0
        took = self._enter(self._unsubmitted, wait, _ENTER_GETEVENTS if wait else 0)
        self._unsubmitted -= took
        return took

    def _enter(self, to_submit: int, min_complete: int, flags: int) -> int:
        """io_uring_enter, again after EINTR; what it returned, or OSError."""
        while True:
            ret = _syscall(_SYS_ENTER, self.fd, to_submit, min_complete, flags, None, 0)
            if ret >= 0 or ctypes.get_errno() != errno.EINTR:
                break
        return _check(int(ret), "io_uring_enter")

    def reap(self) -> list[tuple[int, int]]:
        """The completions posted so far, as (user_data, result) pairs; they leave the queue."""
        cq = self._cq
        head = _U32.unpack_from(cq, self._cq_head)[0]
        # The tail is read before the entries it covers.
        tail = _U32.unpack_from(cq, self._cq_tail)[0]
        out = []
        mask = self._cq_mask
        base = self._cqes
        unpack = _CQE.unpack_from
        while head != tail:
            user_data, res, _flags = unpack(cq, base + (head & mask) * _CQE.size)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(cq, self._cq_head, head)
        return out

    @property
    def overflowed(self) -> bool:
        """Whether completions wait in the kernel's overflow list, out of the CQ (flush_overflow())."""
        return bool(_U32.unpack_from(self._sq, self._sq_flags)[0] & _SQ_CQ_OVERFLOW)

    def flush_overflow(self) -> None:
        """Have the kernel move the completions of its overflow list into the CQ, as far as they fit."""
        self._enter(0, 0, _ENTER_GETEVENTS)

    def register_eventfd(self, efd: int) -> None:
        """Have the kernel signal EFD whenever it posts a completion."""
        arg = ctypes.c_int32(efd)
        _check(_syscall(_SYS_REGISTER, self.fd, _REGISTER_EVENTFD, ctypes.byref(arg), 1), "io_uring_register")

    def close(self) -> None:
        """Unmap the rings and close the ring's descriptor (nothing may be in flight)."""
        for view in ("_sq", "_cq", "_sqes"):
            v = self.__dict__.pop(view, None)
            if v is not None:
                v.release()
        for m in self._maps:
            m.close()
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


Done = Callable[[BaseException | None], None]
# One read to do in full: (fd, fallback fd, buffer, file offset). A short read goes on from
# the fallback fd: an O_DIRECT read that stops short leaves a rest that may not be aligned.
ReadIO = tuple[int, int, memoryview, int]
# One write to do in full: (fd, the bytes, file offset).
WriteIO = tuple[int, memoryview, int]


class _Op:
    """One read or write in flight: what is left of it, and the request it belongs to."""

    __slots__ = ("anchor", "done", "fallback", "fd", "group", "offset", "view", "write")

    def __init__(self, group: _Group, fd: int, fallback: int, view: memoryview, offset: int, write: bool) -> None:
        self.group = group
        self.fd = fd
        self.fallback = fallback
        self.view = view
        self.offset = offset
        self.write = write
        self.done = 0
        # Holds the buffer exported, so it stays where it is until the completion (the kernel
        # reads from it or writes into it). A write's read-only buffer (bytes) is copied: the
        # kernel only reads it, but ctypes gives addresses of writable buffers alone.
        if write and view.readonly:
            self.anchor = (ctypes.c_char * len(view)).from_buffer_copy(view)
        else:
            self.anchor = (ctypes.c_char * len(view)).from_buffer(view)


class _Group:
    """The reads or writes of one request: its callback runs once, after the last of them ends."""

    __slots__ = ("callback", "error", "left")

    def __init__(self, left: int, callback: Done) -> None:
        self.left = left
        self.callback = callback
        self.error: BaseException | None = None


class UringIO:
    """Reads and writes for the event loop through one Ring: read_all() and write_all() queue,
    completions call back on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, entries: int = DEFAULT_ENTRIES) -> None:
        self._loop = loop
        self.ring = Ring(entries)
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            self.ring.close()
            raise
        try:
            self.ring.register_eventfd(self._efd)
            loop.add_reader(self._efd, self._complete)
        except BaseException:
            os.close(self._efd)
            self.ring.close()
            raise
        # SQEs in flight are at most the SQ's size, so the CQ (twice that) never overflows.
        self._limit = self.ring.sq_entries
        self._ops: dict[int, _Op] = {}
        self._next = 1
        self._waiting: collections.deque[_Op] = collections.deque()  # beyond _limit, in order
        self._submit_pending = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._check_timer: asyncio.TimerHandle | None = None
        self._reaped = False  # a completion was reaped since the last look (_check)
        self.overflows = 0  # times completions were fetched from the kernel's overflow list
        self.read_requests = 0  # read_all() calls
        self.reads = 0  # read SQEs queued, resubmissions of short reads included
        self.write_requests = 0  # write_all() calls
        self.writes = 0  # write SQEs queued, resubmissions of short writes included

    @property
    def capacity(self) -> int:
        """How many reads and writes the ring runs at once; more wait, first come, first served."""
        return self._limit

    @property
    def busy(self) -> int:
        """How many reads and writes are in flight or waiting for room in the ring."""
        return len(self._ops) + len(self._waiting)

    def read_all(self, ios: Sequence[ReadIO], callback: Done) -> None:
        """Fill each buffer of IOS from its file; then CALLBACK(None), or CALLBACK(the first error), on the loop.

        Bytes past the end of a file stay as the buffer had them. The buffers
        must not be resized until the callback runs.
        """
        self._start(ios, False, callback)

    def write_all(self, ios: Sequence[WriteIO], callback: Done) -> None:
        """Write each buffer of IOS to its file; then CALLBACK(None), or CALLBACK(the first error), on the loop.

        The buffers must stay as they are until the callback runs.
        """
        self._start([(fd, fd, view, offset) for fd, view, offset in ios], True, callback)

    def _start(self, ios: Sequence[ReadIO], write: bool, callback: Done) -> None:
        """Queue one request's reads (or writes) as (fd, fallback fd, buffer, offset); CALLBACK after the last."""
        if self._closed:
            raise RuntimeError("the io_uring ring is closed")
        if write:
            self.write_requests += 1
        else:
            self.read_requests += 1
        group = _Group(len(ios), callback)
        if not ios:
            self._loop.call_soon(callback, None)
            return
        for fd, fallback, view, offset in ios:
            self._waiting.append(_Op(group, fd, fallback, view, offset, write))
        self._fill()

    def _fill(self) -> None:
        """Queue waiting reads and writes while the ring has room, and have them submitted at the end of this turn."""
        ring = self.ring
        waiting = self._waiting
        if waiting:
            room = min(ring.space(), self._limit - len(self._ops))
            while waiting and room > 0:
                self._queue(waiting.popleft())
                room -= 1
        if ring.unsubmitted and not self._submit_pending:
            self._submit_pending = True
            self._loop.call_soon(self._submit)
        if self._ops and self._check_timer is None:
            self._check_timer = self._loop.call_later(CHECK_INTERVAL, self._check)

    def _queue(self, op: _Op) -> None:
        key = self._next
        self._next += 1
        self._ops[key] = op
        addr = ctypes.addressof(op.anchor) + op.done
        length = min(len(op.view) - op.done, _MAX_LEN)
        if op.write:
            self.writes += 1
            self.ring.queue_write(op.fd, addr, length, op.offset + op.done, key)
        else:
            self.reads += 1
            self.ring.queue_read(op.fd, addr, length, op.offset + op.done, key)

    def _submit(self) -> None:
        self._submit_pending = False
        try:
            self.ring.submit()
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EBUSY, errno.ENOMEM):
                # The kernel is short of resources for now: completions make room, and with none
                # in flight to bring one, a retry after a moment must.
                if len(self._ops) <= self.ring.unsubmitted:
                    self._submit_pending = True
                    self._loop.call_later(RETRY_DELAY, self._submit)
                return
            # Anything else will not pass on a retry: the reads and writes it refused end with
            # the error (their requests are answered EIO) rather than wait for ever.
            log.error("io_uring: submitting %d reads and writes failed: %s", self.ring.unsubmitted, e)
            newest = self._next
            for key in range(newest - self.ring.unqueue(), newest):
                self._ended(self._ops.pop(key), -(e.errno or errno.EIO))
            self._fill()

    def _complete(self) -> None:
        """The eventfd fired: run the callbacks of the I/O that ended; resubmit what is left of short ones."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        ring = self.ring
        ops = self._ops
        flushed = False
        while True:
            done = ring.reap()
            if not done:
                if flushed or not ring.overflowed:
                    break
                # Completions the kernel put aside (CHECK_INTERVAL): have them moved to the CQ.
                if not self.overflows:
                    log.warning("io_uring: completions came through the kernel's overflow list")
                self.overflows += 1
                ring.flush_overflow()
                flushed = True
                continue
            flushed = False
            self._reaped = True
            for key, res in done:
                op = ops.pop(key)
                self._ended(op, res)
        self._fill()
        if not self.busy and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _check(self) -> None:
        """The periodic look while I/O is in flight: reap what no eventfd signal announced."""
        self._check_timer = None
        if not self._reaped and self._ops:
            self._complete()
        self._reaped = False
        if self._ops and self._check_timer is None and not self._closed:
            self._check_timer = self._loop.call_later(CHECK_INTERVAL, self._check)

    def _ended(self, op: _Op, res: int) -> None:
        if res in (-errno.EINTR, -errno.EAGAIN):
            self._waiting.appendleft(op)
            return
        if res < 0:
            self._finish(op, OSError(-res, os.strerror(-res)))
            return
        if res == 0 and op.write:
            # The kernel took nothing and gave no reason: a write must not be answered as done.
            self._finish(op, OSError(errno.EIO, f"write of {len(op.view) - op.done} bytes at "
                                                f"{op.offset + op.done} wrote nothing"))
            return
        op.done += res
        if res == 0 or op.done >= len(op.view):
            self._finish(op, None)  # whole, or (a read) the file ended: the rest stays as it was
            return
        op.fd = op.fallback
        self._waiting.appendleft(op)

    def _finish(self, op: _Op, error: BaseException | None) -> None:
        group = op.group
        op.anchor = None  # type: ignore[assignment]  # the buffer may be let go now
        if error is not None and group.error is None:
            group.error = error
        group.left -= 1
        if group.left:
            return
        try:
            group.callback(group.error)
        except Exception as e:  # a callback's own failure must not strand the others
            self._loop.call_exception_handler({"message": "io_uring completion callback failed", "exception": e})

    async def idle(self) -> None:
        """Wait until no read or write is in flight."""
        if self.busy:
            fut: asyncio.Future[None] = self._loop.create_future()
            self._idle_waiters.append(fut)
            await fut

    def close(self) -> None:
        """Stop watching the eventfd and close the ring (call when idle)."""
        if self._closed:
            return
        self._closed = True
        if self._check_timer is not None:
            self._check_timer.cancel()
            self._check_timer = None
        self._loop.remove_reader(self._efd)
        os.close(self._efd)
        self.ring.close()
