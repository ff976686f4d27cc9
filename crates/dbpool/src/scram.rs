//! SCRAM-SHA-256 (RFC 5802, RFC 7677) at both ends. Towards clients the pooler is the server:
//! it checks a client's proof without the password crossing the wire, keeping a verifier per
//! role (salt, iterations, StoredKey, ServerKey) as PostgreSQL does, so a login costs a few
//! HMACs rather than a PBKDF2 run. A verifier may also come from PostgreSQL itself
//! (`auth_query`); then a client's proof yields its ClientKey, and with that key the pooler
//! logs into PostgreSQL as the client's role without ever knowing the password. Towards
//! PostgreSQL the pooler is the client, with the password or those keys.

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
    #[error("the server could not prove it knows the password")]
    ServerUnproven,
}

fn attribute<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.split(',').find_map(|attr| {
        attr.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

/// The keys a password makes with a salt and an iteration count: ClientKey signs a login,
/// ServerKey checks the server's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl Keys {
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password.as_bytes(), salt, iterations);
        Self {
            client_key: hmac(&salted, b"Client Key"),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
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
        let keys = Keys::from_password(password, salt, ITERATIONS);
        Self {
            iterations: ITERATIONS,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(keys.client_key).into(),
            server_key: keys.server_key,
        }
    }

    /// Reads a verifier as PostgreSQL stores it in `pg_authid.rolpassword`:
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64 each.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            iterations: iterations.parse().ok().filter(|i| *i > 0)?,
            salt: STANDARD.decode(salt).ok()?,
            stored_key: STANDARD.decode(stored).ok()?.try_into().ok()?,
            server_key: STANDARD.decode(server).ok()?.try_into().ok()?,
        })
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
    let client_nonce = attribute(bare, "r")
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

    /// Checks the client-final message; returns the server-final message and the client's
    /// keys (its ClientKey, recovered from the proof, and the role's ServerKey).
    pub fn verify(&self, client_final: &[u8]) -> Result<(String, Keys), ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let nonce = attribute(without_proof, "r").ok_or(ScramError::Malformed)?;
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
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key
            .iter_mut()
            .zip(proof.iter().zip(signature.iter()))
        {
            *k = p ^ s;
        }
        let recovered_stored: [u8; 32] = Sha256::digest(client_key).into();
        if recovered_stored != stored_key {
            return Err(ScramError::Mismatch);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        let keys = Keys {
            client_key,
            server_key: self.verifier.server_key,
        };
        Ok((format!("v={}", STANDARD.encode(server_signature)), keys))
    }
}

/// What the pooler logs into PostgreSQL with.
#[derive(Debug, Clone)]
pub enum Credential<'a> {
    Password(&'a str),
    Keys(Keys),
}

/// The pooler's own login to PostgreSQL, as the client of the exchange.
#[derive(Debug)]
pub struct ClientLogin {
    first_bare: String,
    nonce: String,
    server_signature: Option<[u8; 32]>,
}

impl ClientLogin {
    pub fn new(random: &[u8; 18]) -> Self {
        let nonce = STANDARD.encode(random);
        Self {
            first_bare: format!("n=,r={nonce}"),
            nonce,
            server_signature: None,
        }
    }

    /// The client-first message (no channel binding).
    pub fn first(&self) -> String {
        format!("n,,{}", self.first_bare)
    }

    /// Answers the server-first message with the client-final one.
    pub fn respond(
        &mut self,
        server_first: &[u8],
        credential: &Credential<'_>,
    ) -> Result<String, ScramError> {
        let text = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed)?;
        let nonce = attribute(text, "r")
            .filter(|n| n.starts_with(&self.nonce) && n.len() > self.nonce.len())
            .ok_or(ScramError::Malformed)?;
        let keys = match credential {
            Credential::Keys(keys) => *keys,
            Credential::Password(password) => {
                let salt = attribute(text, "s")
                    .and_then(|s| STANDARD.decode(s).ok())
                    .ok_or(ScramError::Malformed)?;
                let iterations = attribute(text, "i")
                    .and_then(|i| i.parse().ok())
                    .filter(|i| *i > 0)
                    .ok_or(ScramError::Malformed)?;
                Keys::from_password(password, &salt, iterations)
            }
        };
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.first_bare);
        let stored_key: [u8; 32] = Sha256::digest(keys.client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = keys.client_key;
        proof
            .iter_mut()
            .zip(signature.iter())
            .for_each(|(p, s)| *p ^= s);
        self.server_signature = Some(hmac(&keys.server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)))
    }

    /// Checks the server-final message: the server knew the password too.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed)?;
        let signature = attribute(text, "v")
            .and_then(|v| STANDARD.decode(v).ok())
            .ok_or(ScramError::ServerUnproven)?;
        match self.server_signature {
            Some(expected) if signature == expected => Ok(()),
            _ => Err(ScramError::ServerUnproven),
        }
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
        let (server_final, _) = exchange.verify(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed)
    }

    /// The pooler's own client against its own server side; returns the keys the server
    /// recovered from the proof.
    fn own_login(credential: Credential<'_>, verifier: &Verifier) -> Result<Keys, ScramError> {
        let mut client = ClientLogin::new(&[3u8; 18]);
        let exchange = server_first(client.first().as_bytes(), &[9u8; 18], verifier)?;
        let last = client.respond(exchange.message(), &credential)?;
        let (server_final, keys) = exchange.verify(last.as_bytes())?;
        client.finish(server_final.as_bytes())?;
        Ok(keys)
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

    #[test]
    fn a_proof_yields_the_client_key_and_that_key_logs_in_again() {
        let verifier = Verifier::new("secret", b"salt-of-16-bytes");
        let keys = own_login(Credential::Password("secret"), &verifier).unwrap();
        assert_eq!(
            keys,
            Keys::from_password("secret", b"salt-of-16-bytes", ITERATIONS)
        );
        assert_eq!(own_login(Credential::Keys(keys), &verifier), Ok(keys));
        let wrong = Keys::from_password("guess", b"salt-of-16-bytes", ITERATIONS);
        assert_eq!(
            own_login(Credential::Keys(wrong), &verifier),
            Err(ScramError::Mismatch)
        );
    }

    #[test]
    fn a_server_that_does_not_know_the_password_is_caught() {
        let mut client = ClientLogin::new(&[3u8; 18]);
        let verifier = Verifier::new("secret", b"salt");
        let exchange = server_first(client.first().as_bytes(), &[9u8; 18], &verifier).unwrap();
        client
            .respond(exchange.message(), &Credential::Password("secret"))
            .unwrap();
        assert_eq!(
            client.finish(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(ScramError::ServerUnproven)
        );
        // A server nonce that does not extend the client's is refused before any proof.
        let mut other = ClientLogin::new(&[4u8; 18]);
        assert_eq!(
            other.respond(exchange.message(), &Credential::Password("secret")),
            Err(ScramError::Malformed)
        );
    }

    #[test]
    fn verifiers_are_read_as_postgresql_stores_them() {
        let made = Verifier::new("secret", b"0123456789abcdef");
        let stored = format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            made.iterations,
            STANDARD.encode(&made.salt),
            STANDARD.encode(made.stored_key),
            STANDARD.encode(made.server_key)
        );
        assert_eq!(Verifier::parse(&stored), Some(made));
        assert_eq!(Verifier::parse("md5abcdef"), None);
        assert_eq!(Verifier::parse("SCRAM-SHA-256$0:AA==$AA==:AA=="), None);
        assert_eq!(Verifier::parse("SCRAM-SHA-256$4096:AA==$AA==:AA=="), None);
    }
}
