#!/usr/bin/env python3
"""The AWS event-stream binary framing (application/vnd.amazon.eventstream),
for mock Bedrock providers in tests.

    encode(headers, payload) -> bytes   one message, string headers
    decode(data) -> [(headers, payload)] whole messages, CRCs checked

Layout: total length (u32 BE), headers length (u32 BE), CRC-32 of those 8
bytes, headers (name length u8, name, type u8, value), payload, CRC-32 of
everything before it. zlib.crc32 is the CRC the format uses.

`python3 eventstream.py` runs a self-test.
"""

import struct
import zlib

_STRING = 7
_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


def encode(headers, payload=b""):
    """One message; header values are strings (type 7), as Bedrock sends."""
    if isinstance(payload, str):
        payload = payload.encode()
    h = b""
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        h += struct.pack(">B", len(n)) + n + struct.pack(">BH", _STRING, len(v)) + v
    prelude = struct.pack(">II", 16 + len(h) + len(payload), len(h))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + h + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(event_type, payload):
    """A Bedrock stream event: JSON payload with the usual headers."""
    return encode(
        {
            ":event-type": event_type,
            ":content-type": "application/json",
            ":message-type": "event",
        },
        payload,
    )


def exception(exception_type, message):
    """A Bedrock stream exception frame (e.g. "throttlingException")."""
    import json

    return encode(
        {
            ":exception-type": exception_type,
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        json.dumps({"message": message}),
    )


def _headers(data):
    out, i = {}, 0
    while i < len(data):
        (n,) = struct.unpack_from(">B", data, i)
        name = data[i + 1 : i + 1 + n].decode()
        i += 1 + n
        kind = data[i]
        i += 1
        if kind in (6, _STRING):
            (length,) = struct.unpack_from(">H", data, i)
            raw = data[i + 2 : i + 2 + length]
            out[name] = raw.decode() if kind == _STRING else raw
            i += 2 + length
        elif kind in _FIXED:
            size = _FIXED[kind]
            raw = data[i : i + size]
            out[name] = {0: True, 1: False}.get(kind, raw)
            i += size
        else:
            raise ValueError(f"unknown header type {kind}")
    return out


def decode(data):
    """Every whole message in data, as (headers, payload); raises on a bad CRC."""
    messages, i = [], 0
    while len(data) - i >= 12:
        total, hlen, pcrc = struct.unpack_from(">III", data, i)
        if zlib.crc32(data[i : i + 8]) != pcrc:
            raise ValueError("prelude CRC mismatch")
        if len(data) - i < total:
            break
        body, (crc,) = data[i : i + total - 4], struct.unpack_from(">I", data, i + total - 4)
        if zlib.crc32(body) != crc:
            raise ValueError("message CRC mismatch")
        messages.append((_headers(body[12 : 12 + hlen]), body[12 + hlen :]))
        i += total
    return messages


if __name__ == "__main__":
    assert encode({}, b"").hex() == "000000100000000005c248eb7d98c8ff"
    frames = event("contentBlockDelta", '{"contentBlockIndex":0,"delta":{"text":"hé"}}')
    frames += exception("throttlingException", "Too many requests")
    got = decode(frames)
    assert got[0][0][":event-type"] == "contentBlockDelta"
    assert got[0][1] == '{"contentBlockIndex":0,"delta":{"text":"hé"}}'.encode()
    assert got[1][0][":exception-type"] == "throttlingException"
    try:
        decode(frames[:-1] + bytes([frames[-1] ^ 1]))
        raise AssertionError("corruption not detected")
    except ValueError:
        pass
    print("eventstream.py: ok")
