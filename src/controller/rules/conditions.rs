//! The conditions a connection's status carries: `Ready` (which reason a person sees for each
//! state), and `Reconciling` / `Stalled`, which tell tools that read status the kstatus way
//! (Flux, `kubectl wait`, Argo CD's health check in `deploy/argocd/`) "in progress" from "needs a
//! person"; and when a change is a transition worth an Event. Pure.

use std::time::SystemTime;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The states a connection can be in, each with its `Ready` reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// The token Secret holds a usable access token.
    TokenValid,
    /// No refresh token yet: someone must authorise the app. Holds the commands that do it
    /// ([`authorize_hint`]), empty when unknown.
    WaitingForAuthorization(String),
    /// The stored refresh token cannot be used (Xero refused it, or it is not text); a person
    /// must authorise again. Holds what happened, and the commands as in
    /// [`Self::WaitingForAuthorization`].
    ReauthorizationRequired(String, String),
    /// Xero answered 429; waiting it out.
    RateLimited(String),
    /// Xero failed (5xx, timeouts, unusable answers); retrying with backoff.
    XeroUnavailable(String),
    /// Xero refused the app's client id or secret.
    InvalidClientCredentials(String),
    /// The client Secret is missing, or lacks a key.
    MissingClientSecret(String),
    /// The spec is valid for the schema but cannot work (e.g. the token Secret is the client
    /// Secret).
    InvalidSpec(String),
    /// Another party is refreshing right now, and the stored access token is still usable.
    Refreshing(String),
    /// Another party is refreshing right now, and the stored access token has expired: not
    /// Ready until the new one is stored.
    RefreshingExpired(String),
    /// The access token stopped being usable while the controller's refresh of it is still
    /// failing and being retried: written at that moment, not when the retries end.
    TokenExpired(String),
    /// Xero refused the request with an error only a configuration change can fix (other than
    /// `invalid_client`): nobody calls until the credentials or the refresh token change.
    RequestRefused(String),
    /// The Kubernetes API failed.
    ApiError(String),
    /// The token Secret exists and is not the operator's, nor opted in (or not Opaque).
    TokenSecretNotOwned(String),
    /// The token Secret belongs to another connection or controller.
    TokenSecretInUse(String),
    /// The client Secret lacks the opt-in label `xero-operator.io/client-credentials: "true"`.
    ClientSecretNotOptedIn(String),
    /// An endpoint's host is not in the operator's allowlist: no request is sent.
    EndpointNotAllowed(String),
    /// A consumer ServiceAccount outside the connection's namespace, which the operator does not
    /// allow.
    ConsumerNotAllowed(String),
    /// A Role or RoleBinding with the consumers' name exists and is not this connection's.
    ConsumerRbacConflict(String),
}

