//! Pool of logic instances: power-of-two-choices over reported load plus in-flight calls, with a
//! circuit breaker per instance and one retry on a different instance after a transport failure.
//! Calls travel on each instance's long-lived link ([`LinkSession`]).

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use switchboard_proto::cluster_tls::{endpoint, ClusterTls};
use switchboard_proto::internal::link_call::Call;
use switchboard_proto::internal::link_result::Result as Outcome;
use switchboard_proto::internal::logic_client::LogicClient;
use tokio::runtime::Handle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::push::LocalPush;
use crate::session::{LinkSession, PushEnd, PushSlot};

/// Breaker state of one logic instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Calls flow.
    Closed,
    /// No calls until the instant (then one probe is let through).
    Open(Instant),
    /// Cooldown elapsed; a single probe is in flight.
    HalfOpen,
}

#[derive(Debug)]
struct Breaker {
    state: State,
    failures: u32,
}

/// One logic instance of the pool.
struct Member {
    url: String,
    session: LinkSession,
    /// Last reported load (`f32` bits); 0.0 when unknown.
    load: AtomicU32,
    /// This gateway's RPCs to it right now.
    inflight: AtomicU64,
    /// Attempts made to it (every call, including probes and retries).
    calls: AtomicU64,
    breaker: Mutex<Breaker>,
}

impl Member {
    fn load(&self) -> f32 {
        f32::from_bits(self.load.load(Ordering::Relaxed))
    }

    fn score(&self) -> f32 {
        self.load() + self.inflight.load(Ordering::Relaxed) as f32 / 100.0
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Per-endpoint counters of [`LogicPool::stats`].
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStats {
    /// The endpoint URL.
    pub url: String,
    /// Consecutive transport failures.
    pub failures: u32,
    /// The breaker is open or half-open (a probe in flight).
    pub breaker_open: bool,
    /// Attempts made to this endpoint so far.
    pub calls: u64,
    /// In-flight RPCs right now.
    pub inflight: u64,
    /// Last reported load.
    pub load: f32,
}

/// A selected endpoint for one attempt; report the outcome with [`Lease::finish`].
pub(crate) struct Lease {
    member: Arc<Member>,
    probe: bool,
    failures: u32,
    cooldown: Duration,
    done: bool,
}

impl Lease {
    /// Records the outcome: `true` for a transport failure, `false` otherwise (including
    /// application errors, which prove the instance is alive).
    pub(crate) fn finish(mut self, transport_failure: bool) {
        self.done = true;
        let mut b = self.member.breaker();
        if transport_failure {
            b.failures = b.failures.saturating_add(1);
            if self.probe || b.state == State::HalfOpen || b.failures >= self.failures {
                b.state = State::Open(Instant::now() + self.cooldown);
            }
        } else {
            b.failures = 0;
            b.state = State::Closed;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.member.inflight.fetch_sub(1, Ordering::Relaxed);
        if !self.done && self.probe {
            // Probe abandoned without an outcome: let the next caller probe.
            let mut b = self.member.breaker();
            if b.state == State::HalfOpen {
                b.state = State::Open(Instant::now());
            }
        }
    }
}

/// The logic instances this gateway calls, chosen by power-of-two-choices.
pub struct LogicPool {
    members: RwLock<Vec<Arc<Member>>>,
    breaker_failures: u32,
    breaker_cooldown: Duration,
    rng: AtomicU64,
    rt: Handle,
    /// Largest message on the pool's channels, both directions.
    max_message: usize,
    /// Mutual TLS on the channels, when the cluster uses it.
    tls: Option<ClusterTls>,
    /// The cluster secret every link carries.
    secret: Option<Arc<MetadataValue<Ascii>>>,
    /// Where pushes that come down the links go, once the gateway serves them.
    pushes: PushSlot,
}

impl std::fmt::Debug for LogicPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicPool").field("endpoints", &self.stats()).finish()
    }
}

/// Whether `s` is a transport-level failure (the instance may be down), as opposed to an answer.
pub fn is_transport_failure(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => true,
        // Unknown built locally from a broken connection carries its source error;
        // an Unknown sent by the server does not.
        Code::Unknown => std::error::Error::source(s).is_some(),
        _ => false,
    }
}

