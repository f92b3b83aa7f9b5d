//! The model check of the refresh protocol (`proving_ground::model`): the product's rules
//! hold every property in every state explored, and each rule below, taken out, gives a
//! counterexample the checker finds and prints as a readable trace.

use std::time::{Duration, SystemTime};

use serde_json::Value;
use xero_operator::protocol::format::{Lease, claim_patch, release_patch, token_patch};
use xero_operator::protocol::round::{self, Action, Facts};
use xero_operator::xero::TokenSet;
use xero_proving_ground::model::{Config, ProtocolModel, Report, Rules, check, check_until_broken};

/// The configuration of these tests: `make model` checks the product deeper.
fn config() -> Config {
    Config {
        depth: 16,
        ..Config::quick()
    }
}

fn broken(report: &Report) -> Vec<&'static str> {
    report
        .counterexamples
        .iter()
        .map(|(name, _)| *name)
        .collect()
}

/// Checks the product with one rule replaced; the names of the properties that broke, and
/// the first trace printed.
fn mutant(rules: Rules) -> Vec<&'static str> {
    let report = check_until_broken(ProtocolModel::new(
        Config {
            depth: 20,
            ..config()
        },
        rules,
    ));
    if let Some((name, trace)) = report.counterexamples.first() {
        println!("{name}:\n{trace}");
    }
    broken(&report)
}

#[test]
fn the_product_s_rules_hold_every_property() {
    let report = check(ProtocolModel::new(config(), Rules::product()));
    println!(
        "{} states ({} unique) to depth {} in {:?}",
        report.states, report.unique_states, report.max_depth, report.elapsed
    );
    assert!(report.counterexamples.is_empty(), "{:?}", broken(&report));
    assert!(report.unreached.is_empty(), "{:?}", report.unreached);
    assert!(
        report.unique_states > 10_000,
        "the model explored too little"
    );
}

#[test]
fn without_the_claim_s_cap_on_a_call_two_parties_call_with_one_refresh_token() {
    let uncapped = Rules {
        call_window: |_now, _lease_end, timeout| Some(timeout.max(Duration::from_secs(3600))),
        ..Rules::product()
    };
    let broken = mutant(uncapped);
    assert!(
        broken.contains(&"two parties never wait on Xero with one refresh token"),
        "{broken:?}"
    );
}

#[test]
fn without_the_release_s_condition_another_party_s_claim_is_removed() {
    fn unconditional(rv: &str, extra: &[(&str, Option<String>)]) -> Value {
        let mut patch = release_patch(rv, extra);
        if let Some(metadata) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.remove("resourceVersion");
        }
        patch
    }
    let broken = mutant(Rules {
        release_patch: unconditional,
        ..Rules::product()
    });
    assert!(
        broken.contains(&"two parties never wait on Xero with one refresh token"),
        "{broken:?}"
    );
}

#[test]
fn counting_the_expiry_from_the_answer_hands_out_an_expired_token() {
    fn from_receipt(set: &TokenSet, _sent: SystemTime, received: SystemTime) -> SystemTime {
        set.expires_at(received)
    }
    let broken = mutant(Rules {
        stored_expiry: from_receipt,
        ..Rules::product()
    });
    assert!(
        broken.contains(&"no party hands out an expired token"),
        "{broken:?}"
    );
}

#[test]
fn deciding_without_the_markers_claims_under_a_backoff_or_a_stop() {
    fn blind(facts: &Facts) -> Action {
        let mut rec = facts.rec.clone();
        rec.retry_not_before = None;
        rec.failed_attempts = 0;
        rec.stopped_for = None;
        rec.reauthorization_required_for = None;
        round::next(&Facts {
            rec: &rec,
            ..*facts
        })
    }
    let broken = mutant(Rules {
        next: blind,
        ..Rules::product()
    });
    assert!(
        broken.contains(&"every stop and backoff marker is honoured"),
        "{broken:?}"
    );
}

#[test]
fn a_store_that_mixes_up_the_tokens_breaks_the_chain() {
    fn mixed_up(
        rv: &str,
        set: &TokenSet,
        expires_at: SystemTime,
        by: &str,
        sent: SystemTime,
        rotation: u64,
    ) -> Value {
        let mixed = TokenSet {
            refresh_token: Some(set.access_token.clone()),
            ..set.clone()
        };
        token_patch(rv, &mixed, expires_at, by, sent, rotation)
    }
    let broken = mutant(Rules {
        token_patch: mixed_up,
        ..Rules::product()
    });
    assert!(
        broken.contains(&"the refresh chain never breaks"),
        "{broken:?}"
    );
}

#[test]
fn an_unconditional_claim_calls_again_with_a_rotated_refresh_token() {
    fn unconditional(rv: &str, holder: &str, expires: SystemTime) -> Value {
        let mut patch = claim_patch(rv, holder, expires);
        if let Some(metadata) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.remove("resourceVersion");
        }
        patch
    }
    // Every property this breaks, not only the first found: a claim on a stale read is a
    // replay of a rotated token (more than one call for an expiry) whether or not the other
    // call is still in flight.
    let report = check(ProtocolModel::new(
        config(),
        Rules {
            claim_patch: unconditional,
            ..Rules::product()
        },
    ));
    let broken = broken(&report);
    assert!(
        broken
            .contains(&"absent crashes and lost answers, every call rotates (one call per expiry)"),
        "{broken:?}"
    );
}

#[test]
fn a_claim_that_never_lapses_leaves_the_token_expired_after_a_crash() {
    fn never_lapses(facts: &Facts) -> Action {
        if let Lease::Held { holder, .. } = &facts.rec.lease
            && holder != facts.me
        {
            return Action::Wait(Duration::from_secs(1));
        }
        round::next(facts)
    }
    let broken = mutant(Rules {
        next: never_lapses,
        ..Rules::product()
    });
    assert!(
        broken.contains(&"liveness: with Xero up and parties alive, a usable token is stored"),
        "{broken:?}"
    );
}
