//! Realistic Chord CDP traffic, for benchmarks: what a shop's Jitsu
//! pipeline sends, in proportions like a storefront's, built from Chord's
//! tracking plan (event names and properties) and the shape of Chord's
//! envelope (a browser `context` with consent, page, geo and client ids;
//! server events with an empty one).
//!
//! The mix: identifies with full traits; product, cart and checkout events;
//! orders of 1 to 20 products; page views (which the destination drops);
//! events from anonymous visitors with no email or phone (which it skips);
//! people in six countries writing their phone numbers in national and
//! international formats, some unusable; and a small share of very large
//! product lists (about 200 KB, as a collection page with hundreds of
//! products sends). Deterministic for a seed.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

/// Share of product-list views that list a whole catalogue (~200 KB).
pub const HUGE_LIST_SHARE: f64 = 0.005;

/// Events of the mix, one JSON object per item, deterministic for `seed`.
pub fn generate(seed: u64, count: usize) -> impl Iterator<Item = String> {
    let mut mix = Mix::new(seed);
    (0..count).map(move |n| mix.event(n).to_string())
}

/// What kind of event, and how often, per 1,000 events.
const KINDS: &[(Kind, u32)] = &[
    (Kind::Identify, 110),
    (Kind::Page, 120),
    (Kind::ProductViewed, 200),
    (Kind::ProductListViewed, 80),
    (Kind::ProductAdded, 90),
    (Kind::CartViewed, 60),
    (Kind::CheckoutStarted, 50),
    (Kind::CheckoutStepViewed, 40),
    (Kind::CouponApplied, 15),
    (Kind::EmailCaptured, 20),
    (Kind::ProductsSearched, 60),
    (Kind::OrderCompleted, 45),
    (Kind::OrderRefunded, 5),
    (Kind::SignedIn, 30),
    (Kind::SubscriptionCreated, 10),
    (Kind::ProductRemoved, 30),
    (Kind::ProductClicked, 35),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Identify,
    Page,
    ProductViewed,
    ProductListViewed,
    ProductAdded,
    ProductRemoved,
    ProductClicked,
    CartViewed,
    CheckoutStarted,
    CheckoutStepViewed,
    CouponApplied,
    EmailCaptured,
    ProductsSearched,
    OrderCompleted,
    OrderRefunded,
    SignedIn,
    SubscriptionCreated,
}

impl Kind {
    fn event_name(self) -> &'static str {
        match self {
            Kind::Identify | Kind::Page => "",
            Kind::ProductViewed => "Product Viewed",
            Kind::ProductListViewed => "Product List Viewed",
            Kind::ProductAdded => "Product Added",
            Kind::ProductRemoved => "Product Removed",
            Kind::ProductClicked => "Product Clicked",
            Kind::CartViewed => "Cart Viewed",
            Kind::CheckoutStarted => "Checkout Started",
            Kind::CheckoutStepViewed => "Checkout Step Viewed",
            Kind::CouponApplied => "Coupon Applied",
            Kind::EmailCaptured => "Email Captured",
            Kind::ProductsSearched => "Products Searched",
            Kind::OrderCompleted => "Order Completed",
            Kind::OrderRefunded => "Order Refunded",
            Kind::SignedIn => "Signed In",
            Kind::SubscriptionCreated => "Subscription Created",
        }
    }

    /// Sent by the shop's backend (empty context), not the browser.
    fn server_side(self) -> bool {
        matches!(self, Kind::OrderRefunded | Kind::SubscriptionCreated)
    }
}

/// A shopper: who they are to the shop, and how they write their phone.
struct Person {
    user_id: Option<String>,
    anonymous_id: String,
    email: Option<String>,
    phone: Option<String>,
    first_name: &'static str,
    last_name: &'static str,
    country: &'static Country,
}

struct Country {
    code: &'static str,
    name: &'static str,
    locale: &'static str,
    city: &'static str,
    region: &'static str,
    postal_code: &'static str,
    street: &'static str,
    timezone: &'static str,
    currency: &'static str,
    /// Ways people there write a number; `#` is a random digit.
    phones: &'static [&'static str],
}

