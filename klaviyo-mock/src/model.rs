//! What the sandbox holds, kept the way Klaviyo keeps it: profiles matched
//! by email, phone and external id (with Klaviyo's 409 when email and phone
//! belong to different profiles), and events deduplicated by (profile,
//! metric, unique_id), duplicates being accepted and dropped, as Klaviyo
//! does after its 202.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::validate::{ApiError, EventInput, ProfileInput};

#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub id: String,
    pub email: Option<String>,
    pub phone_number: Option<String>,
    pub external_id: Option<String>,
    pub anonymous_ids: Vec<String>,
    pub attributes: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoredEvent {
    pub id: String,
    pub metric: String,
    pub profile_id: String,
    pub unique_id: String,
    pub time: Option<String>,
    pub value: Option<f64>,
    pub properties: Map<String, Value>,
}

/// One accepted write, in arrival order: which profile, and what.
#[derive(Debug, Clone, Serialize)]
pub struct Arrival {
    pub profile_id: String,
    /// `profile-import`, or the event's metric name.
    pub what: String,
    /// What was written: a profile-import's attributes, or an event's
    /// `unique_id` and properties (for checkers of order and duplicates).
    pub detail: Value,
}

/// Counters shown at `/sandbox/stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub requests: u64,
    pub accepted: u64,
    /// Events that arrived again with a (profile, metric, unique_id)
    /// already stored: accepted with 202 and dropped, as Klaviyo does.
    pub deduplicated: u64,
    pub profiles_created: u64,
    pub profiles_updated: u64,
    /// Rejections by "status code", e.g. "400 invalid".
    pub rejected: BTreeMap<String, u64>,
    /// Injected faults by kind.
    pub faults: BTreeMap<String, u64>,
    /// 429 answers by endpoint.
    pub throttled: BTreeMap<String, u64>,
    pub by_endpoint: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct Model {
    profiles: Vec<Profile>,
    by_email: HashMap<String, usize>,
    by_phone: HashMap<String, usize>,
    by_external_id: HashMap<String, usize>,
    by_anonymous_id: HashMap<String, usize>,
    events: Vec<StoredEvent>,
    seen: HashSet<(String, String, String)>,
    arrivals: Vec<Arrival>,
    jobs: Vec<ImportJob>,
    pub stats: Stats,
}

/// A bulk profile import: queued when created, applied once `due`.
struct ImportJob {
    id: String,
    created_at: DateTime<Utc>,
    due: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    /// Each profile of the request: valid, or its import error.
    profiles: Vec<Result<ProfileInput, ApiError>>,
    completed: usize,
    errors: Vec<Value>,
}

/// What a profile upsert did.
pub enum Upsert {
    Created(String),
    Updated(String),
}

impl Model {
    /// Queues a bulk import; its document, as the 202 answers it.
    pub fn create_job(
        &mut self,
        profiles: Vec<Result<ProfileInput, ApiError>>,
        now: DateTime<Utc>,
        processing: chrono::Duration,
    ) -> Value {
        let id = format!("job{:08}", self.jobs.len() + 1);
        self.jobs.push(ImportJob {
            id: id.clone(),
            created_at: now,
            due: now + processing,
            completed_at: None,
            profiles,
            completed: 0,
            errors: Vec::new(),
        });
        self.job(&id, now).expect("just created")
    }

    /// Applies every job whose processing time has passed.
    pub fn settle(&mut self, now: DateTime<Utc>) {
        let mut jobs = std::mem::take(&mut self.jobs);
        for job in jobs.iter_mut().filter(|j| j.completed_at.is_none() && j.due <= now) {
            for (index, profile) in std::mem::take(&mut job.profiles).into_iter().enumerate() {
                let applied = profile.and_then(|p| self.import_profile(&p).map(|_| ()));
                match applied {
                    Ok(()) => job.completed += 1,
                    Err(error) => {
                        // Every import error points at its profile, whatever
                        // the failure (a validation error already does; a
                        // conflict found while applying it does not).
                        let at = format!("/data/attributes/profiles/data/{index}");
                        let pointer = match error.pointer.clone() {
                            Some(pointer) if pointer == at || pointer.starts_with(&format!("{at}/")) => pointer,
                            _ => at,
                        };
                        job.errors.push(json!({
                            "type": "import-error",
                            "id": format!("{}-{index}", job.id),
                            "attributes": {
                                "code": error.code,
                                "title": error.title,
                                "detail": error.detail,
                                "source": {"pointer": pointer},
                                "original_payload": {"index": index},
                            },
                        }));
                    }
                }
            }
            job.completed_at = Some(now);
        }
        self.jobs = jobs;
    }

