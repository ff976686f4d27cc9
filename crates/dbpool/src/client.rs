//! One client connection: startup, checks and login, then the relay.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// A client's connection: TCP or a Unix socket.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

use crate::auth::{self, Credential, Secret};
use crate::pool::{Pool, PoolKey};
use crate::relay::Relay;
use crate::scram;
use crate::state;
use crate::wire::{self, Startup, WireError};
use strata_core::tls::TlsAcceptor;

/// How clients connect (who may log in is `dbpool.server_user`, `dbpool.users` and
/// `dbpool.auth`).
pub struct Login {
    /// TLS offered to clients that ask for it.
    pub tls: Option<TlsAcceptor>,
    /// Clients that do not use TLS are refused.
    pub tls_required: bool,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Serves one client until it leaves.
///
/// A client that has not proven who it is within `client_login_timeout` (its TLS handshake,
/// startup packet and password exchange) is closed: idle sockets cannot hold the pooler.
pub async fn serve<S: Stream>(mut client: S, pool: Arc<Pool>, login: Arc<Login>) {
    let deadline = LoginDeadline::new(pool.config.client_login_timeout);
    let tls = login.tls.as_ref();
    let opened = deadline.bound(async move {
        match wire::read_startup(&mut client).await {
            Ok(Startup::Encryption { tls: true }) if tls.is_some() => {
                let acceptor = tls.expect("checked above");
                client.write_all(b"S").await?;
                Ok(Opened::Secure(Box::new(acceptor.accept(client).await?)))
            }
            first => Ok(Opened::Plain(client, first)),
        }
    });
    let outcome = match opened.await {
        // A client that said nothing a PostgreSQL client would understand is just closed.
        Err(LoginTimedOut) => {
            pool.counts.login_timeouts.inc();
            tracing::debug!("dbpool client closed: no startup packet within client_login_timeout");
            return;
        }
        Ok(Err(error)) => Err(error),
        Ok(Ok(Opened::Secure(mut secure))) => {
            session(&mut secure, None, true, &pool, &login, deadline).await
        }
        Ok(Ok(Opened::Plain(mut client, first))) => {
            session(&mut client, Some(first), false, &pool, &login, deadline).await
        }
    };
    if let Err(error) = outcome {
        tracing::debug!(%error, "dbpool client ended");
    }
}

/// A client connection after its first packet: TLS set up, or as it came with that packet.
enum Opened<S: Stream> {
    Secure(Box<strata_core::tls::TlsStream<S>>),
    Plain(S, Result<Startup, WireError>),
}

/// When a client's login must be over (`None`: never).
#[derive(Debug, Clone, Copy)]
struct LoginDeadline {
    at: Option<tokio::time::Instant>,
    timeout: std::time::Duration,
}

/// The login took longer than `client_login_timeout`.
#[derive(Debug)]
struct LoginTimedOut;

impl LoginDeadline {
    fn new(timeout: std::time::Duration) -> Self {
        let at = (!timeout.is_zero()).then(|| tokio::time::Instant::now() + timeout);
        Self { at, timeout }
    }

