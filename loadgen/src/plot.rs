//! Latency you can look at: a histogram as HdrHistogram's percentile
//! distribution text (`.hgrm`, what HdrHistogram's plotter and wrk2 read),
//! read back, and drawn as an SVG percentile plot (the tail on a log scale,
//! 50% to 99.999%), one line per server.
//!
//! Histograms here hold nanoseconds; `.hgrm` values are milliseconds, as
//! the plotter labels them.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

const NS_PER_MS: f64 = 1_000_000.0;
/// Rows per halving of the distance to 100% (HdrHistogram's default is 5;
/// more rows keep a quantile read back from the file within a few per cent
/// of the original's).
const TICKS_PER_HALF: u32 = 20;

/// The percentile distribution of `h` in HdrHistogram's text format.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(TICKS_PER_HALF) {
        total += v.count_since_last_iteration();
        let value = h.highest_equivalent(v.value_iterated_to()) as f64 / NS_PER_MS;
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(
                out,
                "{value:>12.3} {q:>2.12} {total:>10} {:>14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(out, "{value:>12.3} {q:>2.12} {total:>10}");
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / NS_PER_MS,
        h.stdev() / NS_PER_MS
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / NS_PER_MS,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        // HdrHistogram's sub-bucket count for the precision.
        (2.0 * 10f64.powi(i32::from(h.sigfig())))
            .log2()
            .ceil()
            .exp2() as u64
    );
    out
}

/// A histogram rebuilt from `.hgrm` text: each row's new counts recorded at
/// its value (so quantiles agree with the original's at the rows' points,
/// to the histogram's precision).
pub fn read_hgrm(text: &str) -> Result<Histogram<u64>, String> {
    let mut h =
        Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let mut prev = 0u64;
    let mut rows = 0;
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() || line.starts_with('#') || f[0] == "Value" {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
        if f.len() < 3 {
            return Err(bad("expected value, percentile, total count"));
        }
        let ms: f64 = f[0].parse().map_err(|_| bad("value"))?;
        let q: f64 = f[1].parse().map_err(|_| bad("percentile"))?;
        let total: u64 = f[2].parse().map_err(|_| bad("total count"))?;
        if !(0.0..=1.0).contains(&q) || total < prev || !ms.is_finite() || ms < 0.0 {
            return Err(bad("out of order or out of range"));
        }
        let ns = ((ms * NS_PER_MS).round() as u64).max(1_000);
        h.record_n(ns, total - prev)
            .map_err(|e| bad(&e.to_string()))?;
        prev = total;
        rows += 1;
    }
    if rows == 0 {
        return Err("no percentile rows".into());
    }
    Ok(h)
}

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];
const PERCENTILES: [(f64, &str); 6] = [
    (0.5, "50%"),
    (0.9, "90%"),
    (0.99, "99%"),
    (0.999, "99.9%"),
    (0.9999, "99.99%"),
    (0.99999, "99.999%"),
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A step of 1, 2 or 5 times a power of ten that gives about five ticks
/// up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-9);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// An SVG percentile plot of each (label, histogram): latency in ms
/// against the percentile, 50% to 99.999% on a log scale of 1/(1-p).
pub fn svg(title: &str, series: &[(String, &Histogram<u64>)]) -> String {
    let (w, h) = (900.0, 520.0);
    let (left, right, top, bottom) = (70.0, 40.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let x_lo = 2f64.log10(); // 50%
    let x_hi = 5.0; // 99.999%
    let x_of = |q: f64| left + (((1.0 / (1.0 - q)).log10() - x_lo) / (x_hi - x_lo)) * pw;
    let samples = 240;
    let q_at = |k: usize| 1.0 - 1.0 / 10f64.powf(x_lo + (x_hi - x_lo) * k as f64 / samples as f64);
    let top_ms = series
        .iter()
        .map(|(_, hist)| hist.value_at_quantile(0.99999) as f64 / NS_PER_MS)
        .fold(0.0f64, f64::max)
        .max(0.001);
    let step = nice_step(top_ms);
    let y_max = (top_ms / step).ceil() * step;
    let y_of = |ms: f64| top + ph - (ms / y_max).min(1.0) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    for (q, label) in PERCENTILES {
        let x = x_of(q);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            top + ph,
            top + ph + 18.0
        );
    }
    let mut y = 0.0;
    while y <= y_max + step / 2.0 {
        let py = y_of(y);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            py + 4.0,
            trim_number(y)
        );
        y += step;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        left + pw / 2.0,
        h - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">latency (ms)</text>"#,
        top + ph / 2.0
    );
    for (i, (label, hist)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut pts = String::new();
        for k in 0..=samples {
            let q = q_at(k);
            let ms = hist.value_at_quantile(q) as f64 / NS_PER_MS;
            let _ = write!(pts, "{:.1},{:.1} ", x_of(q), y_of(ms));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            pts.trim_end()
        );
        let ly = top + 16.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{} (p99 {:.3} ms, {} requests)</text>"#,
            left + 12.0,
            left + 36.0,
            left + 42.0,
            ly + 4.0,
            escape(label),
            hist.value_at_quantile(0.99) as f64 / NS_PER_MS,
            hist.len()
        );
    }
    s.push_str("</svg>\n");
    s
}

