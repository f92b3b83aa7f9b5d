//! One benchmark consumer process: `threads` workers asking for a token in a loop, the way one of
//! three designs would, and a summary of what they were handed (as one JSON line on stdout).
//!
//! - `naive`: every worker refreshes on its own when it sees an expired token (read the Secret,
//!   call Xero, write the Secret back; last write wins).
//! - `per-process`: the workers of a process share one cache and one refresh (an SDK's token
//!   cache), but processes do not coordinate.
//! - `protocol`: this project's refresh protocol (`Refresher`, single flight, claims).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde::{Deserialize, Serialize};

use xero_operator::protocol::format::{self as f, TokenRecord, format_time};
use xero_operator::protocol::{Refresher, Role};
use xero_operator::redact::Sensitive;
use xero_operator::xero::{Endpoints, XeroClient};

/// The three designs compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Naive,
    PerProcess,
    Protocol,
}

/// What one consumer process measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConsumerReport {
    pub gets: u64,
    pub errors: u64,
    /// Tokens handed out whose JWT `exp` had already passed.
    pub expired_handed_out: u64,
    /// Latencies of gets served while the token stayed the same (microseconds).
    pub warm_us: Vec<u64>,
    /// Latencies of gets that returned a new token: the moment of expiry (microseconds).
    pub at_expiry_us: Vec<u64>,
    /// Those gets as (when each returned, in Unix ms; how long it took, in µs): the wake-up part
    /// of the critical path, and the slowest gets placed on the rotation's timeline.
    #[serde(default)]
    pub at_expiry_gets: Vec<(u64, u64)>,
    /// Latencies of each worker's first get (microseconds): a cold start (the process's first
    /// connection to the API server), not a moment of expiry, so kept apart.
    #[serde(default)]
    pub first_us: Vec<u64>,
    /// Requests the process's protocol client made to the API server (reads, writes, watches;
    /// `protocol` mode only).
    #[serde(default)]
    pub api_requests: u64,
    /// Those made after the process first saw a new token, and the new tokens it saw after
    /// that: the steady state, without the cold start.
    #[serde(default)]
    pub steady_api_requests: u64,
    #[serde(default)]
    pub steady_rotations: u64,
}

impl ConsumerReport {
    /// Adds `other`'s counts and latencies to these.
    pub fn merge(&mut self, other: ConsumerReport) {
        self.gets += other.gets;
        self.errors += other.errors;
        self.expired_handed_out += other.expired_handed_out;
        self.warm_us.extend(other.warm_us);
        self.at_expiry_us.extend(other.at_expiry_us);
        self.at_expiry_gets.extend(other.at_expiry_gets);
        self.first_us.extend(other.first_us);
        self.api_requests += other.api_requests;
        self.steady_api_requests += other.steady_api_requests;
        self.steady_rotations += other.steady_rotations;
    }
}

/// Running totals, printed as JSON lines while the workers run (`progress`), so a process that
/// is killed still leaves its figures behind.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub gets: AtomicU64,
    pub errors: AtomicU64,
    pub expired_handed_out: AtomicU64,
}

impl Progress {
    fn print(&self) {
        println!(
            "{}",
            serde_json::to_string(self).expect("atomics serialize")
        );
    }
}

/// Runs `threads` workers for `duration` and returns what they saw. With `progress`, running
/// totals are printed every `progress` and at once whenever an expired token is handed out.
/// The token Secret a consumer process uses, and where it may send credentials.
pub struct Target<'a> {
    pub namespace: &'a str,
    pub secret: &'a str,
    pub allowlist: xero_operator::allowlist::EndpointAllowlist,
}

