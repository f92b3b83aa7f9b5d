//! Which hosts the controller may send credentials to: the `--allowed-endpoint-hosts` allowlist.
//! Pure.
//!
//! A connection's `spec.endpoints` (and the token Secret's `token-url` annotation, which a
//! consumer can edit) name URLs that receive the app's client credentials, the refresh token and
//! access tokens. The controller calls only URLs whose host this allowlist holds, so a spec can
//! neither exfiltrate credentials to its author's listener nor make the controller reach an
//! internal address (cloud metadata, the cluster network) from its own network position.
//!
//! An entry is `host` or `host:port` (IPv6 as `[::1]:8480`):
//! - `host` allows `https://host/…` on port 443 only (the real Xero's form);
//! - `host:port` allows `http` or `https` to exactly that port (an emulator or an egress proxy).
//!
//! URLs with a user or password part are refused (they would add credentials of their own).

use std::fmt;

/// Xero's own API hosts: the default allowlist.
pub const XERO_HOSTS: [&str; 2] = ["identity.xero.com", "api.xero.com"];

/// One allowed host, with a port or (none) HTTPS on 443.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    host: String,
    port: Option<u16>,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => write!(f, "{host}:{p}"),
            None => write!(f, "{host}"),
        }
    }
}

/// Who set an allowlist, which says how to extend it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Owner {
    /// The operator's admin (`--allowed-endpoint-hosts`, the chart's `allowedEndpointHosts`).
    #[default]
    Operator,
    /// The person or pod running a CLI or a consumer (`--allow-endpoint-host`).
    Caller,
}

/// The hosts the controller (or a CLI, or a consumer) may call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointAllowlist {
    entries: Vec<Entry>,
    owner: Owner,
}

impl Default for EndpointAllowlist {
    /// Xero's own hosts, HTTPS only.
    fn default() -> Self {
        Self::parse(XERO_HOSTS).expect("Xero's hosts are valid entries")
    }
}

impl fmt::Display for EndpointAllowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.entries.iter().map(ToString::to_string).collect();
        write!(f, "{}", list.join(","))
    }
}

impl EndpointAllowlist {
    /// Parses entries (`host` or `host:port`); an error names the first bad one.
    pub fn parse<I, S>(entries: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for raw in entries {
            let raw = raw.as_ref().trim();
            if raw.is_empty() {
                continue;
            }
            parsed.push(parse_entry(raw)?);
        }
        if parsed.is_empty() {
            return Err("the endpoint allowlist is empty: name at least one host".to_owned());
        }
        Ok(Self {
            entries: parsed,
            owner: Owner::Operator,
        })
    }

    /// Xero's hosts and `extra` (`host` or `host:port` each): where a CLI or a consumer may
    /// send credentials. Its refusals say how its caller extends it (`--allow-endpoint-host`).
    pub fn for_callers<S: AsRef<str>>(extra: &[S]) -> Result<Self, String> {
        let mut list = Self::parse(
            XERO_HOSTS
                .iter()
                .copied()
                .chain(extra.iter().map(AsRef::as_ref)),
        )?;
        list.owner = Owner::Caller;
        Ok(list)
    }

    /// Adds `host:port` (the emulator of `make run`, tests and benchmarks).
    pub fn with(mut self, host: &str, port: u16) -> Self {
        self.entries.push(Entry {
            host: host.trim_matches(['[', ']']).to_ascii_lowercase(),
            port: Some(port),
        });
        self
    }

    /// `Ok` if `url` may be called; otherwise a message naming the URL's host (never its path
    /// or query, which could carry a value) and what to do.
    pub fn check(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|_| "is not an absolute URL".to_owned())?;
        let scheme = parsed.scheme();
        if scheme != "http" && scheme != "https" {
            return Err(format!("uses scheme {scheme:?}: only http and https"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("carries a user or password: not allowed in an endpoint".to_owned());
        }
        let host = match parsed.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(h) => h.to_string().to_ascii_lowercase(),
            None => return Err("has no host".to_owned()),
        };
        let port = parsed.port_or_known_default().unwrap_or(0);
        let allowed = self.entries.iter().any(|e| {
            e.host == host
                && match e.port {
                    Some(p) => p == port,
                    None => scheme == "https" && port == 443,
                }
        });
        if allowed {
            Ok(())
        } else {
            let shown = Entry {
                host,
                port: Some(port),
            };
            Err(match self.owner {
                Owner::Operator => format!(
                    "{scheme}://{shown} is not in the operator's endpoint allowlist ({self}); \
                     an operator admin can add it with --allowed-endpoint-hosts (chart value \
                     allowedEndpointHosts)"
                ),
                Owner::Caller => format!(
                    "{scheme}://{shown} is not among the hosts this process sends credentials \
                     to ({self}); if it is yours, allow it with --allow-endpoint-host (env \
                     XERO_ALLOW_ENDPOINT_HOSTS)"
                ),
            })
        }
    }
}

