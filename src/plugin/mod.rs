//! `kubectl xero` (the binary `kubectl-xero` on the PATH): one connection at a glance
//! (`status`), an early refresh through the refresh protocol (`renew`), and the first
//! authorisation (`authorize`), each by the connection's name; shell completion through kubectl
//! ([`complete`]). Runs with the caller's own
//! kubeconfig and rights; `status` reads the token Secret's metadata only, never its tokens.

mod complete;
mod status;

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use crate::cli::EXIT_OTHER;
use crate::cli::authorize::{AuthorizeArgs, Target, client_credentials_of, run_for, token_url_of};
use crate::controller::resources::protocol_settings;
use crate::crd::XeroConnection;
use crate::protocol::format::{TokenRecord, Trusted, format_time};
use crate::protocol::refresher::process_identity;
use crate::protocol::{Refresher, Role};

/// Xero connections managed by xero-operator, by name.
#[derive(Parser, Debug)]
#[command(version, name = "kubectl xero", bin_name = "kubectl xero")]
pub struct Args {
    /// Namespace of the XeroConnection. Default: the kubeconfig's.
    #[arg(short, long, global = true)]
    namespace: Option<String>,

    /// A host besides Xero's own (identity.xero.com, api.xero.com) that `renew` and `authorize`
    /// may send the refresh token, the code and the app's credentials to: `host` (HTTPS on
    /// 443) or `host:port`. Endpoints come from the XeroConnection, never from its token
    /// Secret (which every consumer may write).
    #[arg(
        long = "allow-endpoint-host",
        value_name = "HOST",
        global = true,
        env = crate::cli::ALLOW_HOSTS_ENV,
        value_delimiter = ','
    )]
    allow_endpoint_hosts: Vec<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One connection: Ready and why, both tokens' expiries, the claim holder, the rotation,
    /// the last refresh and by whom, waits and stops, tenants and recent Events.
    Status {
        /// The XeroConnection's name.
        name: String,
    },
    /// Refresh now, before expiry, through the refresh protocol: a claim on the token Secret,
    /// one call to Xero, the new pair stored. A refresh that another party stores meanwhile
    /// counts (no second call). Needs get, watch and patch on the token Secret.
    Renew {
        /// The XeroConnection's name.
        name: String,
        /// How long to wait at most for another party's refresh or a rate limit.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Authorise the app for this connection (authorization code + PKCE) and store the first
    /// token pair in its token Secret: `xero-token authorize` by connection name.
    Authorize {
        /// The XeroConnection's name.
        name: String,
        #[command(flatten)]
        authorize: AuthorizeArgs,
    },
}

/// The entry point of the `kubectl-xero` binary.
pub async fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("__complete") {
        complete::run(&argv[2..]).await;
        return ExitCode::SUCCESS;
    }
    crate::process::run_cli("kubectl xero", EXIT_OTHER, run(Args::parse())).await
}

/// The connection named on the command line, with a client and its namespace.
async fn connection(
    args: &Args,
    name: &str,
) -> anyhow::Result<(XeroConnection, kube::Client, String)> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API: {e}"))?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let api: Api<XeroConnection> = Api::namespaced(client.clone(), &namespace);
    match api.get_opt(name).await {
        Ok(Some(conn)) => Ok((conn, client, namespace)),
        Ok(None) => anyhow::bail!("no XeroConnection {name:?} in namespace {namespace:?}"),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            anyhow::bail!("the XeroConnection CRD is not installed: run `kubectl apply -f crds/`")
        }
        Err(e) => anyhow::bail!("cannot read XeroConnection {namespace}/{name}: {e}"),
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        Command::Status { name } => {
            let (conn, client, namespace) = connection(&args, name).await?;
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            // Metadata only: the claim, the rotation and the markers live in annotations.
            let secret = match secrets.get_metadata_opt(&conn.token_secret_name()).await {
                Ok(meta) => Ok(meta.map(|m| Secret {
                    metadata: m.metadata,
                    ..Secret::default()
                })),
                Err(e) => Err(e.to_string()),
            };
            let events: Api<Event> = Api::namespaced(client, &namespace);
            let uid = conn.uid().unwrap_or_default();
            let recent = match events.list(&ListParams::default()).await {
                Ok(list) => {
                    let mut mine: Vec<Event> = list
                        .items
                        .into_iter()
                        .filter(|e| {
                            e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(&uid)
                        })
                        .collect();
                    mine.sort_by_key(status::event_time);
                    Ok(mine)
                }
                Err(e) => Err(e.to_string()),
            };
            print!(
                "{}",
                status::render(&conn, secret.as_ref(), recent.as_deref(), SystemTime::now())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Renew { name, timeout } => {
            let (conn, client, namespace) = connection(&args, name).await?;
            let secret = conn.token_secret_name();
            let identity = process_identity("kubectl-xero");
            // The last refresh as it stands now: the renewal is done once the Secret shows
            // another one.
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let seen = match secrets.get_metadata_opt(&secret).await {
                Ok(Some(meta)) => {
                    TokenRecord::from_secret(&Secret {
                        metadata: meta.metadata,
                        ..Secret::default()
                    })
                    .refreshed_at
                }
                Ok(None) => anyhow::bail!("token Secret {namespace}/{secret} not found"),
                Err(e) => anyhow::bail!("cannot read token Secret {namespace}/{secret}: {e}"),
            };
            // The connection's endpoint and its client Secret's credentials (read with the
            // caller's rights), not what the token Secret says of them.
            let allowlist = crate::cli::allowlist(&args.allow_endpoint_hosts)?;
            let token_url = token_url_of(Some(&conn));
            if let Err(why) = allowlist.check(&token_url) {
                anyhow::bail!("the connection's token endpoint {why}");
            }
            let trusted = Trusted {
                settings: Some(protocol_settings(&conn, &token_url)),
                client: Some(client_credentials_of(&client, &conn).await?),
            };
            let refresher =
                Refresher::new(client, &namespace, &secret, &identity, Role::Renew { seen })
                    .with_allowlist(allowlist)
                    .with_trusted(trusted)
                    .with_max_wait(*timeout);
            match refresher.get().await {
                Ok(token) => {
                    let rec = refresher.last_record();
                    let (rotation, by) = rec
                        .map(|r| (r.rotation, r.refreshed_by.unwrap_or_default()))
                        .unwrap_or_default();
                    println!(
                        "renewed {namespace}/{name}: rotation {rotation} by {by}; the access token expires {}",
                        format_time(token.expires_at)
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("kubectl xero: {e}");
                    Ok(ExitCode::from(e.exit_code()))
                }
            }
        }
        Command::Authorize { name, authorize } => {
            let (conn, client, namespace) = connection(&args, name).await?;
            // A token Secret this command creates is labelled for the connection, so the
            // operator may use it.
            let mut authorize = authorize.clone();
            authorize.connection.get_or_insert_with(|| conn.name_any());
            let target = Target {
                secret: conn.token_secret_name(),
                client,
                namespace,
                identity: None,
                allowlist: crate::cli::allowlist(&args.allow_endpoint_hosts)?,
                connection: Some(conn),
            };
            run_for(target, &authorize).await
        }
    }
}
