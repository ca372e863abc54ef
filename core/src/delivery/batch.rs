//! Batching, for plugins that export `batching` (contract 1.1): a mapped
//! request the plugin calls batchable waits in its class's queue and goes
//! out with others in one request the plugin assembles; the plugin judges
//! the answer per item. The event's own delivery waits for its item's
//! verdict, so ordering per person, dead letters and counts work as for a
//! single request.
//!
//! Adaptive: at a trickle (the class's queue is empty and the single
//! request's rate class has a slot free now, which it takes) a request
//! goes alone at once; under a
//! backlog the queue fills, and a batch leaves when it is full or its
//! oldest item has waited the class's `max-wait-ms`. Batches stay within
//! the class's item and byte bounds, never hold two items with the same
//! dedupe key, and an assembled body over the bound is split in two.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use plugin_runtime::batching::{next_batch, split_taken};
use plugin_runtime::{
    BatchClass, BatchItem, BatchVerdict, CallError, HttpRequest, HttpResponse, ItemVerdict, Plugin, Use,
};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::Delivery;
use super::request::{Attempted, Attempts, Judged};
use crate::mapping::EventId;
use crate::settings::Render;

/// What became of a request sent in a batch.
pub(super) enum ItemOutcome {
    Delivered,
    Rejected {
        reason: String,
        response: Option<HttpResponse>,
    },
    /// The plugin could not assemble it with others: send it alone.
    Alone,
    /// The fence no longer lets its event be sent from here.
    Abandoned,
}

/// How a request goes out.
pub(super) enum Route {
    Alone,
    /// Alone, at once: its rate slot is already taken.
    AloneNow,
    Batched(oneshot::Receiver<ItemOutcome>),
}

/// The batch queues of one plugin version (items are assembled and judged
/// by the version that mapped them).
pub(super) struct PluginBatching {
    plugin: Arc<Plugin>,
    classes: HashMap<String, Arc<ClassQueue>>,
}

struct ClassQueue {
    class: BatchClass,
    pending: Mutex<VecDeque<Pending>>,
    changed: Notify,
}

struct Pending {
    /// The event it belongs to (for the fence).
    id: EventId,
    item: String,
    dedupe_key: Option<String>,
    done: oneshot::Sender<ItemOutcome>,
    enqueued: Instant,
    not_before: Instant,
    attempts: u32,
}

impl Delivery {
    /// Whether `request` goes alone or waits for a batch (and then its
    /// outcome).
    pub(super) async fn route(
        self: &Arc<Self>,
        id: EventId,
        plugin: &Arc<Plugin>,
        request: &Arc<HttpRequest>,
        item: BatchItem,
    ) -> Route {
        // Without pacing (a destination with no limits) nothing is gained by
        // waiting for a batch; nor are events kept in flight for one.
        if !self.config.pacing && !self.config.batch_always {
            return Route::Alone;
        }
        let Some(batching) = self.batching_of(plugin).await else {
            return Route::Alone;
        };
        let Some(queue) = batching.classes.get(&item.class) else {
            tracing::warn!(%plugin, class = %item.class, "an item of an undeclared batch class; sending the request alone");
            return Route::Alone;
        };
        let BatchItem { item, dedupe_key, .. } = item;
        if item.len() + queue.class.item_overhead_bytes as usize > queue.class.max_bytes as usize {
            return Route::Alone;
        }
        // A trickle: nothing is waiting for a batch and the request's own
        // rate class has a slot free now, which is taken at once (a check
        // without taking it would let many requests see the same slot and
        // then queue for the single endpoint, each with a batch to go in).
        if !self.config.batch_always && queue.pending.lock().unwrap().is_empty() {
            if !self.config.pacing {
                return Route::Alone;
            }
            if self
                .pacer
                .load()
                .try_acquire(&request.rate_class, &plugin.manifest().rate_classes)
            {
                return Route::AloneNow;
            }
        }
        let (done, outcome) = oneshot::channel();
        let now = Instant::now();
        let mut pending = queue.pending.lock().unwrap();
        pending.push_back(Pending {
            id,
            item,
            dedupe_key,
            done,
            enqueued: now,
            not_before: now,
            attempts: 0,
        });
        // The flusher needs waking when the queue was empty (its wait for
        // max-wait-ms starts then), when it is full, and now and then to
        // see whether the bytes fill a batch first.
        if pending.len() == 1 || pending.len() >= queue.class.max_items as usize || pending.len() % 64 == 0 {
            queue.changed.notify_one();
        }
        drop(pending);
        Route::Batched(outcome)
    }

