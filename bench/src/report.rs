//! Collecting per-rank figures on rank 0 and writing the report (markdown, CSV, SVG plots).

use anyhow::Result;
use moe_ep::Group;
use std::fmt::Write as _;

/// What the figures mean, at the top of every `results.md`.
pub const PREFACE: &str = "**Definitions.** Times are medians of CUDA-event-timed runs after a warm-up, per rank; \
the tables give every rank and the slowest. *Logical GB/s* (DeepEP's definition) = bytes of the rows a rank \
receives in dispatch (or sends back in combine), its own tokens included, / time: `N_recv * row / t`, row = \
`2 * hidden` bytes (BF16, and every combine) or `hidden + 4 * hidden / 128` bytes (FP8 with its scales). \
*NVLink GB/s* = bytes that actually crossed to other GPUs / time: `rows sent to (dispatch) or received from \
(combine) other ranks * row / t`. The P2P limit and the NCCL baseline in each section were measured in the \
same run; DeepEP figures come from `ANCHORS.md` (4 x H200, measured on this project's machines) and are \
labelled so.\n";

/// The benchmark report (filled on rank 0).
pub struct Report {
    pub header: String,
    pub sections: Vec<(String, String)>,
    /// Extra files of the results folder: (name, contents), e.g. CSV tables and SVG plots.
    pub files: Vec<(String, String)>,
}

impl Report {
    pub fn new(g: &Group) -> Self {
        let header = format!(
            "device: {} x {} (GPUs {:?}), {} SMs each, {} ranks, {}",
            g.world(),
            g.device_name(),
            g.devices(),
            g.sm_count(),
            g.world(),
            if g.gpu_sharers() > 1 { "processes sharing GPUs" } else { "one process per GPU" }
        );
        Report { header, sections: vec![], files: vec![] }
    }

    /// Collective: every rank's values; rank 0 gets them all (`[rank][i]`), others `None`.
    pub fn gather(g: &Group, vals: &[f64]) -> Result<Option<Vec<Vec<f64>>>> {
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = g.all_gather_bytes(&bytes)?;
        if g.rank() != 0 {
            return Ok(None);
        }
        Ok(Some(all.iter().map(|b| b.chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()).collect()))
    }

    pub fn section(&mut self, title: &str, body: String) {
        println!("\n## {title}\n{}\n\n{body}", self.header);
        self.sections.push((title.to_string(), body));
    }

    pub fn finish(&self, out: Option<&std::path::Path>, preface: &str) -> Result<()> {
        let Some(dir) = out else { return Ok(()) };
        std::fs::create_dir_all(dir)?;
        let mut md = format!("# moe-ep benchmark\n\n{}\n\n{preface}", self.header);
        for (t, b) in &self.sections {
            let _ = write!(md, "\n## {t}\n\n{b}\n");
        }
        std::fs::write(dir.join("results.md"), md)?;
        for (name, text) in &self.files {
            std::fs::write(dir.join(name), text)?;
        }
        println!("\nreport written to {}", dir.display());
        Ok(())
    }
}

/// A markdown table.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n|{}\n", head.join(" | "), " --- |".repeat(head.len()));
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s
}

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// A measured curve: line and markers.
    Line,
    /// Reference points (e.g. another library's published or measured figures): hollow markers.
    Points,
    /// A horizontal reference line at the first point's y (a limit or a baseline), dashed.
    Level,
}

/// One series of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

impl Series {
    pub fn line(name: &str) -> Self {
        Series { name: name.into(), points: vec![], style: Style::Line }
    }
    pub fn points(name: &str, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, style: Style::Points }
    }
    pub fn level(name: &str, y: f64) -> Self {
        Series { name: name.into(), points: vec![(f64::NAN, y)], style: Style::Level }
    }
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) for a range of `span` in about `n` steps.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(1e-9);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|&s| s >= raw).unwrap_or(10.0 * p)
}

