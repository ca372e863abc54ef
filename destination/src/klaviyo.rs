//! What Klaviyo's API is, in one place: endpoints, the pinned revision, rate
//! budgets and ingestion limits. Every other module refers to these; none
//! repeats a number. Sources: `shared/klaviyo/API-NOTES.md` (OpenAPI
//! 2026-07-15 and Klaviyo's events overview).

use crate::contract::RateClass;

/// The API revision this plugin is written against and sends by default.
pub const REVISION: &str = "2026-07-15";

/// The only host the plugin sends to.
pub const HOST: &str = "a.klaviyo.com";

pub const EVENTS_PATH: &str = "/api/events";
pub const PROFILE_IMPORT_PATH: &str = "/api/profile-import";
pub const BULK_EVENTS_PATH: &str = "/api/event-bulk-create-jobs";
pub const BULK_PROFILES_PATH: &str = "/api/profile-bulk-import-jobs";

/// JSON:API media type, for `content-type` and `accept`.
pub const MEDIA_TYPE: &str = "application/vnd.api+json";

/// `Authorization` value; the host fills in the secret.
pub const AUTHORIZATION: &str = "Klaviyo-API-Key {{secret:api_key}}";

/// `POST /api/events`: burst 350/s, steady 3500/min (scope events:write).
pub const EVENTS_RATE: RateClass = RateClass {
    name: "events",
    burst_per_second: 350,
    steady_per_minute: 3500,
};

/// `POST /api/profile-import`: burst 75/s, steady 750/min (scope profiles:write).
pub const PROFILES_RATE: RateClass = RateClass {
    name: "profiles",
    burst_per_second: 75,
    steady_per_minute: 750,
};

/// `POST /api/event-bulk-create-jobs`: burst 10/s, steady 150/min (scope
/// events:write), up to 1,000 events and 5 MB a request.
pub const BULK_EVENTS_RATE: RateClass = RateClass {
    name: "bulk_events",
    burst_per_second: 10,
    steady_per_minute: 150,
};

/// `POST /api/profile-bulk-import-jobs`: burst 10/s, steady 150/min (scopes
/// lists:write and profiles:write), up to 10,000 profiles and 5 MB.
pub const BULK_PROFILES_RATE: RateClass = RateClass {
    name: "bulk_profiles",
    burst_per_second: 10,
    steady_per_minute: 150,
};

/// `GET /api/profile-bulk-import-jobs/{id}` and its `import-errors`: each
/// burst 10/s, steady 150/min; counted together, which stays inside both.
pub const BULK_JOBS_RATE: RateClass = RateClass {
    name: "bulk_jobs",
    burst_per_second: 10,
    steady_per_minute: 150,
};

/// Name of the per-item metric of the optional order fan-out (Klaviyo's own).
pub const ORDERED_PRODUCT_METRIC: &str = "Ordered Product";

/// Klaviyo's documented ingestion limits. Where Klaviyo's own wording is
/// loose ("100 KB"), the smaller reading is used so we stay inside.
pub mod limits {
    /// A metric name "must be less than 128 characters".
    pub const METRIC_NAME_CHARS: usize = 127;
    /// Event properties per event.
    pub const EVENT_PROPERTIES: usize = 400;
    /// Any one string value, in bytes.
    pub const STRING_BYTES: usize = 100_000;
    /// Object nesting depth (the properties object is level 1).
    pub const NESTING_DEPTH: usize = 10;
    /// Items in any one array.
    pub const ARRAY_ITEMS: usize = 4_000;
    /// The profile object inside an event, serialised.
    pub const EVENT_PROFILE_BYTES: usize = 95_000;
    /// A whole profile-import body.
    pub const PROFILE_IMPORT_BYTES: usize = 100_000;
    /// Any request body.
    pub const BODY_BYTES: usize = 5_000_000;
    /// Events in one bulk create request.
    pub const BULK_EVENTS: usize = 1_000;
    /// Profiles in one bulk import request.
    pub const BULK_PROFILES: usize = 10_000;
    /// `unique_id`, `external_id`: 1 to 255 characters.
    pub const ID_CHARS: usize = 255;
    /// An email address.
    pub const EMAIL_CHARS: usize = 100;
    /// Events may be dated from 2000-01-01 to one year after now.
    pub const EARLIEST_EVENT_YEAR: i32 = 2000;
}