    /// The batch classes of `plugin` under these settings, asked once per
    /// version, with a flusher per class.
    async fn batching_of(self: &Arc<Self>, plugin: &Arc<Plugin>) -> Option<Arc<PluginBatching>> {
        // Per version and settings: the classes and what goes in them
        // follow both (an update through the admin API makes new queues).
        let key = format!("{}:{}", plugin.sha256_hex(), self.settings.load().public_json());
        if let Some(found) = self.batching.lock().unwrap().get(&key) {
            return Some(found.clone());
        }
        let classes = match self
            .plugin_call(plugin, |instance, settings| instance.batch_classes(settings))
            .await
        {
            Ok(classes) => classes,
            Err(e) => {
                tracing::warn!(%plugin, "batch-classes failed ({e}); nothing is batched");
                Vec::new()
            }
        };
        let declared = &plugin.manifest().rate_classes;
        let classes: HashMap<String, Arc<ClassQueue>> = classes
            .into_iter()
            .filter(|class| {
                let ok = declared.iter().any(|r| r.name == class.rate_class) && class.max_items > 0;
                if !ok {
                    tracing::warn!(%plugin, class = %class.name, "a batch class with an undeclared rate class or no room; not used");
                }
                ok
            })
            .map(|class| {
                let queue = Arc::new(ClassQueue {
                    class,
                    pending: Mutex::new(VecDeque::new()),
                    changed: Notify::new(),
                });
                (queue.class.name.clone(), queue)
            })
            .collect();
        let batching = Arc::new(PluginBatching {
            plugin: plugin.clone(),
            classes,
        });
        let mut all = self.batching.lock().unwrap();
        if let Some(found) = all.get(&key) {
            return Some(found.clone());
        }
        let most = batching
            .classes
            .values()
            .map(|q| q.class.max_items as usize)
            .max()
            .unwrap_or(0);
        self.batch_room.fetch_max(most.min(MAX_BATCH_ROOM), Ordering::Relaxed);
        for queue in batching.classes.values() {
            tokio::spawn(flush(Arc::downgrade(self), batching.clone(), queue.clone()));
        }
        all.insert(key, batching.clone());
        Some(batching)
    }

