//! Plain Rust mirrors of the `chord:destination` WIT types.
//!
//! The mapping is written against these so it compiles and is tested
//! natively; `component.rs` converts them to the generated bindings at the
//! WebAssembly boundary, and nothing else touches the bindings.

/// One HTTP header; names are lower case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// One outbound HTTP request descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub headers: Vec<Header>,
    pub body: String,
    pub idempotency_key: Option<String>,
    pub rate_class: String,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.name == name).map(|h| h.value.as_str())
    }
}

/// What became of one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Send(Vec<Request>),
    Skip(String),
    Error(String),
}

/// The result of mapping one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub outcome: Outcome,
    pub warnings: Vec<String>,
    pub ordering_key: Option<String>,
}

/// A response received for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<Header>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
}

/// What the host should do after a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry(Option<u64>),
    Rejected(String),
    Replace(Vec<Request>),
}

/// A rate budget of the remote API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateClass {
    pub name: &'static str,
    pub burst_per_second: u32,
    pub steady_per_minute: u32,
}

/// The JSON kind of a setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingKind {
    String,
    Boolean,
    StringList,
}

/// One setting the plugin understands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingSpec {
    pub name: &'static str,
    pub kind: SettingKind,
    pub description: &'static str,
    pub required_to_send: bool,
    pub secret: bool,
    pub default_value: Option<&'static str>,
}

/// Who the plugin is and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub name: &'static str,
    pub version: &'static str,
    pub api_revision: &'static str,
    pub allowed_hosts: Vec<&'static str>,
    pub rate_classes: Vec<RateClass>,
    pub settings: Vec<SettingSpec>,
}

/// A setting that is wrong, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingError {
    pub name: String,
    pub reason: String,
}

/// A kind of item sent many to a request (`batch-class`, since 1.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchClass {
    pub name: &'static str,
    pub max_items: u32,
    pub max_bytes: u32,
    pub item_overhead_bytes: u32,
    pub max_wait_ms: u32,
    pub rate_class: &'static str,
}

/// A mapped request as an item of a batch class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchItem {
    pub class: String,
    pub item: String,
    pub dedupe_key: Option<String>,
}

/// What became of one item of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemVerdict {
    Delivered,
    Retry(Option<u64>),
    Rejected(String),
    Alone,
}

/// A request about a batch already sent, and the items already decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowUp {
    pub request: Request,
    pub after_ms: u64,
    pub decided: Vec<(u32, ItemVerdict)>,
}

/// The judgement of a batch's (or a follow-up's) response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchVerdict {
    Items(Vec<ItemVerdict>),
    Retry(Option<u64>),
    FollowUp(FollowUp),
}
