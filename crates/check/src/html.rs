//! A self-contained HTML timeline of a failing partition (no external assets).
//!
//! Clients are rows, operations are bars from invocation to return (an unknown outcome runs to
//! the right edge, hatched); hovering a bar shows its input, output and times. The operations of
//! the longest linearizable prefix are green and numbered in linearization order; the operations
//! involved in the violation are red, the blocked one outlined.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::check::Explanation;
use crate::history::{ClientId, OpId};

/// Pixels per distinct event time: times are compressed to their rank so that a history with
/// nanosecond timestamps and one with line numbers look alike.
const PIXELS_PER_TICK: usize = 16;
/// Height of one lane.
const LANE_PIXELS: usize = 26;
/// Width of the client label column.
const LABEL_PIXELS: usize = 90;

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

/// Renders the timeline of `explanation`'s partition as a complete HTML page; `title` names the
/// history (for example its file name).
pub fn render(title: &str, explanation: &Explanation) -> String {
    let mut times = BTreeSet::new();
    for op in &explanation.ops {
        times.insert(op.invoked_at);
        if let Some(at) = op.returned_at {
            times.insert(at);
        }
    }
    let rank: BTreeMap<u64, usize> = times.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let end_rank = times.len() + 1;
    let prefix_order: BTreeMap<OpId, usize> = explanation
        .prefix
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i + 1))
        .collect();
    let involved: BTreeSet<OpId> = explanation.involved.iter().copied().collect();

    // Lanes: a client's operations overlap only when one had an unknown outcome.
    let mut lanes_end: BTreeMap<ClientId, Vec<usize>> = BTreeMap::new();
    let mut placed = Vec::with_capacity(explanation.ops.len());
    let mut order: Vec<usize> = (0..explanation.ops.len()).collect();
    order.sort_by_key(|&i| (explanation.ops[i].invoked_at, i));
    for i in order {
        let op = &explanation.ops[i];
        let start = rank.get(&op.invoked_at).copied().unwrap_or(0);
        let end = op
            .returned_at
            .and_then(|at| rank.get(&at).copied())
            .unwrap_or(end_rank);
        let lanes = lanes_end.entry(op.client).or_default();
        let lane = match lanes.iter().position(|&e| e < start) {
            Some(lane) => {
                lanes[lane] = end;
                lane
            }
            None => {
                lanes.push(end);
                lanes.len() - 1
            }
        };
        placed.push((i, start, end, lane));
    }
    let mut row_top = BTreeMap::new();
    let mut top = 0;
    for (client, lanes) in &lanes_end {
        row_top.insert(*client, top);
        top += lanes.len().max(1) * LANE_PIXELS + 6;
    }
    let height = top;
    let width = LABEL_PIXELS + (end_rank + 2) * PIXELS_PER_TICK;

    let partition = match &explanation.partition {
        Some(key) => format!("key {key:?}"),
        None => "the whole history".to_string(),
    };
    let mut page = String::new();
    let _ = write!(
        page,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Not linearizable: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; color: #222; }}
#timeline {{ position: relative; overflow-x: auto; border: 1px solid #ccc; background: #fafafa; }}
#canvas {{ position: relative; }}
.client {{ position: absolute; left: 0; width: {label_w}px; font-size: 12px; font-weight: 600; padding-left: 4px; border-top: 1px solid #e4e4e4; box-sizing: border-box; }}
.op {{ position: absolute; height: {bar_h}px; background: #9db4d3; border: 1px solid #5a7aa6; border-radius: 3px; font-size: 11px; line-height: {bar_h}px; overflow: hidden; white-space: nowrap; text-overflow: ellipsis; padding: 0 3px; box-sizing: border-box; cursor: default; }}
.op:hover {{ outline: 2px solid #000; z-index: 10; overflow: visible; background-clip: padding-box; }}
.op.prefix {{ background: #a6dba0; border-color: #3d8b37; }}
.op.involved {{ background: #f4a6a6; border-color: #c0392b; }}
.op.blocked {{ border: 3px solid #8b0000; }}
.op.unknown {{ background-image: repeating-linear-gradient(45deg, transparent 0 6px, rgba(255,255,255,.6) 6px 12px); border-style: dashed; }}
.badge {{ font-weight: 700; margin-right: 4px; }}
.legend span {{ display: inline-block; padding: 2px 8px; margin-right: 8px; border-radius: 3px; border: 1px solid #888; font-size: 12px; }}
pre {{ background: #f4f4f4; padding: 8px; overflow-x: auto; }}
</style></head><body>
<h1>Not linearizable: {title}</h1>
<p>Partition: <b>{partition}</b>, {n} operations. The longest linearizable prefix found has
<b>{plen}</b> operations (green, numbered in linearization order); after it the state is
<code>{state}</code>, and none of the red operations can come next. Hover a bar for its input,
output and times. Times are shown by rank (equal spacing per distinct event).</p>
<p class="legend"><span style="background:#a6dba0">linearized prefix (n = order)</span><span style="background:#f4a6a6">involved in the violation</span><span style="background:#f4a6a6;border:3px solid #8b0000">blocked: must take effect before it returns, cannot</span><span style="background:#9db4d3">other</span><span style="background:#ddd;border-style:dashed">unknown outcome (runs to the end)</span></p>
<div id="timeline"><div id="canvas" style="width:{width}px;height:{height}px">
"#,
        title = escape(title),
        label_w = LABEL_PIXELS,
        bar_h = LANE_PIXELS - 6,
        partition = escape(&partition),
        n = explanation.ops.len(),
        plen = explanation.prefix.len(),
        state = escape(&explanation.state_after_prefix),
    );
    for (client, top) in &row_top {
        let lanes = lanes_end.get(client).map_or(1, Vec::len).max(1);
        let _ = writeln!(
            page,
            r#"<div class="client" style="top:{top}px;height:{h}px;width:{width}px">client {client}</div>"#,
            h = lanes * LANE_PIXELS + 6,
        );
    }
    for (i, start, end, lane) in placed {
        let op = &explanation.ops[i];
        let mut classes = vec!["op"];
        let position = prefix_order.get(&op.id);
        if position.is_some() {
            classes.push("prefix");
        }
        if involved.contains(&op.id) {
            classes.push("involved");
        }
        if op.id == explanation.blocked {
            classes.push("blocked");
        }
        if op.returned_at.is_none() {
            classes.push("unknown");
        }
        let returned = op.returned_at.map_or_else(
            || "unknown outcome".to_string(),
            |t| format!("returned at {t}"),
        );
        let mut hover = format!(
            "{} client {}: {}\ninvoked at {}, {}",
            op.id, op.client, op.description, op.invoked_at, returned
        );
        if let Some(k) = position {
            let _ = write!(hover, "\nlinearized #{k} of the prefix");
        }
        if op.id == explanation.blocked {
            hover.push_str("\nblocked: cannot be linearized before it returns");
        }
        let badge = position.map_or_else(String::new, |k| {
            format!(r#"<span class="badge">{k}</span>"#)
        });
        let top = row_top.get(&op.client).copied().unwrap_or(0) + 3 + lane * LANE_PIXELS;
        let left = LABEL_PIXELS + start * PIXELS_PER_TICK;
        let bar_width = ((end - start).max(1)) * PIXELS_PER_TICK;
        let _ = writeln!(
            page,
            r#"<div class="{classes}" style="left:{left}px;top:{top}px;width:{bar_width}px" title="{hover}">{badge}{label}</div>"#,
            classes = classes.join(" "),
            hover = escape(&hover),
            label = escape(&op.description),
        );
    }
    let _ = write!(
        page,
        "</div></div>\n<h2>Explanation</h2>\n<pre>{}</pre>\n</body></html>\n",
        escape(&explanation.to_string())
    );
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::OpSummary;

    #[test]
    fn escapes_and_marks_operations() {
        let op = |id, client, description: &str, invoked_at, returned_at| OpSummary {
            id: OpId(id),
            client,
            description: description.to_string(),
            invoked_at,
            returned_at,
        };
        let explanation = Explanation {
            partition: Some("k<1>".into()),
            ops: vec![
                op(0, 1, "write 1 -> ok", 1, Some(2)),
                op(1, 2, "read -> 2", 3, Some(4)),
                op(2, 3, "write 2 -> ?", 5, None),
            ],
            prefix: vec![OpId(0)],
            state_after_prefix: "1".into(),
            blocked: OpId(1),
            involved: vec![OpId(1)],
        };
        let page = render("a <b> file", &explanation);
        assert!(page.contains("a &lt;b&gt; file"));
        assert!(page.contains("k&lt;1&gt;"));
        assert!(page.contains(r#"class="op prefix""#));
        assert!(page.contains(r#"class="op involved blocked""#));
        assert!(page.contains(r#"class="op unknown""#));
        assert!(!page.contains("http"), "no external assets");
    }
}