    /// A job's document (`GET /api/profile-bulk-import-jobs/{id}`).
    pub fn job(&self, id: &str, now: DateTime<Utc>) -> Option<Value> {
        let job = self.jobs.iter().find(|j| j.id == id)?;
        let time = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
        let total = job.completed + job.errors.len() + job.profiles.len();
        let status = match job.completed_at {
            Some(_) => "complete",
            None if now >= job.created_at + (job.due - job.created_at) / 2 => "processing",
            None => "queued",
        };
        Some(json!({"data": {
            "type": "profile-bulk-import-job",
            "id": job.id,
            "attributes": {
                "status": status,
                "created_at": time(job.created_at),
                "total_count": total,
                "completed_count": job.completed,
                "failed_count": job.errors.len(),
                "completed_at": job.completed_at.map(time),
                "expires_at": time(job.created_at + chrono::Duration::days(7)),
                "started_at": time(job.created_at),
            },
            "links": {"self": format!("/api/profile-bulk-import-jobs/{}", job.id)},
        }}))
    }

    /// A job's import errors (`GET …/{id}/import-errors`), one page.
    pub fn job_errors(&self, id: &str) -> Option<Value> {
        let job = self.jobs.iter().find(|j| j.id == id)?;
        Some(
            json!({"data": job.errors, "links": {"self": format!("/api/profile-bulk-import-jobs/{id}/import-errors"), "next": null, "prev": null}}),
        )
    }

    pub fn events(&self) -> &[StoredEvent] {
        &self.events
    }

    pub fn profiles(&self) -> &[Profile] {
        &self.profiles
    }

    pub fn arrivals(&self) -> &[Arrival] {
        &self.arrivals
    }

    /// A profile-import, logged as an arrival.
    pub fn import_profile(&mut self, input: &ProfileInput) -> Result<Upsert, ApiError> {
        let upsert = self.upsert_profile(input)?;
        let (Upsert::Created(id) | Upsert::Updated(id)) = &upsert;
        self.arrivals.push(Arrival {
            profile_id: id.clone(),
            what: "profile-import".to_string(),
            detail: Value::Object(input.attributes.clone()),
        });
        Ok(upsert)
    }

    /// Create or update a profile (profile-import). Attributes given as
    /// `null` are cleared; absent ones are left as they are.
    pub fn upsert_profile(&mut self, input: &ProfileInput) -> Result<Upsert, ApiError> {
        let found = self.find(input)?;
        let index = match found {
            Some(index) => index,
            None => {
                self.profiles.push(Profile {
                    id: format!("01SANDBOX{:016}", self.profiles.len() + 1),
                    email: None,
                    phone_number: None,
                    external_id: None,
                    anonymous_ids: Vec::new(),
                    attributes: Map::new(),
                });
                self.profiles.len() - 1
            }
        };
        self.merge(index, input);
        let id = self.profiles[index].id.clone();
        Ok(match found {
            Some(_) => {
                self.stats.profiles_updated += 1;
                Upsert::Updated(id)
            }
            None => {
                self.stats.profiles_created += 1;
                Upsert::Created(id)
            }
        })
    }