/// HTTP/2 pings on each channel to logic: a peer that stops answering them (a host gone without a
/// reset, a partition) breaks the link within interval + timeout instead of leaving it wedged.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

fn client_for(url: &str, max_message: usize, tls: Option<&ClusterTls>) -> Result<LogicClient<Channel>, String> {
    let channel = endpoint(url, tls)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(LogicClient::new(channel).max_decoding_message_size(max_message).max_encoding_message_size(max_message))
}

/// tonic's default message limit, until [`LogicPool::with_max_message_bytes`] says otherwise.
const DEFAULT_MAX_MESSAGE: usize = 4 << 20;

impl LogicPool {
    /// A pool over `endpoints` (loads unknown). Must be called within a tokio runtime, whose
    /// handle is kept for the lazily-connected channels. Errors name the first invalid URL
    /// (`(url, message)`) or an empty list.
    pub fn new(
        endpoints: &[String],
        breaker_failures: u32,
        breaker_cooldown: Duration,
    ) -> Result<LogicPool, (String, String)> {
        if endpoints.is_empty() {
            return Err((String::new(), "no logic endpoints".to_string()));
        }
        let rt = Handle::try_current().map_err(|e| (String::new(), e.to_string()))?;
        let mut members: Vec<Arc<Member>> = Vec::with_capacity(endpoints.len());
        let pushes = PushSlot::default();
        {
            let _guard = rt.enter();
            for url in endpoints {
                if members.iter().any(|m| &m.url == url) {
                    continue;
                }
                let client = client_for(url, DEFAULT_MAX_MESSAGE, None).map_err(|e| (url.clone(), e))?;
                members.push(Arc::new(Self::member(url.clone(), client, 0.0, None, &pushes)));
            }
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64);
        Ok(LogicPool {
            members: RwLock::new(members),
            breaker_failures: breaker_failures.max(1),
            breaker_cooldown,
            rng: AtomicU64::new(seed),
            rt,
            max_message: DEFAULT_MAX_MESSAGE,
            tls: None,
            secret: None,
            pushes,
        })
    }

    /// Talks mutual TLS to every endpoint (`http://` URLs are dialled as `https://`).
    pub fn with_tls(mut self, tls: Option<ClusterTls>) -> Result<Self, String> {
        self.tls = tls;
        self.rebuild()?;
        Ok(self)
    }

    /// Sets the largest message on the channels to every endpoint, both directions.
    pub fn with_max_message_bytes(mut self, max: usize) -> Result<Self, String> {
        self.max_message = max;
        self.rebuild()?;
        Ok(self)
    }

    /// Sends the cluster secret on every link.
    pub fn with_secret(mut self, secret: Option<MetadataValue<Ascii>>) -> Result<Self, String> {
        self.secret = secret.map(Arc::new);
        self.rebuild()?;
        Ok(self)
    }

    /// Re-creates every member's channel and link with the pool's current settings.
    fn rebuild(&mut self) -> Result<(), String> {
        let _guard = self.rt.enter();
        let members = self.members.get_mut().unwrap_or_else(|e| e.into_inner());
        for m in members.iter_mut() {
            let client = client_for(&m.url, self.max_message, self.tls.as_ref())?;
            *m = Arc::new(Self::member(m.url.clone(), client, m.load(), self.secret.clone(), &self.pushes));
        }
        Ok(())
    }

    fn member(
        url: String,
        client: LogicClient<Channel>,
        load: f32,
        secret: Option<Arc<MetadataValue<Ascii>>>,
        pushes: &PushSlot,
    ) -> Member {
        Member {
            url,
            session: LinkSession::new(client, secret, pushes.clone()),
            load: AtomicU32::new(load.to_bits()),
            inflight: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            breaker: Mutex::new(Breaker { state: State::Closed, failures: 0 }),
        }
    }