impl State {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TokenValid => "TokenValid",
            Self::WaitingForAuthorization(_) => "WaitingForAuthorization",
            Self::ReauthorizationRequired(..) => "ReauthorizationRequired",
            Self::RateLimited(_) => "RateLimited",
            Self::XeroUnavailable(_) => "XeroUnavailable",
            Self::InvalidClientCredentials(_) => "InvalidClientCredentials",
            Self::MissingClientSecret(_) => "MissingClientSecret",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::Refreshing(_) | Self::RefreshingExpired(_) => "Refreshing",
            Self::TokenExpired(_) => "TokenExpired",
            Self::RequestRefused(_) => "RequestRefused",
            Self::ApiError(_) => "KubernetesApiError",
            Self::TokenSecretNotOwned(_) => "TokenSecretNotOwned",
            Self::TokenSecretInUse(_) => "TokenSecretInUse",
            Self::ClientSecretNotOptedIn(_) => "ClientSecretNotOptedIn",
            Self::EndpointNotAllowed(_) => "EndpointNotAllowed",
            Self::ConsumerNotAllowed(_) => "ConsumerNotAllowed",
            Self::ConsumerRbacConflict(_) => "ConsumerRbacConflict",
        }
    }

    /// A sentence for `kubectl describe`. Never holds a token; text that came from a Secret's
    /// annotations or from an endpoint's answer is sanitised (no control characters, capped).
    pub fn message(&self) -> String {
        let text = match self {
            Self::TokenValid => "the token Secret holds a valid access token".to_owned(),
            Self::WaitingForAuthorization(hint) => format!(
                "no refresh token yet: run `{}` to authorise the app",
                authorize_command(hint)
            ),
            Self::ReauthorizationRequired(what, hint) => format!(
                "{what}; run `{}` to authorise the app again",
                authorize_command(hint)
            ),
            Self::RateLimited(why)
            | Self::XeroUnavailable(why)
            | Self::InvalidClientCredentials(why)
            | Self::MissingClientSecret(why)
            | Self::InvalidSpec(why)
            | Self::Refreshing(why)
            | Self::RefreshingExpired(why)
            | Self::TokenExpired(why)
            | Self::RequestRefused(why)
            | Self::ApiError(why)
            | Self::TokenSecretNotOwned(why)
            | Self::TokenSecretInUse(why)
            | Self::ClientSecretNotOptedIn(why)
            | Self::EndpointNotAllowed(why)
            | Self::ConsumerNotAllowed(why)
            | Self::ConsumerRbacConflict(why) => why.clone(),
        };
        crate::text::sanitize(&text, crate::text::MAX_REASON_CHARS)
    }

    /// True only while the token Secret holds a usable access token.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::TokenValid | Self::Refreshing(_))
    }

    /// Whether the operator is getting there on its own, or needs a person.
    pub fn health(&self) -> Health {
        match self {
            Self::TokenValid | Self::Refreshing(_) => Health::Ready,
            // Retried on their own: a refresh under way, a rate limit or an outage waited
            // out, an API error retried with backoff.
            Self::RefreshingExpired(_)
            | Self::TokenExpired(_)
            | Self::RateLimited(_)
            | Self::XeroUnavailable(_)
            | Self::ApiError(_) => Health::Progressing,
            // Nothing changes until a person authorises the app, fixes a Secret, the spec or
            // the operator's configuration.
            Self::WaitingForAuthorization(_)
            | Self::ReauthorizationRequired(..)
            | Self::InvalidClientCredentials(_)
            | Self::MissingClientSecret(_)
            | Self::InvalidSpec(_)
            | Self::RequestRefused(_)
            | Self::TokenSecretNotOwned(_)
            | Self::TokenSecretInUse(_)
            | Self::ClientSecretNotOptedIn(_)
            | Self::EndpointNotAllowed(_)
            | Self::ConsumerNotAllowed(_)
            | Self::ConsumerRbacConflict(_) => Health::Stalled,
        }
    }
}

/// A state as tools that read status the kstatus way see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// `Ready` True: the token Secret holds a usable access token.
    Ready,
    /// `Reconciling` True: not ready, and the operator is getting there on its own.
    Progressing,
    /// `Stalled` True: not ready until a person acts (the message says what to do).
    Stalled,
}

/// The command that authorises the app for a connection, as [`authorize_hint`] wrote it, or
/// with a placeholder when the connection is unknown.
fn authorize_command(hint: &str) -> String {
    if hint.is_empty() {
        "kubectl xero authorize <connection>".to_owned()
    } else {
        hint.to_owned()
    }
}

/// The commands a person runs to authorise the app for connection `conn` in `ns`, whose token
/// Secret is `secret`: the plugin by the connection's name, or `xero-token` by the Secret's,
/// naming the connection so that it reads the app's identity from the connection's client
/// Secret (never from the token Secret, which consumers may write).
pub fn authorize_hint(ns: &str, conn: &str, secret: &str) -> String {
    format!(
        "kubectl xero authorize {conn} -n {ns}` (or `xero-token --namespace {ns} --secret {secret} \
         authorize --connection {conn}"
    )
}

