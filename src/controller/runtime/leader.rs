//! Leader election with a `Lease` (via `kube-lease-manager`): with several replicas only the
//! holder reconciles, so only one of them ever calls Xero. A replica that loses the lease exits
//! with an error, so Kubernetes restarts it as a follower; the others take over once the lease
//! runs out.

use std::sync::Arc;

use kube_lease_manager::LeaseManagerBuilder;

use crate::controller::Context;

/// Where the lease is and how long it lasts.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// Seconds a holder's lease lasts after its last renewal.
    pub duration_secs: u64,
    /// Seconds before expiry that the holder renews (also the tolerated clock skew).
    pub grace_secs: u64,
}

/// Waits for leadership, then runs the controller until `shutdown` or until leadership is lost.
pub async fn run_as_leader(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    lease: LeaseSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let manager = LeaseManagerBuilder::new(ctx.client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&ctx.identity)
        .with_duration(lease.duration_secs)
        .with_grace(lease.grace_secs)
        .build()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot use the Lease {}/{}: {e}",
                lease.namespace,
                lease.name
            )
        })?;
    let (mut leading, task) = manager.watch().await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown_watch = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut stop = stop_rx.clone();
    tracing::info!(lease = %lease.name, identity = %ctx.identity, "waiting to become the leader");
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => changed.map_err(|_| anyhow::anyhow!("the lease manager stopped"))?,
            _ = stop.changed() => {
                drop(leading);
                let _ = task.await;
                return Ok(());
            }
        }
    }
    tracing::info!(lease = %lease.name, identity = %ctx.identity, "became the leader: reconciling");
    let mut stop_signal = stop_rx.clone();
    let mut lease_state = leading.clone();
    let controller_stop = async move {
        tokio::select! {
            _ = stop_signal.changed() => {}
            _ = async {
                while lease_state.changed().await.is_ok() && *lease_state.borrow() {}
            } => {}
        }
    };
    crate::controller::run(ctx.clone(), namespaces, controller_stop).await?;
    // Stopped by neither a signal: the lease was lost, or its manager died (API unreachable).
    let manager_alive = leading.has_changed().is_ok();
    let lost_leadership = !*stop.borrow_and_update() && (!manager_alive || !*leading.borrow());
    shutdown_watch.abort();
    drop(leading);
    let _ = task.await;
    if lost_leadership {
        anyhow::bail!(
            "lost the leader lease {}: exiting so that a new leader takes over",
            lease.name
        );
    }
    Ok(())
}