    /// Store an event, creating or updating its profile. `true` when it was
    /// new, `false` when its (profile, metric, unique_id) was seen before.
    pub fn add_event(&mut self, input: EventInput, received_at: &str) -> Result<bool, ApiError> {
        // The Events API resolves the profile without failing on a conflict:
        // the email's profile wins.
        let index = match self.find(&input.profile) {
            Ok(found) => found,
            Err(_) => input
                .profile
                .email
                .as_ref()
                .and_then(|e| self.by_email.get(&e.to_lowercase()).copied()),
        };
        let profile_id = match index {
            Some(index) => {
                self.merge(index, &input.profile);
                self.profiles[index].id.clone()
            }
            None => match self.upsert_profile(&input.profile)? {
                Upsert::Created(id) | Upsert::Updated(id) => id,
            },
        };
        // Without a unique_id Klaviyo uses the time to the second.
        let unique_id = input.unique_id.clone().unwrap_or_else(|| {
            input
                .time
                .clone()
                .unwrap_or_else(|| received_at[..19.min(received_at.len())].to_string())
        });
        let key = (profile_id.clone(), input.metric.clone(), unique_id.clone());
        if !self.seen.insert(key) {
            self.stats.deduplicated += 1;
            return Ok(false);
        }
        self.arrivals.push(Arrival {
            profile_id: profile_id.clone(),
            what: input.metric.clone(),
            detail: serde_json::json!({"unique_id": unique_id, "properties": input.properties}),
        });
        self.events.push(StoredEvent {
            id: format!("evt{:012}", self.events.len() + 1),
            metric: input.metric,
            profile_id,
            unique_id,
            time: input.time,
            value: input.value,
            properties: input.properties,
        });
        Ok(true)
    }

    fn find(&self, input: &ProfileInput) -> Result<Option<usize>, ApiError> {
        let by_email = input
            .email
            .as_ref()
            .and_then(|e| self.by_email.get(&e.to_lowercase()).copied());
        let by_phone = input.phone_number.as_ref().and_then(|p| self.by_phone.get(p).copied());
        if let (Some(a), Some(b)) = (by_email, by_phone)
            && a != b
        {
            let mut error = ApiError::new(
                409,
                "duplicate_profile",
                "Conflict.",
                "A profile already exists with one of these identifiers.",
            );
            error.pointer = Some("/data/attributes".to_string());
            error.meta.insert(
                "duplicate_profile_id".into(),
                Value::String(self.profiles[b].id.clone()),
            );
            return Err(error);
        }
        Ok(by_email
            .or(by_phone)
            .or_else(|| {
                input
                    .external_id
                    .as_ref()
                    .and_then(|x| self.by_external_id.get(x).copied())
            })
            .or_else(|| {
                input
                    .anonymous_id
                    .as_ref()
                    .and_then(|x| self.by_anonymous_id.get(x).copied())
            }))
    }

    fn merge(&mut self, index: usize, input: &ProfileInput) {
        let profile = &mut self.profiles[index];
        if let Some(email) = &input.email {
            profile.email = Some(email.clone());
            self.by_email.insert(email.to_lowercase(), index);
        }
        if let Some(phone) = &input.phone_number {
            profile.phone_number = Some(phone.clone());
            self.by_phone.insert(phone.clone(), index);
        }
        if let Some(external_id) = &input.external_id {
            profile.external_id = Some(external_id.clone());
            self.by_external_id.insert(external_id.clone(), index);
        }
        if let Some(anonymous_id) = &input.anonymous_id
            && !profile.anonymous_ids.contains(anonymous_id)
        {
            profile.anonymous_ids.push(anonymous_id.clone());
            self.by_anonymous_id.insert(anonymous_id.clone(), index);
        }
        for (key, value) in &input.attributes {
            if matches!(key.as_str(), "email" | "phone_number" | "external_id" | "anonymous_id") {
                continue;
            }
            match (key.as_str(), value) {
                ("location" | "properties", Value::Object(fields)) => {
                    let target = profile
                        .attributes
                        .entry(key.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Some(target) = target.as_object_mut() {
                        for (k, v) in fields {
                            if v.is_null() {
                                target.remove(k);
                            } else {
                                target.insert(k.clone(), v.clone());
                            }
                        }
                    }
                }
                (_, Value::Null) => {
                    profile.attributes.remove(key);
                }
                _ => {
                    profile.attributes.insert(key.clone(), value.clone());
                }
            }
        }
    }
}