/// The status's conditions for `state`, `Ready` first: `Ready`, `Reconciling` and `Stalled`
/// (exactly one of them True), each keeping its `lastTransitionTime` from `previous` while its
/// status and reason stay the same.
pub fn conditions(
    state: &State,
    previous: &[Condition],
    generation: Option<i64>,
    now: SystemTime,
) -> Vec<Condition> {
    let health = state.health();
    [
        ("Ready", health == Health::Ready),
        ("Reconciling", health == Health::Progressing),
        ("Stalled", health == Health::Stalled),
    ]
    .into_iter()
    .map(|(type_, is_true)| {
        let prev = previous.iter().find(|c| c.type_ == type_);
        condition(type_, is_true, state, prev, generation, now)
    })
    .collect()
}

/// One condition of `type_`, keeping `lastTransitionTime` when the status and reason did not
/// change.
fn condition(
    type_: &str,
    is_true: bool,
    state: &State,
    previous: Option<&Condition>,
    generation: Option<i64>,
    now: SystemTime,
) -> Condition {
    let status = if is_true { "True" } else { "False" };
    let unchanged = previous.is_some_and(|p| p.status == status && p.reason == state.reason());
    let last_transition_time = match previous {
        Some(p) if unchanged => p.last_transition_time.clone(),
        _ => Time(
            k8s_openapi::jiff::Timestamp::try_from(now)
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        ),
    };
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: state.reason().to_owned(),
        message: state.message(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether going from `previous` to `state` deserves an Event (a transition, not steady state).
pub fn is_transition(previous: Option<&Condition>, state: &State) -> bool {
    previous.is_none_or(|p| p.reason != state.reason())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `Ready` condition alone, as [`conditions`] writes it.
    fn ready_condition(
        state: &State,
        previous: Option<&Condition>,
        generation: Option<i64>,
        now: SystemTime,
    ) -> Condition {
        condition("Ready", state.is_ready(), state, previous, generation, now)
    }

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s)
    }

    #[test]
    fn ready_is_true_only_with_a_usable_token() {
        let x = || "x".to_owned();
        // Every state, with the status and reason a person sees (written out, not derived).
        let table = [
            (State::TokenValid, "True", "TokenValid"),
            (State::Refreshing(x()), "True", "Refreshing"),
            (State::RefreshingExpired(x()), "False", "Refreshing"),
            (
                State::WaitingForAuthorization(x()),
                "False",
                "WaitingForAuthorization",
            ),
            (
                State::ReauthorizationRequired(x(), x()),
                "False",
                "ReauthorizationRequired",
            ),
            (State::RateLimited(x()), "False", "RateLimited"),
            (State::XeroUnavailable(x()), "False", "XeroUnavailable"),
            (
                State::InvalidClientCredentials(x()),
                "False",
                "InvalidClientCredentials",
            ),
            (
                State::MissingClientSecret(x()),
                "False",
                "MissingClientSecret",
            ),
            (State::InvalidSpec(x()), "False", "InvalidSpec"),
            (State::RequestRefused(x()), "False", "RequestRefused"),
            (State::ApiError(x()), "False", "KubernetesApiError"),
            (
                State::TokenSecretNotOwned(x()),
                "False",
                "TokenSecretNotOwned",
            ),
            (State::TokenSecretInUse(x()), "False", "TokenSecretInUse"),
            (
                State::ClientSecretNotOptedIn(x()),
                "False",
                "ClientSecretNotOptedIn",
            ),
            (
                State::EndpointNotAllowed(x()),
                "False",
                "EndpointNotAllowed",
            ),
            (
                State::ConsumerNotAllowed(x()),
                "False",
                "ConsumerNotAllowed",
            ),
            (
                State::ConsumerRbacConflict(x()),
                "False",
                "ConsumerRbacConflict",
            ),
        ];
        for (state, status, reason) in table {
            let c = ready_condition(&state, None, Some(1), t(0));
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                (status, reason),
                "{state:?}"
            );
        }
    }

    #[test]
    fn exactly_one_of_ready_reconciling_and_stalled_is_true() {
        let x = || "x".to_owned();
        // Written out: what retries on its own is in progress, what needs a person is stalled.
        let table = [
            (State::TokenValid, "Ready"),
            (State::Refreshing(x()), "Ready"),
            (State::RefreshingExpired(x()), "Reconciling"),
            (State::TokenExpired(x()), "Reconciling"),
            (State::RateLimited(x()), "Reconciling"),
            (State::XeroUnavailable(x()), "Reconciling"),
            (State::ApiError(x()), "Reconciling"),
            (State::WaitingForAuthorization(x()), "Stalled"),
            (State::ReauthorizationRequired(x(), x()), "Stalled"),
            (State::InvalidClientCredentials(x()), "Stalled"),
            (State::MissingClientSecret(x()), "Stalled"),
            (State::InvalidSpec(x()), "Stalled"),
            (State::RequestRefused(x()), "Stalled"),
            (State::TokenSecretNotOwned(x()), "Stalled"),
            (State::TokenSecretInUse(x()), "Stalled"),
            (State::ClientSecretNotOptedIn(x()), "Stalled"),
            (State::EndpointNotAllowed(x()), "Stalled"),
            (State::ConsumerNotAllowed(x()), "Stalled"),
            (State::ConsumerRbacConflict(x()), "Stalled"),
        ];
        for (state, true_one) in table {
            let all = conditions(&state, &[], Some(3), t(0));
            let types: Vec<&str> = all.iter().map(|c| c.type_.as_str()).collect();
            assert_eq!(types, ["Ready", "Reconciling", "Stalled"], "Ready first");
            for c in &all {
                let want = if c.type_ == true_one { "True" } else { "False" };
                assert_eq!(c.status, want, "{state:?} {}", c.type_);
                assert_eq!(c.reason, state.reason());
                assert_eq!(c.observed_generation, Some(3));
            }
        }
        // Each keeps its own transition time.
        let stalled = conditions(&State::InvalidSpec(x()), &[], Some(1), t(10));
        let valid = conditions(&State::TokenValid, &stalled, Some(2), t(20));
        let again = conditions(&State::TokenValid, &valid, Some(2), t(30));
        assert_eq!(again, valid);
        assert_ne!(
            valid[0].last_transition_time,
            stalled[0].last_transition_time
        );
    }

    #[test]
    fn transition_time_moves_only_on_a_change() {
        let first = ready_condition(&State::TokenValid, None, Some(1), t(10));
        let same = ready_condition(&State::TokenValid, Some(&first), Some(2), t(20));
        assert_eq!(same.last_transition_time, first.last_transition_time);
        assert_eq!(same.observed_generation, Some(2));
        let changed = ready_condition(
            &State::XeroUnavailable("500".into()),
            Some(&same),
            Some(2),
            t(30),
        );
        assert_ne!(changed.last_transition_time, first.last_transition_time);
    }

    #[test]
    fn events_only_on_transitions() {
        let valid = ready_condition(&State::TokenValid, None, None, t(0));
        assert!(is_transition(None, &State::TokenValid));
        assert!(!is_transition(Some(&valid), &State::TokenValid));
        assert!(is_transition(
            Some(&valid),
            &State::RateLimited("429".into())
        ));
    }

    #[test]
    fn messages_are_sanitised() {
        let m = State::ReauthorizationRequired("x\u{1b}[2J\nREADY True".into(), String::new())
            .message();
        assert!(!m.chars().any(char::is_control), "{m:?}");
        let long = State::Refreshing("held by ".to_owned() + &"a".repeat(5000)).message();
        assert!(long.chars().count() <= crate::text::MAX_REASON_CHARS);
    }

    #[test]
    fn the_reauthorization_message_says_what_to_do() {
        let hint = authorize_hint("team-a", "acme", "acme-xero-token");
        let m = State::ReauthorizationRequired("Xero refused".into(), hint).message();
        assert!(
            m.contains("run `kubectl xero authorize acme -n team-a`"),
            "{m}"
        );
        assert!(
            m.contains(
                "`xero-token --namespace team-a --secret acme-xero-token authorize --connection acme`"
            ),
            "{m}"
        );
        let m = State::WaitingForAuthorization(String::new()).message();
        assert!(m.contains("kubectl xero authorize <connection>"), "{m}");
    }
}
