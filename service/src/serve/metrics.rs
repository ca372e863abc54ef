//! `/metrics` in Prometheus text format: what came in, what became of it,
//! what the destination answered, how long the plugin and delivery took, the spool
//! depth and the plugin serving.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use super::Counter;
use super::connections::Connections;
use cdp_core::delivery::{Histogram, Progress};

#[derive(Default)]
pub struct Metrics {
    pub received: Counter,
    pub finished: Counter,
    /// With `--stream`: the partitions this host's worker holds now
    /// (`None` without a stream or a worker).
    pub partitions_held: Mutex<Option<u64>>,
    skipped_by_code: Mutex<BTreeMap<String, u64>>,
}

/// Distinct skip codes kept as label values (each plugin version declares
/// at most 32, and versions may differ); later ones count as `other`.
const CODE_LABELS: usize = 64;

impl Metrics {
    /// Counts a skip under its plugin's code for the reason (`skip-codes`,
    /// contract 1.2), never under the reason's text, which may quote the
    /// event: the text stays in the spool, the outcomes and the logs.
    pub fn skipped(&self, code: &str) {
        let mut skipped = self.skipped_by_code.lock().unwrap();
        let key = if skipped.contains_key(code) || skipped.len() < CODE_LABELS {
            code
        } else {
            "other"
        };
        *skipped.entry(key.to_string()).or_default() += 1;
    }
}

