#!/usr/bin/env python3
"""An independent HTTP/3 client (aioquic, from PyPI) for the gateway's tests.

Reads requests as JSON lines on stdin ({"method", "target", "body",
"headers"}), sends
them on one QUIC connection, one stream each, and prints one JSON line per
answer: {"status", "headers", "body"}. Exits non-zero when the connection
fails.
"""
import argparse
import asyncio
import json
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.waiters = {}
        self.answers = {}

    def quic_event_received(self, event):
        for ev in self.h3.handle_event(event):
            if not isinstance(ev, (HeadersReceived, DataReceived)):
                continue
            a = self.answers.setdefault(ev.stream_id, {"headers": {}, "body": b""})
            if isinstance(ev, HeadersReceived):
                for k, v in ev.headers:
                    a["headers"][k.decode()] = v.decode()
            else:
                a["body"] += ev.data
            if ev.stream_ended and ev.stream_id in self.waiters:
                self.waiters.pop(ev.stream_id).set_result(a)

    async def request(self, authority, method, target, body, extra):
        sid = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", target.encode()),
            (b"user-agent", b"aioquic-test (Linux)"),
        ] + [(k.encode(), v.encode()) for k, v in extra.items()]
        self.h3.send_headers(sid, headers, end_stream=not body)
        if body:
            self.h3.send_data(sid, body.encode(), end_stream=True)
        fut = asyncio.get_running_loop().create_future()
        self.waiters[sid] = fut
        self.transmit()
        a = await asyncio.wait_for(fut, 10)
        return {
            "status": int(a["headers"].get(":status", "0")),
            "headers": {k: v for k, v in a["headers"].items() if not k.startswith(":")},
            "body": a["body"].decode(errors="replace"),
        }


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    args = p.parse_args()
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.load_verify_locations(args.cafile)
    config.server_name = "localhost"
    reqs = [json.loads(line) for line in sys.stdin if line.strip()]
    async with connect("127.0.0.1", args.port, configuration=config, create_protocol=Client) as c:
        for r in reqs:
            a = await c.request(f"localhost:{args.port}", r["method"], r["target"], r.get("body", ""), r.get("headers", {}))
            print(json.dumps(a), flush=True)


asyncio.run(main())
