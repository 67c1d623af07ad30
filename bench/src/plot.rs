//! `--plot FILE.svg`: charts drawn from a report's JSON with plotters (SVG backend, no
//! fonts needed): the latency CDF for `demo`; throughput and p99 latency against
//! offered load, plus the latency CDF at half of saturation, for `circuit`.

use plotters::prelude::*;
use serde_json::Value;

/// `[[microseconds, quantile], …]` from an HDR histogram, for the reports.
pub fn cdf_points(h: &hdrhistogram::Histogram<u64>) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return Vec::new();
    }
    (0..=100)
        .map(|i| {
            let q = (i as f64 / 100.0).min(0.999_9);
            [h.value_at_quantile(q) as f64, q]
        })
        .collect()
}

fn pairs(v: &Value) -> Vec<(f64, f64)> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
        .collect()
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

fn cdf_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    points: &[(f64, f64)],
    title: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let xmax = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..xmax, 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("one-way latency (us)")
        .y_desc("fraction of payloads")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), &BLUE))
        .map_err(err)?;
    Ok(())
}

/// Draws the chart(s) for a `demo` or `circuit` report into `path`.
pub fn plot(path: &std::path::Path, r: &Value) -> anyhow::Result<()> {
    match r["schema"].as_str() {
        Some("shroud-bench/demo/1") => {
            let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            let title = format!(
                "Latency CDF, {} hops, {:.0} MB/s payload",
                r["hops"],
                r["payload_mb_per_sec"].as_f64().unwrap_or(0.0)
            );
            cdf_chart(&root, &pairs(&r["latency_cdf_us"]), &title)?;
            root.present().map_err(err)?;
        }
        Some("shroud-bench/circuit/1") => {
            let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            let (left, right) = root.split_horizontally(600);
            let sweep: Vec<(f64, f64, f64)> = r["sweep"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p["offered_cells_per_sec"].as_f64()?,
                        p["delivered_cells_per_sec"].as_f64()?,
                        p["p99_us"].as_f64()?,
                    ))
                })
                .collect();
            let xmax = sweep.iter().map(|p| p.0.max(p.1)).fold(1.0, f64::max) * 1.1;
            let mut chart = ChartBuilder::on(&left)
                .caption(
                    format!("Delivered vs offered, {} hops", r["hops"]),
                    ("sans-serif", 18),
                )
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..xmax, 0.0..xmax)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("offered cells/s")
                .y_desc("delivered cells/s")
                .draw()
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new(sweep.iter().map(|p| (p.0, p.1)), &BLUE))
                .map_err(err)?;
            chart
                .draw_series(
                    sweep
                        .iter()
                        .map(|p| Circle::new((p.0, p.1), 4, BLUE.filled())),
                )
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new([(0.0, 0.0), (xmax, xmax)], &BLACK.mix(0.3)))
                .map_err(err)?;
            let title = format!(
                "Latency CDF at {:.0} cells/s ({} hops)",
                r["per_hop_latency_us"]["offered_cells_per_sec"]
                    .as_f64()
                    .unwrap_or(0.0),
                r["hops"]
            );
            cdf_chart(&right, &pairs(&r["latency_cdf_us"]), &title)?;
            root.present().map_err(err)?;
        }
        Some("shroud-bench/mix/1") => {
            let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            let (left, right) = root.split_horizontally(600);
            let rows: Vec<&Value> = r["results"].as_array().into_iter().flatten().collect();
            let series = |k: &str| -> Vec<(f64, f64)> {
                rows.iter()
                    .filter_map(|p| Some((p["mean_delay_ms"].as_f64()?, p[k].as_f64()?)))
                    .collect()
            };
            let xmax = series("chance").iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
            let mut chart = ChartBuilder::on(&left)
                .caption(
                    format!(
                        "Timing observer, {} circuits, {} hop(s)",
                        r["circuits"], r["hops"]
                    ),
                    ("sans-serif", 18),
                )
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(50)
                .build_cartesian_2d(0.0..xmax, 0.0..1.05)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("mean delay per hop (ms)")
                .y_desc("fraction of cells matched")
                .draw()
                .map_err(err)?;
            for (k, color, label) in [
                ("fifo_accuracy", RED, "observer, FIFO"),
                ("best_match_accuracy", BLUE, "observer, best match"),
                ("chance", BLACK, "chance (1 / cells in the mix)"),
            ] {
                chart
                    .draw_series(LineSeries::new(series(k), &color))
                    .map_err(err)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
            let p99 = series("delay_p99_ms");
            let ymax = p99.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
            let mut chart = ChartBuilder::on(&right)
                .caption("Added latency (one way)", ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(50)
                .build_cartesian_2d(0.0..xmax, 0.0..ymax)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("mean delay per hop (ms)")
                .y_desc("ms")
                .draw()
                .map_err(err)?;
            for (k, color, label) in [("delay_p50_ms", BLUE, "p50"), ("delay_p99_ms", RED, "p99")] {
                chart
                    .draw_series(LineSeries::new(series(k), &color))
                    .map_err(err)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
            root.present().map_err(err)?;
        }
        other => anyhow::bail!("no plot for report {other:?}"),
    }
    Ok(())
}
