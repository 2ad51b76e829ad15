//! Collecting per-rank figures on rank 0 and writing the report (markdown, CSV, SVG).

use anyhow::Result;
use moe_ep::Group;
use std::fmt::Write as _;

/// The benchmark report (filled on rank 0).
pub struct Report {
    pub header: String,
    pub sections: Vec<(String, String)>,
    pub csv: Vec<String>,
    pub svg: Option<String>,
    /// Per-GPU P2P store GB/s with every rank storing at once (24 SMs, all SMs), if measured.
    pub p2p_ring: Option<(f64, f64)>,
    /// Flag round trip (us), if measured.
    pub rtt_us: Option<f64>,
}

impl Report {
    pub fn new(g: &Group) -> Self {
        let header = format!(
            "device: {} x {} (GPUs {:?}), {} SMs each, {} ranks, one process per GPU",
            g.world(),
            g.device_name(),
            g.devices(),
            g.sm_count(),
            g.world()
        );
        Report { header, sections: vec![], csv: vec![], svg: None, p2p_ring: None, rtt_us: None }
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

    pub fn finish(&self, out: Option<&std::path::Path>) -> Result<()> {
        let Some(dir) = out else { return Ok(()) };
        std::fs::create_dir_all(dir)?;
        let mut md = format!("# moe-ep benchmark\n\n{}\n", self.header);
        for (t, b) in &self.sections {
            let _ = write!(md, "\n## {t}\n\n{b}\n");
        }
        std::fs::write(dir.join("results.md"), md)?;
        if !self.csv.is_empty() {
            std::fs::write(dir.join("sweep.csv"), self.csv.join("\n") + "\n")?;
        }
        if let Some(svg) = &self.svg {
            std::fs::write(dir.join("sweep.svg"), svg)?;
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

/// An SVG line chart: `series` of (name, points (x, y)), x on a log2 axis.
pub fn line_chart(title: &str, xlabel: &str, ylabel: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, l, r, t, b) = (770.0, 420.0, 70.0, 220.0, 40.0, 50.0);
    let xs: Vec<f64> = series.iter().flat_map(|s| s.1.iter().map(|p| p.0.log2())).collect();
    let ymax = series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).fold(1.0f64, f64::max) * 1.1;
    let (x0, x1) = (xs.iter().cloned().fold(f64::MAX, f64::min), xs.iter().cloned().fold(f64::MIN, f64::max).max(1.0));
    let px = |x: f64| l + (x.log2() - x0) / (x1 - x0).max(1e-9) * (w - l - r);
    let py = |y: f64| h - b - y / ymax * (h - t - b);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" font-size=\"14\">{title}</text>\n",
        l
    );
    let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>", h - b, w - r, h - b);
    let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>", h - b);
    for i in 0..=5 {
        let y = ymax * i as f64 / 5.0;
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>", l - 6.0, py(y) + 4.0, y);
        let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#ddd\"/>", py(y), w - r);
    }
    let mut xt: Vec<f64> = series.iter().flat_map(|s| s.1.iter().map(|p| p.0)).collect();
    xt.sort_by(|a, b| a.total_cmp(b));
    xt.dedup();
    for x in &xt {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x}</text>", px(*x), h - b + 16.0);
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{xlabel}</text>", (l + w - r) / 2.0, h - 10.0);
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{ylabel}</text>",
        (t + h - b) / 2.0,
        (t + h - b) / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>", path.join(" "));
        for &(x, y) in pts {
            let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>", px(x), py(y));
        }
        let ly = t + 20.0 * i as f64 + 10.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{name}</text>",
            w - r + 10.0,
            w - r + 30.0,
            w - r + 36.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}