fn trim_number(v: f64) -> String {
    let t = format!("{v:.3}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Histogram<u64> {
        let mut h = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
        // A body around 200 us and a long tail to 80 ms.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x % 1_000_000) as f64 / 1_000_000.0;
            let ns = 150_000.0
                + 100_000.0 * u
                + if x.is_multiple_of(1000) {
                    80e6 * u
                } else {
                    0.0
                };
            h.record(ns as u64).unwrap();
        }
        h
    }

    #[test]
    fn hgrm_round_trips_through_hdrhistogram() {
        let h = sample();
        let text = hgrm(&h);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"));
        let back = read_hgrm(&text).unwrap();
        assert_eq!(back.len(), h.len());
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 1.0] {
            let (a, b) = (h.value_at_quantile(q), back.value_at_quantile(q));
            // Rows every fifth of a halving: the rebuilt quantile is the
            // original's at the next row, within the 3 significant digits.
            let step = 2f64.powf(1.0 / f64::from(TICKS_PER_HALF)) * 1.01;
            let row_gap = h.value_at_quantile(q.max(1.0 - (1.0 - q) / step)) as f64;
            assert!(
                (b as f64) >= a as f64 * 0.999 && (b as f64) <= row_gap * 1.001,
                "q {q}: {a} vs {b}"
            );
        }
        assert!(h.equivalent(back.max(), h.max()));
        // The footer the plotter reads.
        assert!(text.contains("#[Max     ="));
        assert!(text.contains(&format!("Total count    = {:>12}", h.len())));
    }

    #[test]
    fn bad_hgrm_is_refused_with_the_line() {
        assert!(read_hgrm("").is_err());
        let e = read_hgrm("       Value     Percentile TotalCount\n\n  1.0 0.5 10\n  0.9 0.6 5\n")
            .unwrap_err();
        assert!(e.contains("line 4"), "{e}");
        assert!(read_hgrm("abc def ghi\n").is_err());
    }

    #[test]
    fn the_svg_is_well_formed_and_draws_each_series() {
        let (a, b) = (sample(), {
            let mut h = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
            h.record_n(300_000, 1000).unwrap();
            h
        });
        let s = svg(
            "p99 <at> 50% & more",
            &[("gateway".into(), &a), ("nginx \"light\"".into(), &b)],
        );
        let doc = roxmltree::Document::parse(&s).unwrap();
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        let lines: Vec<_> = root
            .descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .collect();
        assert_eq!(lines.len(), 2);
        for l in &lines {
            assert_eq!(l.attribute("points").unwrap().split(' ').count(), 241);
        }
        let texts: String = root
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .collect();
        assert!(texts.contains("99.999%") && texts.contains("nginx \"light\""));
        assert!(texts.contains("p99 <at> 50% & more"));
    }
}
