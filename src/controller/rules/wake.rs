//! Which changes of a token Secret wake the controller, and which connection they wake.
//!
//! Every consumer may write its token Secret, so nothing a consumer can write decides either:
//! - **which connection**: a Secret is mapped to the connection that names it, by its namespace
//!   and name ([`SecretOwners`]), never by its `xero-operator.io/connection` label (a consumer
//!   who relabels its Secret must not send its events elsewhere);
//! - **whether to wake**: every change wakes, except a version the controller wrote itself
//!   ([`OwnWrites`]: the controller notes the `resourceVersion` each of its own writes produced;
//!   versions are compared for equality only, as the API allows). A claim, a store, a marker, a
//!   label or owner change, a data edit, a deletion: whoever made it, the controller looks.
//!
//! The event of a write often arrives before the write's own answer: an event of a Secret with a
//! write of the controller's in flight is judged once that write has ended (within
//! [`IN_FLIGHT_WAIT`]), so it is recognised as the controller's own. A write whose answer is lost
//! wakes it once more: a reconcile too many, never one too few.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use crate::controller::context::lock;
use crate::crd::{TOKEN_SECRET_SUFFIX, XeroConnection};

/// A Secret by namespace and name.
type SecretKey = (String, String);

/// How long a version the controller wrote is remembered waiting for its watch event: the
/// event comes within milliseconds; one that never comes (a watch restarted in between) is
/// forgotten after this.
const OWN_WRITE_MEMORY: Duration = Duration::from_secs(60);
/// Versions remembered per Secret at most (the controller makes a few writes per reconcile).
const OWN_WRITES_PER_SECRET: usize = 8;
/// The longest an event waits for a write of the controller's to the same Secret to end (a
/// write's answer takes milliseconds; an API request's timeout is longer, and such an event
/// then wakes the controller).
pub const IN_FLIGHT_WAIT: Duration = Duration::from_secs(2);

/// The versions of token Secrets that the controller's own writes produced, until their watch
/// events arrive, and the writes still waiting for their answer.
#[derive(Default)]
pub struct OwnWrites {
    versions: Mutex<HashMap<SecretKey, Vec<(String, Instant)>>>,
    in_flight: Mutex<HashMap<SecretKey, usize>>,
    /// Told each time a write ends.
    ended: tokio::sync::Notify,
}

impl crate::protocol::refresher::WriteWatch for OwnWrites {
    fn sending(&self, namespace: &str, name: &str) {
        *lock(&self.in_flight)
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default() += 1;
    }

    fn ended(&self, namespace: &str, name: &str, written: Option<&Secret>) {
        if let Some(secret) = written {
            self.note(secret);
        }
        let key = (namespace.to_owned(), name.to_owned());
        let mut in_flight = lock(&self.in_flight);
        if let Some(n) = in_flight.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&key);
            }
        }
        drop(in_flight);
        self.ended.notify_waiters();
    }
}

impl OwnWrites {
    /// Runs the write `write` of the Secret `namespace/name`, noting the version it produced.
    pub async fn write<F>(
        &self,
        namespace: &str,
        name: &str,
        write: F,
    ) -> Result<Secret, kube::Error>
    where
        F: std::future::Future<Output = Result<Secret, kube::Error>>,
    {
        use crate::protocol::refresher::WriteWatch;
        self.sending(namespace, name);
        let result = write.await;
        self.ended(namespace, name, result.as_ref().ok());
        result
    }

    /// Notes `secret`, as a write of the controller's returned it.
    fn note(&self, secret: &Secret) {
        let (Some(ns), Some(name), Some(rv)) = (
            &secret.metadata.namespace,
            &secret.metadata.name,
            &secret.metadata.resource_version,
        ) else {
            return;
        };
        let mut versions = lock(&self.versions);
        let seen = versions.entry((ns.clone(), name.clone())).or_default();
        seen.retain(|(_, at)| at.elapsed() < OWN_WRITE_MEMORY);
        if seen.len() >= OWN_WRITES_PER_SECRET {
            seen.remove(0);
        }
        seen.push((rv.clone(), Instant::now()));
    }