    /// Replaces the endpoint set with these URLs and their reported loads. Endpoints that remain
    /// keep their client and breaker state; invalid URLs are skipped; an update leaving no valid
    /// endpoint keeps the current set.
    pub fn update(&self, endpoints: Vec<(String, f32)>) {
        let current = self.members.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut next: Vec<Arc<Member>> = Vec::with_capacity(endpoints.len());
        let _guard = self.rt.enter();
        for (url, load) in endpoints {
            let load = if load.is_finite() { load.max(0.0) } else { 0.0 };
            if let Some(m) = next.iter().find(|m| m.url == url) {
                m.load.store(load.to_bits(), Ordering::Relaxed);
                continue;
            }
            if let Some(m) = current.iter().find(|m| m.url == url) {
                m.load.store(load.to_bits(), Ordering::Relaxed);
                next.push(m.clone());
                continue;
            }
            match client_for(&url, self.max_message, self.tls.as_ref()) {
                Ok(client) => next.push(Arc::new(Self::member(url, client, load, self.secret.clone(), &self.pushes))),
                Err(e) => tracing::warn!(%url, error = %e, "ignoring invalid logic endpoint"),
            }
        }
        if next.is_empty() {
            return;
        }
        if self.pushes.get().is_some() {
            // logic pushes only down a link it holds: every instance gets one
            for m in &next {
                m.session.open();
            }
        }
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// Serves pushes on the links: each names this gateway as `name` (its push address, as routes
    /// name it) when it opens, and logic sends the gateway's pushes down it to `local`. Opens a
    /// link to every instance now; [`LogicPool::update`] opens one to each it adds, and again
    /// to one whose link broke.
    pub fn serve_pushes(&self, name: &str, local: LocalPush) -> Result<(), String> {
        let name = name.parse().map_err(|_| format!("the push address {name:?} is not visible ASCII"))?;
        if self.pushes.set(PushEnd { name, local }).is_err() {
            return Err("the links already serve pushes".into());
        }
        let _guard = self.rt.enter();
        for m in self.members.read().unwrap_or_else(|e| e.into_inner()).iter() {
            m.session.open();
        }
        Ok(())
    }

    /// Per-endpoint state, in pool order.
    pub fn stats(&self) -> Vec<EndpointStats> {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        members
            .iter()
            .map(|m| {
                let b = m.breaker();
                EndpointStats {
                    url: m.url.clone(),
                    failures: b.failures,
                    breaker_open: b.state != State::Closed,
                    calls: m.calls.load(Ordering::Relaxed),
                    inflight: m.inflight.load(Ordering::Relaxed),
                    load: m.load(),
                }
            })
            .collect()
    }

    /// Current endpoint URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.read().unwrap_or_else(|e| e.into_inner()).iter().map(|m| m.url.clone()).collect()
    }

