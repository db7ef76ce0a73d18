//! The PNG: training loss and dev accuracy per epoch (mean over seeds, each seed faint), and
//! the distribution of parameter sensitivity at the end (the paper's Figure 2).

use std::path::Path;

use plotters::prelude::*;

use crate::train::RunResult;

/// Font files tried in order: plotters draws text with ab_glyph from a registered font, so no
/// system font library is linked; the PNG needs one TrueType file at run time.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

fn register_font() -> Result<(), String> {
    let extra = std::env::var("SAGE_FONT").ok();
    let paths = extra
        .iter()
        .map(String::as_str)
        .chain(FONT_PATHS.iter().copied());
    for p in paths {
        if let Ok(bytes) = std::fs::read(p) {
            // Registered once per process for the life of the program.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{p}: not a usable font"));
        }
    }
    Err("no TrueType font found (set SAGE_FONT=/path/to/font.ttf)".into())
}

const COLORS: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40)];

type Series<'a> = (&'a str, Vec<&'a RunResult>);

fn per_epoch(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    groups: &[Series<'_>],
    title: &str,
    ylabel: &str,
    pick: fn(&RunResult) -> &Vec<f64>,
) -> Result<(), Box<dyn std::error::Error>> {
    let epochs = groups
        .iter()
        .flat_map(|(_, r)| r.iter().map(|r| pick(r).len()))
        .max()
        .unwrap_or(1);
    let all: Vec<f64> = groups
        .iter()
        .flat_map(|(_, r)| r.iter().flat_map(|r| pick(r).iter().copied()))
        .collect();
    let (lo, hi) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.8f64..epochs as f64 + 0.2, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(ylabel)
        .x_labels(epochs + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    for (k, (label, runs)) in groups.iter().enumerate() {
        let c = COLORS[k % 2];
        for r in runs {
            let pts = pick(r)
                .iter()
                .enumerate()
                .map(|(e, &v)| ((e + 1) as f64, v));
            chart.draw_series(LineSeries::new(pts, c.mix(0.25)))?;
        }
        let mean: Vec<(f64, f64)> = (0..epochs)
            .map(|e| {
                let v: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| pick(r).get(e).copied())
                    .collect();
                (
                    (e + 1) as f64,
                    v.iter().sum::<f64>() / v.len().max(1) as f64,
                )
            })
            .collect();
        chart
            .draw_series(LineSeries::new(mean.clone(), c.stroke_width(3)))?
            .label(format!("{label} (mean of {})", runs.len()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(mean.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn sensitivity(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    groups: &[Series<'_>],
) -> Result<(), Box<dyn std::error::Error>> {
    // log10 |θ·g| of every encoder linear weight, all seeds pooled; exact zeros left out.
    let logs: Vec<Vec<f64>> = groups
        .iter()
        .map(|(_, runs)| {
            runs.iter()
                .flat_map(|r| r.sensitivity.iter())
                .filter(|&&s| s > 0.0)
                .map(|&s| (s as f64).log10())
                .collect()
        })
        .collect();
    // The range the data spans, to whole decades.
    let (lo, hi) = logs
        .iter()
        .flatten()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let (lo, hi) = if lo <= hi {
        (lo.floor(), hi.ceil())
    } else {
        (-12.0, 0.0)
    };
    let bins = 48;
    let w = (hi - lo) / bins as f64;
    let hists: Vec<Vec<f64>> = logs
        .iter()
        .map(|l| {
            let mut h = vec![0.0; bins];
            for &x in l {
                let b = (((x - lo) / w).floor().max(0.0) as usize).min(bins - 1);
                h[b] += 1.0;
            }
            let n = l.len().max(1) as f64;
            h.iter().map(|c| c / n).collect()
        })
        .collect();
    let ymax = hists.iter().flatten().fold(0.0f64, |a, &b| a.max(b)) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("Sensitivity |θ·g| at the end", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..hi, 0.0..ymax.max(1e-3))?;
    chart
        .configure_mesh()
        .x_desc("log10 |θ·g|, encoder linear weights, seeds pooled")
        .y_desc("fraction of parameters")
        .light_line_style(WHITE)
        .draw()?;
    for (k, ((label, _), h)) in groups.iter().zip(&hists).enumerate() {
        let c = COLORS[k % 2];
        chart
            .draw_series(h.iter().enumerate().map(|(i, &v)| {
                let x0 = lo + i as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w, v)], c.mix(0.35).filled())
            }))?
            .label(*label)
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.mix(0.5).filled())
            });
        let outline = h
            .iter()
            .enumerate()
            .map(|(i, &v)| (lo + (i as f64 + 0.5) * w, v));
        chart.draw_series(LineSeries::new(outline, c.stroke_width(2)))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// Draws the three panels into `path` (a PNG).
pub fn draw(path: &Path, results: &[RunResult]) -> Result<(), Box<dyn std::error::Error>> {
    register_font()?;
    let mut groups: Vec<Series<'_>> = Vec::new();
    for r in results {
        match groups.iter_mut().find(|(l, _)| *l == r.label) {
            Some((_, v)) => v.push(r),
            None => groups.push((r.label.as_str(), vec![r])),
        }
    }
    let root = BitMapBackend::new(path, (1650, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    per_epoch(
        &panels[0],
        &groups,
        "Training loss",
        "mean cross-entropy",
        |r| &r.epoch_loss,
    )?;
    per_epoch(&panels[1], &groups, "Dev accuracy", "accuracy", |r| {
        &r.epoch_dev_acc
    })?;
    sensitivity(&panels[2], &groups)?;
    root.present()?;
    Ok(())
}