    /// Whether the controller wrote version `rv` of the Secret `key` (forgetting it: each
    /// version has one event).
    fn take(&self, key: &SecretKey, rv: &str) -> bool {
        let mut versions = lock(&self.versions);
        let Some(seen) = versions.get_mut(key) else {
            return false;
        };
        let mine = seen.iter().position(|(v, _)| v == rv);
        if let Some(i) = mine {
            seen.remove(i);
        }
        seen.retain(|(_, at)| at.elapsed() < OWN_WRITE_MEMORY);
        if seen.is_empty() {
            versions.remove(key);
        }
        mine.is_some()
    }

    fn forget(&self, key: &SecretKey) {
        lock(&self.versions).remove(key);
    }

    fn writing(&self, key: &SecretKey) -> bool {
        lock(&self.in_flight).contains_key(key)
    }

    /// Whether version `rv` of `key` is the controller's own, waiting up to `wait` for writes
    /// of it in flight to end first.
    async fn own_after_writes(&self, key: &SecretKey, rv: &str, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let ended = self.ended.notified();
            if !self.writing(key) {
                break;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                break;
            }
        }
        self.take(key, rv)
    }

    /// Secrets with versions still waiting for their event (for tests).
    pub fn pending(&self) -> usize {
        lock(&self.versions).len()
    }
}

/// Which connections name which token Secret. A Secret named `<connection>-xero-token` maps to
/// that connection by its name alone; connections naming another `tokenSecretName` are kept
/// in an index (few: Secrets opted in by hand).
#[derive(Default)]
pub struct SecretOwners {
    chosen: Mutex<HashMap<SecretKey, BTreeSet<String>>>,
}

impl SecretOwners {
    /// Notes what a connection event says: a connection seen (its chosen token Secret name, if
    /// any) or deleted.
    pub fn note(&self, event: &watcher::Event<XeroConnection>) {
        match event {
            watcher::Event::Apply(c) | watcher::Event::InitApply(c) => self.set(c, true),
            watcher::Event::Delete(c) => self.set(c, false),
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }

    fn set(&self, conn: &XeroConnection, present: bool) {
        let secret = conn.token_secret_name();
        if secret == conn.default_token_secret_name() {
            return;
        }
        let (Some(ns), Some(name)) = (&conn.metadata.namespace, &conn.metadata.name) else {
            return;
        };
        let key = (ns.clone(), secret);
        let mut chosen = lock(&self.chosen);
        if present {
            chosen.entry(key).or_default().insert(name.clone());
        } else if let Some(names) = chosen.get_mut(&key) {
            names.remove(name);
            if names.is_empty() {
                chosen.remove(&key);
            }
        }
    }

    /// The connections that may name the Secret `ns/secret` as their token Secret.
    pub fn of(&self, ns: &str, secret: &str) -> Vec<ObjectRef<XeroConnection>> {
        let mut names: Vec<String> = lock(&self.chosen)
            .get(&(ns.to_owned(), secret.to_owned()))
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default();
        if let Some(conn) = secret.strip_suffix(TOKEN_SECRET_SUFFIX)
            && !conn.is_empty()
            && !names.iter().any(|n| n == conn)
        {
            names.push(conn.to_owned());
        }
        names
            .into_iter()
            .map(|n| ObjectRef::new(&n).within(ns))
            .collect()
    }
}

/// What to do with one event of the token-Secret watch.
pub enum Judged {
    /// Wake the connections naming this Secret.
    Wake(PartialObjectMeta<Secret>),
    /// The controller's own write, or nothing to act on.
    Skip,
    /// A write of the controller's to this Secret is in flight: decide once it has ended
    /// ([`WakeFilter::settle`]).
    Later(PartialObjectMeta<Secret>),
}

/// Keeps the events of a token-Secret watch that should wake the controller: all but the
/// versions it wrote itself.
pub struct WakeFilter {
    own: Arc<OwnWrites>,
}

fn key_of(s: &PartialObjectMeta<Secret>) -> SecretKey {
    (
        s.metadata.namespace.clone().unwrap_or_default(),
        s.metadata.name.clone().unwrap_or_default(),
    )
}

impl WakeFilter {
    pub fn new(own: Arc<OwnWrites>) -> Self {
        Self { own }
    }