    fn next_rand(&self) -> u64 {
        // splitmix64 over an atomic counter.
        let mut z = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Whether `m`'s breaker lets a call through now, without changing its state.
    fn admits(m: &Member, now: Instant) -> bool {
        match m.breaker().state {
            State::Closed => true,
            State::Open(until) => until <= now,
            State::HalfOpen => false,
        }
    }

    /// Takes a call slot on `m`: `Some(probe)` when admitted (an elapsed open breaker turns
    /// half-open and this call is its probe), `None` when a racing caller took the probe.
    fn admit(m: &Member, now: Instant) -> Option<bool> {
        let mut b = m.breaker();
        match b.state {
            State::Closed => Some(false),
            State::Open(until) if until <= now => {
                b.state = State::HalfOpen;
                Some(true)
            }
            _ => None,
        }
    }

    /// Picks an endpoint for one attempt. With `exclude`, picks a different endpoint, or `None`
    /// when there is no other; without, always `Some`.
    pub(crate) fn pick(&self, exclude: Option<&str>) -> Option<Lease> {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner()).clone();
        let pool: Vec<&Arc<Member>> = {
            let others: Vec<&Arc<Member>> = members.iter().filter(|m| Some(m.url.as_str()) != exclude).collect();
            if others.is_empty() {
                if exclude.is_some() {
                    return None;
                }
                members.iter().collect()
            } else {
                others
            }
        };
        let now = Instant::now();
        let mut candidates: Vec<&Arc<Member>> = pool.iter().copied().filter(|m| Self::admits(m, now)).collect();
        while !candidates.is_empty() {
            let chosen = match candidates.len() {
                1 => 0,
                n => {
                    let r = self.next_rand();
                    let a = (r % n as u64) as usize;
                    let b = ((r >> 32) % (n as u64 - 1)) as usize;
                    let b = if b >= a { b + 1 } else { b };
                    if candidates[b].score() < candidates[a].score() {
                        b
                    } else {
                        a
                    }
                }
            };
            if let Some(probe) = Self::admit(candidates[chosen], now) {
                return Some(self.lease(candidates[chosen], probe));
            }
            candidates.swap_remove(chosen);
        }
        // Nothing admits a call: try the one whose cooldown ends first anyway.
        let fallback = pool
            .iter()
            .min_by_key(|m| match m.breaker().state {
                State::Open(until) => until,
                _ => now,
            })
            .copied()
            .or_else(|| members.first())?;
        Some(self.lease(fallback, false))
    }

    fn lease(&self, m: &Arc<Member>, probe: bool) -> Lease {
        m.inflight.fetch_add(1, Ordering::Relaxed);
        m.calls.fetch_add(1, Ordering::Relaxed);
        Lease {
            member: m.clone(),
            probe,
            failures: self.breaker_failures,
            cooldown: self.breaker_cooldown,
            done: false,
        }
    }

    /// Makes one call on a logic instance's link within `timeout` overall: on a transport
    /// failure (or a timed-out attempt with time left) it is retried once on a different endpoint.
    pub(crate) async fn call(&self, timeout: Duration, call: Call) -> Result<Outcome, Status> {
        self.attempt(timeout, |m| {
            let (m, call) = (m.clone(), call.clone());
            async move { m.session.call(call).await }
        })
        .await
    }

