//! SCRAM-SHA-256 on the server side (RFC 5802, RFC 7677), as PostgreSQL runs it: the pooler
//! checks a client's proof of the configured password without the password crossing the wire.
//! Like PostgreSQL, it keeps a verifier per role (salt, iterations, StoredKey, ServerKey),
//! computed once, so a login costs a few HMACs rather than a PBKDF2 run.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// PBKDF2 rounds for the per-login salted password.
const ITERATIONS: u32 = 4096;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// RFC 5802's Hi(): PBKDF2 with HMAC-SHA-256, one block.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &block);
    let mut result = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        result.iter_mut().zip(u.iter()).for_each(|(r, x)| *r ^= x);
    }
    result
}

/// Why a login failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("password authentication failed")]
    Mismatch,
}

/// What the server keeps of a password: enough to check a proof, not to make one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl Verifier {
    /// The verifier of `password` with `salt`.
    pub fn new(password: &str, salt: &[u8]) -> Self {
        let salted = salted_password(password.as_bytes(), salt, ITERATIONS);
        Self {
            iterations: ITERATIONS,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(hmac(&salted, b"Client Key")).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

/// One login in progress.
#[derive(Debug)]
pub struct Exchange<'a> {
    client_first_bare: String,
    server_first: String,
    nonce: String,
    verifier: &'a Verifier,
}

/// Reads the client-first message and answers the server-first message, for a role whose
/// verifier is `verifier`.
pub fn server_first<'a>(
    client_first: &[u8],
    random: &[u8; 18],
    verifier: &'a Verifier,
) -> Result<Exchange<'a>, ScramError> {
    let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
    // gs2 header: "n,," or "y,," (no channel binding is offered), then the bare message.
    let mut parts = text.splitn(3, ',');
    let (Some(flag), Some(_), Some(bare)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ScramError::Malformed);
    };
    if !matches!(flag, "n" | "y") {
        return Err(ScramError::Malformed);
    }
    let client_nonce = bare
        .split(',')
        .find_map(|attr| attr.strip_prefix("r="))
        .filter(|n| !n.is_empty())
        .ok_or(ScramError::Malformed)?;
    let nonce = format!("{client_nonce}{}", STANDARD.encode(random));
    let server_first = format!(
        "r={nonce},s={},i={}",
        STANDARD.encode(&verifier.salt),
        verifier.iterations
    );
    Ok(Exchange {
        client_first_bare: bare.to_owned(),
        server_first,
        nonce,
        verifier,
    })
}

impl Exchange<'_> {
    pub fn message(&self) -> &[u8] {
        self.server_first.as_bytes()
    }

    /// Checks the client-final message; returns the server-final message.
    pub fn verify(&self, client_final: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let nonce = without_proof
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .ok_or(ScramError::Malformed)?;
        if nonce != self.nonce {
            return Err(ScramError::Malformed);
        }
        let proof = STANDARD.decode(proof).map_err(|_| ScramError::Malformed)?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed);
        }
        let stored_key = self.verifier.stored_key;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let recovered: Vec<u8> = proof
            .iter()
            .zip(signature.iter())
            .map(|(p, s)| p ^ s)
            .collect();
        let recovered_stored: [u8; 32] = Sha256::digest(&recovered).into();
        if recovered_stored != stored_key {
            return Err(ScramError::Mismatch);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// The client side is postgres-protocol's, so both ends of the exchange are checked.
    fn login(client_password: &str, server_password: &str) -> Result<(), ScramError> {
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let verifier = Verifier::new(server_password, b"salt-of-16-bytes");
        let exchange = server_first(client.message(), &[7u8; 18], &verifier)?;
        client
            .update(exchange.message())
            .map_err(|_| ScramError::Malformed)?;
        let server_final = exchange.verify(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed)
    }

    #[test]
    fn the_right_password_logs_in_and_the_server_proves_itself() {
        assert_eq!(login("secret", "secret"), Ok(()));
    }

    #[test]
    fn a_wrong_password_or_garbage_is_refused() {
        assert_eq!(login("guess", "secret"), Err(ScramError::Mismatch));
        let verifier = Verifier::new("secret", b"salt");
        assert!(server_first(b"garbage", &[0; 18], &verifier).is_err());
        assert!(server_first(b"n,,n=,r=", &[0; 18], &verifier).is_err());
    }
}
