//! Which changes of a token Secret wake the controller. Every change does, except
//! - one that only moves the refresh claim (`refresh-holder`, `refresh-lease-expires`): the
//!   controller's own claim and release, or another party's claim, whose end the controller
//!   already has a requeue for;
//! - the controller's own store of a new token (`refreshed-by` is this controller): the
//!   reconcile that made it has already acted on it.
//!
//! So the controller is not re-triggered by its own writes, while another party's store, a
//! marker (`retry-not-before`, `stopped-for`, …), a data-only edit (a person storing a refresh
//! token by hand), a label or owner change, or a deletion still wakes it at once.
//!
//! The watch sees metadata only, so each Secret is remembered as three hashes (24 bytes): of its
//! metadata without the claim and the store's annotations, of the claim, and of the store's.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;

use crate::protocol::format as f;

/// The annotations of the refresh claim.
const CLAIM: [&str; 2] = [f::ANN_HOLDER, f::ANN_LEASE_EXPIRES];
/// The annotations a store of a new token writes.
const STORE: [&str; 3] = [f::ANN_REFRESHED_BY, f::ANN_REFRESHED_AT, f::ANN_ROTATION];

/// What is remembered of a token Secret between two events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    /// Labels, annotations other than the claim's and the store's, owners, finalizers,
    /// deletion, uid.
    rest: u64,
    /// The claim annotations.
    claim: u64,
    /// The store's annotations.
    store: u64,
}

fn seen(meta: &kube::api::ObjectMeta) -> Seen {
    let mut rest = std::collections::hash_map::DefaultHasher::new();
    let mut claim = std::collections::hash_map::DefaultHasher::new();
    let mut store = std::collections::hash_map::DefaultHasher::new();
    meta.uid.hash(&mut rest);
    meta.labels.hash(&mut rest);
    meta.finalizers.hash(&mut rest);
    meta.deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut rest);
    for o in meta.owner_references.iter().flatten() {
        (&o.uid, o.controller).hash(&mut rest);
    }
    for (k, v) in meta.annotations.iter().flatten() {
        if CLAIM.contains(&k.as_str()) {
            (k, v).hash(&mut claim);
        } else if STORE.contains(&k.as_str()) {
            (k, v).hash(&mut store);
        } else {
            (k, v).hash(&mut rest);
        }
    }
    Seen {
        rest: rest.finish(),
        claim: claim.finish(),
        store: store.finish(),
    }
}

/// Whether a change from `before` to `now` should wake the controller; `stored_by_me`: the
/// Secret now says this controller made the last refresh.
fn wakes(before: Option<Seen>, now: Seen, stored_by_me: bool) -> bool {
    let Some(b) = before else { return true };
    if b.rest != now.rest {
        return true;
    }
    if b.store != now.store {
        // A new token: another party's wakes the controller, its own does not.
        return !stored_by_me;
    }
    // Only the claim moved: nothing to do before the requeue the controller already has.
    // Nothing moved in the metadata at all: the data changed (a person's edit): look.
    b.claim == now.claim
}

/// Keeps the events of a token-Secret watch that should wake the controller, as the objects
/// they touched (deletions included).
pub struct WakeFilter {
    /// The controller's identity in the protocol (`refreshed-by` of its own stores).
    identity: String,
    seen: HashMap<(Option<String>, Option<String>), Seen>,
}

impl WakeFilter {
    pub fn new(identity: &str) -> Self {
        Self {
            identity: identity.to_owned(),
            seen: HashMap::new(),
        }
    }