const COUNTRIES: &[Country] = &[
    Country {
        code: "US",
        name: "United States",
        locale: "en-US",
        city: "Fall River",
        region: "MA",
        postal_code: "02720",
        street: "12 Analytical Engine Way",
        timezone: "America/New_York",
        currency: "USD",
        phones: &[
            "+1617555####",
            "(212) 555-01##",
            "212.555.01##",
            "617-555-####",
            "1 (415) 555 ####",
        ],
    },
    Country {
        code: "GB",
        name: "United Kingdom",
        locale: "en-GB",
        city: "London",
        region: "ENG",
        postal_code: "SW1A 1AA",
        street: "10 Downing Street",
        timezone: "Europe/London",
        currency: "GBP",
        phones: &["+44 20 7946 0###", "020 7946 0###", "07700 900###"],
    },
    Country {
        code: "DE",
        name: "Germany",
        locale: "de-DE",
        city: "Berlin",
        region: "BE",
        postal_code: "10117",
        street: "Unter den Linden 77",
        timezone: "Europe/Berlin",
        currency: "EUR",
        phones: &["030 12345###", "+49 30 12345###", "0151 2345 6###"],
    },
    Country {
        code: "FR",
        name: "France",
        locale: "fr-FR",
        city: "Paris",
        region: "IDF",
        postal_code: "75008",
        street: "55 Rue du Faubourg Saint-Honoré",
        timezone: "Europe/Paris",
        currency: "EUR",
        phones: &["+33 1 42 68 5# ##", "01 42 68 5# ##", "06 12 34 5# ##"],
    },
    Country {
        code: "AU",
        name: "Australia",
        locale: "en-AU",
        city: "Sydney",
        region: "NSW",
        postal_code: "2000",
        street: "1 Macquarie St",
        timezone: "Australia/Sydney",
        currency: "AUD",
        phones: &["0412 345 ###", "+61 2 9374 4###", "(02) 9374 4###"],
    },
    Country {
        code: "CA",
        name: "Canada",
        locale: "en-CA",
        city: "Toronto",
        region: "ON",
        postal_code: "M5H 2N2",
        street: "100 Queen St W",
        timezone: "America/Toronto",
        currency: "CAD",
        phones: &["(416) 555-0###", "+1 416 555 0###"],
    },
];

const FIRST_NAMES: &[&str] = &[
    "Ada",
    "Grace",
    "Alan",
    "Katherine",
    "Linus",
    "Margaret",
    "Edsger",
    "Barbara",
    "Dennis",
    "Frances",
    "Sophie",
    "Jürgen",
    "Amélie",
    "Zoë",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace", "Hopper", "Turing", "Johnson", "Pauling", "Hamilton", "Dijkstra", "Liskov", "Ritchie", "Allen",
    "Müller", "Dubois", "O'Brien",
];
const PLANTS: &[&str] = &[
    "Monstera Deliciosa",
    "Fiddle Leaf Fig",
    "Calathea Orbifolia",
    "Snake Plant",
    "Pothos",
    "ZZ Plant",
    "Bird of Paradise",
    "Peace Lily",
    "Rubber Plant",
    "String of Pearls",
];
const VARIANTS: &[&str] = &["4 in pot", "6 in pot", "10 in pot"];
const GENDERS: &[&str] = &["female", "male", "non-binary"];
const CATEGORIES: &[&str] = &["Houseplants", "Succulents", "Pots & Planters", "Plant Care", "Gifts"];

struct Mix {
    rng: StdRng,
    people: Vec<Person>,
    total_weight: u32,
}

impl Mix {
    fn new(seed: u64) -> Mix {
        let mut rng = StdRng::seed_from_u64(seed);
        let people = (0..5_000).map(|n| person(&mut rng, n)).collect();
        Mix {
            rng,
            people,
            total_weight: KINDS.iter().map(|(_, w)| w).sum(),
        }
    }

    fn kind(&mut self) -> Kind {
        let mut pick = self.rng.random_range(0..self.total_weight);
        for (kind, weight) in KINDS {
            if pick < *weight {
                return *kind;
            }
            pick -= weight;
        }
        unreachable!("the weights add up")
    }