    /// A call on an interpreting instance of `plugin`, on a blocking thread.
    pub(super) async fn plugin_call<R: Send + 'static>(
        &self,
        plugin: &Arc<Plugin>,
        call: impl FnOnce(&mut plugin_runtime::Instance, &str) -> Result<R, CallError> + Send + 'static,
    ) -> Result<R, CallError> {
        let _permit = self.interpreters.acquire().await.expect("never closed");
        // And the host's, when deliveries share one (many connections):
        // each call holds an instance, and they must stay few.
        let _host_permit = match &self.host_interpreters {
            Some(host) => Some(host.clone().acquire_owned().await.expect("never closed")),
            None => None,
        };
        let plugin = plugin.clone();
        let settings = self.settings.load().public_json().to_string();
        tokio::task::spawn_blocking(move || {
            let mut instance = plugin.pool().checkout(&plugin, Use::Interpreting)?;
            call(&mut instance, &settings)
        })
        .await
        .map_err(|e| CallError::Trap(format!("plugin task failed: {e}")))?
    }

    /// Sends one batch until every item has its outcome.
    async fn send_batch(self: Arc<Self>, batching: Arc<PluginBatching>, queue: Arc<ClassQueue>, batch: Vec<Pending>) {
        let plugin = &batching.plugin;
        let class = &queue.class;
        let items: Arc<Vec<String>> = Arc::new(batch.iter().map(|p| p.item.clone()).collect());
        let assembled = self
            .plugin_call(plugin, {
                let (class, items) = (class.name.clone(), items.clone());
                move |instance, settings| instance.assemble(settings, &class, &items)
            })
            .await;
        let request = match assembled {
            Ok(Ok(request)) => request,
            Ok(Err(reason)) => {
                tracing::warn!(%plugin, class = %class.name, "could not assemble a batch ({reason}); sending its items alone");
                return finish_all(batch, || ItemOutcome::Alone);
            }
            Err(e) => {
                tracing::warn!(%plugin, class = %class.name, "assemble failed ({e}); sending the items alone");
                return finish_all(batch, || ItemOutcome::Alone);
            }
        };
        if request.body.len() > class.max_bytes as usize {
            // The estimate was short: halve until each part fits.
            if batch.len() == 1 {
                return finish_all(batch, || ItemOutcome::Alone);
            }
            let mut first = batch;
            let second = first.split_off(first.len() / 2);
            Box::pin(self.clone().send_batch(batching.clone(), queue.clone(), first)).await;
            return Box::pin(self.send_batch(batching, queue, second)).await;
        }
        if let Err(e) = plugin.check_requests(std::slice::from_ref(&request)) {
            let reason = format!("{plugin} assembled a batch request that {e}");
            return finish_all(batch, || ItemOutcome::Rejected {
                reason: reason.clone(),
                response: None,
            });
        }
        self.run_batch(&batching, &queue, batch, items, request).await;
    }

    /// Sends an assembled batch and its follow-ups, and settles each item.
    async fn run_batch(
        self: &Arc<Self>,
        batching: &Arc<PluginBatching>,
        queue: &Arc<ClassQueue>,
        batch: Vec<Pending>,
        items: Arc<Vec<String>>,
        first: HttpRequest,
    ) {
        let plugin = &batching.plugin;
        let class = queue.class.name.clone();
        let mut slots: Vec<Option<Pending>> = batch.into_iter().map(Some).collect();
        let mut current = Arc::new(first);
        let started = Instant::now();
        loop {
            let target = match plugin.egress().target(&current.url, self.config.base_url.as_ref()) {
                Ok(target) => target,
                Err(e) => {
                    let reason = format!("refused to send: {plugin} made {e}");
                    return settle_rest(&mut slots, |_| reject(&reason, None));
                }
            };
            let headers = match self.settings.load().render_headers(&current, Render::Send) {
                Ok(headers) => headers,
                Err(e) => return settle_rest(&mut slots, |_| reject(&format!("{e:#}"), None)),
            };
            let how = Attempts {
                plugin,
                request: &current,
                target: &target,
                headers: &headers,
                paced: false,
                started,
            };
            let attempted = self
                .attempt(
                    how,
                    // An item the fence stops is dropped; the rest go alone,
                    // each fenced on its own (see below).
                    || slots.iter().flatten().all(|p| self.may_send(p.id)),
                    |response| {
                        let (class, items, request, response) =
                            (class.clone(), items.clone(), current.clone(), response.clone());
                        let this = &**self;
                        async move {
                            let judged = this
                                .plugin_call(plugin, move |instance, settings| {
                                    instance.judge(settings, &class, &items, &request, &response)
                                })
                                .await;
                            match judged {
                                Ok(BatchVerdict::Retry(after_ms)) => Judged::Retry { after_ms, why: None },
                                Ok(verdict) => Judged::Settled(Ok(verdict)),
                                Err(CallError::Busy(_)) => Judged::Retry {
                                    after_ms: None,
                                    why: None,
                                },
                                Err(e) => Judged::Settled(Err(format!("{plugin} {e} while judging a batch's answer"))),
                            }
                        }
                    },
                    |_, _| {},
                )
                .await;
            let (verdict, response) = match attempted {
                Attempted::Fenced => {
                    // The batch as assembled holds both kinds of item.
                    return settle_rest(&mut slots, |p| {
                        if self.may_send(p.id) {
                            ItemOutcome::Alone
                        } else {
                            ItemOutcome::Abandoned
                        }
                    });
                }
                Attempted::GaveUp { how, response } => {
                    let reason = format!("gave up on a batch {how}");
                    return settle_rest(&mut slots, |_| reject(&reason, response.clone()));
                }
                Attempted::Settled(Err(reason), response) => {
                    return settle_rest(&mut slots, |_| reject(&reason, Some(response.clone())));
                }
                Attempted::Settled(Ok(verdict), response) => (verdict, response),
            };
            let last = format!("HTTP {}", response.status);
            let response = Some(response);
            match verdict {
                BatchVerdict::Items(verdicts) => {
                    let mut again = Vec::new();
                    for (slot, verdict) in slots.iter_mut().zip(verdicts) {
                        let Some(pending) = slot.take() else { continue };
                        match verdict {
                            ItemVerdict::Delivered => {
                                let _ = pending.done.send(ItemOutcome::Delivered);
                            }
                            ItemVerdict::Rejected(reason) => {
                                let _ = pending.done.send(reject(&reason, response.clone()));
                            }
                            ItemVerdict::Alone => {
                                let _ = pending.done.send(ItemOutcome::Alone);
                            }
                            ItemVerdict::Retry(after) => again.push((pending, after)),
                        }
                    }
                    self.requeue(queue, again, response.as_ref());
                    return;
                }
                BatchVerdict::Retry(_) => unreachable!("a retry is judged inside the attempt loop"),
                BatchVerdict::FollowUp(follow) => {
                    for decision in follow.decided {
                        let Some(slot) = slots.get_mut(decision.index as usize) else {
                            continue;
                        };
                        let Some(pending) = slot.take() else { continue };
                        let outcome = match decision.verdict {
                            ItemVerdict::Delivered => ItemOutcome::Delivered,
                            ItemVerdict::Alone => ItemOutcome::Alone,
                            ItemVerdict::Rejected(reason) => reject(&reason, response.clone()),
                            ItemVerdict::Retry(_) => {
                                *slot = Some(pending);
                                continue;
                            }
                        };
                        let _ = pending.done.send(outcome);
                    }
                    if let Err(e) = plugin.check_requests(std::slice::from_ref(&follow.request)) {
                        let reason = format!("{plugin} asked for a follow-up request that {e}");
                        return settle_rest(&mut slots, |_| reject(&reason, response.clone()));
                    }
                    if started.elapsed() > self.config.max_retry_time {
                        let reason = format!(
                            "gave up following a batch up after {:.0}s; the last answer was {last}",
                            started.elapsed().as_secs_f64()
                        );
                        return settle_rest(&mut slots, |_| reject(&reason, response.clone()));
                    }
                    // A follow-up is a new request: its own attempts.
                    current = Arc::new(follow.request);
                    tokio::time::sleep(Duration::from_millis(follow.after_ms.min(60_000))).await;
                }
            }
        }
    }

    /// Puts items the plugin wants sent again back in their queue, after a
    /// backoff; an item out of attempts is given up.
    fn requeue(&self, queue: &ClassQueue, again: Vec<(Pending, Option<u64>)>, response: Option<&HttpResponse>) {
        if again.is_empty() {
            return;
        }
        // One backoff for all of them, so that they leave together again.
        let attempts = again.iter().map(|(item, _)| item.attempts + 1).max().unwrap_or(1);
        let after = again.iter().filter_map(|(_, after)| *after).max();
        let ready = Instant::now() + self.backoff(attempts, after.map(Duration::from_millis));
        let mut pending = queue.pending.lock().unwrap();
        for (mut item, _) in again.into_iter().rev() {
            item.attempts += 1;
            if item.attempts >= self.config.max_attempts || item.enqueued.elapsed() > self.config.max_retry_time {
                let reason = format!("gave up after {} batches that did not settle it", item.attempts);
                let _ = item.done.send(reject(&reason, response.cloned()));
                continue;
            }
            self.progress.retries.fetch_add(1, Ordering::Relaxed);
            item.not_before = ready;
            pending.push_front(item);
        }
        drop(pending);
        queue.changed.notify_one();
    }
}

