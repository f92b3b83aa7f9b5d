//! The tenants step: the tenants (`/connections`), listed when the connection first has a
//! token, after a new authorisation and every [`TENANTS_RECHECK`] (not on every refresh: that
//! would double the calls to Xero), go into the status (sanitised) and into the token Secret's
//! `tenant_id`/`tenant_ids` (pinned to the Secret version the token came from).
//!
//! Assumed of Xero: the access token's `authentication_event_id` stays the same across the
//! refreshes of one authorisation and is new with each authorisation (its connections' `authEventId`
//! is "shared across connections authorised at the same time"). Were it new with every token,
//! the tenants would be listed on every refresh, as before: more calls, never a stale list.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::controller::checks;
use crate::controller::context::Context;
use crate::crd::{Tenant, XeroConnection, XeroConnectionStatus};
use crate::protocol::format::{self as f, TokenRecord};
use crate::text::{MAX_IDENTITY_CHARS, sanitize};
use crate::xero::XeroClient;

/// How long a tenant list stands when no new authorisation came: a tenant disconnected in Xero
/// (which needs no new authorisation) shows in the status within this long.
pub const TENANTS_RECHECK: Duration = Duration::from_secs(6 * 3600);
/// The recheck of each connection comes up to this much sooner, by a fixed amount of its own:
/// connections whose tokens rotated together (a storm, a restart) do not all list again in
/// the same minute six hours later.
const RECHECK_SPREAD: Duration = Duration::from_secs(3600);

/// After a failed listing, the next is tried no sooner than this, doubling with each failure in
/// a row up to [`TENANTS_RECHECK`]: not on every refresh.
pub const LISTING_RETRY: Duration = Duration::from_secs(300);

/// How long after `failures` listings in a row failed the next is tried.
pub fn listing_retry(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1).min(16))
        .unwrap_or(u32::MAX);
    LISTING_RETRY.saturating_mul(factor).min(TENANTS_RECHECK)
}

/// This connection's share of [`RECHECK_SPREAD`], fixed by its uid.
fn recheck_of(uid: &str) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    uid.hash(&mut hasher);
    let spread = RECHECK_SPREAD.as_secs();
    TENANTS_RECHECK - Duration::from_secs(hasher.finish() % spread)
}

/// A tenant list just fetched, and the authorisation it was fetched under.
pub(crate) struct Listing {
    pub(crate) tenants: Vec<Tenant>,
    pub(crate) authentication_event: Option<String>,
}

/// Whether the tenants the status shows still stand for the token `rec`, at `now`: listed
/// under the same authorisation, less than `recheck` ago. A status an earlier version wrote
/// (no listing time) stands for the very token it listed them with: the listing moves to this
/// rule with the next refresh, spread as the refreshes are, not all at once on an upgrade.
fn still_listed(
    status: Option<&XeroConnectionStatus>,
    rec: &TokenRecord,
    now: SystemTime,
    recheck: Duration,
) -> bool {
    let Some(status) = status else { return false };
    let Some(listed_at) = &status.tenants_listed_at else {
        return !status.tenants.is_empty() && status.refresh_count == rec.rotation;
    };
    let event = rec
        .access_token
        .as_ref()
        .and_then(|t| crate::xero::jwt_authentication_event(t.expose()));
    let fresh = now
        .duration_since(SystemTime::from(listed_at.0))
        .is_ok_and(|age| age < recheck);
    fresh && status.tenants_authentication_event == event
}

