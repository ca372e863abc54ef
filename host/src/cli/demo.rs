//! `cdp-host sandbox` (the local Klaviyo stand-in, as a process) and
//! `cdp-host demo` (the main job end to end, with no Klaviyo account).

use std::io;
use std::process::ExitCode;

use anyhow::Context;
use cdp_host::bundled::{self, EXAMPLE_EVENTS};
use cdp_host::delivery::{Delivery, DeliveryConfig};
use cdp_host::settings::DestinationSettings;
use klaviyo_mock::{DEMO_KEY, EVENTS_ONLY_KEY, Faults, KlaviyoMock, MockConfig};

use super::args::{RuntimeArgs, SandboxArgs};
use super::progress;

pub fn sandbox(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let config = MockConfig {
        rate_limits: !args.no_rate_limits,
        faults: Faults {
            server_errors: args.fault_5xx,
            drop_connections: args.fault_drop,
            throttle_storm: args.fault_429,
            storm_retry_after: args.fault_429_retry_after,
            html_errors: args.fault_html,
            latency: std::time::Duration::from_millis(args.fault_latency_ms),
            slow: args.fault_slow,
            invalid_marker: args.fault_invalid_marker.clone(),
        },
        seed: args.seed,
        ..MockConfig::default()
    };
    super::tokio_runtime()?.block_on(async {
        let sandbox = KlaviyoMock::start(config, args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        println!("Klaviyo sandbox listening on {}", sandbox.url());
        println!("  keys: {DEMO_KEY} (all scopes), {EVENTS_ONLY_KEY} (events:write only)");
        println!(
            "  state: {0}/sandbox/events, {0}/sandbox/profiles, {0}/sandbox/stats",
            sandbox.url()
        );
        tokio::select! {
            _ = sandbox.wait() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

pub fn demo(runtime_args: &RuntimeArgs) -> anyhow::Result<ExitCode> {
    let runtime = super::runtime(runtime_args, 8)?;
    let plugin = super::load_plugin(&runtime, None)?;
    super::tokio_runtime()?.block_on(async {
        let sandbox = KlaviyoMock::start(MockConfig::default(), "127.0.0.1:0".parse().unwrap()).await?;
        println!("Started the local Klaviyo sandbox on {}", sandbox.url());
        println!(
            "Sending {} example Chord events through {plugin}:\n",
            EXAMPLE_EVENTS.lines().count()
        );
        let mut settings: serde_json::Map<String, serde_json::Value> = serde_json::from_str(bundled::EXAMPLE_SETTINGS)?;
        settings.insert("api_key".into(), DEMO_KEY.into());
        let settings = DestinationSettings::from_object(settings, plugin.manifest(), &[], |_| None)?;
        let config = DeliveryConfig {
            base_url: Some(sandbox.url().parse()?),
            concurrency: 8,
            ..DeliveryConfig::default()
        };
        let slot = super::slot(plugin, &settings)?;
        let delivery = Delivery::new(slot, settings, config)?;
        let records = std::sync::Mutex::new(Vec::new());
        let report = delivery
            .run(io::Cursor::new(EXAMPLE_EVENTS.as_bytes().to_vec()), |record| {
                records.lock().unwrap().push(record.clone());
            })
            .await?;
        let mut records = records.into_inner().unwrap();
        records.sort_by_key(|r| r.id);
        for record in &records {
            println!("{}", progress::outcome_line(record));
        }
        println!("\n{}", report.summary());
        println!("\nThe sandbox now holds:");
        for event in sandbox.events() {
            let who = sandbox
                .profiles()
                .into_iter()
                .find(|p| p.id == event.profile_id)
                .and_then(|p| p.email.or(p.phone_number))
                .unwrap_or_default();
            let value = event.value.map(|v| format!(" value {v}")).unwrap_or_default();
            println!(
                "  event   {:<22} {who:<32} unique_id {}{value}",
                event.metric, event.unique_id
            );
        }
        for profile in sandbox.profiles() {
            let name = [
                profile.attributes.get("first_name"),
                profile.attributes.get("last_name"),
            ]
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(" ");
            println!(
                "  profile {} email {} phone {} {name}",
                profile.id,
                profile.email.as_deref().unwrap_or("-"),
                profile.phone_number.as_deref().unwrap_or("-")
            );
        }
        let stats = sandbox.stats();
        println!(
            "  requests {}, accepted {}, deduplicated {}, rejected {:?}",
            stats.requests, stats.accepted, stats.deduplicated, stats.rejected
        );
        anyhow::Ok(ExitCode::SUCCESS)
    })
}
