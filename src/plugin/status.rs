//! `kubectl xero status`: one connection, as a person reads it. Pure: the connection, the token
//! Secret's metadata and the Events in, text out. Every value that came from an object someone
//! else may write (annotations, Event notes) is sanitised before it reaches the terminal.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;

use crate::crd::XeroConnection;
use crate::protocol::format::{Lease, TokenRecord, format_time};
use crate::text::{MAX_REASON_CHARS, sanitize};

/// How long Xero keeps an unused refresh token (`docs/xero-facts.md`): each refresh issues a
/// new one, so the current one lapses this long after the last refresh.
pub const REFRESH_TOKEN_IDLE_LIFETIME: Duration = Duration::from_secs(60 * 24 * 3600);

/// Events shown, the most recent last.
const EVENTS_SHOWN: usize = 10;

/// When an Event happened, for sorting (oldest first).
pub fn event_time(e: &Event) -> Option<SystemTime> {
    let t = e
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.deprecated_last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    Some(SystemTime::from(t))
}

/// `2026-11-28T03:40:00.000Z (in 12m 3s)` or `(4s ago)`.
fn when(t: SystemTime, now: SystemTime) -> String {
    let rel = match t.duration_since(now) {
        Ok(ahead) => format!("in {}", span(ahead)),
        Err(e) => format!("{} ago", span(e.duration())),
    };
    format!("{} ({rel})", format_time(t))
}

/// The two largest units: `59d 23h`, `20m 0s`, `4s`.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (days, hours, mins) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, _) => format!("{mins}m {secs}s"),
        (0, _, _) => format!("{hours}h {mins}m"),
        _ => format!("{days}d {hours}h"),
    }
}

fn shown(text: &str) -> String {
    sanitize(text, MAX_REASON_CHARS)
}

