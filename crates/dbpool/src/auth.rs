//! Who may log in, and what the pooler proves to PostgreSQL for them.
//!
//! Roles of the configuration come with their passwords. With `auth_query`, any other role is
//! looked up in PostgreSQL itself, on a control connection (tokio-postgres): the query returns
//! what `pg_authid` stores, a SCRAM verifier or an md5 hash. A client proves it knows the
//! password against that secret, and the proof itself gives the pooler what it needs to log
//! into PostgreSQL as the same role: the ClientKey a SCRAM proof carries, or the md5 hash.
//! The pooler never learns the password, and PostgreSQL stays the one place roles live.

use std::time::Duration;

use md5::{Digest, Md5};
use tokio_postgres::Client;

use crate::config::DbPoolConfig;
use crate::scram;

/// What PostgreSQL (or the configuration) holds for a role.
#[derive(Debug, Clone)]
pub enum Secret {
    /// The password itself: configured roles, or a role stored in plain text.
    Password(String),
    /// A SCRAM-SHA-256 verifier, as `pg_authid.rolpassword` stores it.
    Scram(scram::Verifier),
    /// `md5` followed by the hex md5 of password and role name.
    Md5(String),
}

impl Secret {
    /// Reads a stored secret as PostgreSQL writes it.
    pub fn parse(text: &str) -> Self {
        if let Some(verifier) = scram::Verifier::parse(text) {
            return Self::Scram(verifier);
        }
        let is_md5 = text
            .strip_prefix("md5")
            .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if is_md5 {
            Self::Md5(text.to_owned())
        } else {
            Self::Password(text.to_owned())
        }
    }
}

/// What the pooler logs into PostgreSQL with, for one role.
#[derive(Debug, Clone)]
pub enum Credential {
    Password(String),
    /// The keys a client's SCRAM proof gave (SCRAM logins only).
    Scram(scram::Keys),
    /// The stored md5 hash (md5 logins only).
    Md5(String),
}

impl Credential {
    /// The password, for a server that asks for it in clear text.
    pub fn cleartext(&self) -> Option<&str> {
        match self {
            Self::Password(password) => Some(password),
            _ => None,
        }
    }

    /// The stored md5 hash of the password for role `user`.
    pub fn md5(&self, user: &str) -> Option<String> {
        match self {
            Self::Password(password) => Some(md5_stored(user, password)),
            Self::Md5(hash) => Some(hash.clone()),
            Self::Scram(_) => None,
        }
    }

    pub fn scram(&self) -> Option<scram::Credential<'_>> {
        match self {
            Self::Password(password) => Some(scram::Credential::Password(password)),
            Self::Scram(keys) => Some(scram::Credential::Keys(*keys)),
            Self::Md5(_) => None,
        }
    }
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What PostgreSQL stores for an md5 password: `md5` + hex(md5(password ++ role)).
pub fn md5_stored(user: &str, password: &str) -> String {
    format!("md5{}", md5_hex(&[password.as_bytes(), user.as_bytes()]))
}

/// The answer to an md5 challenge with `salt`, from the stored hash.
pub fn md5_answer(stored: &str, salt: [u8; 4]) -> String {
    let inner = stored.strip_prefix("md5").unwrap_or(stored);
    format!("md5{}", md5_hex(&[inner.as_bytes(), &salt]))
}

/// Looks roles up in PostgreSQL with `dbpool.auth_query`.
pub struct Lookup {
    query: String,
    control: tokio::sync::Mutex<Option<Client>>,
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookup")
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

impl Lookup {
    pub fn new(query: String) -> Self {
        Self {
            query,
            control: tokio::sync::Mutex::default(),
        }
    }

    /// The secret PostgreSQL holds for `user`; `None` when the role does not exist or has
    /// no password. Runs the query on the control connection, opened when first needed.
    pub async fn secret(
        &self,
        config: &DbPoolConfig,
        user: &str,
    ) -> Result<Option<Secret>, String> {
        let attempt = async {
            let mut control = self.control.lock().await;
            if control.as_ref().is_none_or(Client::is_closed) {
                *control = Some(crate::health::connect(config, "strata-dbpool-auth").await?);
            }
            let client = control.as_ref().expect("connected above");
            let row = client
                .query_opt(self.query.as_str(), &[&user])
                .await
                .map_err(|e| format!("dbpool.auth_query failed: {e}"))?;
            let Some(row) = row else { return Ok(None) };
            let secret: Option<String> = row
                .try_get(1)
                .map_err(|e| format!("dbpool.auth_query must return (name, password): {e}"))?;
            Ok(secret.map(|s| Secret::parse(&s)))
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .unwrap_or_else(|_| Err("PostgreSQL did not answer within 5s".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_answers_match_postgresql() {
        let salt = [1, 2, 3, 4];
        let expected = postgres_protocol::authentication::md5_hash(b"alice", b"secret", salt);
        assert_eq!(md5_answer(&md5_stored("alice", "secret"), salt), expected);
        let stored = md5_stored("alice", "secret");
        assert!(matches!(Secret::parse(&stored), Secret::Md5(h) if h == stored));
    }

    #[test]
    fn secrets_are_told_apart() {
        assert!(matches!(Secret::parse("md5xyz"), Secret::Password(_)));
        assert!(matches!(Secret::parse("plain"), Secret::Password(p) if p == "plain"));
        let scram = "SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        assert!(matches!(Secret::parse(scram), Secret::Scram(_)));
        assert!(Credential::Scram(scram::Keys::from_password("x", b"s", 1))
            .md5("alice")
            .is_none());
    }
}
