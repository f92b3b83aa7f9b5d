//! Counts the token Secret's writes per rotation: over the whole run, and in steady state
//! (from the second change of the access token to the last, so the writes that set a
//! connection up — around its first token — are left out).

use k8s_openapi::api::core::v1::Secret;

use xero_operator::protocol::format as f;
use xero_operator::redact::Sensitive;

/// The writes seen in a Secret's watch, and where its access token changed.
#[derive(Debug, Default)]
pub struct WriteCounter {
    writes: u64,
    /// The access token last seen (kept as `Sensitive`, so a debug print shows no token).
    token: Option<Sensitive>,
    /// The write count at each change of the access token.
    changes: Vec<u64>,
}

impl WriteCounter {
    /// Notes one write (a watch `Modified` event) that left the Secret as `secret`.
    pub fn observe(&mut self, secret: &Secret) {
        self.writes += 1;
        let token = secret
            .data
            .as_ref()
            .and_then(|d| d.get(f::ACCESS_TOKEN))
            .map(|v| Sensitive::new(String::from_utf8_lossy(&v.0)));
        if token.is_some() && token != self.token {
            self.changes.push(self.writes);
            self.token = token;
        }
    }

    /// All writes seen.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Writes per rotation once set up: the writes after the one that stored the second token,
    /// up to the one that stored the latest, per rotation in between. `None` until three
    /// tokens were seen.
    pub fn steady_per_rotation(&self) -> Option<f64> {
        match self.changes.as_slice() {
            [_, second, .., last] if last > second => {
                Some((last - second) as f64 / (self.changes.len() - 2) as f64)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(token: Option<&str>) -> Secret {
        let mut s = Secret::default();
        if let Some(t) = token {
            s.data = Some([(f::ACCESS_TOKEN.to_owned(), ByteString(t.into()))].into());
        }
        s
    }

    fn observe_all(c: &mut WriteCounter, tokens: &[Option<&str>]) {
        for t in tokens {
            c.observe(&secret(*t));
        }
    }

    #[test]
    fn setup_writes_are_left_out_of_the_steady_state() {
        let mut c = WriteCounter::default();
        // Setup: settings, a claim, the first token, the tenants; a claim, the second token.
        observe_all(
            &mut c,
            &[None, None, Some("a"), Some("a"), Some("a"), Some("b")],
        );
        assert_eq!(c.steady_per_rotation(), None, "setup is not steady state");
        // Two rotations of claim + store.
        observe_all(&mut c, &[Some("b"), Some("c"), Some("c"), Some("d")]);
        assert_eq!(c.writes(), 10);
        assert_eq!(c.steady_per_rotation(), Some(2.0));
    }

    #[test]
    fn a_rotation_with_extra_writes_raises_the_figure() {
        let mut c = WriteCounter::default();
        observe_all(
            &mut c,
            &[Some("a"), Some("b"), Some("b"), Some("b"), Some("c")],
        );
        assert_eq!(c.steady_per_rotation(), Some(3.0));
    }
}
