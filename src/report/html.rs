//! HTML text: escaping and the page's inline style sheet.

/// Escapes text for HTML content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A metric value as the table shows it: 4 decimals, or "-" where undefined.
pub fn num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        _ => "-".into(),
    }
}

/// The frame colours are OML's (`RetrievalResults.visualize`): query blue (0,0,255), correct
/// green (0,255,0), wrong red (255,0,0), ground truth grey (120,120,120).
pub const STYLE: &str = r#"
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: #555; margin: 0 0 12px; }
.meta td { padding: 1px 12px 1px 0; vertical-align: top; }
.note { color: #666; font-size: 13px; }
.nav a { color: #1a4fb4; }
table.metrics { border-collapse: collapse; }
.scroll { max-height: 440px; overflow-y: auto; display: inline-block; border: 1px solid #ddd; }
.scroll thead th { position: sticky; top: 0; background: #fff; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics tr.overall td { font-weight: 600; background: #f4f6fa; }
.qrow { display: flex; align-items: flex-start; gap: 6px; margin: 6px 0; }
.qrow .info { width: 150px; font-size: 12px; color: #444; flex: none; }
.item { width: 88px; flex: none; text-align: center; font-size: 11px; line-height: 1.25; }
.item .pic { width: 80px; height: 80px; border: 4px solid #000; display: block; margin: 0 auto 2px;
  overflow: hidden; background: #fff; }
.item img { width: 80px; height: 80px; display: block; }
.item .txt { font-size: 11px; padding: 2px; text-align: left; word-break: break-word; }
.item .miss { color: #a00; font-size: 10px; padding: 2px; word-break: break-all; }
.item.query .pic { border-color: rgb(0,0,255); }
.item.hit .pic { border-color: rgb(0,255,0); }
.item.miss-item .pic { border-color: rgb(255,0,0); }
.item.gt .pic { border-color: rgb(120,120,120); }
.item.empty .pic { border-color: #eee; background: #fafafa; }
.sep { width: 10px; flex: none; }
svg.chart { display: block; margin: 6px 0 12px; background: #fff; }
svg.chart .ct { font-size: 14px; font-weight: 600; fill: #222; }
svg.chart .tick { font-size: 11px; fill: #444; }
svg.chart .at { font-size: 12px; fill: #333; }
svg.chart .axis { stroke: #888; stroke-width: 1; }
svg.chart .grid { stroke: #eee; stroke-width: 1; }
svg.chart .pos { fill: rgb(0,170,0); fill-opacity: 0.55; }
svg.chart .neg { fill: rgb(220,0,0); fill-opacity: 0.45; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 12px; height: 12px; border: 3px solid; vertical-align: -3px; margin-right: 4px; }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
        assert_eq!(esc("ünïcode"), "ünïcode");
        assert_eq!(num(None), "-");
        assert_eq!(num(Some(f64::NAN)), "-");
        assert_eq!(num(Some(0.5)), "0.5000");
    }
}
