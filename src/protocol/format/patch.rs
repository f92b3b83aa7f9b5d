//! The protocol's writes as JSON merge patches, each conditional on the `resourceVersion` read.

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::*;
use crate::redact::Sensitive;
use crate::xero::TokenSet;

fn b64(s: &str) -> Value {
    Value::String(STANDARD.encode(s))
}

/// A merge patch, conditional on `resource_version`, setting `annotations` (`None` removes one).
pub fn annotations_patch(resource_version: &str, annotations: &[(&str, Option<String>)]) -> Value {
    let ann: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_owned(),
                v.clone().map_or(Value::Null, Value::String),
            )
        })
        .collect();
    json!({"metadata": {"resourceVersion": resource_version, "annotations": ann}})
}

/// The claim: this party holds the refresh until `expires`.
pub fn claim_patch(resource_version: &str, holder: &str, expires: SystemTime) -> Value {
    annotations_patch(
        resource_version,
        &[
            (ANN_HOLDER, Some(holder.to_owned())),
            (ANN_LEASE_EXPIRES, Some(format_time(expires))),
        ],
    )
}

/// The release of a claim, optionally recording an error for everyone.
pub fn release_patch(resource_version: &str, extra: &[(&str, Option<String>)]) -> Value {
    let mut annotations = vec![(ANN_HOLDER, None), (ANN_LEASE_EXPIRES, None)];
    annotations.extend_from_slice(extra);
    annotations_patch(resource_version, &annotations)
}

/// Writes a new token set and releases the claim in one conditional write. When the answer has
/// no refresh token (client-credentials grant), the stored one is left as it is.
pub fn token_patch(
    resource_version: &str,
    set: &TokenSet,
    expires_at: SystemTime,
    refreshed_by: &str,
    now: SystemTime,
    rotation: u64,
) -> Value {
    let mut data = serde_json::Map::new();
    data.insert(ACCESS_TOKEN.into(), b64(set.access_token.expose()));
    if let Some(rt) = &set.refresh_token {
        data.insert(REFRESH_TOKEN.into(), b64(rt.expose()));
    }
    data.insert(EXPIRES_AT.into(), b64(&format_time(expires_at)));
    data.insert(TOKEN_TYPE.into(), b64(&set.token_type));
    data.insert(SCOPE.into(), b64(&set.scope));
    let mut patch = rotation_patch(resource_version, refreshed_by, now, rotation, true);
    patch["data"] = Value::Object(data);
    patch
}

/// Releases the claim recording a rotation (who, when, the counter) and clearing the stop
/// markers of the credentials it replaced; with `clear_backoff`, the backoff too.
fn rotation_patch(
    resource_version: &str,
    refreshed_by: &str,
    now: SystemTime,
    rotation: u64,
    clear_backoff: bool,
) -> Value {
    let mut annotations = vec![
        (ANN_REFRESHED_BY, Some(refreshed_by.to_owned())),
        (ANN_REFRESHED_AT, Some(format_time(now))),
        (ANN_ROTATION, Some(rotation.to_string())),
        (ANN_REAUTH_FOR, None),
        (ANN_REAUTH_REASON, None),
        (ANN_STOPPED_FOR, None),
        (ANN_STOP_REASON, None),
        (ANN_REFUSED_ACCESS_TOKEN, None),
    ];
    if clear_backoff {
        annotations.extend([(ANN_RETRY_NOT_BEFORE, None), (ANN_FAILED_ATTEMPTS, None)]);
    }
    release_patch(resource_version, &annotations)
}

/// Stores a new refresh token from an unusable answer, with no usable access token, so the
/// rotated token is not lost; the next party refreshes with it.
pub fn salvage_patch(
    resource_version: &str,
    refresh_token: &Sensitive,
    refreshed_by: &str,
    now: SystemTime,
    rotation: u64,
) -> Value {
    // A rotation like any other (the refresh token changed): counted, attributed, and the stop
    // markers of the old credentials cleared; the answer was unusable, so the backoff stays.
    let mut patch = rotation_patch(resource_version, refreshed_by, now, rotation, false);
    patch["data"] = json!({
        REFRESH_TOKEN: b64(refresh_token.expose()),
        EXPIRES_AT: b64(&format_time(now)),
        ACCESS_TOKEN: Value::Null,
    });
    patch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_patch_is_conditional_and_releases_the_claim() {
        let set = TokenSet {
            access_token: Sensitive::new("at2"),
            refresh_token: Some(Sensitive::new("rt2")),
            expires_in: 1800,
            token_type: "Bearer".into(),
            scope: "offline_access".into(),
        };
        let now = parse_time("2030-01-01T00:00:00Z").expect("t");
        let p = token_patch("42", &set, now + Duration::from_secs(1800), "pod-a", now, 8);
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        assert_eq!(p["metadata"]["annotations"][ANN_HOLDER], Value::Null);
        assert_eq!(p["metadata"]["annotations"][ANN_ROTATION], "8");
        assert_eq!(p["data"][REFRESH_TOKEN], STANDARD.encode("rt2"));
        assert_eq!(
            p["data"][EXPIRES_AT],
            STANDARD.encode("2030-01-01T00:30:00.000Z")
        );
        let no_rt = TokenSet {
            refresh_token: None,
            ..set
        };
        let p = token_patch("42", &no_rt, now, "pod-a", now, 9);
        assert!(
            p["data"].get(REFRESH_TOKEN).is_none(),
            "the stored refresh token stays"
        );
    }
}