    /// The object to pass on for `event`, if it should wake the controller.
    pub fn pass(
        &mut self,
        event: watcher::Event<PartialObjectMeta<Secret>>,
    ) -> Option<PartialObjectMeta<Secret>> {
        match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                let key = (s.metadata.namespace.clone(), s.metadata.name.clone());
                let now = seen(&s.metadata);
                let before = self.seen.insert(key, now);
                let stored_by_me = s.annotations().get(f::ANN_REFRESHED_BY) == Some(&self.identity);
                wakes(before, now, stored_by_me).then_some(s)
            }
            watcher::Event::Delete(s) => {
                self.seen
                    .remove(&(s.metadata.namespace.clone(), s.metadata.name.clone()));
                Some(s)
            }
            watcher::Event::Init | watcher::Event::InitDone => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(annotations: &[(&str, &str)], rv: &str) -> PartialObjectMeta<Secret> {
        let mut s = PartialObjectMeta::<Secret>::default();
        s.metadata.name = Some("t".into());
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

    fn apply(f: &mut WakeFilter, s: PartialObjectMeta<Secret>) -> bool {
        f.pass(watcher::Event::Apply(s)).is_some()
    }

    const ME: &str = "controller/me";

    #[test]
    fn a_claim_or_its_release_alone_does_not_wake() {
        let mut f = WakeFilter::new(ME);
        assert!(
            apply(&mut f, secret(&[(f::ANN_ROTATION, "1")], "1")),
            "first sight"
        );
        let claimed = [
            (f::ANN_ROTATION, "1"),
            (f::ANN_HOLDER, "controller/x"),
            (f::ANN_LEASE_EXPIRES, "2030-01-01T00:00:00.000Z"),
        ];
        assert!(!apply(&mut f, secret(&claimed, "2")), "the claim");
        assert!(
            !apply(&mut f, secret(&[(f::ANN_ROTATION, "1")], "3")),
            "its release"
        );
    }

    #[test]
    fn its_own_store_does_not_wake_the_controller_another_partys_does() {
        let mut f = WakeFilter::new(ME);
        apply(&mut f, secret(&[(f::ANN_ROTATION, "1")], "1"));
        apply(
            &mut f,
            secret(&[(f::ANN_ROTATION, "1"), (f::ANN_HOLDER, ME)], "2"),
        );
        let mine = [(f::ANN_ROTATION, "2"), (f::ANN_REFRESHED_BY, ME)];
        assert!(!apply(&mut f, secret(&mine, "3")), "its own store");
        let theirs = [(f::ANN_ROTATION, "3"), (f::ANN_REFRESHED_BY, "consumer/1")];
        assert!(apply(&mut f, secret(&theirs, "4")), "a consumer's store");
    }

    #[test]
    fn a_store_a_marker_a_data_edit_and_a_deletion_wake() {
        let mut f = WakeFilter::new(ME);
        apply(&mut f, secret(&[(f::ANN_ROTATION, "1")], "1"));
        // Another party's store: the claim goes and the rotation moves in one write.
        apply(
            &mut f,
            secret(&[(f::ANN_ROTATION, "1"), (f::ANN_HOLDER, "c")], "2"),
        );
        assert!(
            apply(&mut f, secret(&[(f::ANN_ROTATION, "2")], "3")),
            "store"
        );
        // A release with a backoff marker.
        assert!(apply(
            &mut f,
            secret(
                &[(f::ANN_ROTATION, "2"), (f::ANN_RETRY_NOT_BEFORE, "x")],
                "4"
            )
        ));
        // Only the data changed (the metadata is the same but for its version).
        assert!(apply(
            &mut f,
            secret(
                &[(f::ANN_ROTATION, "2"), (f::ANN_RETRY_NOT_BEFORE, "x")],
                "5"
            )
        ));
        let gone = secret(&[], "6");
        assert!(f.pass(watcher::Event::Delete(gone)).is_some(), "deletion");
        assert!(f.seen.is_empty(), "forgotten when deleted");
    }

    #[test]
    fn a_restarted_watch_wakes_for_every_secret() {
        let mut f = WakeFilter::new(ME);
        assert!(f.pass(watcher::Event::Init).is_none());
        assert!(
            f.pass(watcher::Event::InitApply(secret(&[], "1")))
                .is_some()
        );
        assert!(f.pass(watcher::Event::InitDone).is_none());
    }
}