pub async fn run(
    client: kube::Client,
    target: Target<'_>,
    mode: Mode,
    threads: usize,
    duration: Duration,
    progress: Option<Duration>,
) -> ConsumerReport {
    let totals = Arc::new(Progress::default());
    let printer = progress.map(|every| {
        let totals = totals.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                totals.print();
            }
        })
    });
    let identity = xero_operator::protocol::refresher::default_identity();
    let Target {
        namespace,
        secret,
        allowlist,
    } = target;
    let refresher = Arc::new(
        Refresher::new(client.clone(), namespace, secret, &identity, Role::Consumer)
            .with_allowlist(allowlist),
    );
    let shared_cache: Arc<tokio::sync::Mutex<Option<(Sensitive, SystemTime)>>> = Arc::default();
    // The tokens this process saw, in order, and its request count when it first saw a new one.
    let rotations = Arc::new(std::sync::Mutex::new(SeenTokens::default()));
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let deadline = Instant::now() + duration;
    let workers = (0..threads).map(|_| {
        let (refresher, cache, api, secret, totals, rotations) = (
            refresher.clone(),
            shared_cache.clone(),
            api.clone(),
            secret.to_owned(),
            totals.clone(),
            rotations.clone(),
        );
        tokio::spawn(async move {
            let mut report = ConsumerReport::default();
            let mut own_cache: Option<(Sensitive, SystemTime)> = None;
            let mut last: Option<Sensitive> = None;
            while Instant::now() < deadline {
                let started = Instant::now();
                let got = match mode {
                    Mode::Protocol => refresher.get().await.ok().map(|t| t.token),
                    Mode::Naive => naive_get(&api, &secret, &mut own_cache).await,
                    Mode::PerProcess => {
                        let mut guard = cache.lock().await;
                        naive_get(&api, &secret, &mut guard).await
                    }
                };
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                report.gets += 1;
                totals.gets.fetch_add(1, Ordering::Relaxed);
                match got {
                    None => {
                        report.errors += 1;
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(token) => {
                        if xero_operator::xero::jwt_expiry(token.expose())
                            .is_some_and(|exp| SystemTime::now() > exp + Duration::from_secs(1))
                        {
                            report.expired_handed_out += 1;
                            totals.expired_handed_out.fetch_add(1, Ordering::Relaxed);
                            if progress.is_some() {
                                totals.print();
                            }
                        }
                        if mode == Mode::Protocol {
                            rotations
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .saw(&token, || refresher.api_requests());
                        }
                        match &last {
                            None => report.first_us.push(micros),
                            Some(previous) if *previous == token => report.warm_us.push(micros),
                            Some(_) => {
                                report.at_expiry_us.push(micros);
                                report.at_expiry_gets.push((unix_ms_now(), micros));
                            }
                        }
                        last = Some(token);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            report
        })
    });
    let mut total = ConsumerReport::default();
    let results = futures_util::future::join_all(workers).await;
    if let Some(printer) = printer {
        printer.abort();
        totals.print();
    }
    for r in results.into_iter().flatten() {
        total.merge(r);
    }
    if mode == Mode::Protocol {
        total.api_requests = refresher.api_requests();
        let seen = rotations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at_first) = seen.requests_at_first_change {
            total.steady_api_requests = total.api_requests - at_first;
            total.steady_rotations = seen.changes.saturating_sub(1);
        }
    }
    total
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// The new tokens one process saw (across its workers).
#[derive(Default)]
struct SeenTokens {
    last: Option<Sensitive>,
    changes: u64,
    requests_at_first_change: Option<u64>,
}

impl SeenTokens {
    fn saw(&mut self, token: &Sensitive, requests: impl FnOnce() -> u64) {
        match &self.last {
            Some(last) if last == token => {}
            Some(_) => {
                self.changes += 1;
                if self.changes == 1 {
                    self.requests_at_first_change = Some(requests());
                }
                self.last = Some(token.clone());
            }
            None => self.last = Some(token.clone()),
        }
    }
}

/// Read the Secret; refresh on our own if the token is expired; write the pair back without any
/// coordination. The cache is this worker's (naive) or the process's (per-process).
async fn naive_get(
    api: &Api<Secret>,
    name: &str,
    cache: &mut Option<(Sensitive, SystemTime)>,
) -> Option<Sensitive> {
    let now = SystemTime::now();
    if let Some((token, until)) = cache.as_ref()
        && now < *until
    {
        return Some(token.clone());
    }
    let rec = TokenRecord::from_secret(&api.get(name).await.ok()?);
    if rec.is_usable(now) {
        let until = rec.usable_until()?;
        let token = rec.access_token.clone()?;
        *cache = Some((token.clone(), until));
        return Some(token);
    }
    let app = rec.client.clone()?;
    let endpoints = Endpoints {
        token_url: rec.settings.token_url.clone()?,
        ..Endpoints::default()
    };
    let set = XeroClient::new(endpoints)
        .refresh(&app, rec.refresh_token.as_ref()?)
        .await
        .ok()?;
    let expires_at = set.expires_at(now);
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut data = serde_json::json!({
        f::ACCESS_TOKEN: b64(set.access_token.expose()),
        f::EXPIRES_AT: b64(&format_time(expires_at)),
    });
    if let Some(rt) = &set.refresh_token {
        data[f::REFRESH_TOKEN] = serde_json::json!(b64(rt.expose()));
    }
    // Last write wins: no resourceVersion, no claim.
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": data})),
    )
    .await
    .ok()?;
    let until = expires_at.checked_sub(rec.settings.clock_skew)?;
    *cache = Some((set.access_token.clone(), until));
    Some(set.access_token)
}
