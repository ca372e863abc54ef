//! One request's life: paced, sent, its answer judged by the plugin's
//! `interpret`, and then delivered, retried after a backoff, replaced once,
//! or given up as undelivered.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use plugin_runtime::{BatchItem, CallError, Header, HttpRequest, HttpResponse, Plugin, Verdict};
use rand::Rng;
use tokio::time::Instant;

use super::Delivery;
use super::batch::{ItemOutcome, Route};
use crate::mapping::EventId;
use crate::settings::Render;

/// A request's body, handed to the HTTP client without a copy.
struct RequestBody(Arc<HttpRequest>);

impl AsRef<[u8]> for RequestBody {
    fn as_ref(&self) -> &[u8] {
        self.0.body.as_bytes()
    }
}

/// Why a request ended undelivered.
pub(super) struct Undelivered {
    pub reason: String,
    pub request: HttpRequest,
    pub response: Option<HttpResponse>,
    /// Dropped unsent by the fence: not for a dead letter.
    pub abandoned: bool,
}

/// A request to send until it is judged, and how.
pub(super) struct Attempts<'a> {
    pub plugin: &'a Arc<Plugin>,
    pub request: &'a Arc<HttpRequest>,
    pub target: &'a url::Url,
    pub headers: &'a [Header],
    /// Its first attempt's rate slot is already taken.
    pub paced: bool,
    /// When the time allowed for retries started.
    pub started: Instant,
}

/// What a judge makes of one answer.
pub(super) enum Judged<T> {
    /// The loop ends with this.
    Settled(T),
    /// Worth another attempt, no sooner than `after_ms` when given. `why`
    /// names the cause when it is not the answer's status (a busy plugin).
    Retry { after_ms: Option<u64>, why: Option<String> },
}

/// How an attempt loop ended.
pub(super) enum Attempted<T> {
    /// Judged, with the answer it was judged on.
    Settled(T, HttpResponse),
    /// The fence stopped it before it left.
    Fenced,
    /// Out of attempts or time: `how` says how many, over how long, and
    /// what the last attempt met ("after 3 attempts over 1.2s; the last
    /// was HTTP 503").
    GaveUp {
        how: String,
        response: Option<HttpResponse>,
    },
}

impl Delivery {
    /// Sends one request until the plugin judges it delivered, or it ends
    /// undelivered; in a batch when `item` says how and the moment is
    /// right (see `batch`). Delivered alone, the destination's answer to
    /// it (to its last replacement, if the plugin replaced it); none when it
    /// went in a batch.
    pub(super) async fn deliver_request(
        self: &Arc<Self>,
        id: EventId,
        plugin: &Arc<Plugin>,
        request: Arc<HttpRequest>,
        item: Option<BatchItem>,
        retries: &mut u64,
    ) -> Result<Option<HttpResponse>, Undelivered> {
        let route = match item {
            Some(item) => self.route(id, plugin, &request, item).await,
            None => Route::Alone,
        };
        let paced = matches!(route, Route::AloneNow);
        if let Route::Batched(outcome) = route {
            match outcome.await {
                Ok(ItemOutcome::Delivered) => return Ok(None),
                Ok(ItemOutcome::Rejected { reason, response }) => {
                    return Err(Undelivered {
                        reason,
                        request: (*request).clone(),
                        response,
                        abandoned: false,
                    });
                }
                Ok(ItemOutcome::Alone) => {}
                Ok(ItemOutcome::Abandoned) => return Err(self.abandon(id, &request)),
                Err(_) => {
                    return Err(Undelivered {
                        reason: "its batch was dropped unsent".to_string(),
                        request: (*request).clone(),
                        response: None,
                        abandoned: false,
                    });
                }
            }
        }
        self.send_alone(id, plugin, request, false, paced, retries).await
    }

