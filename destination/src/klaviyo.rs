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
    /// `unique_id`, `external_id`: 1 to 255 characters.
    pub const ID_CHARS: usize = 255;
    /// An email address.
    pub const EMAIL_CHARS: usize = 100;
    /// Events may be dated from 2000-01-01 to one year after now.
    pub const EARLIEST_EVENT_YEAR: i32 = 2000;
}
