#!/usr/bin/env python3
"""Reads Clickgate's Kafka topics back with kafka-python (a client
independent of the aggregator's), as a consumer that keeps the highest
revision per row key and one event per event key would, and prints one JSON
object:

  {"rows": {"<row key>": <row record>, ...},   highest revision per key
   "events": {"<gateway>/<shard>/<seq>": {"key": k, "kind": .., "verdict": ..}, ...},
                                                one per event, however often sent
   "row_messages": n, "event_messages": n,      messages read (with resends)
   "partitions_ok": true|false}                 every advertiser on one partition

  kafka_read.py BOOTSTRAP EVENTS_TOPIC ROWS_TOPIC [IDLE_SECONDS]

Reads from the beginning until no message came for IDLE_SECONDS (default 3).
With KAFKA_SSL_CAFILE set it connects over TLS trusting that CA; with
KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD, it authenticates with
SCRAM-SHA-256.
"""
import json
import os
import sys

from kafka import KafkaConsumer


def security():
    extra = {}
    tls = "KAFKA_SSL_CAFILE" in os.environ
    if tls:
        extra["ssl_cafile"] = os.environ["KAFKA_SSL_CAFILE"]
    if "KAFKA_SASL_USERNAME" in os.environ:
        extra["sasl_mechanism"] = "SCRAM-SHA-256"
        extra["sasl_plain_username"] = os.environ["KAFKA_SASL_USERNAME"]
        extra["sasl_plain_password"] = os.environ["KAFKA_SASL_PASSWORD"]
        extra["security_protocol"] = "SASL_SSL" if tls else "SASL_PLAINTEXT"
    elif tls:
        extra["security_protocol"] = "SSL"
    return extra


def read(bootstrap, topic, idle_s):
    c = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=int(idle_s * 1000),
        **security(),
    )
    out = []
    for m in c:
        out.append((m.partition, m.key.decode(), json.loads(m.value)))
    c.close()
    return out


def main():
    bootstrap, events_topic, rows_topic = sys.argv[1:4]
    idle_s = float(sys.argv[4]) if len(sys.argv) > 4 else 3.0
    placed = {}
    ok = True

    def place(adv, p):
        nonlocal ok
        if placed.setdefault(adv, p) != p:
            ok = False

    rows = {}
    row_msgs = read(bootstrap, rows_topic, idle_s)
    for p, k, v in row_msgs:
        place(("rows", v["advertiser_id"]), p)
        if k not in rows or rows[k]["revision"] <= v["revision"]:
            rows[k] = v
    events = {}
    ev_msgs = read(bootstrap, events_topic, idle_s)
    for p, k, v in ev_msgs:
        place(("events", v["advertiser_id"]), p)
        ident = "%s/%d/%d" % (v["gateway_id"], v["shard"], v["seq"])
        events.setdefault(ident, {"key": k, "kind": v["kind"], "verdict": v["verdict"]})
    json.dump(
        {
            "rows": rows,
            "events": events,
            "row_messages": len(row_msgs),
            "event_messages": len(ev_msgs),
            "partitions_ok": ok,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