    /// Sends one request alone. `replacement` marks a request the plugin
    /// offered in place of a failed one: it may not be replaced again.
    /// `paced`: its first attempt's rate slot is already taken.
    async fn send_alone(
        self: &Arc<Self>,
        id: EventId,
        plugin: &Arc<Plugin>,
        request: Arc<HttpRequest>,
        replacement: bool,
        paced: bool,
        retries: &mut u64,
    ) -> Result<Option<HttpResponse>, Undelivered> {
        // Shared, not copied, with the HTTP client and the plugin's
        // interpret call: a body can be megabytes.
        let undelivered = |reason: String, response: Option<HttpResponse>| Undelivered {
            reason,
            request: (*request).clone(),
            response,
            abandoned: false,
        };
        let target = plugin
            .egress()
            .target(&request.url, self.config.base_url.as_ref())
            .map_err(|e| undelivered(format!("refused to send: {plugin} made {e}"), None))?;
        let headers = self
            .settings
            .load()
            .render_headers(&request, Render::Send)
            .map_err(|e| undelivered(format!("{e:#}"), None))?;
        let started = Instant::now();
        let how = Attempts {
            plugin,
            request: &request,
            target: &target,
            headers: &headers,
            paced,
            started,
        };
        let attempted = self
            .attempt(
                how,
                || self.may_send(id),
                |response| {
                    let (this, request, response) = (&**self, request.clone(), response.clone());
                    async move {
                        match this.interpret(plugin, request, response).await {
                            Ok(Verdict::Retry(after_ms)) => Judged::Retry { after_ms, why: None },
                            Ok(verdict) => Judged::Settled(Ok(verdict)),
                            Err(busy @ CallError::Busy(_)) => Judged::Retry {
                                after_ms: None,
                                why: Some(busy.to_string()),
                            },
                            Err(e) => Judged::Settled(Err(format!("{plugin} {e} while interpreting the answer"))),
                        }
                    }
                },
                |after_ms, delay| {
                    *retries += 1;
                    if let (Some(deferred), Some(_)) = (&self.deferred, after_ms) {
                        deferred(id, std::time::SystemTime::now() + delay);
                    }
                },
            )
            .await;
        let (verdict, response) = match attempted {
            Attempted::Fenced => return Err(self.abandon(id, &request)),
            Attempted::GaveUp { how, response } => return Err(undelivered(format!("gave up {how}"), response)),
            Attempted::Settled(Err(reason), response) => return Err(undelivered(reason, Some(response))),
            Attempted::Settled(Ok(verdict), response) => (verdict, Some(response)),
        };
        match verdict {
            Verdict::Delivered => Ok(response),
            Verdict::Rejected(reason) => Err(undelivered(reason, response)),
            Verdict::Replace(requests) => {
                if replacement {
                    return Err(undelivered(
                        format!("{plugin} asked to replace a replacement request; refused to avoid a loop"),
                        response,
                    ));
                }
                if let Err(e) = plugin.check_requests(&requests) {
                    return Err(undelivered(
                        format!("{plugin} offered a replacement that {e}"),
                        response,
                    ));
                }
                let mut last = response;
                for replacement in requests {
                    last = Box::pin(self.send_alone(id, plugin, Arc::new(replacement), true, false, retries)).await?;
                }
                Ok(last)
            }
            Verdict::Retry(_) => unreachable!("a retry is judged inside the attempt loop"),
        }
    }