    /// Runs `step` of the login, unless the deadline passes first.
    async fn bound<T>(
        &self,
        step: impl std::future::Future<Output = T>,
    ) -> Result<T, LoginTimedOut> {
        match self.at {
            Some(at) => tokio::time::timeout_at(at, step)
                .await
                .map_err(|_| LoginTimedOut),
            None => Ok(step.await),
        }
    }
}

/// Who a client proved to be, and the tracked parameters it asked for at startup.
struct Hello {
    user: String,
    database: String,
    asked: Vec<(&'static str, String)>,
}

/// A client's startup and login (`first`: its first packet, when already read), then the
/// relay.
async fn session<S: Stream>(
    client: &mut S,
    first: Option<Result<Startup, WireError>>,
    secure: bool,
    pool: &Pool,
    login: &Login,
    deadline: LoginDeadline,
) -> std::io::Result<()> {
    let hello = match deadline
        .bound(log_in(client, first, secure, pool, login))
        .await
    {
        Ok(Ok(Some(hello))) => hello,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(error)) => return Err(error),
        Err(LoginTimedOut) => {
            pool.counts.login_timeouts.inc();
            let text = format!(
                "client_login_timeout: the login did not finish within {:?} (dbpool.client_login_timeout)",
                deadline.timeout
            );
            return refuse(client, "08P01", &text).await;
        }
    };
    greet(client, pool, hello).await
}

/// Reads the startup packet and checks the client's role and password; `None` when the
/// client was refused (and told why) or only sent a cancel request.
async fn log_in<S: Stream>(
    client: &mut S,
    mut first: Option<Result<Startup, WireError>>,
    secure: bool,
    pool: &Pool,
    login: &Login,
) -> std::io::Result<Option<Hello>> {
    let params = loop {
        let packet = match first.take() {
            Some(packet) => packet,
            None => wire::read_startup(client).await,
        };
        match packet {
            Ok(Startup::Encryption { .. }) => client.write_all(b"N").await?,
            Ok(Startup::Cancel { pid, key }) => return pool.cancel(pid, key).await.map(|()| None),
            Ok(Startup::Params { params, minor }) => {
                // A client asking for a newer 3.x, or for protocol options, hears what the
                // pooler speaks: 3.0 without options (PostgreSQL 18's libpq then uses 3.0).
                let options: Vec<&str> = params
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .filter(|name| name.starts_with("_pq_."))
                    .collect();
                if minor > 0 || !options.is_empty() {
                    let mut out = BytesMut::new();
                    wire::negotiate_protocol_version(&mut out, &options);
                    client.write_all(&out).await?;
                }
                let params = params
                    .into_iter()
                    .filter(|(name, _)| !name.starts_with("_pq_."))
                    .collect::<Vec<_>>();
                break params;
            }
            Err(error) => return refused(client, "08P01", &error.to_string()).await,
        }
    };
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if login.tls_required && !secure {
        return refused(
            client,
            "28000",
            "this pooler requires TLS (dbpool.tls_required)",
        )
        .await;
    }
    let user = get("user").unwrap_or_default();
    let database = get("database").unwrap_or_else(|| user.clone());
    let known = pool.config.knows(&user);
    let secret = match &pool.lookup {
        _ if known => {
            let password = pool.config.password_of(&user).unwrap_or_default();
            Secret::Password(password.to_owned())
        }
        Some(lookup) => match lookup.secret(&pool.config, &user).await {
            Ok(Some(secret)) => secret,
            // As PostgreSQL does, a role that does not exist fails like a wrong password.
            Ok(None) => {
                let text = format!("password authentication failed for user \"{user}\"");
                return refused(client, "28P01", &text).await;
            }
            Err(error) => {
                let text = format!("could not look role \"{user}\" up in PostgreSQL: {error}");
                return refused(client, "08006", &text).await;
            }
        },
        None => {
            let text = format!("role \"{user}\" is not served by this pooler");
            return refused(client, "28000", &text).await;
        }
    };
    let mut asked = Vec::new();
    for (name, value) in &params {
        if let Some(tracked) = state::tracked(name) {
            asked.push((tracked, value.clone()));
        } else if !matches!(name.as_str(), "user" | "database")
            && !pool.config.ignore_startup_parameters.contains(name)
        {
            let text = format!(
                "unsupported startup parameter: {name} (dbpool.ignore_startup_parameters lists those ignored)"
            );
            return refused(client, "08P01", &text).await;
        }
    }
    let proven = match (secret, pool.config.auth.as_str()) {
        (Secret::Password(password), "trust") => Ok(Credential::Password(password)),
        (Secret::Password(password), "scram-sha-256") => {
            let verifier = pool.verifier(&user, &password)?;
            authenticate(client, &verifier)
                .await
                .map(|_| Credential::Password(password))
        }
        (Secret::Password(password), _) => {
            let stored = auth::md5_stored(&user, &password);
            authenticate_md5(client, &stored)
                .await
                .map(|()| Credential::Password(password))
        }
        (Secret::Scram(verifier), _) => {
            authenticate(client, &verifier).await.map(Credential::Scram)
        }
        (Secret::Md5(stored), _) => authenticate_md5(client, &stored)
            .await
            .map(|()| Credential::Md5(stored)),
    };
    match proven {
        Err(error) => {
            let text = format!("password authentication failed for user \"{user}\" ({error})");
            return refused(client, "28P01", &text).await;
        }
        // A looked-up role's server logins use what its latest client proved.
        Ok(credential) if !known => pool.learn(&user, credential),
        Ok(_) => {}
    }
    Ok(Some(Hello {
        user,
        database,
        asked,
    }))
}

/// Greets a logged-in client with its server's parameters (in session mode, once it holds
/// its server connection), then relays its messages.
async fn greet<S: Stream>(client: &mut S, pool: &Pool, hello: Hello) -> std::io::Result<()> {
    let Hello {
        user,
        database,
        asked,
    } = hello;
    let entry = pool.entry(&PoolKey { database, user });
    // Session mode lends a connection for the whole session; transaction mode only needs to
    // know what the server reports.
    let (link, reported) = if pool.config.transaction_mode() {
        (None, pool.server_params(&entry).await)
    } else {
        match pool.acquire(&entry).await {
            Ok(lent) => {
                let params = lent.conn.params.clone();
                (Some(lent), Ok(params))
            }
            Err(error) => (None, Err(error)),
        }
    };
    let reported = match reported {
        Ok(reported) => reported,
        Err(error) => return refuse(client, error.code(), &error.to_string()).await,
    };
    // The client's view: what the server reports, with the tracked values it asked for.
    let mut tracked = state::Tracked::default();
    let mut out = BytesMut::new();
    wire::authentication_ok(&mut out);
    for (name, value) in &reported {
        let value = match state::tracked(name) {
            Some(t) => {
                let value = asked
                    .iter()
                    .find(|(a, _)| *a == t)
                    .map_or(value, |(_, v)| v);
                tracked.set(t, value);
                value
            }
            None => value,
        };
        wire::parameter_status(&mut out, name, value);
    }
    let ticket = pool.cancels.issue(i32::from_ne_bytes(random_bytes()?));
    wire::backend_key_data(&mut out, ticket.pid, ticket.key);
    wire::ready_for_query(&mut out, b'I');
    client.write_all(&out).await?;
    let relay = Relay::new(pool, entry, tracked, ticket, link);
    if let Err(error) = relay.run(client).await {
        tracing::debug!(%error, "dbpool session ended");
    }
    Ok(())
}

/// Refuses a client with a FATAL error, during its login.
async fn refused<S: Stream>(
    client: &mut S,
    code: &str,
    text: &str,
) -> std::io::Result<Option<Hello>> {
    refuse(client, code, text).await.map(|()| None)
}

/// Refuses a client with a FATAL error.
async fn refuse<S: Stream>(client: &mut S, code: &str, text: &str) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    wire::error_response(&mut out, "FATAL", code, text);
    client.write_all(&out).await
}

