//! A [`Refresher`]'s construction and its options, set before the first `get`.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::{CallBudget, Inner, Refresher, WriteWatch};
use crate::protocol::decide::Role;
use crate::protocol::format::Trusted;
use crate::xero::Endpoints;

impl Refresher {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        role: Role,
    ) -> Self {
        let inner = Inner {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            role,
            default_endpoints: Endpoints::default(),
            max_wait: Duration::from_secs(60),
            xero_timeout: crate::xero::REQUEST_TIMEOUT,
            budget: None,
            allowlist: crate::allowlist::EndpointAllowlist::for_callers::<&str>(&[])
                .expect("Xero's hosts are valid entries"),
            trusted: Trusted::default(),
            write_watch: None,
            cache: Mutex::new(None),
            http: std::sync::OnceLock::new(),
            snapshot: Mutex::new(None),
            last: Mutex::new(None),
            gets: AtomicU64::new(0),
            last_use: Mutex::new(std::time::Instant::now()),
            requests: AtomicU64::new(0),
            xero_calls: AtomicU64::new(0),
            followed: Mutex::new(None),
            followed_latest: tokio::sync::watch::Sender::new(None),
            follow_live: std::sync::atomic::AtomicBool::new(false),
            follower_behind: AtomicU64::new(0),
            ask_server_next: std::sync::atomic::AtomicBool::new(false),
            managed: std::sync::atomic::AtomicBool::new(false),
            follow_refused: Mutex::new(None),
            refused: Mutex::new(None),
        };
        Self {
            inner: Arc::new(inner),
            flight: tokio::sync::Mutex::new(()),
            pending: Mutex::new(None),
            follower: Mutex::new(None),
        }
    }

    /// The state, while it is still this handle's alone (the builder methods run before the
    /// first `get`).
    fn inner_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("a Refresher is configured before its first get")
    }

    /// Calls Xero through `http` (a shared client and connection pool) instead of its own.
    pub fn with_http(self, http: reqwest::Client) -> Self {
        let _ = self.http.set(http);
        self
    }

    /// Starts from `secret`, which the owner has just read, instead of reading it again. Every
    /// write is conditional on its `resourceVersion`, so a copy a moment old is safe.
    pub fn with_snapshot(self, secret: Secret) -> Self {
        self.keep_snapshot(secret);
        self
    }

    /// Endpoints used when the Secret names none.
    pub fn with_default_endpoints(mut self, endpoints: Endpoints) -> Self {
        self.inner_mut().default_endpoints = endpoints;
        self
    }

    /// How long one [`Refresher::get`] may wait for another party or a rate limit.
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.inner_mut().max_wait = max_wait;
        self
    }

    /// How long one call to Xero may take before it counts as lost.
    pub fn with_xero_timeout(mut self, timeout: Duration) -> Self {
        self.inner_mut().xero_timeout = timeout;
        self
    }

    /// Asks `budget` before each claim; a refusal ends the `get` with [`Error::Throttled`]
    /// (nothing claimed, nothing called) rather than a wait.
    pub fn with_budget(mut self, budget: Arc<dyn CallBudget>) -> Self {
        self.inner_mut().budget = Some(budget);
        self
    }

    /// Calls Xero only at hosts `allowlist` holds (by default Xero's own): a token URL from the
    /// Secret's annotation (a consumer can edit it) that names another host ends the `get` with
    /// [`Error::EndpointNotAllowed`] before any claim or request.
    pub fn with_allowlist(mut self, allowlist: crate::allowlist::EndpointAllowlist) -> Self {
        self.inner_mut().allowlist = allowlist;
        self
    }

    /// Tells `watch` of each write this party makes to the Secret.
    pub fn with_write_watch(mut self, watch: Arc<dyn WriteWatch>) -> Self {
        self.inner_mut().write_watch = Some(watch);
        self
    }

    /// Uses `trusted` settings and credentials instead of what the Secret says (the controller:
    /// the connection's spec and its client Secret), in every decision and every call.
    pub fn with_trusted(mut self, trusted: Trusted) -> Self {
        self.inner_mut().trusted = trusted;
        self
    }
}
