//! The PNGs: training loss and dev accuracy per epoch (mean over seeds, each seed faint), the
//! distribution of parameter sensitivity at the end (the paper's Figure 2) and the one-shot
//! pruning curve (its Figure 3).

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

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

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
        let c = COLORS[k % COLORS.len()];
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

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn sensitivity(area: &Area<'_>, groups: &[Series<'_>]) -> Result<(), Box<dyn std::error::Error>> {
    use crate::analysis::{HIST_BINS, HIST_HI, HIST_LO};
    // log10 |θ·g| of every encoder linear weight (g over the whole training set), seeds
    // pooled; exact zeros left out.
    let hists: Vec<Vec<f64>> = groups
        .iter()
        .map(|(_, runs)| {
            let mut h = vec![0.0; HIST_BINS];
            for c in runs.iter().filter_map(|r| r.claims.as_ref()) {
                for (a, &b) in h.iter_mut().zip(&c.sensitivity.log10_hist) {
                    *a += b as f64;
                }
            }
            let n = h.iter().sum::<f64>().max(1.0);
            h.iter().map(|c| c / n).collect()
        })
        .collect();
    // The range the data spans, to whole decades.
    let w = (HIST_HI - HIST_LO) / HIST_BINS as f64;
    // Bins holding at least 1e-4 of some optimizer's parameters set the range.
    let used: Vec<usize> = (0..HIST_BINS)
        .filter(|&i| hists.iter().any(|h| h[i] >= 1e-4))
        .collect();
    let (lo, hi) = match (used.first(), used.last()) {
        (Some(&a), Some(&b)) => (
            (HIST_LO + a as f64 * w).floor(),
            (HIST_LO + (b + 1) as f64 * w).ceil(),
        ),
        _ => (HIST_LO, HIST_HI),
    };
    let ymax = hists.iter().flatten().fold(0.0f64, |a, &b| a.max(b)) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("Sensitivity |θ·g| at the end", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..hi, 0.0..ymax.max(1e-3))?;
    chart
        .configure_mesh()
        .x_desc("log10 |θ·g|, g over the training set, seeds pooled")
        .y_desc("fraction of parameters")
        .light_line_style(WHITE)
        .draw()?;
    for (k, ((label, _), h)) in groups.iter().zip(&hists).enumerate() {
        let c = COLORS[k % COLORS.len()];
        chart
            .draw_series(h.iter().enumerate().map(|(i, &v)| {
                let x0 = HIST_LO + i as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w, v)], c.mix(0.25).filled())
            }))?
            .label(*label)
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.mix(0.5).filled())
            });
        let outline = h
            .iter()
            .enumerate()
            .map(|(i, &v)| (HIST_LO + (i as f64 + 0.5) * w, v));
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

/// One-shot pruning (the paper's Figure 3): accuracy against the share of encoder linear
/// weights pruned by lowest sensitivity, mean over seeds; `relative` plots the change from the
/// unpruned model instead.
fn pruning(
    area: &Area<'_>,
    groups: &[Series<'_>],
    relative: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let curves: Vec<Vec<(f64, f64)>> = groups
        .iter()
        .map(|(_, runs)| {
            let cl: Vec<_> = runs.iter().filter_map(|r| r.claims.as_ref()).collect();
            let n = cl.first().map_or(0, |c| c.pruning.len());
            (0..n)
                .map(|i| {
                    let v: Vec<f64> = cl
                        .iter()
                        .filter_map(|c| c.pruning.get(i))
                        .map(|p| p.1)
                        .collect();
                    let base: Vec<f64> = cl
                        .iter()
                        .filter_map(|c| c.pruning.first())
                        .map(|p| p.1)
                        .collect();
                    let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
                    let b = base.iter().sum::<f64>() / base.len().max(1) as f64;
                    let ratio = cl[0].pruning[i].0;
                    (100.0 * ratio, 100.0 * if relative { m - b } else { m })
                })
                .collect()
        })
        .collect();
    let ys: Vec<f64> = curves.iter().flatten().map(|p| p.1).collect();
    let (lo, hi) = ys
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.1).max(0.5);
    let mut chart = ChartBuilder::on(area)
        .caption(
            if relative {
                "Change from the unpruned model"
            } else {
                "Accuracy after one-shot pruning"
            },
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-2.0f64..42.0, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("% of encoder linear weights pruned (lowest |θ·g|)")
        .y_desc(if relative { "points" } else { "accuracy (%)" })
        .light_line_style(WHITE)
        .draw()?;
    for (k, ((label, runs), pts)) in groups.iter().zip(&curves).enumerate() {
        let c = COLORS[k % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))?
            .label(format!("{label} (mean of {})", runs.len()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    Ok(())
}

fn group<'a>(results: impl IntoIterator<Item = &'a RunResult>) -> Vec<Series<'a>> {
    let mut groups: Vec<Series<'a>> = Vec::new();
    for r in results {
        match groups.iter_mut().find(|(l, _)| *l == r.label) {
            Some((_, v)) => v.push(r),
            None => groups.push((r.label.as_str(), vec![r])),
        }
    }
    groups
}

/// Draws claims 2 and 3 into `path` (a PNG): the sensitivity distribution, the pruning curve
/// and its change from the unpruned model, one series per optimizer, seeds pooled.
pub fn draw_claims(path: &Path, results: &[&RunResult]) -> Result<(), Box<dyn std::error::Error>> {
    register_font()?;
    let groups = group(results.iter().copied());
    let root = BitMapBackend::new(path, (1650, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    sensitivity(&panels[0], &groups)?;
    pruning(&panels[1], &groups, false)?;
    pruning(&panels[2], &groups, true)?;
    root.present()?;
    Ok(())
}

/// Draws loss and dev accuracy per epoch, and (when the runs measured them) claims 2 and 3,
/// into `path` (a PNG).
pub fn draw(path: &Path, results: &[RunResult]) -> Result<(), Box<dyn std::error::Error>> {
    register_font()?;
    let groups = group(results);
    let claims = results.iter().any(|r| r.claims.is_some());
    let root =
        BitMapBackend::new(path, (1650, if claims { 1000 } else { 500 })).into_drawing_area();
    root.fill(&WHITE)?;
    // Top: loss, dev accuracy, sensitivity; below (with claims): the pruning curve and its
    // change from the unpruned model.
    let (top, bottom) = if claims {
        let (t, b) = root.split_vertically(500);
        (t, Some(b))
    } else {
        (root.clone(), None)
    };
    let row = top.split_evenly((1, if claims { 3 } else { 2 }));
    per_epoch(
        &row[0],
        &groups,
        "Training loss",
        "mean cross-entropy",
        |r| &r.epoch_loss,
    )?;
    per_epoch(&row[1], &groups, "Dev accuracy", "accuracy", |r| {
        &r.epoch_dev_acc
    })?;
    if let Some(bottom) = bottom {
        sensitivity(&row[2], &groups)?;
        let row = bottom.split_evenly((1, 2));
        pruning(&row[0], &groups, false)?;
        pruning(&row[1], &groups, true)?;
    }
    root.present()?;
    Ok(())
}