    fn event(&mut self, n: usize) -> Value {
        let kind = self.kind();
        let who = self.rng.random_range(0..self.people.len());
        let person = &self.people[who];
        let rng = &mut self.rng;
        let timestamp = format!(
            "2025-10-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            1 + n / 86_400 % 28,
            n / 3_600 % 24,
            n / 60 % 60,
            n % 60,
            rng.random_range(0..1000)
        );
        let mut event = Map::new();
        event.insert(
            "type".into(),
            json!(match kind {
                Kind::Identify => "identify",
                Kind::Page => "page",
                _ => "track",
            }),
        );
        if !kind.event_name().is_empty() {
            event.insert("event".into(), json!(kind.event_name()));
        }
        event.insert(
            "messageId".into(),
            json!(format!("gen-{n:08}-{:08x}", rng.random::<u32>())),
        );
        if let Some(user_id) = &person.user_id {
            event.insert("userId".into(), json!(user_id));
        }
        if !kind.server_side() {
            event.insert("anonymousId".into(), json!(person.anonymous_id));
        }
        match kind {
            Kind::Identify => {
                event.insert("traits".into(), traits(person, rng));
            }
            _ => {
                event.insert("properties".into(), properties(kind, person, rng));
            }
        }
        let context = if kind.server_side() {
            json!({})
        } else {
            browser_context(person, kind, rng)
        };
        event.insert("context".into(), context);
        event.insert("timestamp".into(), json!(timestamp));
        event.insert("sentAt".into(), json!(timestamp));
        event.insert("receivedAt".into(), json!(timestamp));
        event.insert("requestIp".into(), json!("73.61.21.118"));
        event.insert("writeKey".into(), json!("3kd8Xo2bLq:***"));
        Value::Object(event)
    }
}

fn person(rng: &mut StdRng, n: usize) -> Person {
    let country = COUNTRIES
        .choose_weighted(rng, |c| if c.code == "US" { 5 } else { 1 })
        .expect("countries");
    let first_name = FIRST_NAMES.choose(rng).expect("names");
    let last_name = LAST_NAMES.choose(rng).expect("names");
    // Most shoppers are known by email; some only by phone (SMS sign-up);
    // a share are anonymous visitors the destination must skip.
    let roll: f64 = rng.random();
    let email = (roll < 0.85).then(|| {
        format!(
            "{}.{}{n}@example.{}",
            first_name.to_lowercase(),
            last_name.to_lowercase().replace('\'', ""),
            ["com", "org", "co.uk", "de"].choose(rng).expect("domains")
        )
    });
    let phone = if roll >= 0.92 {
        None
    } else if rng.random::<f64>() < 0.04 {
        Some("call me maybe".to_string())
    } else if roll >= 0.85 || rng.random::<f64>() < 0.6 {
        Some(digits(country.phones.choose(rng).expect("formats"), rng))
    } else {
        None
    };
    Person {
        user_id: (email.is_some() && rng.random::<f64>() < 0.7).then(|| format!("73984{:08}", n)),
        anonymous_id: format!("{:08x}-4a5b-4c6d-8e7f-{:012x}", rng.random::<u32>(), n),
        email,
        phone,
        first_name,
        last_name,
        country,
    }
}

fn digits(format: &str, rng: &mut StdRng) -> String {
    format
        .chars()
        .map(|c| {
            if c == '#' {
                char::from(b'0' + rng.random_range(0..10u8))
            } else {
                c
            }
        })
        .collect()
}

fn traits(person: &Person, rng: &mut StdRng) -> Value {
    let c = person.country;
    let mut traits = json!({
        "firstName": person.first_name,
        "lastName": person.last_name,
        "name": format!("{} {}", person.first_name, person.last_name),
        "address": {"street": c.street, "city": c.city, "state": c.region, "postalCode": c.postal_code, "country": c.code},
        "createdAt": "2024-03-02T14:11:09.000Z",
    });
    if rng.random::<f64>() < 0.5 {
        traits["birthday"] = json!("1990-12-10");
        traits["gender"] = json!(GENDERS.choose(rng).expect("genders"));
        traits["accepts_marketing"] = json!(true);
        traits["tags"] = json!(["vip", "newsletter"]);
    }
    identity_into(&mut traits, person);
    traits
}