/// Fetches the tenants unless the status still has them for this token ([`still_listed`]), and
/// publishes them in the token Secret. `None`: keep what the status has.
pub(crate) async fn refresh(
    conn: &XeroConnection,
    ctx: &Context,
    rec: &TokenRecord,
) -> Option<Listing> {
    // Right after this controller's own status write the cached connection lags behind it:
    // the status as written then (a reconcile woken by the tenants' own Secret write would
    // otherwise list them again).
    let status = if ctx.status_is_stale(conn) {
        let api: Api<XeroConnection> =
            Api::namespaced(ctx.client.clone(), &conn.namespace().unwrap_or_default());
        api.get(&conn.name_any()).await.ok()?.status
    } else {
        conn.status.clone()
    };
    let recheck = recheck_of(&conn.uid().unwrap_or_default());
    if let Some(status) = status.as_ref()
        && still_listed(Some(status), rec, SystemTime::now(), recheck)
    {
        // A `tenant_id` or `tenant_ids` someone changed in the Secret is put back from the
        // status: an API write, no call to Xero.
        let ids: Vec<String> = status.tenants.iter().map(|t| t.tenant_id.clone()).collect();
        if !publishes(rec, &ids) {
            publish(conn, ctx, rec, &ids).await;
        }
        return None;
    }
    let uid = conn.uid().unwrap_or_default();
    if ctx.tenants_listing_held_back(&uid) {
        // Not listed again yet: the tenants the status shows are still put back.
        if let Some(status) = status.as_ref().filter(|s| !s.tenants.is_empty()) {
            let ids: Vec<String> = status.tenants.iter().map(|t| t.tenant_id.clone()).collect();
            if !publishes(rec, &ids) {
                publish(conn, ctx, rec, &ids).await;
            }
        }
        return None;
    }
    let access_token = rec.access_token.clone()?;
    let authentication_event = crate::xero::jwt_authentication_event(access_token.expose());
    // checks::validate has allowed this endpoint before the reconcile got here.
    let endpoints = checks::endpoints(conn, &ctx.policy.default_endpoints);
    let xero = XeroClient::with_http(ctx.http.clone(), endpoints, crate::xero::REQUEST_TIMEOUT);
    let list = match xero.connections(&access_token).await {
        Ok(list) => list,
        Err(e) => {
            let retry_in = ctx.tenants_listing_failed(&uid);
            tracing::warn!(connection = %conn.name_any(), error = %e, ?retry_in, "could not list the tenants");
            return None;
        }
    };
    ctx.tenants_listing_succeeded(&uid);
    let ids: Vec<String> = list.iter().map(|t| t.tenant_id.clone()).collect();
    if !publishes(rec, &ids) && !publish(conn, ctx, rec, &ids).await {
        return None;
    }
    let tenants = list
        .into_iter()
        // What an endpoint answered reaches `kubectl get -o yaml`: shown sanitised.
        .map(|t| Tenant {
            tenant_id: t.tenant_id,
            tenant_type: t.tenant_type.map(|v| sanitize(&v, MAX_IDENTITY_CHARS)),
            tenant_name: t.tenant_name.map(|v| sanitize(&v, MAX_IDENTITY_CHARS)),
            connection_id: Some(t.id),
        })
        .collect();
    Some(Listing {
        tenants,
        authentication_event,
    })
}

/// Whether the token Secret `rec` says exactly `ids`: in `tenant_ids`, and the first in
/// `tenant_id` (a reader of one tenant reads that key alone).
fn publishes(rec: &TokenRecord, ids: &[String]) -> bool {
    rec.tenant_ids == ids
        && rec.tenant_list_stored != ids.is_empty()
        && rec.tenant_id.as_deref() == ids.first().map(String::as_str)
}

