//! What a plugin sees of time and chance. The contract promises a plugin
//! no clock, and WASI's defaults would give it the host's real clocks and
//! real random bytes. So each instance's WASI is given these instead:
//! - a wall clock that reads the `now-unix-ms` the host passed to the
//!   current call (the last one given, for calls that take none);
//! - a monotonic clock that starts at zero at every call and advances a
//!   microsecond per reading (monotonic, as WASI requires, and telling
//!   nothing of how long anything took);
//! - random bytes from a generator seeded per call from that `now` and the
//!   instance's call count (a plugin's `HashMap` still needs some).
//!
//! A plugin therefore cannot measure time or learn anything from chance,
//! and the same call on a fresh instance sees the same values.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use rand_core::TryRng;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};

/// The values of the current call, shared with the instance's WASI.
#[derive(Default)]
pub(crate) struct CallEnv {
    now_unix_ms: AtomicI64,
    /// Monotonic nanoseconds read so far in this call.
    monotonic: AtomicU64,
    /// The current call's random seed.
    seed: AtomicU64,
}

impl CallEnv {
    /// Gives these clocks and this randomness to a WASI context.
    pub(crate) fn install(self: &Arc<Self>, wasi: &mut WasiCtxBuilder) {
        wasi.wall_clock(Wall(self.clone()))
            .monotonic_clock(Monotonic(self.clone()))
            .secure_random(Random::new(self.clone()))
            .insecure_random(Random::new(self.clone()))
            .insecure_random_seed(0x636f_7270_6c75_6769_6e2d_7365_6564_0001);
    }

    /// Starts a call: its `now` (or the last one), its clock at zero, and
    /// its random seed.
    pub(crate) fn begin(&self, now_unix_ms: Option<i64>, call: u32) {
        if let Some(now) = now_unix_ms {
            self.now_unix_ms.store(now, Ordering::Relaxed);
        }
        self.monotonic.store(0, Ordering::Relaxed);
        let now = self.now_unix_ms.load(Ordering::Relaxed) as u64;
        self.seed.store(mix(now ^ (u64::from(call) << 48)), Ordering::Relaxed);
    }
}

struct Wall(Arc<CallEnv>);

impl HostWallClock for Wall {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.now_unix_ms.load(Ordering::Relaxed).max(0) as u64)
    }
}

struct Monotonic(Arc<CallEnv>);

impl HostMonotonicClock for Monotonic {
    fn resolution(&self) -> u64 {
        1_000
    }
    fn now(&self) -> u64 {
        self.0.monotonic.fetch_add(1_000, Ordering::Relaxed)
    }
}

/// SplitMix64 over the call's seed: reseeded whenever a new call began.
struct Random {
    env: Arc<CallEnv>,
    seed: u64,
    state: u64,
}

impl Random {
    fn new(env: Arc<CallEnv>) -> Random {
        Random { env, seed: 0, state: 0 }
    }

    fn next(&mut self) -> u64 {
        let seed = self.env.seed.load(Ordering::Relaxed);
        if seed != self.seed {
            (self.seed, self.state) = (seed, seed);
        }
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }
}

impl TryRng for Random {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.next() as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.next())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(())
    }
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use rand_core::Rng;

    use super::*;

    #[test]
    fn the_clocks_read_the_call_not_the_host() {
        let env = Arc::new(CallEnv::default());
        env.begin(Some(1_700_000_000_123), 1);
        assert_eq!(Wall(env.clone()).now(), Duration::from_millis(1_700_000_000_123));
        let monotonic = Monotonic(env.clone());
        let (a, b) = (monotonic.now(), monotonic.now());
        assert!(a == 0 && b > a, "{a} then {b}");
        env.begin(None, 2);
        assert_eq!(
            Wall(env.clone()).now(),
            Duration::from_millis(1_700_000_000_123),
            "the last now is kept"
        );
        assert_eq!(monotonic.now(), 0, "the monotonic clock starts again at each call");
    }

    #[test]
    fn randomness_is_seeded_per_call() {
        let draw = |now, call| {
            let env = Arc::new(CallEnv::default());
            env.begin(Some(now), call);
            let mut random = Random::new(env);
            (random.next_u64(), random.next_u64())
        };
        assert_eq!(draw(5, 1), draw(5, 1), "the same call draws the same");
        assert_ne!(draw(5, 1), draw(5, 2));
        assert_ne!(draw(5, 1), draw(6, 1));
        let (a, b) = draw(5, 1);
        assert_ne!(a, b);
    }
}
