//! Signs the emulator's access tokens as JWTs (ES256) and publishes the key as a JWKS, so a
//! consumer can validate them the way it would validate Xero's.
//!
//! Xero signs with RS256; ES256 keeps key generation instant and needs only `ring`. Nothing in the
//! operator depends on the algorithm: it reads `expires_in`, never the signature.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

/// Key id published in the JWKS and in each token's header.
const KEY_ID: &str = "xero-emulator-1";

/// An ES256 signing key.
pub struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Signer {
    /// A fresh random key.
    pub fn generate() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("the system RNG works");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("a key ring just generated parses");
        Self { key, rng }
    }

    /// `header.claims.signature`, each part base64url without padding.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "kid": KEY_ID, "typ": "JWT"});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .expect("ECDSA signing does not fail with a valid key");
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }

    /// The public key as a JSON Web Key Set.
    pub fn jwks(&self) -> Value {
        // An uncompressed P-256 point: 0x04 || x (32 bytes) || y (32 bytes).
        let point = self.key.public_key().as_ref();
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": KEY_ID,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
    }
}

/// Decodes a JWT's claims without checking the signature (for tests and diagnostics).
pub fn decode_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    #[test]
    fn tokens_verify_against_the_published_jwks() {
        let signer = Signer::generate();
        let token = signer.sign(&json!({"sub": "user-1", "exp": 42}));
        let jwk = &signer.jwks()["keys"][0];
        let mut point = vec![4u8];
        for coord in ["x", "y"] {
            point.extend(
                URL_SAFE_NO_PAD
                    .decode(jwk[coord].as_str().expect("coordinate"))
                    .expect("base64url"),
            );
        }
        let (signing_input, signature) = token.rsplit_once('.').expect("three parts");
        let signature = URL_SAFE_NO_PAD.decode(signature).expect("base64url");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(signing_input.as_bytes(), &signature)
            .expect("signature verifies with the JWKS key");
        assert_eq!(decode_claims(&token).expect("claims")["sub"], "user-1");
    }

    #[test]
    fn a_tampered_token_does_not_verify() {
        let signer = Signer::generate();
        let token = signer.sign(&json!({"sub": "user-1"}));
        let forged_claims = URL_SAFE_NO_PAD.encode(json!({"sub": "admin"}).to_string());
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = &forged_claims;
        let (signing_input, signature) = (format!("{}.{}", parts[0], parts[1]), parts[2]);
        let point = signer.key.public_key().as_ref().to_vec();
        let verdict = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point).verify(
            signing_input.as_bytes(),
            &URL_SAFE_NO_PAD.decode(signature).expect("b64"),
        );
        assert!(verdict.is_err());
    }

    #[test]
    fn garbage_is_not_decoded() {
        assert!(decode_claims("not-a-jwt").is_none());
        assert!(decode_claims("a.!!!.c").is_none());
    }
}
