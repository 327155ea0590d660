//! The memory timeline picture: RSS (and VRAM when present) against seconds,
//! each phase shaded and named. SVG, drawn with plotters (no font libraries).

use plotters::prelude::*;

use crate::probe::ProbeRecord;

const MIB: f64 = 1024.0 * 1024.0;

/// Renders the record as an SVG document.
pub fn render_svg(title: &str, record: &ProbeRecord) -> String {
    let mut svg = String::new();
    if let Err(e) = draw(&mut svg, title, record) {
        return format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\"><text x=\"10\" y=\"25\">memory plot failed: {}</text></svg>",
            xml_escape(&e)
        );
    }
    svg
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn draw(out: &mut String, title: &str, record: &ProbeRecord) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let max_t = record
        .timeline
        .iter()
        .map(|p| p.seconds)
        .fold(record.seconds, f64::max)
        .max(1e-3);
    let max_y = record
        .timeline
        .iter()
        .map(|p| p.rss_bytes.max(p.vram_bytes.unwrap_or(0)))
        .chain(record.phases.iter().map(|p| p.peak_rss_bytes))
        .max()
        .unwrap_or(0) as f64
        / MIB;
    let max_y = (max_y * 1.15).max(1.0);
    {
        let root = SVGBackend::with_string(out, (960, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..max_t, 0f64..max_y)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("MiB")
            .draw()
            .map_err(|e| err(&e))?;
        for (i, span) in record.spans.iter().enumerate() {
            let color = Palette99::pick(i);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(span.start, 0.0), (span.end.max(span.start), max_y)],
                    color.mix(0.18).filled(),
                )))
                .map_err(|e| err(&e))?;
            let y = max_y * (0.96 - 0.05 * (i % 4) as f64);
            chart
                .draw_series(std::iter::once(Text::new(
                    span.name.clone(),
                    (span.start, y),
                    ("sans-serif", 13).into_font().color(&BLACK),
                )))
                .map_err(|e| err(&e))?;
        }
        chart
            .draw_series(LineSeries::new(
                record
                    .timeline
                    .iter()
                    .map(|p| (p.seconds, p.rss_bytes as f64 / MIB)),
                BLUE.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label("process RSS")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        if record.timeline.iter().any(|p| p.vram_bytes.is_some()) {
            chart
                .draw_series(LineSeries::new(
                    record
                        .timeline
                        .iter()
                        .filter_map(|p| Some((p.seconds, p.vram_bytes? as f64 / MIB))),
                    RED.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label("process VRAM")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{PhaseSpan, TimelinePoint};

    #[test]
    fn svg_names_every_phase_and_draws_the_rss_line() {
        let record = ProbeRecord {
            seconds: 2.0,
            spans: vec![
                PhaseSpan {
                    name: "video_load".into(),
                    start: 0.0,
                    end: 0.5,
                },
                PhaseSpan {
                    name: "encode".into(),
                    start: 0.5,
                    end: 2.0,
                },
            ],
            timeline: (0..20)
                .map(|i| TimelinePoint {
                    seconds: i as f64 * 0.1,
                    rss_bytes: (10 + i) << 20,
                    vram_bytes: None,
                })
                .collect(),
            ..Default::default()
        };
        let svg = render_svg("test run", &record);
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for needle in [
            "video_load",
            "encode",
            "process RSS",
            "test run",
            "<polyline",
        ] {
            assert!(svg.contains(needle), "missing {needle}");
        }
    }
}
