//! One client connection, session mode: startup, a server connection for the whole session,
//! messages relayed both ways, the server connection reset and pooled again at the end.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client's connection: TCP or a Unix socket.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

use crate::pool::Pool;
use crate::scram;
use crate::wire::{self, Startup};

/// Who may log in.
#[derive(Debug)]
pub struct Login {
    /// The one role clients name.
    pub user: String,
    /// The password their SCRAM proof must match; `None`: trusted.
    pub password: Option<String>,
}

/// Serves one client until it leaves.
pub async fn serve<S: Stream>(mut client: S, pool: Arc<Pool>, login: Arc<Login>) {
    if let Err(error) = session(&mut client, &pool, &login).await {
        tracing::debug!(%error, "dbpool client ended");
    }
}

async fn session<S: Stream>(client: &mut S, pool: &Pool, login: &Login) -> std::io::Result<()> {
    let params = loop {
        match wire::read_startup(client).await {
            Ok(Startup::Encryption) => client.write_all(b"N").await?,
            // In session mode a client holds the key of its own server connection: pass the
            // cancel on to PostgreSQL as it is.
            Ok(Startup::Cancel { pid, key }) => return pool.cancel(pid, key).await,
            Ok(Startup::Params(params)) => break params,
            Err(error) => {
                let mut out = BytesMut::new();
                wire::error_response(&mut out, "FATAL", "08P01", &error.to_string());
                return client.write_all(&out).await;
            }
        }
    };
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let user = get("user").unwrap_or_default();
    let database = get("database").unwrap_or_else(|| user.clone());
    let mut out = BytesMut::new();
    if user != login.user {
        let text = format!("role \"{user}\" is not served by this pooler");
        wire::error_response(&mut out, "FATAL", "28000", &text);
        return client.write_all(&out).await;
    }
    if let Some(password) = &login.password {
        if let Err(error) = authenticate(client, password).await {
            let text = format!("password authentication failed for user \"{user}\" ({error})");
            wire::error_response(&mut out, "FATAL", "28P01", &text);
            return client.write_all(&out).await;
        }
    }
    let mut lent = match pool.acquire(&database).await {
        Ok(lent) => lent,
        Err(error) => {
            let code = match error {
                crate::pool::AcquireError::Timeout(_) => "53300",
                crate::pool::AcquireError::Server(_) => "08006",
            };
            wire::error_response(&mut out, "FATAL", code, &error.to_string());
            return client.write_all(&out).await;
        }
    };
    wire::authentication_ok(&mut out);
    for (name, value) in &lent.conn.params {
        wire::parameter_status(&mut out, name, value);
    }
    wire::backend_key_data(&mut out, lent.conn.pid, lent.conn.key);
    wire::ready_for_query(&mut out, b'I');
    client.write_all(&out).await?;
    let clean = relay(client, &mut lent.conn.stream).await;
    if clean {
        pool.release(lent).await;
    }
    Ok(())
}

/// Runs a SCRAM-SHA-256 exchange with the client; on success the client has proven it
/// knows `password` (and has checked that the pooler knows it too).
async fn authenticate<S: Stream>(client: &mut S, password: &str) -> Result<(), String> {
    let mut out = BytesMut::new();
    wire::authentication_sasl(&mut out);
    client.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut message = BytesMut::new();
    let first = sasl_data(client, &mut message, true).await?;
    let random: [u8; 32] = random_bytes().map_err(|e| e.to_string())?;
    let exchange = scram::server_first(&first, &random).map_err(|e| e.to_string())?;
    out.clear();
    wire::authentication_sasl_step(&mut out, 11, exchange.message());
    client.write_all(&out).await.map_err(|e| e.to_string())?;
    let last = sasl_data(client, &mut message, false).await?;
    let server_final = exchange
        .verify(&last, password)
        .map_err(|e| e.to_string())?;
    out.clear();
    wire::authentication_sasl_step(&mut out, 12, server_final.as_bytes());
    client.write_all(&out).await.map_err(|e| e.to_string())
}

/// The SCRAM payload of a client's `SASLInitialResponse` (`initial`) or `SASLResponse`.
async fn sasl_data<S: Stream>(
    client: &mut S,
    message: &mut BytesMut,
    initial: bool,
) -> Result<Vec<u8>, String> {
    let tag = wire::read_message(client, message)
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
fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    use std::io::Read;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Relays until the client sends Terminate (true: the server connection can be reused after
/// a reset) or either side goes away (false).
async fn relay<S: Stream>(client: &mut S, server: &mut TcpStream) -> bool {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = server.split();
    let mut message = BytesMut::new();
    let mut answers = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            tag = wire::read_message(&mut client_read, &mut message) => match tag {
                Ok(b'X') => return true,
                Ok(_) => {
                    if server_write.write_all(&message).await.is_err() {
                        return false;
                    }
                }
                Err(_) => return false,
            },
            read = server_read.read(&mut answers) => match read {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    if client_write.write_all(&answers[..n]).await.is_err() {
                        return false;
                    }
                }
            },
        }
    }
}