/// Runs a SCRAM-SHA-256 exchange with the client; on success the client has proven it
/// knows the role's password (and has checked that the pooler knows it too), and its proof
/// has given its keys.
async fn authenticate<S: Stream>(
    client: &mut S,
    verifier: &scram::Verifier,
) -> Result<scram::Keys, String> {
    let mut out = BytesMut::new();
    wire::authentication_sasl(&mut out);
    client.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut message = BytesMut::new();
    let first = sasl_data(client, &mut message, true).await?;
    let random: [u8; 18] = random_bytes().map_err(|e| e.to_string())?;
    let exchange = scram::server_first(&first, &random, verifier).map_err(|e| e.to_string())?;
    out.clear();
    wire::authentication_sasl_step(&mut out, 11, exchange.message());
    client.write_all(&out).await.map_err(|e| e.to_string())?;
    let last = sasl_data(client, &mut message, false).await?;
    let (server_final, keys) = exchange.verify(&last).map_err(|e| e.to_string())?;
    out.clear();
    wire::authentication_sasl_step(&mut out, 12, server_final.as_bytes());
    client.write_all(&out).await.map_err(|e| e.to_string())?;
    Ok(keys)
}

/// Runs an md5 exchange: the client proves it knows the password whose stored hash is
/// `stored` by hashing that with a fresh salt.
async fn authenticate_md5<S: Stream>(client: &mut S, stored: &str) -> Result<(), String> {
    let salt: [u8; 4] = random_bytes().map_err(|e| e.to_string())?;
    let mut out = BytesMut::new();
    wire::authentication_md5(&mut out, salt);
    client.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut message = BytesMut::new();
    let tag = wire::read_message_up_to(client, &mut message, wire::MAX_AUTH_MESSAGE)
        .await
        .map_err(|e| e.to_string())?;
    let answer = message.get(5..).and_then(|b| b.strip_suffix(b"\0"));
    if tag != b'p' || answer.is_none() {
        return Err("expected a password message".into());
    }
    let expected = auth::md5_answer(stored, salt);
    if answer == Some(expected.as_bytes()) {
        Ok(())
    } else {
        Err("wrong password".into())
    }
}

/// The SCRAM payload of a client's `SASLInitialResponse` (`initial`) or `SASLResponse`.
async fn sasl_data<S: Stream>(
    client: &mut S,
    message: &mut BytesMut,
    initial: bool,
) -> Result<Vec<u8>, String> {
    let tag = wire::read_message_up_to(client, message, wire::MAX_AUTH_MESSAGE)
        .await
        .map_err(|e| e.to_string())?;
    if tag != b'p' {
        return Err("expected a SASL response".into());
    }
    let body = &message[5..];
    if !initial {
        return Ok(body.to_vec());
    }
    let end = body
        .iter()
        .position(|b| *b == 0)
        .ok_or("malformed SASL response")?;
    if &body[..end] != b"SCRAM-SHA-256" {
        return Err("unsupported SASL mechanism".into());
    }
    Ok(body
        .get(end + 5..)
        .ok_or("malformed SASL response")?
        .to_vec())
}

/// Fresh random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    use std::io::Read;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}
