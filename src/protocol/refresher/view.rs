//! What this party knows of the Secret: the cached token, a copy just seen, the follower's
//! latest version (a consumer in use keeps its Secret watched), and reads from the API server.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;

use super::{AccessToken, Inner, Refresher, is_not_found, lock, version_number};
use crate::protocol::Error;
use crate::protocol::backoff::WRITE_RETRY;
use crate::protocol::decide::{Step, decide};
use crate::protocol::follow;
use crate::protocol::format::TokenRecord;

/// How long a copy of the Secret may stand in for reading it. Every write is conditional on the
/// `resourceVersion`, so a stale copy costs a conflict and a re-read, never a lost token; the
/// limit keeps a copy left from an earlier call from being used much later.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);
/// How long a read waits for the follower to deliver a version it is known to be behind (after
/// a claim made on its latest conflicted) before asking the API server instead.
const FOLLOW_CATCH_UP: Duration = Duration::from_millis(500);
/// A consumer that has not asked for a token for this long stops following its Secret.
const FOLLOW_IDLE: Duration = Duration::from_secs(follow::WATCH_SECONDS as u64);
/// After the API server refused the follower's watch (the consumer's RBAC), following is not
/// tried again for this long: not a watch request on every `get`.
const FOLLOW_REFUSED_PAUSE: Duration = Duration::from_secs(300);

impl Refresher {
    /// A consumer asking: from its second `get` on it is in use, and follows its Secret (one
    /// long watch) so that a token stored by another party is in its cache at once.
    pub(super) fn note_use(&self) {
        *lock(&self.last_use) = std::time::Instant::now();
        if self.gets.fetch_add(1, Ordering::Relaxed) < 1 {
            return;
        }
        let mut follower = lock(&self.follower);
        if follower.as_ref().is_some_and(|f| !f.is_finished()) {
            return;
        }
        // Outside a tokio runtime there is nothing to follow with (a get from the cache alone).
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if lock(&self.follow_refused).is_some_and(|at| at.elapsed() < FOLLOW_REFUSED_PAUSE) {
            return;
        }
        let followed = lock(&self.followed).clone();
        let Some(rv) = followed.or_else(|| {
            lock(&self.last)
                .as_ref()
                .and_then(|r| r.resource_version.clone())
        }) else {
            return;
        };
        let (keep, seen, counted, live, ended) = (
            Arc::downgrade(&self.inner),
            Arc::downgrade(&self.inner),
            Arc::downgrade(&self.inner),
            Arc::downgrade(&self.inner),
            Arc::downgrade(&self.inner),
        );
        let following = follow::run(
            self.api.clone(),
            self.name.clone(),
            rv,
            move || match keep.upgrade() {
                Some(inner) if lock(&inner.last_use).elapsed() < FOLLOW_IDLE => {
                    follow::Keep::Watching
                }
                _ => follow::Keep::Stop,
            },
            move |secret| match seen.upgrade() {
                Some(inner) => {
                    inner.adopt(secret);
                    follow::Keep::Watching
                }
                None => follow::Keep::Stop,
            },
            move || {
                if let Some(inner) = counted.upgrade() {
                    inner.requests.fetch_add(1, Ordering::Relaxed);
                }
            },
            move |open| {
                if let Some(inner) = live.upgrade() {
                    inner.follow_live.store(open, Ordering::Relaxed);
                }
            },
            follow::SILENCE_MAX,
        );
        *follower = Some(tokio::spawn(async move {
            if following.await == follow::Ended::Refused
                && let Some(inner) = ended.upgrade()
            {
                *lock(&inner.follow_refused) = Some(std::time::Instant::now());
            }
        }));
    }
}

impl Inner {
    /// A version of the Secret the follower saw: its token goes into the cache if a read would
    /// hand it out ([`decide`] says Use: a usable, plausible token of a valid record) and it
    /// expires no earlier than the cached one.
    pub(super) fn adopt(&self, secret: Secret) {
        // Only the cache: not the snapshot a refresh round reads, which must never be older
        // than this party's own last write (a watch event can arrive after it).
        let rec = self.record(&secret);
        if let Some(rv) = &rec.resource_version {
            *lock(&self.followed) = Some(rv.clone());
        }
        // Never backwards (a restart from "0" after a 410 may replay an older cached state).
        let number = version_number(&secret);
        self.followed_latest.send_if_modified(|latest| {
            let newer = latest.as_ref().and_then(version_number) <= number;
            if newer {
                *latest = Some(secret);
            }
            newer
        });
        if decide(&rec, SystemTime::now(), &self.identity, self.role) != Step::Use {
            return;
        }
        if let Some(token) = AccessToken::from_record(&rec) {
            self.cache_if_newer(token);
        }
    }

    /// Caches `token` unless the cache holds a usable one that expires later (the follower may
    /// have put a newer one there meanwhile).
    pub(super) fn cache_if_newer(&self, token: AccessToken) {
        let mut cache = lock(&self.cache);
        let keep = cache
            .as_ref()
            .is_some_and(|c| c.expires_at > token.expires_at && SystemTime::now() < c.usable_until);
        if !keep {
            *cache = Some(token);
        }
    }

