//! `xero-operator check`: what the chart's `helm test` runs. It asks the operator whether it is
//! ready (its `/readyz`, through the metrics Service) and whether it keeps up with the
//! connections it watches: every XeroConnection must carry a status the controller wrote for its
//! current spec (`status.observedGeneration` equal to `metadata.generation`, a `Ready`
//! condition). It prints one line per connection (its Ready status and reason, never a token or
//! a message that could quote one) and exits 0 when all is well, 1 naming what is not.
//!
//! A connection waiting for its first authorisation is well: the controller has seen it and said
//! what it needs. `--require-ready` is stricter, for pipelines that expect every connection to
//! hold a valid token.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use crate::crd::XeroConnection;

/// What `check` asks.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Where the operator's metrics port answers: a host name or an IP address (the chart's test
    /// gives the metrics Service's cluster IP, so no cluster DNS is needed). Its `/readyz` must
    /// answer 200. Not given: the operator itself is not asked.
    #[arg(long)]
    pub operator_host: Option<String>,

    /// The operator's metrics port.
    #[arg(long, default_value_t = 8080)]
    pub operator_port: u16,

    /// Check the connections of these namespaces (repeatable or comma-separated; default: all
    /// namespaces, which needs `list` on xeroconnections cluster-wide).
    #[arg(long = "namespace", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Also fail when a connection's Ready condition is not True.
    #[arg(long)]
    pub require_ready: bool,

    /// How long to wait for the operator to answer and every connection to be current.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `text` as printable, bounded text (a status field is not trusted to be either).
fn clean(text: &str) -> String {
    crate::text::sanitize(text, crate::text::MAX_REASON_CHARS)
}

/// One connection as `check` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `namespace/name`.
    pub name: String,
    /// The Ready condition's status and reason, if the controller wrote one.
    pub ready: Option<(String, String)>,
    /// Whether that status was written for the connection's current spec.
    pub current: bool,
}

impl Seen {
    /// Reads a connection: its Ready condition and whether the status is for its generation.
    pub fn of(conn: &XeroConnection) -> Self {
        let status = conn.status.as_ref();
        let ready = status.and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                // Anyone who may write the status could put terminal escapes there.
                .map(|c| (clean(&c.status), clean(&c.reason)))
        });
        let current = status
            .and_then(|s| s.observed_generation)
            .is_some_and(|g| Some(g) == conn.metadata.generation);
        Seen {
            name: format!(
                "{}/{}",
                conn.namespace().unwrap_or_default(),
                conn.name_any()
            ),
            ready,
            current,
        }
    }

    /// What is wrong with it, if anything, under `require_ready`.
    pub fn problem(&self, require_ready: bool) -> Option<String> {
        match &self.ready {
            None => Some("no status from the controller yet".into()),
            Some(_) if !self.current => {
                Some("its status is for an older spec (the controller has not caught up)".into())
            }
            Some((status, reason)) if require_ready && status != "True" => {
                Some(format!("not Ready ({reason})"))
            }
            Some(_) => None,
        }
    }

    /// The line printed for it.
    pub fn line(&self) -> String {
        match &self.ready {
            Some((status, reason)) => format!(
                "{}: Ready={status} {reason}{}",
                self.name,
                if self.current { "" } else { " (older spec)" }
            ),
            None => format!("{}: no status", self.name),
        }
    }
}

/// The connections of `namespaces` (all when empty), by name.
async fn connections(client: &Client, namespaces: &[String]) -> anyhow::Result<Vec<Seen>> {
    let apis: Vec<Api<XeroConnection>> = if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let mut seen = BTreeMap::new();
    for api in apis {
        for conn in api
            .list(&ListParams::default())
            .await
            .map_err(|e| anyhow::anyhow!("cannot list XeroConnections: {e}"))?
        {
            let s = Seen::of(&conn);
            seen.insert(s.name.clone(), s);
        }
    }
    Ok(seen.into_values().collect())
}

/// The operator's `/readyz` on `host:port`; an IPv6 address goes in brackets.
pub fn ready_url(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("http://[{ip}]:{port}/readyz"),
        _ => format!("http://{host}:{port}/readyz"),
    }
}

/// Whether the operator answers `ready_url` with 200.
async fn operator_ready(http: &reqwest::Client, ready_url: &str) -> Result<(), String> {
    match http.get(ready_url).send().await {
        Ok(answer) if answer.status().is_success() => Ok(()),
        Ok(answer) => Err(format!("{ready_url} answered {}", answer.status())),
        Err(e) => Err(format!("{:#}", anyhow::Error::from(e))),
    }
}

