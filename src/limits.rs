//! Limits that protect the controller from its peers: connections per source
//! address, read rate per connection, and back-off after failed logins.
//!
//! Everything here is in memory and bounded in size, whatever peers do.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counts live connections per source address.
pub struct ConnectionCounter {
    max_per_ip: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// Held while a connection lives; decrements its address's count on drop.
pub struct ConnectionSlot {
    counter: Arc<ConnectionCounter>,
    ip: IpAddr,
}

impl ConnectionCounter {
    pub fn new(max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionCounter { max_per_ip, counts: Mutex::new(HashMap::new()) })
    }

    /// A slot for one more connection from `ip`, or None when it has too many.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot { counter: self.clone(), ip })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut m = self.counter.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A token bucket over bytes read from one connection (Prosody's mod_limits idea:
/// pause reading rather than drop data).
pub struct ReadRate {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl ReadRate {
    /// `burst` should be at least the stanza size limit so one large stanza passes.
    pub fn new(bytes_per_sec: u64, burst: u64) -> Self {
        ReadRate { rate: bytes_per_sec as f64, burst: burst as f64, tokens: burst as f64, last: Instant::now() }
    }

    /// Accounts for `n` bytes read; returns how long to pause before reading again.
    pub fn consume(&mut self, n: usize) -> Option<Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Per-platform rate limits (RFC 8600 §8.3.1, "MAY automatically disable a
/// misbehaving Platform"), shared by all sessions of a platform.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub stanzas_per_sec: u32,
    pub publishes_per_sec: u32,
    pub bytes_per_sec: u64,
    /// Throttled without pause this long → the platform is disabled (0: never).
    pub disable_after_secs: u64,
}

/// The token buckets of one platform.
pub struct PlatformRate {
    limits: RateLimits,
    stanzas: ReadRate,
    publishes: ReadRate,
    bytes: ReadRate,
    /// Since when every charge has been over a limit (one throttling episode).
    throttled_since: Option<Instant>,
    last_over: Option<Instant>,
    abusive: bool,
}

/// What charging a stanza decided.
#[derive(Debug, Default, PartialEq)]
pub struct Charge {
    /// Pause reading this long (throttling: nothing is dropped).
    pub pause: Option<Duration>,
    /// This charge started a throttling episode (audit it once, not per stanza).
    pub episode_started: bool,
    /// Throttled for longer than `disable_after_secs`: disable the platform.
    pub abuse: bool,
}

impl PlatformRate {
    pub fn new(limits: RateLimits) -> Self {
        // Bursts of one second's worth: short peaks pass, sustained excess waits.
        PlatformRate {
            limits,
            stanzas: ReadRate::new(limits.stanzas_per_sec.into(), limits.stanzas_per_sec.into()),
            publishes: ReadRate::new(limits.publishes_per_sec.into(), limits.publishes_per_sec.into()),
            bytes: ReadRate::new(limits.bytes_per_sec, limits.bytes_per_sec),
            throttled_since: None,
            last_over: None,
            abusive: false,
        }
    }

    /// Accounts for inbound traffic: stanzas, publishes among them, bytes read.
    pub fn charge(&mut self, stanzas: usize, publishes: usize, bytes: usize) -> Charge {
        let pause = [self.stanzas.consume(stanzas), self.publishes.consume(publishes), self.bytes.consume(bytes)]
        .into_iter()
        .flatten()
        .max();
        let now = Instant::now();
        let mut c = Charge { pause, ..Charge::default() };
        match pause {
            None => {
                // An episode ends after a quiet second.
                if self.last_over.is_some_and(|t| now.duration_since(t) > Duration::from_secs(1)) {
                    self.throttled_since = None;
                }
            }
            Some(_) => {
                self.last_over = Some(now);
                let since = *self.throttled_since.get_or_insert_with(|| {
                    c.episode_started = true;
                    now
                });
                let limit = self.limits.disable_after_secs;
                c.abuse = limit > 0 && now.duration_since(since) >= Duration::from_secs(limit);
                self.abusive |= c.abuse;
            }
        }
        c
    }

    /// True once sustained excess was seen (the platform is to be disabled).
    pub fn abusive(&self) -> bool {
        self.abusive
    }
}

/// The shared rate state of every platform with a live session.
#[derive(Default)]
pub struct PlatformRates {
    by_platform: Mutex<HashMap<String, std::sync::Weak<Mutex<PlatformRate>>>>,
}

impl PlatformRates {
    /// The buckets of `platform` (created with `limits` if it has none live).
    pub fn for_platform(&self, platform: &str, limits: RateLimits) -> Arc<Mutex<PlatformRate>> {
        let mut m = self.by_platform.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = m.get(platform).and_then(std::sync::Weak::upgrade) {
            return r;
        }
        if m.len() > 1024 {
            m.retain(|_, w| w.strong_count() > 0);
        }
        let r = Arc::new(Mutex::new(PlatformRate::new(limits)));
        m.insert(platform.to_string(), Arc::downgrade(&r));
        r
    }
}

/// Failed-login memory per key (account or source address), bounded in size.
pub struct AuthThrottle {
    threshold: u32,
    max_delay: Duration,
    window: Duration,
    entries: Mutex<HashMap<String, (u32, Instant)>>,
}

/// Most keys remembered at once; past it, expired keys go first, then all.
const THROTTLE_CAP: usize = 100_000;

impl AuthThrottle {
    pub fn new(threshold: u32, max_delay: Duration, window: Duration) -> Self {
        AuthThrottle { threshold, max_delay, window, entries: Mutex::new(HashMap::new()) }
    }