fn parse_entry(raw: &str) -> Result<Entry, String> {
    let bad = |why: &str| format!("bad allowed endpoint host {raw:?}: {why}");
    if raw.contains('/') || raw.contains('@') || raw.contains('*') {
        return Err(bad("give a host or host:port, not a URL or pattern"));
    }
    // Let the URL parser do hosts, IPv6 brackets and ports the way requests will be parsed.
    let url = reqwest::Url::parse(&format!("http://{raw}/")).map_err(|e| bad(&e.to_string()))?;
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(h) => h.to_string().to_ascii_lowercase(),
        None => return Err(bad("no host")),
    };
    // `Url` drops a port equal to the scheme's default (80), so read it from the text.
    let explicit_port = raw
        .rsplit_once(':')
        .filter(|(h, _)| !h.is_empty() && (!h.contains(':') || h.ends_with(']')))
        .map(|(_, p)| {
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number"))
        })
        .transpose()?;
    Ok(Entry {
        host,
        port: explicit_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_allows_xero_over_https_only() {
        let list = EndpointAllowlist::default();
        assert!(
            list.check("https://identity.xero.com/connect/token")
                .is_ok()
        );
        assert!(list.check("https://api.xero.com/connections").is_ok());
        assert!(
            list.check("https://IDENTITY.xero.com:443/connect/token")
                .is_ok()
        );
        for refused in [
            "http://identity.xero.com/connect/token",
            "https://identity.xero.com:8443/connect/token",
            "https://identity.xero.com.evil.example/connect/token",
            "https://evil.example/identity.xero.com",
            "http://169.254.169.254/latest/meta-data",
            "https://user:pw@identity.xero.com/connect/token",
            "ftp://identity.xero.com/",
            "not a url",
        ] {
            assert!(list.check(refused).is_err(), "{refused} must be refused");
        }
    }

    #[test]
    fn host_and_port_entries_allow_that_port_over_http_or_https() {
        let list = EndpointAllowlist::parse(["127.0.0.1:8480", "[::1]:9000", "proxy.local:80"])
            .expect("valid");
        assert!(list.check("http://127.0.0.1:8480/connect/token").is_ok());
        assert!(list.check("https://127.0.0.1:8480/connect/token").is_ok());
        assert!(list.check("http://[::1]:9000/x").is_ok());
        assert!(
            list.check("http://proxy.local/x").is_ok(),
            "80 is http's default"
        );
        assert!(list.check("http://127.0.0.1:8481/connect/token").is_err());
        assert!(list.check("http://127.0.0.2:8480/connect/token").is_err());
        assert!(list.check("https://127.0.0.1/connect/token").is_err());
    }

    #[test]
    fn a_refusal_names_the_host_but_not_the_path_or_query() {
        let err = EndpointAllowlist::default()
            .check("http://10.0.0.7:9999/steal?token=abc")
            .expect_err("refused");
        assert!(err.contains("10.0.0.7:9999"), "{err}");
        assert!(!err.contains("steal") && !err.contains("abc"), "{err}");
        assert!(err.contains("--allowed-endpoint-hosts"), "{err}");
    }

    #[test]
    fn bad_entries_are_refused_with_their_text() {
        for bad in [
            "http://x/",
            "*.xero.com",
            "host:notaport",
            "a@b",
            "host:99999",
        ] {
            let err = EndpointAllowlist::parse([bad]).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
        assert!(EndpointAllowlist::parse(["", " "]).is_err(), "empty list");
    }

    #[test]
    fn a_callers_list_is_xeros_hosts_and_says_how_to_extend_it() {
        let list = EndpointAllowlist::for_callers::<&str>(&[]).expect("list");
        assert!(
            list.check("https://identity.xero.com/connect/token")
                .is_ok()
        );
        let why = list
            .check("http://127.0.0.1:8480/connect/token")
            .unwrap_err();
        assert!(why.contains("--allow-endpoint-host"), "{why}");
        assert!(!why.contains("--allowed-endpoint-hosts"), "{why}");
        let extended = EndpointAllowlist::for_callers(&["127.0.0.1:8480"]).expect("list");
        assert!(
            extended
                .check("http://127.0.0.1:8480/connect/token")
                .is_ok()
        );
        assert!(EndpointAllowlist::for_callers(&["http://x/"]).is_err());
        // The operator's list says how its admin extends it.
        let why = EndpointAllowlist::default()
            .check("http://x:1/")
            .unwrap_err();
        assert!(why.contains("--allowed-endpoint-hosts"), "{why}");
    }

    #[test]
    fn with_adds_a_loopback_listener() {
        let list = EndpointAllowlist::default().with("127.0.0.1", 4242);
        assert!(list.check("http://127.0.0.1:4242/connect/token").is_ok());
        assert!(list.check("http://127.0.0.1:4243/connect/token").is_err());
        assert_eq!(
            list.to_string(),
            "identity.xero.com,api.xero.com,127.0.0.1:4242"
        );
    }
}