/// The status text: `secret` is the token Secret (metadata only), `None` when it does not
/// exist, or the error reading it.
pub fn render(
    conn: &XeroConnection,
    secret: Result<&Option<Secret>, &String>,
    events: Result<&[Event], &String>,
    now: SystemTime,
) -> String {
    let mut out = String::new();
    let status = conn.status.clone().unwrap_or_default();
    let ns = conn.namespace().unwrap_or_default();
    let _ = writeln!(out, "Connection:     {ns}/{}", conn.name_any());
    match status.conditions.iter().find(|c| c.type_ == "Ready") {
        Some(c) => {
            let _ = writeln!(
                out,
                "Ready:          {} ({})",
                shown(&c.status),
                shown(&c.reason)
            );
            let _ = writeln!(out, "                {}", shown(&c.message));
        }
        None => {
            let _ = writeln!(
                out,
                "Ready:          unknown (no status yet: is the operator running?)"
            );
        }
    }
    if status.observed_generation.is_some()
        && status.observed_generation != conn.metadata.generation
    {
        let _ = writeln!(
            out,
            "                (the status is of an older spec: the operator has not caught up)"
        );
    }
    let secret_name = conn.token_secret_name();
    let _ = writeln!(out, "Token Secret:   {secret_name}");
    match status.access_token_expires_at.as_ref() {
        Some(t) => {
            let at = SystemTime::from(t.0);
            let verb = if at > now { "expires" } else { "expired" };
            let _ = writeln!(out, "Access token:   {verb} {}", when(at, now));
        }
        None => {
            let _ = writeln!(out, "Access token:   none stored yet");
        }
    }
    let rec = match secret {
        Ok(Some(s)) => Some(TokenRecord::from_secret(s)),
        Ok(None) => {
            let _ = writeln!(out, "                the token Secret does not exist");
            None
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "                cannot read the token Secret: {}",
                shown(e)
            );
            None
        }
    };
    let last_refresh = rec
        .as_ref()
        .and_then(|r| r.refreshed_at_as_of(now))
        .or_else(|| {
            status
                .last_refresh_time
                .as_ref()
                .map(|t| SystemTime::from(t.0))
        });
    let grant_uses_refresh_token = conn.spec.grant == crate::crd::Grant::RefreshToken;
    if grant_uses_refresh_token {
        match last_refresh {
            Some(at) => {
                let _ = writeln!(
                    out,
                    "Refresh token:  unused, Xero drops it {} (60 days after the last refresh)",
                    when(at + REFRESH_TOKEN_IDLE_LIFETIME, now)
                );
            }
            None => {
                let _ = writeln!(out, "Refresh token:  no refresh recorded yet");
            }
        }
    }
    let by = rec
        .as_ref()
        .and_then(|r| r.refreshed_by.clone())
        .or(status.last_refreshed_by.clone());
    let rotation = rec.as_ref().map_or(status.refresh_count, |r| r.rotation);
    match last_refresh {
        Some(at) => {
            let _ = writeln!(
                out,
                "Last refresh:   {} by {}",
                when(at, now),
                shown(by.as_deref().unwrap_or("unknown"))
            );
        }
        None => {
            let _ = writeln!(out, "Last refresh:   never");
        }
    }
    let _ = writeln!(out, "Rotation:       {rotation}");
    if let Some(r) = &rec {
        let claim = match &r.lease {
            Lease::None => "none".to_owned(),
            Lease::Held { holder, expires } => {
                let state = if *expires > now { "until" } else { "expired" };
                format!("held by {} {state} {}", shown(holder), when(*expires, now))
            }
            Lease::Unparsable { holder } => {
                format!("held by {} (lease end unreadable)", shown(holder))
            }
        };
        let _ = writeln!(out, "Claim:          {claim}");
        if let Some(at) = r.retry_not_before_as_of(now).filter(|at| *at > now) {
            let _ = writeln!(
                out,
                "Waiting:        nobody calls Xero before {} ({} failed attempts in a row)",
                when(at, now),
                r.failed_attempts
            );
        }
        if r.stopped_for.is_some() {
            let _ = writeln!(
                out,
                "Stopped:        {} — no call until the client credentials or the refresh token change",
                shown(
                    r.stop_reason
                        .as_deref()
                        .unwrap_or("Xero refused the request")
                )
            );
        }
        if r.reauthorization_required_for.is_some() {
            let _ = writeln!(
                out,
                "Re-authorise:   Xero refused the refresh token ({}): kubectl xero authorize {} -n {ns}",
                shown(
                    r.reauthorization_reason
                        .as_deref()
                        .unwrap_or("invalid_grant")
                ),
                conn.name_any()
            );
        }
    }
    if !status.tenants.is_empty() {
        let _ = writeln!(out, "Tenants:");
        for t in &status.tenants {
            let _ = writeln!(
                out,
                "  {} ({})",
                shown(t.tenant_name.as_deref().unwrap_or("unnamed")),
                shown(&t.tenant_id)
            );
        }
    }
    let _ = writeln!(out, "Events:");
    let events = match events {
        Ok(events) => events,
        Err(e) => {
            let _ = writeln!(out, "  cannot list Events: {}", shown(e));
            &[]
        }
    };
    if events.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for e in events.iter().rev().take(EVENTS_SHOWN).rev() {
        let at = event_time(e).map_or_else(|| "?".to_owned(), |t| when(t, now));
        let _ = writeln!(
            out,
            "  {at}  {}  {}  {}",
            shown(e.type_.as_deref().unwrap_or("")),
            shown(e.reason.as_deref().unwrap_or("")),
            shown(e.note.as_deref().unwrap_or(""))
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::XeroConnectionStatus;
    use crate::protocol::format as f;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn time(at: SystemTime) -> Time {
        Time(k8s_openapi::jiff::Timestamp::try_from(at).expect("time"))
    }

    fn conn() -> XeroConnection {
        let mut c: XeroConnection = serde_json::from_value(serde_json::json!({
            "apiVersion": "xero-operator.io/v1alpha1",
            "kind": "XeroConnection",
            "metadata": {"name": "acme", "namespace": "team-a", "generation": 1},
            "spec": {"clientSecretRef": {"name": "xero-app"}},
        }))
        .expect("connection");
        c.status = Some(XeroConnectionStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "TokenValid".into(),
                message: "the token Secret holds a valid access token".into(),
                observed_generation: Some(1),
                last_transition_time: time(t(0)),
            }],
            observed_generation: Some(1),
            access_token_expires_at: Some(time(t(1800))),
            ..XeroConnectionStatus::default()
        });
        c
    }

    fn secret(annotations: &[(&str, String)]) -> Option<Secret> {
        Some(Secret {
            metadata: kube::api::ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), v.clone()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Secret::default()
        })
    }

    #[test]
    fn a_healthy_connection_shows_both_expiries_the_rotation_and_who_refreshed() {
        let s = secret(&[
            (f::ANN_REFRESHED_AT, format_time(t(0))),
            (f::ANN_REFRESHED_BY, "controller/pod-a".into()),
            (f::ANN_ROTATION, "7".into()),
        ]);
        let out = render(&conn(), Ok(&s), Ok(&[]), t(600));
        for want in [
            "Ready:          True (TokenValid)",
            "Access token:   expires",
            "(in 20m 0s)",
            "Refresh token:  unused, Xero drops it",
            "(in 59d 23h)",
            "(10m 0s ago) by controller/pod-a",
            "Rotation:       7",
            "Claim:          none",
        ] {
            assert!(out.contains(want), "{want:?} missing from:\n{out}");
        }
    }

    #[test]
    fn a_claim_a_wait_and_a_stop_are_shown_and_foreign_text_is_sanitised() {
        let s = secret(&[
            (f::ANN_HOLDER, "consumer/x\u{1b}[2J".into()),
            (f::ANN_LEASE_EXPIRES, format_time(t(620))),
            (f::ANN_RETRY_NOT_BEFORE, format_time(t(700))),
            (f::ANN_FAILED_ATTEMPTS, "3".into()),
            (f::ANN_STOPPED_FOR, "abc".into()),
            (f::ANN_STOP_REASON, "invalid_client".into()),
        ]);
        let out = render(&conn(), Ok(&s), Ok(&[]), t(600));
        assert!(out.contains("held by consumer/x"), "{out}");
        assert!(out.contains("until"), "{out}");
        assert!(!out.contains('\u{1b}'), "{out:?}");
        assert!(out.contains("3 failed attempts"), "{out}");
        assert!(out.contains("Stopped:        invalid_client"), "{out}");
    }

    #[test]
    fn no_status_and_no_secret_say_so() {
        let mut c = conn();
        c.status = None;
        let out = render(&c, Ok(&None), Ok(&[]), t(0));
        assert!(out.contains("is the operator running?"), "{out}");
        assert!(out.contains("the token Secret does not exist"), "{out}");
        assert!(out.contains("Access token:   none stored yet"), "{out}");
    }
}
