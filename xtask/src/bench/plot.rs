//! The SVG plot: connect p50 against the number of Services, one line per peer.

use std::path::Path;

use plotters::prelude::*;

use super::Measurement;

pub fn p50_svg(results: &[Measurement], path: &Path) -> anyhow::Result<()> {
    let measured: Vec<&Measurement> = results
        .iter()
        .filter(|m| m.connect_p50_us.is_some())
        .collect();
    let max_services = measured
        .iter()
        .map(|m| m.services)
        .max()
        .unwrap_or(1)
        .max(10);
    let max_p50 = measured
        .iter()
        .filter_map(|m| m.connect_p50_us)
        .fold(1.0_f64, f64::max);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "connect + request + close, p50 (µs) vs Services",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1u32..max_services).log_scale(), 0.0..max_p50 * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("Services (3 endpoints each)")
        .y_desc("p50 µs")
        .draw()?;
    let mut peers: Vec<&str> = measured.iter().map(|m| m.peer.as_str()).collect();
    peers.dedup();
    peers.sort_unstable();
    peers.dedup();
    for (index, peer) in peers.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let points: Vec<(u32, f64)> = measured
            .iter()
            .filter(|m| m.peer == *peer)
            .filter_map(|m| Some((m.services.max(1), m.connect_p50_us?)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*peer)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