    /// The one attempt loop, for a request alone and for a batch: paced,
    /// checked against the fence right before it leaves, sent, and its
    /// answer judged; retried after a backoff (never sooner than the
    /// server asked) until the judge settles it or attempts or time run
    /// out. A transport failure is always worth another try: the request
    /// may not have arrived. `retrying` hears of each retry and its delay.
    pub(super) async fn attempt<T, J: Future<Output = Judged<T>>>(
        &self,
        mut how: Attempts<'_>,
        may_send: impl Fn() -> bool,
        mut judge: impl FnMut(&HttpResponse) -> J,
        mut retrying: impl FnMut(Option<u64>, Duration),
    ) -> Attempted<T> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if self.config.pacing && !std::mem::take(&mut how.paced) {
                self.pacer
                    .load()
                    .acquire(&how.request.rate_class, &how.plugin.manifest().rate_classes)
                    .await;
            }
            if let Some(hold) = &self.hold {
                while hold.load(Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            // Last, right before the request leaves: pacing may have waited.
            if !may_send() {
                return Attempted::Fenced;
            }
            self.requests_sent.fetch_add(1, Ordering::Relaxed);
            let (after_ms, last, response) = match self.send(how.request, how.target, how.headers).await {
                Ok(response) => match judge(&response).await {
                    Judged::Settled(settled) => return Attempted::Settled(settled, response),
                    Judged::Retry { after_ms, why } => {
                        let last = why.unwrap_or_else(|| format!("HTTP {}", response.status));
                        (after_ms, last, Some(response))
                    }
                },
                Err(error) => (None, error, None),
            };
            let delay = self.backoff(attempt, after_ms.map(Duration::from_millis));
            if attempt >= self.config.max_attempts || how.started.elapsed() + delay > self.config.max_retry_time {
                let how = format!(
                    "after {attempt} attempts over {:.1}s; the last was {last}",
                    how.started.elapsed().as_secs_f64()
                );
                return Attempted::GaveUp { how, response };
            }
            self.progress.retries.fetch_add(1, Ordering::Relaxed);
            retrying(after_ms, delay);
            tokio::time::sleep(delay).await;
        }
    }

    /// An event the fence no longer lets this host send.
    fn abandon(&self, id: EventId, request: &HttpRequest) -> Undelivered {
        Undelivered {
            reason: format!("{id} may no longer be sent from here; dropped unsent"),
            request: request.clone(),
            response: None,
            abandoned: true,
        }
    }

    /// Full-jitter exponential backoff, never sooner than the server asked.
    pub(super) fn backoff(&self, attempt: u32, at_least: Option<Duration>) -> Duration {
        let ceiling = self
            .config
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.config.backoff_cap);
        let jittered = Duration::from_secs_f64(rand::rng().random_range(0.0..=ceiling.as_secs_f64()));
        jittered.max(at_least.unwrap_or_default())
    }

    pub(super) async fn send(
        &self,
        request: &Arc<HttpRequest>,
        target: &url::Url,
        headers: &[Header],
    ) -> Result<HttpResponse, String> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut builder = self.client.request(method, target.clone());
        for header in headers {
            builder = builder.header(&header.name, &header.value);
        }
        if !request.body.is_empty() {
            builder = builder.body(Bytes::from_owner(RequestBody(request.clone())));
        }
        let mut response = builder.send().await.map_err(describe_transport_error)?;
        let status = response.status().as_u16();
        *self.progress.statuses.lock().unwrap().entry(status).or_default() += 1;
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| Header {
                name: name.as_str().to_ascii_lowercase(),
                value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            })
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(describe_transport_error)? {
            let room = RESPONSE_BODY_LIMIT.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if room <= chunk.len() {
                break;
            }
        }
        Ok(HttpResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// Asks the plugin what a response means, on a blocking thread (the
    /// call is bounded by the plugin deadline, not by the async runtime),
    /// with an instance from the pool of the version that made the request.
    async fn interpret(
        &self,
        plugin: &Arc<Plugin>,
        request: Arc<HttpRequest>,
        response: HttpResponse,
    ) -> Result<Verdict, CallError> {
        self.plugin_call(plugin, move |instance, settings| {
            instance.interpret(settings, &request, &response)
        })
        .await
    }
}

/// Response bodies beyond this are cut before the plugin sees them.
const RESPONSE_BODY_LIMIT: usize = 64 * 1024;

fn describe_transport_error(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "the answer broke off"
    } else {
        "the connection failed"
    };
    let mut text = format!("{kind} ({error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text.push(')');
    text
}
