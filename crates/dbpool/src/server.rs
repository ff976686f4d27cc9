//! Server connections: log into PostgreSQL (SCRAM-SHA-256, md5, cleartext or trust), remember
//! what it reported (parameters, backend key), and reset a connection between clients.

use bytes::BytesMut;
use postgres_protocol::authentication::sasl;
use postgres_protocol::message::{backend, frontend};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::upstream::ServerStream;

use crate::auth::{self, Credential};
use crate::prepared::OnServer;
use crate::scram;
use crate::wire::{self, WireError};

/// One logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    pub stream: ServerStream,
    /// `ParameterStatus` values the server reported, for the clients that get this connection.
    pub params: Vec<(String, String)>,
    /// The tracked ones among them, for comparing with a client's.
    pub tracked: crate::state::Tracked,
    pub pid: i32,
    pub key: i32,
    /// When it logged in, for `server_lifetime`.
    pub born: std::time::Instant,
    /// Statements prepared on it under the pooler's names.
    pub prepared: OnServer,
    /// The runtime its socket is registered with ([`crate::runners::home`]).
    pub home: usize,
}

/// Why a server connection could not be made or kept.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot reach PostgreSQL at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{message}")]
    Refused { code: String, message: String },
    #[error("PostgreSQL asked for an authentication method the pooler does not speak")]
    Method,
    #[error("PostgreSQL asked for a {0} login and the pooler has no secret for it (dbpool.server_password, dbpool.users, or a client's proof under dbpool.auth_query)")]
    NoSecret(&'static str),
    #[error("SCRAM login to PostgreSQL failed: {0}")]
    Scram(#[from] scram::ScramError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Field `field` of an `ErrorResponse` (`M` message, `C` SQLSTATE), framing included.
pub fn error_field(message: &[u8], field: u8) -> String {
    message
        .get(5..)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .take_while(|f| !f.is_empty())
        .find_map(|f| f.strip_prefix(&[field]))
        .map(|text| String::from_utf8_lossy(text).into_owned())
        .unwrap_or_default()
}

/// The message of an `ErrorResponse`.
pub fn error_text(message: &[u8]) -> String {
    error_field(message, b'M')
}

impl ServerConn {
    /// Connects to the server (TLS as `server_sslmode` says) and logs in as `user` to
    /// `database`.
    pub async fn connect(
        config: &crate::config::DbPoolConfig,
        user: &str,
        database: &str,
        credential: Option<&Credential>,
    ) -> Result<Self, ServerError> {
        let mut stream =
            crate::upstream::open(config)
                .await
                .map_err(|source| ServerError::Connect {
                    addr: config.server.clone(),
                    source,
                })?;
        let mut out = BytesMut::new();
        let params = [
            ("user", user),
            ("database", database),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params.iter().copied(), &mut out)?;
        stream.write_all(&out).await?;
        let mut conn = Self {
            stream,
            params: Vec::new(),
            tracked: Default::default(),
            pid: 0,
            key: 0,
            born: std::time::Instant::now(),
            prepared: OnServer::default(),
            home: crate::runners::home(),
        };
        let mut scram: Option<scram::ClientLogin> = None;
        let mut buf = BytesMut::new();
        loop {
            wire::read_message(&mut conn.stream, &mut buf).await?;
            let mut parse = buf.clone();
            let Some(message) = backend::Message::parse(&mut parse)? else {
                return Err(ServerError::Method);
            };
            out.clear();
            match message {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let password = credential
                        .and_then(Credential::cleartext)
                        .ok_or(ServerError::NoSecret("cleartext password"))?;
                    frontend::password_message(password.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let stored = credential
                        .and_then(|c| c.md5(user))
                        .ok_or(ServerError::NoSecret("md5"))?;
                    let answer = auth::md5_answer(&stored, body.salt());
                    frontend::password_message(answer.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationSasl(_) => {
                    if credential.and_then(Credential::scram).is_none() {
                        return Err(ServerError::NoSecret("SCRAM-SHA-256"));
                    }
                    // The mechanisms: NUL-terminated names after the tag, length and code.
                    let offered = buf
                        .get(9..)
                        .unwrap_or_default()
                        .split(|b| *b == 0)
                        .any(|name| name == sasl::SCRAM_SHA_256.as_bytes());
                    if !offered {
                        return Err(ServerError::Method);
                    }
                    let login = scram::ClientLogin::new(&crate::client::random_bytes()?);
                    let first = login.first();
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        first.as_bytes(),
                        &mut out,
                    )?;
                    scram = Some(login);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let state = scram.as_mut().ok_or(ServerError::Method)?;
                    let secret = credential.and_then(Credential::scram);
                    let secret = secret.ok_or(ServerError::NoSecret("SCRAM-SHA-256"))?;
                    let last = state.respond(body.data(), &secret)?;
                    frontend::sasl_response(last.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let state = scram.as_mut().ok_or(ServerError::Method)?;
                    state.finish(body.data())?;
                }
                backend::Message::ParameterStatus(body) => {
                    conn.set_param(body.name()?, body.value()?);
                }
                backend::Message::BackendKeyData(body) => {
                    conn.pid = body.process_id();
                    conn.key = body.secret_key();
                }
                backend::Message::ReadyForQuery(_) => return Ok(conn),
                backend::Message::ErrorResponse(_) => {
                    return Err(ServerError::Refused {
                        code: error_field(&buf, b'C'),
                        message: error_text(&buf),
                    });
                }
                backend::Message::NoticeResponse(_) => {}
                _ => return Err(ServerError::Method),
            }
            if !out.is_empty() {
                conn.stream.write_all(&out).await?;
            }
        }
    }

    /// Whether the idle connection has nothing to say: a server that closed it, or sent
    /// anything (a FATAL on shutdown), makes it unfit to lend.
    ///
    /// The reactor's readiness answers without a system call: the relay's last read drained
    /// the socket (a short read clears readiness), so any byte or close since then has made
    /// it readable. Only then is the socket itself asked.
    pub fn is_quiet(&self) -> bool {
        self.stream.is_quiet()
    }

    /// Registers the socket with the calling thread's runtime, if it is another's.
    pub fn come_home(self: Box<Self>) -> std::io::Result<Box<Self>> {
        let here = crate::runners::home();
        if self.home == here {
            return Ok(self);
        }
        let mut conn = *self;
        match conn.stream {
            ServerStream::Plain(tcp) => {
                conn.stream = ServerStream::Plain(TcpStream::from_std(tcp.into_std()?)?);
                conn.home = here;
            }
            // A TLS session stays with the runtime it was made on (whose reactor still
            // serves it from any thread).
            tls @ ServerStream::Tls(_) => conn.stream = tls,
        }
        Ok(Box::new(conn))
    }

    /// Records a `ParameterStatus` the server sent.
    pub fn set_param(&mut self, name: &str, value: &str) {
        self.tracked.set(name, value);
        match self.params.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => value.clone_into(v),
            None => self.params.push((name.to_owned(), value.to_owned())),
        }
    }

    /// Returns the connection to a clean state between clients (`DISCARD ALL` rolls back
    /// nothing: a client that left mid-transaction first gets its transaction aborted by
    /// `ROLLBACK`), learning the parameters the server reports as they go back to their
    /// values at login. Errors mean the connection must not be reused.
    pub async fn reset(&mut self) -> Result<(), ServerError> {
        // Answers to what the last client sent but never read may come first: a marker only
        // this reset knows tells where they end. DISCARD ALL goes on its own, as it may not run
        // inside the implicit transaction of a multi-statement query.
        let marker = format!(
            "strata-reset-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let mut out = BytesMut::new();
        frontend::query("ROLLBACK", &mut out)?;
        frontend::query(&format!("SELECT '{marker}'"), &mut out)?;
        frontend::query("DISCARD ALL", &mut out)?;
        self.stream.write_all(&out).await?;
        self.prepared.clear();
        let mut buf = BytesMut::new();
        let (mut marked, mut discarded) = (false, false);
        loop {
            let tag = wire::read_message(&mut self.stream, &mut buf).await?;
            match tag {
                b'D' if buf.ends_with(marker.as_bytes()) => marked = true,
                b'C' if marked && buf.get(5..) == Some(&b"DISCARD ALL\0"[..]) => discarded = true,
                b'Z' if discarded => {
                    return if buf.get(5) == Some(&b'I') {
                        Ok(())
                    } else {
                        Err(ServerError::Refused {
                            code: "25000".into(),
                            message: "the reset left a transaction open".into(),
                        })
                    };
                }
                b'E' => {
                    tracing::debug!(error = %error_text(&buf), "server reset reported an error")
                }
                // `DISCARD ALL` puts every parameter back to its value at login, and the
                // server reports each one that changes: the next client is told these.
                b'S' => {
                    if let Some((name, value)) = wire::parameter_status_fields(&buf) {
                        self.set_param(&name, &value);
                    }
                }
                _ => {}
            }
        }
    }
}