/// The person's email and phone, where Chord puts them.
fn identity_into(object: &mut Value, person: &Person) {
    if let Some(email) = &person.email {
        object["email"] = json!(email);
    }
    if let Some(phone) = &person.phone {
        object["phone"] = json!(phone);
    }
}

fn product(rng: &mut StdRng, position: usize, currency: &str) -> Value {
    let name = PLANTS.choose(rng).expect("plants");
    let id = rng.random_range(8_123_456_789_000u64..8_123_456_799_999);
    let price = (rng.random_range(500..15_000) as f64) / 100.0;
    json!({
        "product_id": id.to_string(),
        "sku": format!("SKU-{:05}", id % 100_000),
        "name": name,
        "brand": "Plantiground",
        "category": CATEGORIES.choose(rng).expect("categories"),
        "variant": VARIANTS.choose(rng).expect("variants"),
        "variant_id": format!("44{}", id % 10_000_000_000),
        "price": price,
        "quantity": rng.random_range(1..4),
        "position": position,
        "currency": currency,
        "url": format!("https://plantiground.com/products/{}", name.to_lowercase().replace(' ', "-")),
        "image_url": format!("https://cdn.shopify.com/s/files/1/0123/4567/products/SKU-{:05}.jpg", id % 100_000),
    })
}

fn products(rng: &mut StdRng, count: usize, currency: &str) -> Vec<Value> {
    (1..=count).map(|position| product(rng, position, currency)).collect()
}

fn properties(kind: Kind, person: &Person, rng: &mut StdRng) -> Value {
    let currency = person.country.currency;
    let mut properties = match kind {
        Kind::Page => {
            json!({"path": "/collections/all", "title": "All plants – Plantiground", "url": "https://plantiground.com/collections/all", "referrer": "https://www.google.com/"})
        }
        Kind::ProductViewed | Kind::ProductAdded | Kind::ProductRemoved | Kind::ProductClicked => {
            let mut p = product(rng, 1, currency);
            if kind == Kind::ProductAdded {
                p["cart_id"] = json!(format!("cart-{:x}", rng.random::<u32>()));
            }
            p
        }
        Kind::ProductListViewed => {
            let count = if rng.random::<f64>() < HUGE_LIST_SHARE {
                // A whole catalogue with long descriptions: about 200 KB.
                600
            } else {
                rng.random_range(8..25)
            };
            let mut list = products(rng, count, currency);
            if count > 100 {
                for item in &mut list {
                    item["description"] = json!("Easy-care foliage plant for bright, indirect light. ".repeat(2));
                }
            }
            json!({"list_id": "284736512", "category": "All plants", "products": list})
        }
        Kind::CartViewed | Kind::CheckoutStarted => {
            let count = rng.random_range(1..6);
            let list = products(rng, count, currency);
            let value: f64 = list.iter().filter_map(|p| p["price"].as_f64()).sum();
            json!({"cart_id": format!("cart-{:x}", rng.random::<u32>()), "currency": currency, "value": value, "products": list})
        }
        Kind::CheckoutStepViewed => {
            json!({"checkout_id": "40854979018855", "step": rng.random_range(1..4), "shipping_method": "standard"})
        }
        Kind::CouponApplied => {
            json!({"cart_id": "cart-1", "coupon_id": "FALL10", "coupon_name": "Fall 10%", "discount": 8.9})
        }
        Kind::EmailCaptured => json!({"placement_component": "footer", "placement_page": "/"}),
        Kind::ProductsSearched => json!({"query": PLANTS.choose(rng).expect("plants").to_lowercase()}),
        Kind::SignedIn => json!({"method": "password"}),
        Kind::OrderCompleted | Kind::OrderRefunded => {
            let count = rng.random_range(1..=20);
            let list = products(rng, count, currency);
            let subtotal: f64 = list
                .iter()
                .map(|p| p["price"].as_f64().unwrap_or(0.0) * p["quantity"].as_f64().unwrap_or(1.0))
                .sum();
            let subtotal = (subtotal * 100.0).round() / 100.0;
            let c = person.country;
            let mut order = json!({
                "order_id": rng.random_range(6_000_000_000_000u64..7_000_000_000_000).to_string(),
                "checkout_id": "40854979018855",
                "affiliation": "Plantiground",
                "currency": currency,
                "subtotal": subtotal,
                "shipping": 9.9,
                "tax": (subtotal * 0.0625 * 100.0).round() / 100.0,
                "revenue": subtotal,
                "total": subtotal + 9.9,
                "coupon": "FALL10",
                "products": list,
                "shipping_city": c.city,
                "shipping_country": c.code,
                "shipping_zipcode": c.postal_code,
                "meta": {"platform": {"name": "Shopify", "type": "web"}, "store": {"domain": "plantiground"}, "version": {"major": 3, "minor": 0, "patch": 0}},
            });
            if kind == Kind::OrderCompleted {
                order["first_name"] = json!(person.first_name);
                order["last_name"] = json!(person.last_name);
                identity_into(&mut order, person);
            }
            order
        }
        Kind::SubscriptionCreated => {
            let c = person.country;
            let mut address = json!({"name": format!("{} {}", person.first_name, person.last_name), "address1": c.street, "city": c.city, "zipcode": c.postal_code, "country": c.code});
            identity_into(&mut address, person);
            json!({"subscription_id": format!("sub_{:x}", rng.random::<u64>()), "state": "active", "currency": currency, "interval_length": 2, "interval_units": "week", "address": address, "products": products(rng, 1, currency)})
        }
        Kind::Identify => Value::Null,
    };
    if kind == Kind::EmailCaptured
        && let Some(email) = &person.email
    {
        properties["email"] = json!(email);
    }
    properties
}

