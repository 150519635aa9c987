//! Output: a hand-written JSON object builder (no serde needed for flat numbers and a few
//! strings), latency summaries, the error-code map, and the once-a-second progress line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::pool::code_name;

/// What a command produced: both renderings, and whether it succeeded. `hold` keeps the
/// connections open until the report has been printed.
#[derive(Debug)]
pub struct Report {
    /// One JSON object.
    pub json: String,
    /// The human-readable summary.
    pub human: String,
    /// False makes the process exit non-zero after printing.
    pub ok: bool,
    /// Dropped after printing.
    pub hold: Option<super::pool::Pool>,
}

/// Why a command could not produce a report.
#[derive(Debug)]
pub enum Fail {
    /// The configuration is refused (bad flags, descriptor limit): exit 2.
    Usage(String),
    /// The run failed (cannot connect, handshake refused): exit 1.
    Run(String),
}

/// A JSON object under construction: `"key":value` pairs, no spaces.
#[derive(Debug, Default)]
pub struct Json {
    s: String,
}

impl Json {
    /// An empty object.
    pub fn new() -> Self {
        Json::default()
    }

    fn key(&mut self, k: &str) {
        self.s.push(if self.s.is_empty() { '{' } else { ',' });
        push_str(&mut self.s, k);
        self.s.push(':');
    }

    /// An integer.
    pub fn int(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k);
        let _ = write!(self.s, "{v}");
        self
    }

    /// A number with up to `dec` decimals (non-finite values become null).
    pub fn num(&mut self, k: &str, v: f64, dec: usize) -> &mut Self {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.s, "{v:.dec$}");
        } else {
            self.s.push_str("null");
        }
        self
    }

    /// A string.
    pub fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        push_str(&mut self.s, v);
        self
    }

    /// A boolean.
    pub fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k);
        self.s.push_str(if v { "true" } else { "false" });
        self
    }

    /// Already-encoded JSON (an object or an array).
    pub fn raw(&mut self, k: &str, json: &str) -> &mut Self {
        self.key(k);
        self.s.push_str(json);
        self
    }

    /// The finished object.
    pub fn finish(&self) -> String {
        if self.s.is_empty() {
            "{}".into()
        } else {
            format!("{}}}", self.s)
        }
    }
}

fn push_str(s: &mut String, v: &str) {
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

/// A JSON array of already-encoded values.
pub fn array(items: &[String]) -> String {
    format!("[{}]", items.join(","))
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lat {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Lat {
    /// From a histogram of µs values.
    pub fn from_us(h: &Histogram<u64>) -> Lat {
        if h.is_empty() {
            return Lat::default();
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Lat {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    /// `{"p50":..,"p90":..,"p99":..,"p999":..,"max":..}` in ms.
    pub fn json(&self) -> String {
        Json::new()
            .int("count", self.count)
            .num("p50", self.p50, 3)
            .num("p90", self.p90, 3)
            .num("p99", self.p99, 3)
            .num("p999", self.p999, 3)
            .num("max", self.max, 3)
            .finish()
    }

    /// `p50 0.123  p90 ...  ms` for humans.
    pub fn human(&self) -> String {
        format!(
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms",
            self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

/// Adds what the connections spoke to a JSON report: `"transport":"tls"`, and for TLS the
/// negotiated parameters, `"tls":"TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519"`.
pub fn transport_json(j: &mut Json, pool: &super::pool::Pool) {
    j.str("transport", pool.kind().name());
    if let Some(info) = &pool.tls_info {
        j.str("tls", info);
    }
}

/// What the connections spoke, for a human report: `tcp`, `ws`, `tls (TLSv1_3 ...)`.
pub fn transport_human(pool: &super::pool::Pool) -> String {
    match &pool.tls_info {
        Some(info) => format!("{} ({info})", pool.kind().name()),
        None => pool.kind().name().to_string(),
    }
}

/// The difference of two error-code maps (`after - before`), by code name.
pub fn error_delta(before: &BTreeMap<u16, u64>, after: &BTreeMap<u16, u64>) -> Vec<(String, u64)> {
    after
        .iter()
        .filter_map(|(code, &n)| {
            let d = n - before.get(code).copied().unwrap_or(0);
            (d > 0).then(|| (code_name(*code), d))
        })
        .collect()
}

/// `{"slow_consumer":3}`.
pub fn errors_json(errors: &[(String, u64)]) -> String {
    let mut j = Json::new();
    for (name, n) in errors {
        j.int(name, *n);
    }
    j.finish()
}

/// `slow_consumer x3, ...` or `none`.
pub fn errors_human(errors: &[(String, u64)]) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    errors
        .iter()
        .map(|(name, n)| format!("{name} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A line on stderr at most once a second.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    next: Instant,
}

impl Progress {
    /// Prints nothing when `enabled` is false.
    pub fn new(enabled: bool) -> Self {
        Progress {
            enabled,
            next: Instant::now() + Duration::from_secs(1),
        }
    }

    /// Whether a line is due now (and, if so, schedules the next one).
    pub fn due(&mut self, now: Instant) -> bool {
        if !self.enabled || now < self.next {
            return false;
        }
        self.next = now + Duration::from_secs(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_compact_and_escaped() {
        let j = Json::new()
            .int("lost", 0)
            .num("ratio", 1.0, 4)
            .str("s", "a\"b\n")
            .bool("ok", true)
            .raw("e", &errors_json(&[("slow_consumer".into(), 2)]))
            .num("nan", f64::NAN, 1)
            .finish();
        assert_eq!(
            j,
            r#"{"lost":0,"ratio":1.0000,"s":"a\"b\u000a","ok":true,"e":{"slow_consumer":2},"nan":null}"#
        );
        assert_eq!(Json::new().finish(), "{}");
    }
}