    /// What to do with `event`.
    pub fn judge(&self, event: watcher::Event<PartialObjectMeta<Secret>>) -> Judged {
        match event {
            watcher::Event::Apply(s) => {
                let key = key_of(&s);
                let rv = s.metadata.resource_version.as_deref().unwrap_or_default();
                if self.own.take(&key, rv) {
                    Judged::Skip
                } else if self.own.writing(&key) {
                    Judged::Later(s)
                } else {
                    Judged::Wake(s)
                }
            }
            // A restarted watch: whatever was missed meanwhile, look at every Secret once.
            watcher::Event::InitApply(s) | watcher::Event::Delete(s) => {
                self.own.forget(&key_of(&s));
                Judged::Wake(s)
            }
            watcher::Event::Init | watcher::Event::InitDone => Judged::Skip,
        }
    }

    /// The object to wake for, once the controller's writes in flight to it have ended: `None`
    /// when the event was of one of them.
    pub fn settle(
        &self,
        s: PartialObjectMeta<Secret>,
    ) -> impl std::future::Future<Output = Option<PartialObjectMeta<Secret>>> + Send + 'static {
        let own = self.own.clone();
        async move {
            let key = key_of(&s);
            let rv = s.metadata.resource_version.clone().unwrap_or_default();
            (!own.own_after_writes(&key, &rv, IN_FLIGHT_WAIT).await).then_some(s)
        }
    }

    /// The object to pass on for `event` at once, if it should wake the controller (an event
    /// to be judged later counts as waking).
    pub fn pass(
        &self,
        event: watcher::Event<PartialObjectMeta<Secret>>,
    ) -> Option<PartialObjectMeta<Secret>> {
        match self.judge(event) {
            Judged::Wake(s) | Judged::Later(s) => Some(s),
            Judged::Skip => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::format as f;

    fn meta(name: &str, rv: &str, annotations: &[(&str, &str)]) -> PartialObjectMeta<Secret> {
        let mut s = PartialObjectMeta::<Secret>::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("n".into());
        s.metadata.resource_version = Some(rv.into());
        s.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        s
    }

    fn written(name: &str, rv: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("n".into());
        s.metadata.resource_version = Some(rv.into());
        s
    }

    fn wakes(f: &WakeFilter, s: PartialObjectMeta<Secret>) -> bool {
        f.pass(watcher::Event::Apply(s)).is_some()
    }

    #[test]
    fn the_controllers_own_writes_do_not_wake_it_everything_else_does() {
        let own = Arc::new(OwnWrites::default());
        let f = WakeFilter::new(own.clone());
        // Its claim, and its store (which releases the claim), as the API server answered them.
        own.note(&written("t", "11"));
        own.note(&written("t", "12"));
        assert!(!wakes(
            &f,
            meta("t", "11", &[(f::ANN_HOLDER, "controller/me")])
        ));
        assert!(!wakes(
            &f,
            meta("t", "12", &[(f::ANN_REFRESHED_BY, "controller/me")])
        ));
        assert_eq!(own.pending(), 0, "each version is forgotten once seen");
        // A consumer's claim, one that also edits the data, one that names the controller as
        // holder or refresher: whatever the metadata says, a version the controller did not
        // write wakes it.
        assert!(wakes(&f, meta("t", "13", &[(f::ANN_HOLDER, "consumer/1")])));
        assert!(wakes(
            &f,
            meta("t", "14", &[(f::ANN_HOLDER, "controller/me")])
        ));
        assert!(wakes(
            &f,
            meta("t", "15", &[(f::ANN_REFRESHED_BY, "controller/me")])
        ));
        // The same version of another Secret is another write.
        own.note(&written("u", "16"));
        assert!(wakes(&f, meta("t", "16", &[])));
    }

    #[test]
    fn a_deletion_and_a_restarted_watch_wake_and_forget() {
        let own = Arc::new(OwnWrites::default());
        let f = WakeFilter::new(own.clone());
        own.note(&written("t", "7"));
        assert!(f.pass(watcher::Event::Init).is_none());
        assert!(
            f.pass(watcher::Event::InitApply(meta("t", "7", &[])))
                .is_some()
        );
        assert!(f.pass(watcher::Event::InitDone).is_none());
        assert_eq!(own.pending(), 0);
        own.note(&written("t", "8"));
        assert!(
            f.pass(watcher::Event::Delete(meta("t", "8", &[])))
                .is_some()
        );
        assert_eq!(own.pending(), 0);
    }

    #[tokio::test]
    async fn an_event_that_comes_before_the_writes_answer_is_judged_after_it() {
        use crate::protocol::refresher::WriteWatch;
        let own = Arc::new(OwnWrites::default());
        let f = WakeFilter::new(own.clone());
        own.sending("n", "t");
        // The event of the write arrives first: judged once the write has ended.
        let Judged::Later(event) = f.judge(watcher::Event::Apply(meta("t", "21", &[]))) else {
            panic!("an event during a write of the controller's waits for it")
        };
        let later = tokio::spawn(f.settle(event));
        tokio::time::sleep(Duration::from_millis(20)).await;
        own.ended("n", "t", Some(&written("t", "21")));
        assert!(later.await.expect("settled").is_none(), "its own write");
        // Another party's write that lands while the controller's is in flight (which then
        // fails): it wakes once the controller's write has ended.
        own.sending("n", "t");
        let Judged::Later(event) = f.judge(watcher::Event::Apply(meta("t", "22", &[]))) else {
            panic!("judged later")
        };
        let later = tokio::spawn(f.settle(event));
        own.ended("n", "t", None);
        assert!(
            later.await.expect("settled").is_some(),
            "another party's write"
        );
        // A write that never answers does not hold an event for ever.
        own.sending("n", "t");
        let Judged::Later(event) = f.judge(watcher::Event::Apply(meta("t", "23", &[]))) else {
            panic!("judged later")
        };
        let started = tokio::time::Instant::now();
        assert!(f.settle(event).await.is_some());
        assert!(started.elapsed() >= IN_FLIGHT_WAIT);
    }

    #[test]
    fn a_write_whose_event_never_comes_is_not_kept_for_ever() {
        let own = OwnWrites::default();
        for rv in 0..100 {
            own.note(&written("t", &rv.to_string()));
        }
        let kept = lock(&own.versions)
            .get(&("n".to_owned(), "t".to_owned()))
            .map(Vec::len);
        assert_eq!(kept, Some(OWN_WRITES_PER_SECRET));
    }

    fn conn(name: &str, token_secret: Option<&str>) -> XeroConnection {
        let mut spec = serde_json::json!({"clientSecretRef": {"name": "app"}});
        if let Some(t) = token_secret {
            spec["tokenSecretName"] = t.into();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "xero-operator.io/v1alpha1", "kind": "XeroConnection",
            "metadata": {"name": name, "namespace": "n"}, "spec": spec,
        }))
        .expect("connection")
    }