    async fn attempt<T, F, Fut>(&self, timeout: Duration, mut rpc: F) -> Result<T, Status>
    where
        F: FnMut(&Arc<Member>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tried: Option<String> = None;
        let mut last = Status::unavailable("no logic endpoint");
        for _ in 0..2 {
            let Some(lease) = self.pick(tried.as_deref()) else {
                // No other endpoint to retry on.
                break;
            };
            tried = Some(lease.member.url.clone());
            let result = match tokio::time::timeout_at(deadline, rpc(&lease.member)).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded("logic timed out")),
            };
            match result {
                Ok(r) => {
                    lease.finish(false);
                    return Ok(r);
                }
                Err(s) if is_transport_failure(&s) => {
                    tracing::debug!(endpoint = %lease.member.url, status = %s, "logic transport failure");
                    lease.finish(true);
                    last = s;
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
                Err(s) => {
                    lease.finish(false);
                    return Err(s);
                }
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://127.0.0.1:{}", 1 + i)).collect()
    }

    fn state(pool: &LogicPool, url: &str) -> EndpointStats {
        pool.stats().into_iter().find(|s| s.url == url).unwrap()
    }

    #[tokio::test]
    async fn p2c_prefers_the_less_loaded_of_two() {
        let u = urls(2);
        let pool = LogicPool::new(&u, 3, Duration::from_secs(2)).unwrap();
        pool.update(vec![(u[0].clone(), 0.9), (u[1].clone(), 0.1)]);
        for _ in 0..50 {
            let l = pool.pick(None).unwrap();
            assert_eq!(l.member.url, u[1]);
            l.finish(false);
        }
        // In-flight RPCs count too: equal loads, many in flight on u[1] -> u[0].
        pool.update(vec![(u[0].clone(), 0.2), (u[1].clone(), 0.2)]);
        let held: Vec<Lease> = (0..5).map(|_| pool.pick(Some(&u[0])).unwrap()).collect();
        assert!(held.iter().all(|l| l.member.url == u[1]));
        assert_eq!(pool.pick(None).unwrap().member.url, u[0]);
        // Exclusion picks the other one even if it is more loaded.
        pool.update(vec![(u[0].clone(), 0.9), (u[1].clone(), 0.0)]);
        drop(held);
        assert_eq!(pool.pick(Some(&u[1])).unwrap().member.url, u[0]);
        // With three endpoints the least loaded wins most often, the most loaded never.
        let u3 = urls(3);
        pool.update(vec![(u3[0].clone(), 0.5), (u3[1].clone(), 0.9), (u3[2].clone(), 0.1)]);
        let mut counts = [0usize; 3];
        for _ in 0..300 {
            let l = pool.pick(None).unwrap();
            counts[u3.iter().position(|u| *u == l.member.url).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0, "{counts:?}");
        assert!(counts[2] > counts[0], "{counts:?}");
    }

    #[tokio::test]
    async fn breaker_opens_avoids_probes_once_and_closes() {
        let u = urls(2);
        let cooldown = Duration::from_millis(100);
        let pool = LogicPool::new(&u, 3, cooldown).unwrap();
        pool.update(vec![(u[0].clone(), 0.0), (u[1].clone(), 0.9)]);
        // Two failures: still closed, still preferred.
        for i in 1..=2 {
            let l = pool.pick(None).unwrap();
            assert_eq!(l.member.url, u[0]);
            l.finish(true);
            let s = state(&pool, &u[0]);
            assert_eq!(s.failures, i);
            assert!(!s.breaker_open);
        }
        let l = pool.pick(None).unwrap();
        assert_eq!(l.member.url, u[0]);
        l.finish(true);
        assert!(state(&pool, &u[0]).breaker_open);
        // Open: avoided although less loaded.
        let calls = state(&pool, &u[0]).calls;
        for _ in 0..20 {
            let l = pool.pick(None).unwrap();
            assert_eq!(l.member.url, u[1]);
            l.finish(false);
        }
        assert_eq!(state(&pool, &u[0]).calls, calls);
        // Cooldown over: exactly one probe goes through.
        std::thread::sleep(cooldown + Duration::from_millis(20));
        let probe = pool.pick(None).unwrap();
        assert_eq!(probe.member.url, u[0]);
        assert!(probe.probe);
        for _ in 0..10 {
            let l = pool.pick(None).unwrap();
            assert_eq!(l.member.url, u[1], "only one probe while half-open");
            l.finish(false);
        }
        // A failed probe re-opens at once.
        probe.finish(true);
        assert!(state(&pool, &u[0]).breaker_open);
        assert_eq!(pool.pick(None).unwrap().member.url, u[1]);
        // Next probe succeeds: closed and failures reset.
        std::thread::sleep(cooldown + Duration::from_millis(20));
        let probe = pool.pick(None).unwrap();
        assert_eq!(probe.member.url, u[0]);
        probe.finish(false);
        let s = state(&pool, &u[0]);
        assert!(!s.breaker_open);
        assert_eq!(s.failures, 0);
        assert_eq!(pool.pick(None).unwrap().member.url, u[0]);
    }

    #[tokio::test]
    async fn all_open_falls_back_to_earliest_cooldown() {
        let u = urls(2);
        let pool = LogicPool::new(&u, 1, Duration::from_secs(60)).unwrap();
        let l = pool.pick(Some(&u[1])).unwrap();
        assert_eq!(l.member.url, u[0]);
        l.finish(true);
        std::thread::sleep(Duration::from_millis(5));
        let l = pool.pick(Some(&u[0])).unwrap();
        assert_eq!(l.member.url, u[1]);
        l.finish(true);
        assert!(pool.stats().iter().all(|s| s.breaker_open));
        assert_eq!(pool.pick(None).unwrap().member.url, u[0]);
    }

    #[tokio::test]
    async fn abandoned_probe_lets_the_next_one_through() {
        let u = urls(1);
        let pool = LogicPool::new(&u, 1, Duration::from_millis(10)).unwrap();
        pool.pick(None).unwrap().finish(true);
        std::thread::sleep(Duration::from_millis(20));
        let probe = pool.pick(None).unwrap();
        assert!(probe.probe);
        drop(probe);
        assert!(pool.pick(None).unwrap().probe);
        // No other endpoint to retry on.
        assert!(pool.pick(Some(&u[0])).is_none());
    }

    #[tokio::test]
    async fn update_keeps_state_of_kept_endpoints() {
        let u = urls(3);
        let pool = LogicPool::new(&u[..2], 2, Duration::from_secs(60)).unwrap();
        for _ in 0..2 {
            pool.pick(Some(&u[1])).unwrap().finish(true);
        }
        assert!(state(&pool, &u[0]).breaker_open);
        pool.update(vec![(u[0].clone(), 0.3), (u[2].clone(), 0.7), ("not a url".into(), 0.1)]);
        assert_eq!(pool.endpoints(), vec![u[0].clone(), u[2].clone()]);
        let s = state(&pool, &u[0]);
        assert!(s.breaker_open);
        assert_eq!(s.calls, 2);
        assert_eq!(s.load, 0.3);
        let s = state(&pool, &u[2]);
        assert!(!s.breaker_open);
        assert_eq!((s.calls, s.load), (0, 0.7));
        // Empty or all-invalid updates keep the current set.
        pool.update(Vec::new());
        pool.update(vec![("bad url".into(), 0.0)]);
        assert_eq!(pool.endpoints(), vec![u[0].clone(), u[2].clone()]);
        // A removed then re-added endpoint starts fresh.
        pool.update(vec![(u[2].clone(), 0.0)]);
        pool.update(vec![(u[0].clone(), 0.0), (u[2].clone(), 0.0)]);
        assert!(!state(&pool, &u[0]).breaker_open);
    }

    #[tokio::test]
    async fn call_retries_once_on_another_endpoint() {
        use switchboard_proto::internal::AuthRequest;
        // Nothing listens on these ports: connection refused -> Unavailable.
        let u = urls(3);
        let pool = LogicPool::new(&u, 5, Duration::from_secs(60)).unwrap();
        let r = pool.call(Duration::from_secs(5), Call::Authenticate(AuthRequest::default())).await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
        let stats = pool.stats();
        assert_eq!(stats.iter().map(|s| s.calls).sum::<u64>(), 2, "{stats:?}");
        assert_eq!(stats.iter().filter(|s| s.calls == 1 && s.failures == 1).count(), 2, "{stats:?}");
        assert!(stats.iter().all(|s| s.inflight == 0));
        // A single endpoint: no retry.
        let pool = LogicPool::new(&u[..1], 5, Duration::from_secs(60)).unwrap();
        let r = pool.call(Duration::from_secs(5), Call::Authenticate(AuthRequest::default())).await;
        assert!(r.is_err());
        assert_eq!(pool.stats()[0].calls, 1);
    }

    #[test]
    fn classifies_transport_failures() {
        assert!(is_transport_failure(&Status::unavailable("x")));
        assert!(is_transport_failure(&Status::deadline_exceeded("x")));
        assert!(is_transport_failure(&Status::cancelled("x")));
        assert!(!is_transport_failure(&Status::unknown("server said so")));
        assert!(is_transport_failure(&Status::from_error(Box::new(std::io::Error::other("broken pipe")))));
        assert!(!is_transport_failure(&Status::internal("x")));
        assert!(!is_transport_failure(&Status::invalid_argument("x")));
    }
}