pub fn render(
    metrics: &Metrics,
    connections: &Connections,
    depths: &BTreeMap<String, u64>,
    engines_running: usize,
) -> String {
    let all = connections.all();
    let sum = |read: &dyn Fn(&Progress) -> u64| -> u64 { all.iter().map(|c| read(&c.delivery.progress)).sum() };
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    };
    counter(
        "cdp_events_received_total",
        "Events accepted by ingest and stored in the spool.",
        metrics.received.load(Ordering::Relaxed),
    );
    counter(
        "cdp_events_mapped_total",
        "Events mapped by the plugin.",
        sum(&|p| p.read.load(Ordering::Relaxed)),
    );
    counter(
        "cdp_events_delivered_total",
        "Events whose requests were all delivered.",
        sum(&|p| p.delivered.load(Ordering::Relaxed)),
    );
    counter(
        "cdp_events_dead_lettered_total",
        "Events that could not be delivered.",
        sum(&|p| p.dead_lettered.load(Ordering::Relaxed)),
    );
    counter(
        "cdp_requests_retried_total",
        "HTTP attempts beyond the first.",
        sum(&|p| p.retries.load(Ordering::Relaxed)),
    );

    let _ = writeln!(
        out,
        "# HELP cdp_events_skipped_total Events not sent, by the plugin's skip code (other: a reason no code names, or a plugin before contract 1.2).\n# TYPE cdp_events_skipped_total counter"
    );
    for (code, count) in metrics.skipped_by_code.lock().unwrap().iter() {
        let _ = writeln!(out, "cdp_events_skipped_total{{code=\"{}\"}} {count}", escape(code));
    }
    let mut statuses = BTreeMap::<u16, u64>::new();
    for connection in &all {
        for (status, count) in connection.delivery.progress.statuses.lock().unwrap().iter() {
            *statuses.entry(*status).or_default() += count;
        }
    }
    let _ = writeln!(
        out,
        "# HELP cdp_responses_total Responses from the destination, by HTTP status.\n# TYPE cdp_responses_total counter"
    );
    for (status, count) in statuses {
        let _ = writeln!(out, "cdp_responses_total{{status=\"{status}\"}} {count}");
    }
    // The host-wide histograms: every connection's observations.
    let mut map_seconds = Histogram::default();
    let mut delivery_seconds = Histogram::default();
    for connection in &all {
        map_seconds.add(&connection.delivery.progress.map_seconds);
        delivery_seconds.add(&connection.delivery.progress.delivery_seconds);
    }
    histogram(
        &mut out,
        "cdp_plugin_map_seconds",
        "Time to map one event through the plugin.",
        &map_seconds,
    );
    histogram(
        &mut out,
        "cdp_delivery_seconds",
        "Time from an event's first request to its outcome.",
        &delivery_seconds,
    );
    let _ = writeln!(
        out,
        "# HELP cdp_spool_depth Events stored and not yet finished.\n# TYPE cdp_spool_depth gauge\ncdp_spool_depth {}",
        depths.values().sum::<u64>()
    );

    // Per connection: label values are connection ids (the operator's) and
    // fixed sets of words, never a plugin's text.
    let _ = writeln!(
        out,
        "# HELP cdp_connection_events_total Events of a connection, by what became of them.\n# TYPE cdp_connection_events_total counter"
    );
    for connection in &all {
        let id = escape(&connection.id);
        let p = &connection.delivery.progress;
        let received = connection.metrics.received.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "cdp_connection_events_total{{connection=\"{id}\",outcome=\"received\"}} {received}"
        );
        let delivered = p.delivered.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "cdp_connection_events_total{{connection=\"{id}\",outcome=\"delivered\"}} {delivered}"
        );
        let dead = p.dead_lettered.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "cdp_connection_events_total{{connection=\"{id}\",outcome=\"dead_lettered\"}} {dead}"
        );
        for (kind, count) in connection.metrics.skipped_by_code() {
            let _ = writeln!(
                out,
                "cdp_connection_events_total{{connection=\"{id}\",outcome=\"skipped\",type=\"{kind}\"}} {count}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP cdp_connection_responses_total Responses from the destination to a connection, by HTTP status.\n# TYPE cdp_connection_responses_total counter"
    );
    for connection in &all {
        for (status, count) in connection.delivery.progress.statuses.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "cdp_connection_responses_total{{connection=\"{}\",status=\"{status}\"}} {count}",
                escape(&connection.id)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP cdp_connection_delivery_seconds_max A connection's longest delivery.\n# TYPE cdp_connection_delivery_seconds_max gauge"
    );
    for connection in &all {
        let _ = writeln!(
            out,
            "cdp_connection_delivery_seconds_max{{connection=\"{}\"}} {}",
            escape(&connection.id),
            connection.delivery.progress.delivery_seconds.max_seconds()
        );
    }
    let _ = writeln!(
        out,
        "# HELP cdp_connection_spool_depth A connection's events stored and not yet finished.\n# TYPE cdp_connection_spool_depth gauge"
    );
    for connection in &all {
        let depth = depths.get(&connection.id).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "cdp_connection_spool_depth{{connection=\"{}\"}} {depth}",
            escape(&connection.id)
        );
    }
    let _ = writeln!(
        out,
        "# HELP cdp_connection_state A connection's state (1 for the one it is in).\n# TYPE cdp_connection_state gauge"
    );
    for connection in &all {
        let _ = writeln!(
            out,
            "cdp_connection_state{{connection=\"{}\",state=\"{}\"}} 1",
            escape(&connection.id),
            connection.state().as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP cdp_plugin_info The plugin serving, per connection.\n# TYPE cdp_plugin_info gauge"
    );
    for connection in &all {
        let active = connection.slot.current();
        let plugin = &active.plugin;
        let m = plugin.manifest();
        let _ = writeln!(
            out,
            "cdp_plugin_info{{connection=\"{}\",name=\"{}\",version=\"{}\",interface=\"{}\",sha256=\"{}\"}} 1",
            escape(&connection.id),
            escape(&m.name),
            escape(&m.version),
            plugin.interface(),
            plugin.sha256_hex()
        );
    }
    let _ = writeln!(
        out,
        "# HELP cdp_engines_running Connections whose delivery engine runs now (an idle one stops, and holds no threads).\n# TYPE cdp_engines_running gauge\ncdp_engines_running {engines_running}"
    );
    if let Some(held) = *metrics.partitions_held.lock().unwrap() {
        let _ = writeln!(
            out,
            "# HELP cdp_stream_partitions_held Partitions of the stream this worker delivers now.\n# TYPE cdp_stream_partitions_held gauge\ncdp_stream_partitions_held {held}"
        );
    }
    out
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let (buckets, count, sum) = h.snapshot();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (bound, cumulative) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
    );
    let _ = writeln!(
        out,
        "# HELP {name}_max The longest observation.\n# TYPE {name}_max gauge\n{name}_max {}",
        h.max_seconds()
    );
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
