//! [`render`]: the Prometheus text exposition format (version 0.0.4) of a [`Snapshot`], by
//! walking [`TABLE`]. This file knows the format and nothing about any metric.

use std::fmt::Write as _;

use super::Snapshot;
use super::table::{Metric, Sample, Series, TABLE};

/// Appends every metric of [`TABLE`], as `snapshot` has them, to `out` in the Prometheus text
/// exposition format 0.0.4: per metric a `# HELP` and a `# TYPE` line, then its samples.
pub fn render(snapshot: &Snapshot, out: &mut String) {
    for m in TABLE {
        render_metric(m, snapshot, out);
    }
}

/// One metric. Writing to a `String` cannot fail, hence the ignored results. A labelled
/// metric without samples (the cluster's, outside a cluster) is left out, HELP and TYPE too.
fn render_metric(m: &Metric, s: &Snapshot, out: &mut String) {
    let name = m.name;
    if let Series::Labelled { values, .. } = m.series {
        let mut any = false;
        values(s, &mut |_| any = true);
        if !any {
            return;
        }
    }
    let _ = writeln!(
        out,
        "# HELP {name} {}\n# TYPE {name} {}",
        m.help,
        m.kind.as_str()
    );
    match m.series {
        Series::Single(value) => {
            let _ = writeln!(out, "{name} {}", value(s));
        }
        Series::Labelled { label, values } => values(s, &mut |x: Sample| {
            // Label values are identifiers from the table, never peer input: no escaping.
            let _ = write!(out, "{name}{{{label}=\"{}\"", x.label);
            if let Some((extra, v)) = x.extra {
                let _ = write!(out, ",{extra}=\"{v}\"");
            }
            let _ = writeln!(out, "}} {}", x.value);
        }),
        Series::Histogram(histogram) => {
            let h = histogram(s);
            let (last, bounded) = h.counts.split_last().unwrap_or((&0, &[]));
            let mut cum = 0;
            for (i, n) in bounded.iter().enumerate() {
                cum += n;
                let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cum}", (h.bound)(i));
            }
            cum += last;
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
            let _ = writeln!(out, "{name}_sum {}", h.sum);
            let _ = writeln!(out, "{name}_count {cum}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::table::Kind;

    /// Every row renders its HELP and TYPE lines and at least one sample, in table order.
    #[test]
    fn every_row_renders_in_order() {
        let mut out = String::new();
        let clustered = Snapshot {
            backbone: Some(Default::default()),
            ..Snapshot::default()
        };
        render(&clustered, &mut out);
        assert!(out.ends_with('\n'));
        let mut at = 0;
        for m in TABLE {
            let head = format!(
                "# HELP {0} {1}\n# TYPE {0} {2}\n",
                m.name,
                m.help,
                m.kind.as_str()
            );
            let pos = out[at..]
                .find(&head)
                .unwrap_or_else(|| panic!("{}: no HELP/TYPE after byte {at}", m.name));
            at += pos + head.len();
            let sample = out[at..].lines().next().unwrap_or_default();
            assert!(
                sample.starts_with(m.name) && !sample.starts_with('#'),
                "{}: first line after TYPE is {sample:?}",
                m.name
            );
        }
    }

    #[test]
    fn cluster_metrics_only_in_a_cluster() {
        let mut out = String::new();
        render(&Snapshot::default(), &mut out);
        assert!(!out.contains("chatloop_cluster_"), "{out}");
    }

    #[test]
    fn values_come_from_the_snapshot() {
        let mut s = Snapshot {
            connections: 7,
            queued_output_max: 11,
            frames_out: vec![0; 256],
            ..Snapshot::default()
        };
        s.shell.accepted = 5;
        s.shell.refused_full = 2;
        s.chat.deliveries = 13;
        s.chat.errors_sent[crate::protocol::ErrorCode::ServerFull.code() as usize] = 3;
        s.frames_out[usize::from(crate::protocol::op::S_PONG)] = 17;
        s.chat.closed.protocol[crate::protocol::ErrorCode::BadMagic.code() as usize] = 19;
        let mut out = String::new();
        render(&s, &mut out);
        for line in [
            "chatloop_connections 7\n",
            "chatloop_connections_accepted_total 7\n",
            "chatloop_queued_output_max_bytes 11\n",
            "chatloop_deliveries_total 13\n",
            "chatloop_errors_sent_total{code=\"server_full\"} 3\n",
            "chatloop_frames_sent_total{op=\"pong\"} 17\n",
            "chatloop_connections_closed_total{reason=\"protocol_error\",code=\"bad_magic\"} 19\n",
        ] {
            assert!(out.contains(line), "no {line:?} in\n{out}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut s = Snapshot::default();
        s.shell.iteration_us[0] = 1; // under 1 µs
        s.shell.iteration_us[3] = 2; // under 8 µs
        s.shell.iteration_us[crate::server::ITERATION_BUCKETS - 1] = 4; // longer than all
        s.shell.iteration_us_sum = 1_500_000;
        let mut out = String::new();
        render(&s, &mut out);
        let h = TABLE
            .iter()
            .find(|m| m.kind == Kind::Histogram)
            .expect("a histogram row")
            .name;
        for line in [
            format!("{h}_bucket{{le=\"0.000001\"}} 1\n"),
            format!("{h}_bucket{{le=\"0.000004\"}} 1\n"),
            format!("{h}_bucket{{le=\"0.000008\"}} 3\n"),
            format!("{h}_bucket{{le=\"4.194304\"}} 3\n"),
            format!("{h}_bucket{{le=\"+Inf\"}} 7\n"),
            format!("{h}_sum 1.5\n"),
            format!("{h}_count 7\n"),
        ] {
            assert!(out.contains(&line), "no {line:?} in\n{out}");
        }
    }
}
