//! Renders the kubeconfig files a local control plane hands out: one per static-token user.

use base64::Engine;
use serde_json::json;

/// A kubeconfig for `server`, trusting `ca_pem`, authenticating with a static bearer `token`.
/// Written as JSON, which is YAML too: kubectl, Helm and kube read it as it is, and quoting is
/// always right.
pub fn render(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    serde_json::to_string_pretty(&json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "local", "user": user, "namespace": "default"}}],
        "current-context": user,
    }))
    .expect("a JSON value always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_parses_with_kube() {
        let yaml = render("https://127.0.0.1:6443", "CA", "admin", "t0k3n");
        let cfg = kube::config::Kubeconfig::from_yaml(&yaml).expect("kube parses it");
        assert_eq!(cfg.current_context.as_deref(), Some("admin"));
        let cluster = cfg.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("Q0E="));
    }
}
