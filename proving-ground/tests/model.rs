//! The model check of the refresh protocol (`proving_ground::model`): the product's rules
//! hold every property in every state explored, and each rule below, taken out, gives a
//! counterexample the checker finds and prints as a readable trace.

use std::time::{Duration, SystemTime};

use serde_json::Value;
use xero_operator::protocol::format::release_patch;
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