    /// Keeps `secret`, seen just now, to stand in for the next read.
    pub(super) fn keep_snapshot(&self, secret: Secret) {
        *lock(&self.snapshot) = Some((secret, std::time::Instant::now()));
    }

    /// The follower's latest version, if it may stand in for a read: its watch is open, and the
    /// version is no older than anything this party read or wrote itself and newer than what
    /// the follower is known to be behind. Waits up to `catch_up` for such a version when the
    /// follower is known to be behind. Versions are compared as the numbers the API server
    /// gives (etcd revisions); one that is not a number is never used.
    pub(super) async fn followed_version(&self, catch_up: Duration) -> Option<Secret> {
        if !self.follow_live.load(Ordering::Relaxed)
            || self.ask_server_next.swap(false, Ordering::Relaxed)
        {
            return None;
        }
        let known = match lock(&self.last)
            .as_ref()
            .and_then(|r| r.resource_version.clone())
        {
            Some(rv) => rv.parse::<u64>().ok()?,
            None => 0,
        };
        let floor = known.max(
            self.follower_behind
                .load(Ordering::Relaxed)
                .saturating_add(1),
        );
        let mut latest = self.followed_latest.subscribe();
        // Nothing seen yet: the follower's watch started after the last read and nothing was
        // written since; only the API server has the current version.
        latest.borrow_and_update().as_ref()?;
        // Otherwise a version at or after `floor` exists (this party saw it, or its claim
        // conflicted with it) and the open watch is delivering it.
        let found = tokio::time::timeout(
            catch_up,
            latest.wait_for(|s| s.as_ref().and_then(version_number) >= Some(floor)),
        )
        .await;
        match found {
            Ok(Ok(secret)) => secret.clone(),
            _ => None,
        }
    }

    /// Notes `secret` as the latest state seen.
    pub(super) fn remember(&self, secret: &Secret) -> TokenRecord {
        let rec = self.record(secret);
        let labelled = secret
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(crate::protocol::format::LABEL_CONNECTION));
        self.managed.store(labelled, Ordering::Relaxed);
        *lock(&self.last) = Some(rec.clone());
        rec
    }

    /// Reads the Secret, noting it as the latest state seen.
    pub(super) async fn fetch(&self) -> Result<Secret, kube::Error> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let secret = self.api.get(&self.name).await?;
        self.remember(&secret);
        // The server's answer replaces what the follower was known to be behind (versions
        // that went backwards, after an etcd restore, must not leave every read waiting).
        self.follower_behind.store(0, Ordering::Relaxed);
        Ok(secret)
    }

    /// The Secret as this party reads it: parsed, with what it trusts more put in place.
    pub(super) fn record(&self, secret: &Secret) -> TokenRecord {
        TokenRecord::from_secret(secret).trusting(&self.trusted)
    }

    /// The Secret's current state: a copy just seen, the follower's latest version, or a read
    /// from the API server; says whether it came from the follower.
    pub(super) async fn read(&self) -> Result<(TokenRecord, bool), Error> {
        let snapshot = lock(&self.snapshot).take();
        if let Some((secret, seen)) = snapshot
            && seen.elapsed() < SNAPSHOT_MAX_AGE
        {
            return Ok((self.remember(&secret), false));
        }
        if let Some(secret) = self.followed_version(FOLLOW_CATCH_UP).await {
            return Ok((self.remember(&secret), true));
        }
        Ok((self.read_from_server().await?, false))
    }

    /// Reads the Secret from the API server (retrying transient failures a few times).
    pub(super) async fn read_from_server(&self) -> Result<TokenRecord, Error> {
        let mut attempt = 0;
        loop {
            match self.fetch().await {
                Ok(secret) => return Ok(self.record(&secret)),
                Err(e) if is_not_found(&e) => {
                    return Err(Error::SecretNotFound {
                        namespace: self.namespace.clone(),
                        name: self.name.clone(),
                    });
                }
                Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => {
                    return Err(Error::Kube {
                        action: "reading the token Secret",
                        source: kube::Error::Api(s),
                    });
                }
                Err(e) if attempt >= 5 => {
                    return Err(Error::Kube {
                        action: "reading the token Secret",
                        source: e,
                    });
                }
                Err(e) => {
                    tracing::warn!(secret = %self.name, error = %e, "reading the token Secret failed; retrying");
                    tokio::time::sleep(WRITE_RETRY.delay(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Whether the follower saw a version after `from` within `wait`; if so, that version
    /// stands in for the next read.
    pub(super) async fn follower_saw_newer(&self, from: u64, wait: Duration) -> bool {
        let mut latest = self.followed_latest.subscribe();
        let newer = tokio::time::timeout(
            wait,
            latest.wait_for(|s| s.as_ref().and_then(version_number) > Some(from)),
        )
        .await;
        match newer {
            Ok(Ok(secret)) => match secret.clone() {
                Some(secret) => {
                    self.keep_snapshot(secret);
                    true
                }
                None => false,
            },
            _ => false,
        }
    }
}