/// The most events the engine keeps in flight for batches, whatever a
/// class allows (each holds its event and requests in memory).
const MAX_BATCH_ROOM: usize = 4_000;

fn reject(reason: &str, response: Option<HttpResponse>) -> ItemOutcome {
    ItemOutcome::Rejected {
        reason: reason.to_string(),
        response,
    }
}

fn finish_all(batch: Vec<Pending>, outcome: impl Fn() -> ItemOutcome) {
    for pending in batch {
        let _ = pending.done.send(outcome());
    }
}

fn settle_rest(slots: &mut [Option<Pending>], outcome: impl Fn(&Pending) -> ItemOutcome) {
    for pending in slots.iter_mut().filter_map(Option::take) {
        let result = outcome(&pending);
        let _ = pending.done.send(result);
    }
}

/// A class's flusher: a batch leaves when it is full, or when its oldest
/// ready item has waited `max-wait-ms`.
async fn flush(delivery: Weak<Delivery>, batching: Arc<PluginBatching>, queue: Arc<ClassQueue>) {
    let class = queue.class.clone();
    let max_wait = Duration::from_millis(class.max_wait_ms.into());
    loop {
        let wake = {
            let pending = queue.pending.lock().unwrap();
            let now = Instant::now();
            let ready = pending.iter().filter(|p| p.not_before <= now).count();
            let oldest = pending.iter().filter(|p| p.not_before <= now).map(|p| p.enqueued).min();
            let bytes: usize = pending
                .iter()
                .filter(|p| p.not_before <= now)
                .map(|p| p.item.len() + class.item_overhead_bytes as usize)
                .sum();
            let full = ready >= class.max_items as usize || bytes >= class.max_bytes as usize;
            let due = oldest.is_some_and(|t| now.duration_since(t) >= max_wait);
            if ready > 0 && (full || due) {
                None
            } else {
                let next_ready = pending.iter().map(|p| p.not_before).filter(|t| *t > now).min();
                let next_due = oldest.map(|t| t + max_wait);
                Some(next_ready.into_iter().chain(next_due).min())
            }
        };
        match wake {
            Some(at) => {
                let sleep = match at {
                    Some(at) => tokio::time::sleep_until(at),
                    None => tokio::time::sleep(Duration::from_secs(3600)),
                };
                tokio::select! {
                    _ = queue.changed.notified() => {}
                    _ = sleep => {}
                }
                if delivery.strong_count() == 0 {
                    return;
                }
            }
            None => {
                let batch = take_batch(&queue);
                let Some(delivery) = delivery.upgrade() else { return };
                if !batch.is_empty() {
                    tokio::spawn(delivery.send_batch(batching.clone(), queue.clone(), batch));
                }
            }
        }
    }
}

/// The ready items, oldest first, within the class's bounds, at most one
/// per dedupe key (`plugin_runtime::batching::next_batch`); the rest stay
/// queued in order.
fn take_batch(queue: &ClassQueue) -> Vec<Pending> {
    let mut pending = queue.pending.lock().unwrap();
    let now = Instant::now();
    let taken = next_batch(
        &queue.class,
        pending
            .iter()
            .map(|p| (p.item.len(), p.dedupe_key.as_deref(), p.not_before <= now)),
    );
    let (batch, kept) = split_taken(pending.drain(..), &taken);
    *pending = kept.into();
    batch
}