/// Runs the check; the error says what is not well.
pub async fn run(args: CheckArgs) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + args.timeout;
    // The operator's address is inside the cluster: never through a proxy from the environment.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()?;
    if let Some(host) = &args.operator_host {
        let url = ready_url(host, args.operator_port);
        loop {
            match operator_ready(&http, &url).await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    anyhow::bail!("the operator is not ready: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        println!("operator: ready ({url})");
    } else {
        println!("operator: not asked (no --operator-host: the chart's metrics Service is off)");
    }
    let client = Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API: {e}"))?;
    loop {
        // A refusal right after install (the test's RoleBinding not yet in the authorizer's
        // cache) or a passing API error is retried until the deadline.
        let seen = match connections(&client, &args.namespaces).await {
            Ok(seen) => seen,
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let problems: Vec<String> = seen
            .iter()
            .filter_map(|s| {
                s.problem(args.require_ready)
                    .map(|p| format!("{}: {p}", s.name))
            })
            .collect();
        if problems.is_empty() || tokio::time::Instant::now() >= deadline {
            for s in &seen {
                println!("{}", s.line());
            }
            println!("{} connection(s) checked", seen.len());
            if problems.is_empty() {
                return Ok(());
            }
            anyhow::bail!(
                "after {}: {}",
                humantime::format_duration(args.timeout),
                problems.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::XeroConnectionStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn conn(generation: i64, status: Option<(i64, &str, &str)>) -> XeroConnection {
        let mut c: XeroConnection = serde_json::from_value(serde_json::json!({
            "apiVersion": "xero-operator.io/v1alpha1",
            "kind": "XeroConnection",
            "metadata": {"name": "acme", "namespace": "team-a", "generation": generation},
            "spec": {"clientSecretRef": {"name": "app"}}
        }))
        .expect("a connection");
        c.status = status.map(|(observed, ready, reason)| XeroConnectionStatus {
            observed_generation: Some(observed),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: ready.into(),
                reason: reason.into(),
                message: "secret-looking text the check never prints".into(),
                observed_generation: Some(observed),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    Default::default(),
                ),
            }],
            ..Default::default()
        });
        c
    }

    #[test]
    fn a_current_status_is_well_whatever_its_reason_unless_ready_is_required() {
        let waiting = Seen::of(&conn(1, Some((1, "False", "WaitingForAuthorization"))));
        assert_eq!(
            waiting.line(),
            "team-a/acme: Ready=False WaitingForAuthorization"
        );
        assert_eq!(waiting.problem(false), None);
        assert_eq!(
            waiting.problem(true).as_deref(),
            Some("not Ready (WaitingForAuthorization)")
        );
        let valid = Seen::of(&conn(3, Some((3, "True", "TokenValid"))));
        assert_eq!(valid.problem(true), None);
        assert!(!valid.line().contains("secret-looking"));
        // A reason someone wrote with terminal escapes is printed without them.
        let mut hostile = conn(1, Some((1, "True", "Token\u{1b}[2JValid")));
        hostile.status.as_mut().expect("status").conditions[0].status = "True\u{7}".into();
        let line = Seen::of(&hostile).line();
        assert!(
            !line.contains('\u{1b}') && !line.contains('\u{7}'),
            "{line:?}"
        );
    }

    #[test]
    fn the_readiness_url_takes_names_and_both_address_families() {
        assert_eq!(
            ready_url("10.96.0.12", 8080),
            "http://10.96.0.12:8080/readyz"
        );
        assert_eq!(ready_url("fd00::c", 9090), "http://[fd00::c]:9090/readyz");
        assert_eq!(ready_url("svc.ns", 8080), "http://svc.ns:8080/readyz");
    }

    #[test]
    fn no_status_or_a_status_for_an_older_spec_is_a_problem() {
        let none = Seen::of(&conn(1, None));
        assert_eq!(none.line(), "team-a/acme: no status");
        assert!(none.problem(false).is_some());
        let stale = Seen::of(&conn(2, Some((1, "True", "TokenValid"))));
        assert_eq!(
            stale.line(),
            "team-a/acme: Ready=True TokenValid (older spec)"
        );
        assert!(stale.problem(false).expect("stale").contains("older spec"));
    }
}
