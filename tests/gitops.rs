//! GitOps health: the Argo CD health check shipped in `deploy/argocd/health.lua`, run in a Lua
//! interpreter against status objects the controller wrote on a real API server (healthy,
//! progressing, suspended, degraded, a status older than the spec, no status at all), and the
//! kstatus conditions it reads (`Ready`, `Reconciling`, `Stalled`: exactly one True).

mod common;

use std::time::Duration;

use common::connection::{self, start_controller};
use common::{Timings, token_fixture};
use kube::api::{Patch, PatchParams};
use serde_json::json;
use xero_operator::crd::XeroConnection;
use xero_proving_ground::emulator::Faults;

/// Argo CD's verdict on `conn`: (status, message), from the shipped script with `obj` set as
/// Argo CD sets it (the object as JSON, turned into Lua tables).
fn argo_health(conn: &XeroConnection) -> (String, String) {
    use mlua::LuaSerdeExt;
    let script = std::fs::read_to_string(common::repo_path("deploy/argocd/health.lua"))
        .expect("deploy/argocd/health.lua");
    let lua = mlua::Lua::new();
    let obj = lua
        .to_value(&serde_json::to_value(conn).expect("json"))
        .expect("to Lua");
    lua.globals().set("obj", obj).expect("set obj");
    let hs: mlua::Table = lua
        .load(&script)
        .set_name("health.lua")
        .eval()
        .expect("the script runs");
    (
        hs.get::<String>("status").expect("status"),
        hs.get::<String>("message").unwrap_or_default(),
    )
}

/// The statuses of `conn`'s Ready, Reconciling and Stalled conditions, in that order.
fn kstatus(conn: &XeroConnection) -> Vec<(String, String)> {
    conn.status
        .as_ref()
        .map(|s| {
            s.conditions
                .iter()
                .map(|c| (c.type_.clone(), c.status.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argo_cd_reads_every_state_the_controller_writes() {
    let timings = Timings {
        access_token: Duration::from_secs(600),
        ..Timings::default()
    };
    let fx = token_fixture("gitops", timings).await;
    // No status yet: created while no controller runs.
    connection::create(&fx, "acme", &fx.secret, timings, json!({})).await;
    let fresh = connection::api(&fx).get("acme").await.expect("get");
    assert_eq!(argo_health(&fresh).0, "Progressing");

    // Healthy: a usable token.
    let controller = start_controller(&fx, |_| {});
    let valid =
        connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    assert_eq!(
        kstatus(&valid),
        pairs(&[
            ("Ready", "True"),
            ("Reconciling", "False"),
            ("Stalled", "False")
        ])
    );
    let (status, message) = argo_health(&valid);
    assert_eq!(status, "Healthy", "{message}");
    assert!(message.starts_with("TokenValid"), "{message}");

    // A status older than the spec: the controller stopped, the spec changed.
    drop(controller);
    tokio::time::sleep(Duration::from_millis(500)).await;
    connection::api(&fx)
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"refresh": {"clockSkewSeconds": 2}}})),
        )
        .await
        .expect("change the spec");
    let behind = connection::api(&fx).get("acme").await.expect("get");
    assert!(
        behind.metadata.generation
            > behind
                .status
                .as_ref()
                .and_then(|s| s.conditions[0].observed_generation),
        "the spec is newer than the status"
    );
    let (status, message) = argo_health(&behind);
    assert_eq!(status, "Progressing", "{message}");
    assert!(message.contains("latest spec"), "{message}");

    // Progressing: Xero unavailable, retried on its own. The token is made due at once.
    let _controller = start_controller(&fx, |_| {});
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(30)).await;
    fx.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    })
    .await;
    fx.patch(json!({"expires_at": "2020-01-01T00:00:00Z"}), json!({}))
        .await;
    let failing =
        connection::wait_for_reason(&fx, "acme", "XeroUnavailable", Duration::from_secs(30)).await;
    assert_eq!(
        kstatus(&failing),
        pairs(&[
            ("Ready", "False"),
            ("Reconciling", "True"),
            ("Stalled", "False")
        ])
    );
    let (status, message) = argo_health(&failing);
    assert_eq!(status, "Progressing", "{message}");
    assert!(message.starts_with("XeroUnavailable"), "{message}");
    fx.set_faults(Faults::default()).await;
    connection::wait_for_reason(&fx, "acme", "TokenValid", Duration::from_secs(60)).await;

    // Suspended: a connection no one has authorised yet waits for a person's browser.
    connection::create(&fx, "new", "new-xero-token", timings, json!({})).await;
    let waiting = connection::wait_for_reason(
        &fx,
        "new",
        "WaitingForAuthorization",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        kstatus(&waiting),
        pairs(&[
            ("Ready", "False"),
            ("Reconciling", "False"),
            ("Stalled", "True")
        ])
    );
    let (status, message) = argo_health(&waiting);
    assert_eq!(status, "Suspended", "{message}");
    assert!(message.contains("kubectl xero authorize new"), "{message}");

    // Degraded: the spec points the token Secret at the client Secret, which cannot work.
    connection::create(&fx, "broken", "xero-app", timings, json!({})).await;
    let broken =
        connection::wait_for_reason(&fx, "broken", "InvalidSpec", Duration::from_secs(30)).await;
    assert_eq!(
        kstatus(&broken),
        pairs(&[
            ("Ready", "False"),
            ("Reconciling", "False"),
            ("Stalled", "True")
        ])
    );
    let (status, message) = argo_health(&broken);
    assert_eq!(status, "Degraded", "{message}");
    assert!(message.starts_with("InvalidSpec"), "{message}");
}