/// An SVG line chart. `log_x`: x on a log2 axis with a tick at every measured x (token counts);
/// otherwise linear with nice ticks. The y axis starts at 0, with nice ticks and grid lines.
pub fn line_chart(title: &str, xlabel: &str, ylabel: &str, series: &[Series], log_x: bool) -> String {
    let (w, h, l, r, t, b) = (860.0, 460.0, 70.0, 300.0, 40.0, 50.0);
    let tx = |x: f64| if log_x { x.log2() } else { x };
    let xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).filter(|x| x.is_finite()).collect();
    let ymax = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|y| y.is_finite()).fold(1.0f64, f64::max) * 1.08;
    let ystep = nice_step(ymax, 6.0);
    let ytop = (ymax / ystep).ceil() * ystep;
    let (x0, x1) = (xs.iter().map(|&x| tx(x)).fold(f64::MAX, f64::min), xs.iter().map(|&x| tx(x)).fold(f64::MIN, f64::max));
    let (x0, x1) = if x1 > x0 { (x0, x1) } else { (x0 - 1.0, x0 + 1.0) };
    let px = |x: f64| l + (tx(x) - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| h - b - y / ytop * (h - t - b);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{l}\" y=\"22\" font-size=\"14\">{title}</text>\n"
    );
    let mut y = 0.0;
    while y <= ytop + 1e-9 {
        let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#e5e5e5\"/>", py(y), w - r);
        let label = if ystep < 1.0 { format!("{y:.1}") } else { format!("{y:.0}") };
        let _ = writeln!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>", l - 6.0, py(y) + 4.0);
        y += ystep;
    }
    let mut xt: Vec<f64> = if log_x {
        xs.clone()
    } else {
        let step = nice_step(x1 - x0, 6.0);
        let mut v = Vec::new();
        let mut x = (x0 / step).ceil() * step;
        while x <= x1 + 1e-9 {
            v.push(x);
            x += step;
        }
        v
    };
    xt.sort_by(|a, b| a.total_cmp(b));
    xt.dedup();
    for x in &xt {
        let _ = writeln!(s, "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#999\"/>", px(*x), h - b, h - b + 4.0);
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x}</text>", px(*x), h - b + 17.0);
    }
    let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>", h - b, w - r);
    let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>", h - b);
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{xlabel}</text>", (l + w - r) / 2.0, h - 10.0);
    let mid = (t + h - b) / 2.0;
    let _ = writeln!(s, "<text x=\"16\" y=\"{mid}\" transform=\"rotate(-90 16 {mid})\" text-anchor=\"middle\">{ylabel}</text>");
    for (i, sr) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        match sr.style {
            Style::Line => {
                let path: Vec<String> = sr.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
                let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>", path.join(" "));
                for &(x, y) in &sr.points {
                    let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>", px(x), py(y));
                }
            }
            Style::Points => {
                for &(x, y) in &sr.points {
                    let _ = writeln!(
                        s,
                        "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"8\" height=\"8\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>",
                        px(x) - 4.0,
                        py(y) - 4.0
                    );
                }
            }
            Style::Level => {
                let yv = sr.points[0].1;
                let _ = writeln!(
                    s,
                    "<line x1=\"{l}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"{c}\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>",
                    py(yv),
                    w - r
                );
            }
        }
        let ly = t + 20.0 * i as f64 + 10.0;
        let (x_a, x_b) = (w - r + 10.0, w - r + 30.0);
        let mark = match sr.style {
            Style::Points => {
                format!("<rect x=\"{}\" y=\"{}\" width=\"8\" height=\"8\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>", x_a + 6.0, ly - 4.0)
            }
            Style::Level => {
                format!("<line x1=\"{x_a}\" y1=\"{ly}\" x2=\"{x_b}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>")
            }
            Style::Line => format!("<line x1=\"{x_a}\" y1=\"{ly}\" x2=\"{x_b}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"/>"),
        };
        let _ = writeln!(s, "{mark}<text x=\"{}\" y=\"{}\">{}</text>", x_b + 6.0, ly + 4.0, sr.name);
    }
    s.push_str("</svg>\n");
    s
}
