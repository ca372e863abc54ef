//! The console's pages, rendered on the server. maud escapes every value
//! put in a page; nothing here writes raw HTML from data (`PreEscaped`
//! only wraps the SVG chart, whose text is numbers this module wrote).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::{Value, json};

use super::recent::{Entry, Minute, Summary, Verdict};
use super::{Search, urlencode};
use crate::serve::Shared;
use crate::serve::connections::Connection;
use cdp_core::shown::ShownBody;

fn page(title: &str, csrf: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · cdp-host console" }
                link rel="stylesheet" href="/console/static/console.css";
                script src="/console/static/console.js" defer {}
            }
            body {
                header {
                    strong { "cdp-host" }
                    @if let Some(csrf) = csrf {
                        nav {
                            a href="/console/" { "Overview" }
                            a href="/console/dead-letters" { "Dead letters" }
                            a href="/console/plugins" { "Plugins" }
                            form method="post" action="/console/logout" class="inline" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

pub(super) fn message(title: &str, text: &str) -> Markup {
    page(title, None, html! { p { (text) } })
}

pub(super) fn refusal(text: &str, back: &str) -> Markup {
    page(
        "Refused",
        None,
        html! {
            p class="refused" id="refusal" { (text) }
            p { "Nothing was changed." }
            p { a href=(back) { "Back" } }
        },
    )
}

pub(super) fn login(error: Option<&str>) -> Markup {
    page(
        "Sign in",
        None,
        html! {
            @if let Some(error) = error { p class="refused" { (error) } }
            form method="post" action="/console/login" {
                label { "Admin token " input type="password" name="token" id="token" autocomplete="off" autofocus; }
                button type="submit" id="sign-in" { "Sign in" }
            }
        },
    )
}

/// One connection's line on the overview.
pub(super) struct Row {
    pub connection: Arc<Connection>,
    pub summary: Summary,
    pub backlog: Option<u64>,
    pub delivered: u64,
    pub skipped: u64,
    pub dead_lettered: u64,
    /// Of those, finished by other hosts (on the stream).
    pub elsewhere: u64,
    pub retried: u64,
    pub throttled: u64,
}

pub(super) fn rows(shared: &Shared, backlog: Option<&BTreeMap<String, u64>>) -> Vec<Row> {
    let console = shared.console.as_ref().expect("the console is on");
    shared
        .connections
        .all()
        .into_iter()
        .map(|connection| {
            let delivery = connection.delivery.clone();
            let progress = &delivery.progress;
            let summary = console
                .recorder
                .get(&connection.id)
                .map(|a| a.summary())
                .unwrap_or_else(|| super::recent::Activity::default().summary());
            Row {
                backlog: backlog.map(|b| b.get(&connection.id).copied().unwrap_or(0)),
                delivered: summary.totals.delivered,
                skipped: summary.totals.skipped,
                dead_lettered: summary.totals.dead_lettered,
                elsewhere: summary.totals.elsewhere,
                retried: progress.retries.load(Ordering::Relaxed),
                throttled: progress.statuses.lock().unwrap().get(&429).copied().unwrap_or(0),
                summary,
                connection,
            }
        })
        .collect()
}

/// The minute now, and the one before (complete).
fn last_minutes(summary: &Summary) -> (Minute, Minute) {
    let n = summary.minutes.len();
    (summary.minutes[n - 1], summary.minutes[n - 2])
}

pub(super) fn live_json(rows: &[Row]) -> Value {
    let mut out = serde_json::Map::new();
    for row in rows {
        let (_, last) = last_minutes(&row.summary);
        out.insert(
            row.connection.id.clone(),
            json!({
                "state": row.connection.state().as_str(),
                "delivered": row.delivered,
                "skipped": row.skipped,
                "dead_lettered": row.dead_lettered,
                "by_other_hosts": row.elsewhere,
                "retried": row.retried,
                "throttled": row.throttled,
                "delivered_last_minute": last.delivered,
                "skipped_last_minute": last.skipped,
                "dead_lettered_last_minute": last.dead_lettered,
                "retried_last_minute": last.retried,
                "throttled_last_minute": last.throttled,
                "backlog": row.backlog,
                "p50_ms": row.summary.p50_ms,
                "p99_ms": row.summary.p99_ms,
            }),
        );
    }
    json!({ "connections": out })
}

/// The last hour, a minute a point: delivered in one line, dead-lettered
/// in another.
fn chart(summary: &Summary) -> Markup {
    let (w, h) = (180.0, 36.0);
    let top = summary
        .minutes
        .iter()
        .map(|m| m.delivered.max(m.dead_lettered))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let line = |f: fn(&Minute) -> u32| {
        summary
            .minutes
            .iter()
            .enumerate()
            .map(|(i, m)| {
                format!(
                    "{:.1},{:.1}",
                    i as f64 * w / 59.0,
                    h - 2.0 - f(m) as f64 * (h - 4.0) / top
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Numbers only, written here: nothing from an event.
    PreEscaped(format!(
        r#"<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="the last hour"><polyline class="dead" points="{}"/><polyline class="delivered" points="{}"/></svg>"#,
        line(|m| m.dead_lettered),
        line(|m| m.delivered)
    ))
}

fn ms(v: Option<u32>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v} ms"))
}

pub(super) fn overview(csrf: &str, rows: &[Row], shared_by_hosts: bool) -> Markup {
    page(
        "Connections",
        Some(csrf),
        html! {
            p class="note" {
                "Counts since this host started, and (below each) in the last full minute; the chart is the last hour, a minute a point (delivered, and dead-lettered in red). "
                @if shared_by_hosts { "On the stream, the counts are every host's (from the outcome records they publish since this host started); retries, 429s and times are this host's own; the backlog is in JetStream." }
                " Updates itself every two seconds."
            }
            table id="connections" {
                thead { tr {
                    th { "Connection" } th { "State" } th { "Plugin" } th { "Delivered" }
                    th { "Skipped" } th { "Dead-lettered" } th { "Retried" } th { "429s" } th { "Backlog" }
                    th { "p50" } th { "p99" } th { "Last hour" }
                } }
                tbody {
                    @for row in rows {
                        @let id = &row.connection.id;
                        @let current = row.connection.slot.current();
                        @let (_, last) = last_minutes(&row.summary);
                        tr data-connection=(id) {
                            td { a href={ "/console/connections/" (urlencode(id)) } { (id) } }
                            td data-live="state" { (row.connection.state().as_str()) }
                            td { (current.plugin.manifest().name) "@" (current.plugin.manifest().version) }
                            @for (key, total, minute) in [
                                ("delivered", row.delivered, last.delivered),
                                ("skipped", row.skipped, last.skipped),
                                ("dead_lettered", row.dead_lettered, last.dead_lettered),
                                ("retried", row.retried, last.retried),
                                ("throttled", row.throttled, last.throttled),
                            ] {
                                td {
                                    span data-live=(key) { (total) }
                                    br;
                                    small class="note" { span data-live={ (key) "_last_minute" } { (minute) } "/min" }
                                }
                            }
                            td data-live="backlog" { (row.backlog.map_or_else(|| "–".to_string(), |b| b.to_string())) }
                            td data-live="p50_ms" { (ms(row.summary.p50_ms)) }
                            td data-live="p99_ms" { (ms(row.summary.p99_ms)) }
                            td { (chart(&row.summary)) }
                        }
                    }
                }
            }
        },
    )
}

/// A setting as shown: a secret as its source, anything else as JSON.
fn setting(value: &Value) -> String {
    match value {
        Value::Object(o) if o.len() == 1 && o.contains_key("env") => {
            format!("env:{}", o["env"].as_str().unwrap_or("?"))
        }
        Value::Object(o) if o.len() == 1 && o.contains_key("file") => {
            format!("file:{}", o["file"].as_str().unwrap_or("?"))
        }
        other => other.to_string(),
    }
}

/// The connection's recent events the search accepts, newest first.
pub(super) fn search(shared: &Shared, id: &str, search: &Search) -> Vec<Entry> {
    let Some(activity) = shared.console.as_ref().and_then(|c| c.recorder.get(id)) else {
        return Vec::new();
    };
    let q = search.q.trim().to_lowercase();
    let outcome = search.outcome.as_str();
    activity.recent(search.after, |e| {
        let outcome_ok = outcome.is_empty() || e.verdict.word() == outcome;
        let q_ok = q.is_empty()
            || e.message_id.as_deref().is_some_and(|m| m.to_lowercase() == q)
            || e.person.as_deref().is_some_and(|p| p.to_lowercase().contains(&q))
            || e.trace.as_ref().is_some_and(|t| t.event.to_lowercase().contains(&q));
        outcome_ok && q_ok
    })
}

/// A JSON text, indented for reading when it is JSON (as it is otherwise).
fn pretty(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| text.to_string())
}

fn when(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at)
        .format("%H:%M:%S%.3f")
        .to_string()
}

fn entry_row(e: &Entry) -> Markup {
    let class = match e.verdict {
        Verdict::Delivered => "ok",
        Verdict::Skipped(_) => "skip",
        Verdict::DeadLettered(_) | Verdict::Abandoned(_) => "bad",
    };
    html! {
        tr class={ "event " (class) } data-serial=(e.serial) data-message-id=[e.message_id.as_deref()] {
            td { (when(e.finished)) }
            td { (e.kind) }
            td class="mono" { (e.message_id.as_deref().unwrap_or("–")) }
            td class="verdict" { (e.verdict.word()) @if let Some(r) = e.verdict.reason() { ": " (r) } }
            td { (e.statuses.iter().filter(|s| **s != 0).map(u16::to_string).collect::<Vec<_>>().join(", ")) }
            td { (e.took_ms.map_or_else(|| "–".to_string(), |t| format!("{t} ms"))) }
            td { (e.plugin_version) }
            td {
                details {
                    summary { "event, requests, answers" }
                    @if let Some(trace) = &e.trace {
                        h4 { "Event" }
                        pre class="event-body" { (pretty(&trace.event)) }
                        @for (i, r) in trace.requests.iter().enumerate() {
                            @let shown = r.shown();
                            h4 { "Request " (i + 1) ": " (shown.method) " " (shown.url) }
                            pre class="request" {
                                @for (name, value) in &shown.headers {
                                    (name) ": " (value.as_str().unwrap_or_default()) "\n"
                                }
                                "\n"
                                @match &shown.body { ShownBody::Json(t) | ShownBody::Text(t) => (pretty(t)) }
                            }
                            @if let Some(answer) = &r.response {
                                h4 { "Answer: HTTP " (answer.status) }
                                pre class="answer" { @if answer.body.is_empty() { "(no body)" } @else { (pretty(&answer.body)) } }
                            } @else if r.batched {
                                p class="note" { "Sent in a bulk request with other events; accepted." }
                            } @else {
                                p class="note" { "No answer." }
                            }
                        }
                        p class="note" { "Sending took " (trace.sending.as_millis()) " ms; retries: " (e.retries) "." }
                    } @else {
                        p class="note" { "No trace: " (e.no_trace.unwrap_or("none was kept")) "." }
                    }
                    @for w in &e.warnings { p class="warning" { "Warning: " (w) } }
                }
            }
        }
    }
}

pub(super) fn tail(entries: &[Entry]) -> Markup {
    html! { @for e in entries { (entry_row(e)) } }
}

pub(super) fn connection(
    shared: &Shared,
    csrf: &str,
    connection: &Connection,
    search: &Search,
    entries: &[Entry],
) -> Markup {
    let spec = connection.spec();
    let current = connection.slot.current();
    let previous = connection.slot.previous();
    let id = &connection.id;
    let ring = shared.console.as_ref().map_or(0, |c| c.recorder.options.ring);
    html! {
        (page(&format!("Connection {id}"), Some(csrf), html! {
            section {
                p {
                    "State: " strong id="state" { (connection.state().as_str()) }
                    " · plugin " strong id="plugin" { (current.plugin.manifest().name) "@" (current.plugin.manifest().version) }
                    @if let Some(p) = &previous { " (before it: " (p.plugin.manifest().version) ")" }
                    " · " a href={ "/console/dead-letters?connection=" (urlencode(id)) } { "dead letters" }
                }
                form method="post" action={ "/console/connections/" (urlencode(id)) "/state" } class="inline" {
                    input type="hidden" name="csrf" value=(csrf);
                    @if connection.state().as_str() == "paused" {
                        input type="hidden" name="state" value="active";
                        button type="submit" { "Resume" }
                    } @else {
                        input type="hidden" name="state" value="paused";
                        button type="submit" { "Pause" }
                    }
                }
            }
            h2 { "Settings" }
            @if connection.from_flags {
                p class="note" { "Defined by serve's flags; its key comes from the environment and is never shown." }
            }
            table id="settings" {
                @for (name, value) in &spec.settings { tr { th { (name) } td class="mono" { (setting(value)) } } }
                tr { th { "write keys" } td { (spec.write_key_hashes.len()) " (kept as hashes; never shown)" } }
                @if let Some(base) = &spec.base_url { tr { th { "base URL" } td class="mono" { (base) } } }
            }
            h2 { "Recent events" }
            p class="note" {
                "The last " (ring) " events this host finished for this connection, newest first; new ones appear as they finish. "
                "Search by messageId, person (email or userId) or any text of the event."
            }
            form method="get" id="search" {
                input type="search" name="q" value=(search.q) placeholder="messageId, email, userId…";
                select name="outcome" {
                    @for (value, label) in [("", "any outcome"), ("delivered", "delivered"), ("skipped", "skipped"), ("dead-lettered", "dead-lettered")] {
                        option value=(value) selected[search.outcome == value] { (label) }
                    }
                }
                button type="submit" { "Search" }
            }
            table id="events" data-tail={ "/console/connections/" (urlencode(id)) "/tail" } data-q=(search.q) data-outcome=(search.outcome) {
                thead { tr { th { "Finished" } th { "Type" } th { "messageId" } th { "Outcome" } th { "HTTP" } th { "Took" } th { "Plugin" } th { "Details" } } }
                tbody { (tail(entries)) }
            }
        }))
    }
}

pub(super) fn dead_letters(csrf: &str, shared: &Shared, connection: Option<&str>, letters: &[Value]) -> Markup {
    let text = |v: &Value| match v {
        Value::Null => "–".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let ids: Vec<String> = shared.connections.all().iter().map(|c| c.id.clone()).collect();
    let confirm = |label: &str| {
        html! { label class="confirm" { input type="checkbox" name="confirm" value="yes" required; " " (label) } }
    };
    html! {
        (page("Dead letters", Some(csrf), html! {
            form method="get" class="inline" {
                select name="connection" {
                    option value="" { "all connections" }
                    @for id in &ids { option value=(id) selected[connection == Some(id.as_str())] { (id) } }
                }
                button type="submit" { "Show" }
            }
            p { (letters.len()) @if letters.len() == 1 { " letter" } @else { " letters" } @if letters.len() >= 200 { " (the oldest 200)" } "." }
            @if !letters.is_empty() {
                form method="post" action="/console/dead-letters/replay" class="inline" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="connection" value=[connection];
                    input type="hidden" name="back" value=[connection];
                    (confirm("sure")) button type="submit" id="replay-all" { "Replay all shown" }
                }
                form method="post" action="/console/dead-letters/purge" class="inline" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="connection" value=[connection];
                    input type="hidden" name="back" value=[connection];
                    (confirm("sure")) button type="submit" class="danger" id="purge-all" { "Purge all shown" }
                }
            }
            table id="letters" {
                thead { tr { th { "Id" } th { "Connection" } th { "messageId" } th { "Reason" } th { "Plugin" } th { "Answer" } th { "" } } }
                tbody {
                    @for letter in letters {
                        @let id = text(&letter["id"]);
                        tr data-letter=(id) {
                            td { (id) }
                            td { (text(&letter["connection"])) }
                            td class="mono" { (text(&letter["message_id"])) }
                            td { (text(&letter["reason"])) }
                            td { (text(&letter["plugin_version"])) }
                            td {
                                details {
                                    summary { "HTTP " (text(&letter["response"]["status"])) }
                                    pre { (serde_json::to_string_pretty(&letter["response"]).unwrap_or_default()) }
                                    h4 { "Request" }
                                    pre { (serde_json::to_string_pretty(&letter["request"]).unwrap_or_default()) }
                                    h4 { "Event" }
                                    pre { (pretty(&text(&letter["event"]))) }
                                }
                            }
                            td {
                                form method="post" action="/console/dead-letters/replay" class="inline" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    input type="hidden" name="id" value=(id);
                                    input type="hidden" name="back" value=[connection];
                                    (confirm("sure")) button type="submit" class="replay" { "Replay" }
                                }
                                form method="post" action="/console/dead-letters/purge" class="inline" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    input type="hidden" name="id" value=(id);
                                    input type="hidden" name="back" value=[connection];
                                    (confirm("sure")) button type="submit" class="danger purge" { "Purge" }
                                }
                            }
                        }
                    }
                }
            }
        }))
    }
}

pub(super) fn plugins(csrf: &str, shared: &Shared) -> Markup {
    let stored = shared.connections.store.loaded();
    let connections = shared.connections.all();
    html! {
        (page("Plugins", Some(csrf), html! {
            h2 { "Stored versions" }
            table id="versions" {
                thead { tr { th { "Name" } th { "Version" } th { "Interface" } th { "API revision" } th { "Settings" } th { "SHA-256" } } }
                tbody {
                    @for p in &stored {
                        @let m = p.manifest();
                        tr {
                            td { (m.name) } td { (m.version) } td { (p.interface()) } td { (m.api_revision) }
                            td { (m.settings.iter().map(|s| if s.secret { format!("{} (secret)", s.name) } else { s.name.clone() }).collect::<Vec<_>>().join(", ")) }
                            td class="mono" { (p.sha256_hex()) }
                        }
                    }
                }
            }
            h2 { "Connections" }
            p class="note" { "Putting a version on one connection runs its canary first (the golden events under that connection's settings); a refusal leaves the version serving as it was." }
            table id="serving" {
                thead { tr { th { "Connection" } th { "Serving" } th { "Before it" } th { "Put a version on it" } th { "" } } }
                tbody {
                    @for c in &connections {
                        @let current = c.slot.current();
                        @let previous = c.slot.previous();
                        tr data-connection=(c.id) {
                            td { (c.id) }
                            td class="serving" { (current.plugin.manifest().version) " " span class="mono" { (short(&current.plugin.sha256_hex())) } }
                            td { @if let Some(p) = &previous { (p.plugin.manifest().version) } @else { "–" } }
                            td {
                                form method="post" action={ "/console/connections/" (urlencode(&c.id)) "/plugin" } class="inline" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    select name="sha256" {
                                        @for p in stored.iter().filter(|p| p.manifest().name == c.slot.name()) {
                                            option value=(p.sha256_hex()) selected[p.sha256_hex() == current.plugin.sha256_hex()] {
                                                (p.manifest().version) " " (short(&p.sha256_hex()))
                                            }
                                        }
                                    }
                                    button type="submit" class="swap" { "Put on" }
                                }
                            }
                            td {
                                @if previous.is_some() {
                                    form method="post" action={ "/console/connections/" (urlencode(&c.id)) "/rollback" } class="inline" {
                                        input type="hidden" name="csrf" value=(csrf);
                                        button type="submit" class="rollback" { "Roll back" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }))
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}