fn browser_context(person: &Person, kind: Kind, rng: &mut StdRng) -> Value {
    let c = person.country;
    let mut context = json!({
        "library": {"name": "@jitsu/js", "version": "1.11.0", "env": "browser"},
        "consent": {"categoryPreferences": {"analytics": true, "marketing": rng.random::<f64>() < 0.8, "preferences": true, "sale_of_data": true}},
        "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        "locale": c.locale,
        "screen": {"width": 1512, "height": 982, "innerWidth": 1512, "innerHeight": 857, "density": 2},
        "page": {"path": "/", "referrer": "https://www.google.com/", "host": "plantiground.com", "title": "Plantiground", "url": "https://plantiground.com/", "encoding": "UTF-8"},
        "clientIds": {"fbp": "fb.1.1733941200000.812345678", "ga4": {"clientId": "1894765432.1733941200"}},
        "campaign": {},
        "ip": "73.61.21.118",
        "geo": {
            "country": {"code": c.code, "name": c.name, "isEU": matches!(c.code, "DE" | "FR")},
            "region": {"code": c.region},
            "city": {"name": c.city},
            "location": {"timezone": c.timezone},
        },
    });
    // The browser SDK carries the known person's traits on every event.
    if kind != Kind::Identify && (person.email.is_some() || person.phone.is_some()) && person.user_id.is_some() {
        let mut traits = json!({"firstName": person.first_name, "lastName": person.last_name});
        identity_into(&mut traits, person);
        context["traits"] = traits;
    }
    context
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_deterministic_and_varied() {
        let a: Vec<String> = generate(7, 2_000).collect();
        let b: Vec<String> = generate(7, 2_000).collect();
        assert_eq!(a, b);
        let events: Vec<Value> = a.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let identifies = events.iter().filter(|e| e["type"] == "identify").count();
        let orders = events.iter().filter(|e| e["event"] == "Order Completed").count();
        assert!(
            identifies > 100 && orders > 40,
            "{identifies} identifies, {orders} orders"
        );
        let largest = a.iter().map(String::len).max().unwrap();
        assert!(largest > 150_000, "no very large event among 2,000: {largest} bytes");
    }
}
