//! The results table (markdown) and chart (SVG).

use std::fmt::Write as _;

/// One row of the results table.
pub struct Row {
    /// What was measured.
    pub what: String,
    /// The measurement, formatted.
    pub value: String,
    /// The target and whether it was met, if there is one.
    pub target: Option<(String, bool)>,
}

/// Renders rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| measurement | result | target |\n|---|---|---|\n");
    for row in rows {
        let target = match &row.target {
            Some((text, true)) => format!("{text}: met"),
            Some((text, false)) => format!("{text}: **missed**"),
            None => String::new(),
        };
        let _ = writeln!(out, "| {} | {} | {} |", row.what, row.value, target);
    }
    out
}

/// A bar in a chart panel.
pub struct Bar {
    /// Label left of the bar.
    pub label: String,
    /// Length.
    pub value: f64,
    /// Text right of the bar.
    pub text: String,
    /// Redis' own bars are grey, kvq's blue.
    pub reference: bool,
}

/// Two horizontal bar panels side by side in one SVG.
pub fn chart(title: &str, panels: &[(&str, Vec<Bar>)]) -> String {
    let panel_width = 460.0;
    let label_width = 190.0;
    let bar_height = 22.0;
    let rows = panels.iter().map(|(_, bars)| bars.len()).max().unwrap_or(0) as f64;
    let height = 70.0 + rows * (bar_height + 8.0) + 20.0;
    let width = panel_width * panels.len() as f64 + 20.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        escape(title)
    );
    for (i, (name, bars)) in panels.iter().enumerate() {
        let x0 = 10.0 + i as f64 * panel_width;
        let _ = writeln!(
            svg,
            "<text x=\"{x0}\" y=\"48\" font-weight=\"bold\">{}</text>",
            escape(name)
        );
        let max = bars
            .iter()
            .map(|b| b.value)
            .fold(0.0_f64, f64::max)
            .max(1e-9);
        let room = panel_width - label_width - 90.0;
        for (j, bar) in bars.iter().enumerate() {
            let y = 60.0 + j as f64 * (bar_height + 8.0);
            let length = (bar.value / max * room).max(1.0);
            let colour = if bar.reference { "#9e9e9e" } else { "#1f77b4" };
            let _ = writeln!(
                svg,
                "<text x=\"{x0}\" y=\"{}\">{}</text>\
                 <rect x=\"{}\" y=\"{y}\" width=\"{length:.1}\" height=\"{bar_height}\" fill=\"{colour}\"/>\
                 <text x=\"{}\" y=\"{}\">{}</text>",
                y + 15.0,
                escape(&bar.label),
                x0 + label_width,
                x0 + label_width + length + 5.0,
                y + 15.0,
                escape(&bar.text),
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
