//! Throw-away keys and certificates for a local control plane: a CA, the API server's serving
//! certificate for 127.0.0.1/localhost, the service-account signing key, and bearer tokens.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// PEM material written into the control plane's state directory.
pub struct Pki {
    /// The CA certificate clients trust (goes into the kubeconfig).
    pub ca_pem: String,
    /// The API server's serving certificate, signed by the CA.
    pub serving_cert_pem: String,
    /// The serving certificate's private key.
    pub serving_key_pem: String,
    /// The API server's client certificate towards kubelets (group `system:masters`).
    pub kubelet_client_cert_pem: String,
    /// Its private key.
    pub kubelet_client_key_pem: String,
    /// The key that signs service-account tokens (PKCS#8, ECDSA P-256).
    pub service_account_key_pem: String,
    /// Its public half, which verifies them.
    pub service_account_pub_pem: String,
}

impl Pki {
    /// Generates a fresh CA, serving certificate (for loopback and `extra_sans`), the API
    /// server's kubelet client certificate and the service-account key.
    pub fn generate(extra_sans: &[String]) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "xero-operator local control plane CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut sans = vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ];
        sans.extend(extra_sans.iter().cloned());
        let mut serving_params = CertificateParams::new(sans)?;
        serving_params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        let serving_cert = serving_params.signed_by(&serving_key, &issuer)?;

        let client_key = KeyPair::generate()?;
        let mut client_params = CertificateParams::new(Vec::<String>::new())?;
        client_params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver-kubelet-client");
        client_params
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params.signed_by(&client_key, &issuer)?;

        let sa_key = KeyPair::generate()?;
        Ok(Self {
            kubelet_client_cert_pem: client_cert.pem(),
            kubelet_client_key_pem: client_key.serialize_pem(),
            ca_pem: ca_cert.pem(),
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            service_account_key_pem: sa_key.serialize_pem(),
            service_account_pub_pem: sa_key.public_key_pem(),
        })
    }
}

/// A random bearer token (128 bits, hex) for the static token file.
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_distinct_pem_material() {
        let pki = Pki::generate(&["10.0.0.1".to_owned()]).expect("pki");
        assert!(pki.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(
            pki.serving_cert_pem
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert_ne!(pki.ca_pem, pki.serving_cert_pem);
        assert!(pki.serving_key_pem.contains("PRIVATE KEY"));
        assert_ne!(pki.serving_key_pem, pki.service_account_key_pem);
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = random_token().expect("token");
        let b = random_token().expect("token");
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
