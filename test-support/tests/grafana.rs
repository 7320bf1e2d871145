//! The operator's Grafana dashboard (deploy/grafana/clickgate.json) asks
//! only for metrics the gateway, the shipper and the aggregator export:
//! every `clickgate_*` name in its queries is rendered by one of them.

#[test]
fn every_metric_the_grafana_dashboard_uses_exists() {
    let json = include_str!("../../deploy/grafana/clickgate.json");
    let dashboard: serde_json::Value = serde_json::from_str(json).unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 10);

    let mut gw = Vec::new();
    gateway_core::metrics::Registry::new(1).render(&mut gw);
    let agg = aggregator::metrics::Metrics::default().render(0, 0);
    let ship = shipper::Metrics::default();
    ship.shards.lock().unwrap().insert(0, [0; 3]);
    let rendered = format!("{}{agg}{}", String::from_utf8(gw).unwrap(), ship.render());

    let mut names: Vec<String> = json
        .match_indices("clickgate_")
        .map(|(i, _)| {
            json[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() > 25, "{names:?}");
    for n in &names {
        let base = n.trim_end_matches("_bucket");
        assert!(
            rendered.contains(&format!("# TYPE {base} ")),
            "the dashboard uses {n}, which no process exports"
        );
    }
}
