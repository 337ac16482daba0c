"""NBD protocol constants, named as in the spec (doc/proto.md of NetworkBlockDevice/nbd)."""

from __future__ import annotations

from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Advertised block sizes (NBD_INFO_BLOCK_SIZE): any byte is addressable, 4 KiB
# is efficient, and 32 MiB is the largest READ/WRITE payload (as qemu-nbd).
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * 1024 * 1024

# Largest name or string the spec lets a peer send.
MAX_STRING = 4096


class HandshakeFlag(IntFlag):
    """Server handshake flags."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Client flags sent after the greeting."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    """Handshake options."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


ERR_BIT = 1 << 31


class Reply(IntEnum):
    """Option reply types."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = ERR_BIT + 1
    ERR_POLICY = ERR_BIT + 2
    ERR_INVALID = ERR_BIT + 3
    ERR_PLATFORM = ERR_BIT + 4
    ERR_TLS_REQD = ERR_BIT + 5
    ERR_UNKNOWN = ERR_BIT + 6
    ERR_SHUTDOWN = ERR_BIT + 7
    ERR_BLOCK_SIZE_REQD = ERR_BIT + 8
    ERR_TOO_BIG = ERR_BIT + 9
    ERR_EXT_HEADER_REQD = ERR_BIT + 10


class Info(IntEnum):
    """Information types in INFO/GO replies."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(IntFlag):
    """Transmission flags of an export."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    """Transmission commands."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    """Command flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class Chunk(IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


CHUNK_DONE = 1 << 0


class Errno(IntEnum):
    """Error values on the wire."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# base:allocation status bits.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
# qemu:dirty-bitmap:NAME status bit.
STATE_DIRTY = 1 << 0

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
