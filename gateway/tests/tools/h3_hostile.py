#!/usr/bin/env python3
"""Hostile HTTP/3 input for the gateway's tests (aioquic, from PyPI): opens a
connection, commits one protocol violation with raw stream bytes, and prints
how the server ended it: {"closed": true, "error_code": N, "reason": "..."}
or {"closed": false} if it did not within the timeout. `garbage` sends
datagrams of random bytes to the port instead, then one normal request, and
prints its status.
"""
import argparse
import asyncio
import json
import os
import socket

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated


def varint(v):
    if v < 1 << 6:
        return bytes([v])
    if v < 1 << 14:
        return (v | 0x4000).to_bytes(2, "big")
    return (v | 0x80000000).to_bytes(4, "big")


def frame(ty, payload):
    return varint(ty) + varint(len(payload)) + payload


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.closed = asyncio.get_running_loop().create_future()
        self.status = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated) and not self.closed.done():
            self.closed.set_result(event)
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived) and not self.status.done():
                self.status.set_result(dict(ev.headers).get(b":status", b"0").decode())


# A minimal valid field section: GET https://localhost/healthz.
GET = bytes([0, 0, 0xC0 | 17, 0xC0 | 23, 0x51, 8]) + b"/healthz" + bytes([0x27, 3]) + b":authority" + bytes([9]) + b"localhost"

ABUSES = {
    # DATA before HEADERS on a request stream.
    "data-before-headers": ("bidi", frame(0, b"abc")),
    # A control frame on a request stream.
    "settings-on-request": ("bidi", frame(4, b"")),
    # A field section that needs the dynamic table (Required Insert Count 1).
    "dynamic-qpack": ("bidi", frame(1, bytes([1, 0, 0x80]))),
    # A static index one past the table's 99 entries.
    "static-index-past": ("bidi", frame(1, bytes([0, 0, 0xFF, 99 - 63]))),
    # A second control stream (aioquic opened the first).
    "second-control": ("uni", varint(0) + frame(4, b"")),
    # A push stream, which only a server may open.
    "push-stream": ("uni", varint(1) + varint(0)),
}


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("abuse", choices=list(ABUSES) + ["garbage"])
    args = p.parse_args()
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.load_verify_locations(args.cafile)
    config.server_name = "localhost"
    if args.abuse == "garbage":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for n in [1, 7, 20, 1200, 1500]:
            for first in [0x00, 0x40, 0xC0, 0xFF]:
                s.sendto(bytes([first]) + os.urandom(n), ("127.0.0.1", args.port))
        s.close()
    async with connect("127.0.0.1", args.port, configuration=config, create_protocol=Client) as c:
        if args.abuse == "garbage":
            sid = c._quic.get_next_available_stream_id()
            c._quic.send_stream_data(sid, frame(1, GET), end_stream=True)
            c.transmit()
            print(json.dumps({"status": int(await asyncio.wait_for(c.status, 10))}), flush=True)
            return
        # Let the handshake and both control streams settle first.
        await c.ping()
        kind, data = ABUSES[args.abuse]
        sid = c._quic.get_next_available_stream_id(is_unidirectional=(kind == "uni"))
        c._quic.send_stream_data(sid, data, end_stream=(kind == "bidi"))
        c.transmit()
        try:
            ev = await asyncio.wait_for(asyncio.shield(c.closed), 5)
            print(json.dumps({"closed": True, "error_code": ev.error_code, "reason": ev.reason_phrase}), flush=True)
        except asyncio.TimeoutError:
            print(json.dumps({"closed": False}), flush=True)


asyncio.run(main())
