"""The NBD wire protocol, sans-I/O: bytes in, events out, buffers to send."""