/// Publishes the tenant ids `ids` in the token Secret, pinned to the version the token came
/// from (on a conflict the next reconcile, woken by that other write, tries again); false when
/// that failed.
async fn publish(conn: &XeroConnection, ctx: &Context, rec: &TokenRecord, ids: &[String]) -> bool {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &conn.namespace().unwrap_or_default());
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let patch = json!({
        "metadata": {"resourceVersion": rec.resource_version},
        "data": {
            f::TENANT_ID: b64(ids.first().map(String::as_str).unwrap_or_default()),
            f::TENANT_IDS: b64(&ids.join(",")),
        },
    });
    let (ns, name) = (
        conn.namespace().unwrap_or_default(),
        conn.token_secret_name(),
    );
    let written = ctx
        .own_writes
        .write(
            &ns,
            &name,
            secrets.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await;
    match written {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(connection = %conn.name_any(), error = %e, "could not publish the tenants in the token Secret");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    /// A token Secret whose access token is a JWT with `claims`.
    fn with_token(claims: serde_json::Value) -> TokenRecord {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let url = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!(
            "{}.{}.sig",
            url(r#"{"alg":"RS256"}"#),
            url(&claims.to_string())
        );
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "t"},
            "data": {f::ACCESS_TOKEN: b64(&jwt)},
        }))
        .expect("a Secret");
        TokenRecord::from_secret(&secret)
    }

    fn listed(ago: Duration, event: Option<&str>, now: SystemTime) -> XeroConnectionStatus {
        XeroConnectionStatus {
            tenants_listed_at: k8s_openapi::jiff::Timestamp::try_from(now - ago)
                .ok()
                .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
            tenants_authentication_event: event.map(str::to_owned),
            ..Default::default()
        }
    }

    #[test]
    fn a_failed_listing_backs_off_to_the_recheck() {
        assert_eq!(listing_retry(1), Duration::from_secs(300));
        assert_eq!(listing_retry(2), Duration::from_secs(600));
        assert_eq!(listing_retry(7), Duration::from_secs(300 * 64));
        assert_eq!(listing_retry(8), TENANTS_RECHECK);
        assert_eq!(listing_retry(40), TENANTS_RECHECK);
    }

    #[test]
    fn either_tenant_key_edited_alone_is_put_back() {
        let rec = |data: serde_json::Value| {
            TokenRecord::from_secret(
                &serde_json::from_value::<Secret>(json!({"metadata": {"name": "t"}, "data": data}))
                    .expect("a Secret"),
            )
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let ids = ["t1".to_owned(), "t2".to_owned()];
        let good = rec(json!({f::TENANT_ID: b64("t1"), f::TENANT_IDS: b64("t1,t2")}));
        assert!(publishes(&good, &ids));
        // A forged `tenant_id` beside the right `tenant_ids` (file readers use tenant_id).
        let forged_one = rec(json!({f::TENANT_ID: b64("evil"), f::TENANT_IDS: b64("t1,t2")}));
        assert!(!publishes(&forged_one, &ids));
        let forged_list = rec(json!({f::TENANT_ID: b64("t1"), f::TENANT_IDS: b64("t1,evil")}));
        assert!(!publishes(&forged_list, &ids));
        let missing_one = rec(json!({f::TENANT_IDS: b64("t1,t2")}));
        assert!(!publishes(&missing_one, &ids));
        let missing_list = rec(json!({f::TENANT_ID: b64("t1")}));
        assert!(!publishes(&missing_list, &ids[..1]));
        assert!(publishes(&rec(json!({})), &[]));
    }

    #[test]
    fn tenants_are_listed_again_only_after_a_new_authorisation_or_the_recheck() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let recheck = TENANTS_RECHECK;
        let token = with_token(json!({"authentication_event_id": "e1", "exp": 1}));
        let stands = |status: &XeroConnectionStatus, rec: &TokenRecord| {
            still_listed(Some(status), rec, now, recheck)
        };
        // Refreshes of one authorisation: the list stands.
        assert!(stands(&listed(hour, Some("e1"), now), &token));
        // Never listed: list.
        assert!(!still_listed(None, &token, now, recheck));
        assert!(!stands(&XeroConnectionStatus::default(), &token));
        // A new authorisation: list.
        assert!(!stands(&listed(hour, Some("e0"), now), &token));
        // The recheck: list.
        assert!(!stands(&listed(recheck + hour, Some("e1"), now), &token));
        assert!(!stands(&listed(recheck, Some("e1"), now), &token));
        // A token without the claim (a Custom Connection's may have none): only the recheck
        // lists again.
        let custom = with_token(json!({"exp": 1}));
        assert!(stands(&listed(hour, None, now), &custom));
        assert!(!stands(&listed(recheck, None, now), &custom));
    }

    #[test]
    fn a_status_from_an_earlier_version_stands_for_the_token_it_listed_with() {
        let now = SystemTime::now();
        let mut token = with_token(json!({"authentication_event_id": "e1"}));
        token.rotation = 7;
        let legacy = XeroConnectionStatus {
            tenants: vec![Tenant {
                tenant_id: "t1".into(),
                tenant_type: None,
                tenant_name: None,
                connection_id: None,
            }],
            refresh_count: 7,
            ..Default::default()
        };
        assert!(still_listed(Some(&legacy), &token, now, TENANTS_RECHECK));
        // The next refresh lists them (and records when).
        token.rotation = 8;
        assert!(!still_listed(Some(&legacy), &token, now, TENANTS_RECHECK));
    }

    #[test]
    fn each_connection_rechecks_at_a_time_of_its_own_within_the_spread() {
        let rechecks: std::collections::BTreeSet<Duration> =
            (0..50).map(|i| recheck_of(&format!("uid-{i}"))).collect();
        assert!(rechecks.len() > 40, "spread: {rechecks:?}");
        assert!(
            rechecks
                .iter()
                .all(|r| *r <= TENANTS_RECHECK && *r > TENANTS_RECHECK - RECHECK_SPREAD)
        );
        assert_eq!(recheck_of("uid-1"), recheck_of("uid-1"), "fixed per uid");
    }
}
