//! What a party believes of a token Secret every consumer may write: settings and credentials
//! from a better source replace the Secret's copy, and times no party can have written count as
//! absent.

use std::time::SystemTime;

use super::*;
use crate::xero::ClientCredentials;

/// What a party knows from a better source than the token Secret, and uses instead of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trusted {
    /// The protocol settings (the controller: from the connection's spec).
    pub settings: Option<Settings>,
    /// The app's credentials (the controller: from the connection's client Secret).
    pub client: Option<ClientCredentials>,
}

impl TokenRecord {
    /// `refreshed-at`, unless it lies more than [`FUTURE_TOLERANCE`] after `now`: a time no
    /// refresh can have written yet (a hand edit, a clock far ahead) is not shown, and does not
    /// start the refresh token's idle countdown or the last-refresh metric.
    pub fn refreshed_at_as_of(&self, now: SystemTime) -> Option<SystemTime> {
        self.refreshed_at.filter(|at| {
            now.checked_add(FUTURE_TOLERANCE)
                .is_none_or(|limit| *at <= limit)
        })
    }

    /// `retry-not-before`, unless it lies further ahead of `now` than any party writes one
    /// ([`MAX_RETRY_NOT_BEFORE`] plus the clock skew): such a marker (a hand edit of `2099-…`)
    /// counts as absent instead of freezing every party's refreshes.
    pub fn retry_not_before_as_of(&self, now: SystemTime) -> Option<SystemTime> {
        let limit = now.checked_add(MAX_RETRY_NOT_BEFORE + self.settings.clock_skew);
        self.retry_not_before
            .filter(|at| limit.is_none_or(|limit| *at <= limit))
    }

    /// This record with what `trusted` knows better put in place of what the Secret says: the
    /// controller reads its settings and the app's credentials from the connection and its
    /// client Secret, never from the token Secret, which every consumer may write.
    pub fn trusting(mut self, trusted: &Trusted) -> Self {
        if let Some(settings) = &trusted.settings {
            self.settings = settings.clone();
        }
        if let Some(client) = &trusted.client {
            self.client = Some(client.clone());
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::format::fixtures::secret;
    use crate::redact::Sensitive;

    #[test]
    fn a_future_refreshed_at_and_a_far_retry_not_before_count_as_absent() {
        let now = parse_time("2030-01-01T00:00:00Z").expect("time");
        let rec = |refreshed: &str, not_before: &str| {
            TokenRecord::from_secret(&secret(
                &[],
                &[
                    (ANN_REFRESHED_AT, refreshed),
                    (ANN_RETRY_NOT_BEFORE, not_before),
                    (ANN_CLOCK_SKEW, "5"),
                ],
            ))
        };
        // Within a clock's difference: as written.
        let near = rec("2030-01-01T00:04:59Z", "2030-01-02T00:00:05Z");
        assert!(near.refreshed_at_as_of(now).is_some());
        assert!(near.retry_not_before_as_of(now).is_some());
        // Further than any party writes: a hand edit, ignored.
        let far = rec("2030-01-01T00:05:01Z", "2030-01-02T00:00:06Z");
        assert_eq!(far.refreshed_at_as_of(now), None);
        assert_eq!(far.retry_not_before_as_of(now), None);
        let absurd = rec("2099-01-01T00:00:00Z", "2099-01-01T00:00:00Z");
        assert_eq!(absurd.refreshed_at_as_of(now), None);
        assert_eq!(absurd.retry_not_before_as_of(now), None);
        // The past is always plausible.
        let past = rec("2029-01-01T00:00:00Z", "2029-01-01T00:00:00Z");
        assert!(past.refreshed_at_as_of(now).is_some());
        assert!(past.retry_not_before_as_of(now).is_some());
    }

    #[test]
    fn trusted_settings_and_credentials_replace_what_the_secret_says() {
        let forged = TokenRecord::from_secret(&secret(
            &[
                (CLIENT_ID, "rogue-app"),
                (CLIENT_SECRET, "rogue"),
                (REFRESH_TOKEN, "rt"),
            ],
            &[
                (ANN_TOKEN_URL, "http://attacker.example/token"),
                (ANN_CLOCK_SKEW, "300"),
                (ANN_GRANT, "ClientCredentials"),
            ],
        ));
        let app = ClientCredentials {
            client_id: "real-app".into(),
            client_secret: Sensitive::new("real"),
        };
        let settings = Settings {
            token_url: Some("https://identity.xero.com/connect/token".into()),
            ..Settings::default()
        };
        let trusted = Trusted {
            settings: Some(settings.clone()),
            client: Some(app.clone()),
        };
        let rec = forged.clone().trusting(&trusted);
        assert_eq!(rec.client, Some(app));
        assert_eq!(rec.settings, settings);
        // The protocol's own fields stay as the Secret says.
        assert_eq!(rec.refresh_token, forged.refresh_token);
        // Nothing trusted: nothing replaced.
        assert_eq!(forged.clone().trusting(&Trusted::default()), forged);
    }
}