    /// Records a failure for each key; returns the delay to impose before answering.
    pub fn failure(&self, keys: &[&str]) -> Duration {
        let now = Instant::now();
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= THROTTLE_CAP {
            m.retain(|_, (_, t)| now.duration_since(*t) < self.window);
            if m.len() >= THROTTLE_CAP {
                m.clear();
            }
        }
        let mut worst = 0;
        for k in keys {
            let e = m.entry((*k).to_string()).or_insert((0, now));
            if now.duration_since(e.1) >= self.window {
                *e = (0, now);
            }
            e.0 += 1;
            e.1 = now;
            worst = worst.max(e.0);
        }
        self.delay_for(worst)
    }

    /// The delay already due for these keys, before an attempt is even evaluated.
    pub fn pending(&self, keys: &[&str]) -> Duration {
        let now = Instant::now();
        let m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let worst = keys
            .iter()
            .filter_map(|k| m.get(*k))
            .filter(|(_, t)| now.duration_since(*t) < self.window)
            .map(|(n, _)| *n)
            .max()
            .unwrap_or(0);
        self.delay_for(worst)
    }

    /// A success clears the account's record (not the address's).
    pub fn success(&self, key: &str) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    fn delay_for(&self, failures: u32) -> Duration {
        if failures < self.threshold {
            return Duration::ZERO;
        }
        let exp = (failures - self.threshold).min(16);
        (Duration::from_millis(250) * 2u32.pow(exp)).min(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_per_address_are_capped_and_released() {
        let c = ConnectionCounter::new(2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = c.acquire(ip).unwrap();
        let _b = c.acquire(ip).unwrap();
        assert!(c.acquire(ip).is_none());
        assert!(c.acquire("127.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(c.acquire(ip).is_some());
    }

    #[test]
    fn read_rate_pauses_only_past_the_burst() {
        let mut r = ReadRate::new(1000, 2000);
        assert!(r.consume(1500).is_none());
        let d = r.consume(1500).unwrap();
        assert!(d > Duration::from_millis(900) && d < Duration::from_millis(1100), "{d:?}");
    }

    #[test]
    fn platform_rate_throttles_past_a_seconds_worth_and_flags_sustained_abuse() {
        let limits = RateLimits { stanzas_per_sec: 10, publishes_per_sec: 2, bytes_per_sec: 1 << 20, disable_after_secs: 0 };
        let mut r = PlatformRate::new(limits);
        for _ in 0..2 {
            assert_eq!(r.charge(1, 1, 100), Charge::default());
        }
        let c = r.charge(1, 1, 100);
        assert!(c.pause.is_some() && c.episode_started && !c.abuse, "{c:?}");
        let c = r.charge(1, 1, 100);
        assert!(c.pause.is_some() && !c.episode_started, "one episode, one audit record: {c:?}");
    }

    #[test]
    fn sustained_excess_is_abuse_when_disabling_is_configured() {
        let limits = RateLimits { stanzas_per_sec: 1, publishes_per_sec: 1, bytes_per_sec: 1 << 20, disable_after_secs: 1 };
        let mut r = PlatformRate::new(limits);
        let start = Instant::now();
        let mut abused = false;
        while start.elapsed() < Duration::from_secs(3) && !abused {
            abused = r.charge(1, 0, 10).abuse;
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(abused);
        assert!(start.elapsed() >= Duration::from_secs(1));
    }

    #[test]
    fn sessions_of_one_platform_share_buckets() {
        let rates = PlatformRates::default();
        let l = RateLimits { stanzas_per_sec: 1, publishes_per_sec: 1, bytes_per_sec: 1, disable_after_secs: 0 };
        let a = rates.for_platform("a@x", l);
        let b = rates.for_platform("a@x", l);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let c = rates.for_platform("a@x", l);
        assert_eq!(Arc::strong_count(&c), 1);
    }

    #[test]
    fn failures_past_the_threshold_delay_exponentially_up_to_the_cap() {
        let t = AuthThrottle::new(3, Duration::from_secs(2), Duration::from_secs(60));
        assert_eq!(t.failure(&["a:x"]), Duration::ZERO);
        assert_eq!(t.failure(&["a:x"]), Duration::ZERO);
        assert_eq!(t.failure(&["a:x"]), Duration::from_millis(250));
        assert_eq!(t.failure(&["a:x"]), Duration::from_millis(500));
        assert_eq!(t.pending(&["a:x"]), Duration::from_millis(500));
        for _ in 0..10 {
            t.failure(&["a:x"]);
        }
        assert_eq!(t.pending(&["a:x", "ip:1"]), Duration::from_secs(2));
        t.success("a:x");
        assert_eq!(t.pending(&["a:x"]), Duration::ZERO);
    }
}
