"""One struct.Struct per NBD message layout (all big-endian), with the spec section each follows."""

from __future__ import annotations

import struct

# "Newstyle negotiation": NBDMAGIC, IHAVEOPT, u16 handshake flags.
GREETING = struct.Struct(">QQH")
# Client flags after the greeting.
CLIENT_FLAGS = struct.Struct(">I")
# "Option haggling": IHAVEOPT, u32 option, u32 length (data follows).
OPTION = struct.Struct(">QII")
# Option reply: magic, u32 option, u32 reply type, u32 length (data follows).
OPTION_REPLY = struct.Struct(">QIII")
# NBD_OPT_EXPORT_NAME success: u64 size, u16 transmission flags.
EXPORT_NAME_REPLY = struct.Struct(">QH")
# NBD_INFO_EXPORT: u16 type, u64 size, u16 flags.
INFO_EXPORT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE: u16 type, u32 minimum, u32 preferred, u32 maximum payload.
INFO_BLOCK_SIZE = struct.Struct(">HIII")
# u16 info type, as the head of NBD_INFO_NAME and NBD_INFO_DESCRIPTION.
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
# Transmission request: magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length.
REQUEST = struct.Struct(">IHHQQI")
# Simple reply: magic, u32 error, u64 cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
# Structured reply chunk: magic, u16 flags, u16 type, u64 cookie, u32 length.
CHUNK = struct.Struct(">IHHQI")
# NBD_REPLY_TYPE_OFFSET_DATA: chunk header followed by u64 offset (data follows).
CHUNK_OFFSET_DATA = struct.Struct(">IHHQIQ")
# NBD_REPLY_TYPE_OFFSET_HOLE: chunk header, u64 offset, u32 hole size.
CHUNK_OFFSET_HOLE = struct.Struct(">IHHQIQI")
# NBD_REPLY_TYPE_ERROR: chunk header, u32 error, u16 message length (message follows).
CHUNK_ERROR = struct.Struct(">IHHQIIH")
# NBD_REPLY_TYPE_BLOCK_STATUS: chunk header, u32 context id (descriptors follow).
CHUNK_BLOCK_STATUS = struct.Struct(">IHHQII")
# One block status descriptor: u32 length, u32 status flags.
EXTENT = struct.Struct(">II")
