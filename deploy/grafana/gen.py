#!/usr/bin/env python3
"""Writes clickgate.json, the operator's Grafana dashboard (Prometheus data
source) for the gateway, shipper and aggregator metrics. Edit here, run it,
commit both; the gateway's and aggregator's metrics tests check that every
metric the dashboard uses exists."""
import json

panels = []


def panel(title, exprs, unit="short", kind="timeseries", w=12, h=8, desc=""):
    i = len(panels)
    panels.append({
        "id": i + 1,
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": (i % 2) * 12 if w == 12 else 0, "y": (i // 2) * h, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(65 + j), "expr": e, "legendFormat": l} for j, (e, l) in enumerate(exprs)],
    })


R = "[$__rate_interval]"
# Gateway
panel("Gateway: requests per second by endpoint and status",
      [(f"sum by (endpoint, status) (rate(clickgate_requests_total{R}))", "{{endpoint}} {{status}}")], "reqps")
panel("Gateway: events per second by verdict",
      [(f"sum by (kind, verdict) (rate(clickgate_events_total{R}))", "{{kind}} {{verdict}}")], "ops")
panel("Gateway: refused signed events by reason",
      [(f"sum by (reason) (rate(clickgate_rejects_total{R}))", "{{reason}}")], "ops")
panel("Gateway: drops by reason (rate limit, disk full, framing, TLS, PROXY)",
      [(f"sum by (reason) (rate(clickgate_drops_total{R}))", "{{reason}}")], "ops")
panel("Gateway: fdatasync latency (group commit)",
      [(f"histogram_quantile(0.99, sum by (le) (rate(clickgate_flush_duration_seconds_bucket{R})))", "p99"),
       (f"histogram_quantile(0.5, sum by (le) (rate(clickgate_flush_duration_seconds_bucket{R})))", "p50")], "s")
panel("Gateway: durable-write failures (the shard stops acknowledging)",
      [("sum(increase(clickgate_flush_errors_total[5m]))", "failures in 5 min")], "short",
      desc="Any value above 0 needs a person: the shard refuses clicks until restarted.")
panel("Gateway: connections",
      [("sum(clickgate_connections_open)", "open"),
       (f"sum(rate(clickgate_connections_accepted_total{R}))", "accepted/s"),
       (f"sum(rate(clickgate_connections_refused_total{R}))", "refused/s")])
panel("Gateway: TLS handshakes and resumption; HTTP/3",
      [(f"sum(rate(clickgate_tls_handshakes_total{R}))", "TLS handshakes/s"),
       (f"sum(rate(clickgate_tls_resumed_total{R}))", "resumed/s"),
       (f"sum(rate(clickgate_h3_connections_total{R}))", "HTTP/3 connections/s"),
       (f"sum(rate(clickgate_h3_errors_total{R}))", "HTTP/3 errors/s")])
panel("Gateway: log on disk", [("sum(clickgate_log_disk_bytes)", "bytes"),
                               ("sum(clickgate_log_segments)", "segments")], "bytes")
panel("Gateway: appended but not yet durable (records)",
      [('sum by (shard) (clickgate_log_seq{state="appended"}) - sum by (shard) (clickgate_log_seq{state="durable"})', "shard {{shard}}")])
panel("Gateway: dedup table", [("sum(clickgate_dedup_entries)", "live ids"),
                               ("sum(clickgate_dedup_capacity_entries)", "capacity"),
                               (f"sum(rate(clickgate_dedup_evictions_total{R}))", "evictions/s")])
panel("Shipper: records behind the gateway's durable log",
      [("sum by (shard, stream) (clickgate_shipper_lag_records)", "shard {{shard}} {{stream}}")])
# Aggregator
panel("Aggregator: batches by stream and answer",
      [(f"sum by (stream, status) (rate(clickgate_aggregator_batches_total{R}))", "{{stream}} {{status}}")], "ops")
panel("Aggregator: rows merged, late rows, corrections",
      [(f"sum(rate(clickgate_aggregator_rows_merged_total{R}))", "rows merged/s"),
       (f"sum(rate(clickgate_aggregator_late_rows_total{R}))", "late rows/s"),
       (f"sum(rate(clickgate_aggregator_corrections_total{R}))", "corrections/s")], "ops")
panel("Aggregator: event-time watermark lag",
      [("max(clickgate_aggregator_watermark_lag_seconds)", "lag")], "s",
      desc="Now minus the watermark: minutes become final allowed-lateness after it.")
panel("Aggregator: store commit and query latency p99",
      [(f"histogram_quantile(0.99, sum by (le) (rate(clickgate_aggregator_store_commit_seconds_bucket{R})))", "commit p99"),
       (f"histogram_quantile(0.99, sum by (le) (rate(clickgate_aggregator_query_seconds_bucket{R})))", "query p99")], "s")
panel("Aggregator: ClickHouse sink",
      [("sum(clickgate_aggregator_clickhouse_backlog_rows)", "backlog rows"),
       (f"sum(rate(clickgate_aggregator_clickhouse_rows_written_total{R}))", "rows written/s"),
       (f"sum(rate(clickgate_aggregator_clickhouse_errors_total{R}))", "errors/s")])
panel("Aggregator: refused certificates and query errors",
      [(f"sum(rate(clickgate_aggregator_refused_certificates_total{R}))", "refused certificates/s"),
       (f"sum(rate(clickgate_aggregator_query_errors_total{R}))", "query 4xx/s")])

dashboard = {
    "title": "Clickgate",
    "uid": "clickgate",
    "tags": ["clickgate"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [{
        "name": "datasource", "type": "datasource", "query": "prometheus",
        "label": "Prometheus", "current": {},
    }]},
    "panels": panels,
}
with open(__file__.replace("gen.py", "clickgate.json"), "w") as f:
    json.dump(dashboard, f, indent=1)
    f.write("\n")