    fn names(refs: Vec<ObjectRef<XeroConnection>>) -> Vec<String> {
        refs.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn a_secret_maps_to_the_connections_naming_it_not_to_its_label() {
        let owners = SecretOwners::default();
        // By the derived name alone: nothing to remember.
        owners.note(&watcher::Event::Apply(conn("acme", None)));
        assert_eq!(names(owners.of("n", "acme-xero-token")), ["acme"]);
        assert_eq!(lock(&owners.chosen).len(), 0);
        // A chosen name.
        owners.note(&watcher::Event::Apply(conn(
            "payroll",
            Some("shared-tokens"),
        )));
        assert_eq!(names(owners.of("n", "shared-tokens")), ["payroll"]);
        assert_eq!(
            names(owners.of("other-ns", "shared-tokens")),
            Vec::<String>::new()
        );
        owners.note(&watcher::Event::Delete(conn(
            "payroll",
            Some("shared-tokens"),
        )));
        assert_eq!(names(owners.of("n", "shared-tokens")), Vec::<String>::new());
        assert_eq!(
            lock(&owners.chosen).len(),
            0,
            "forgotten with the connection"
        );
        // A Secret whose name ends in the suffix and is also chosen by name: both.
        owners.note(&watcher::Event::Apply(conn("b", Some("a-xero-token"))));
        let mut both = names(owners.of("n", "a-xero-token"));
        both.sort();
        assert_eq!(both, ["a", "b"]);
        assert_eq!(names(owners.of("n", "-xero-token")), Vec::<String>::new());
    }
}
