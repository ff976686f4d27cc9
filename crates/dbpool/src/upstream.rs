//! The connection to PostgreSQL: TCP, and TLS when `dbpool.server_sslmode = "verify-full"`.
//!
//! TLS is asked for as libpq asks (an `SSLRequest`; the server answers `S` and the handshake
//! follows, or `N`), and with `verify-full` a server that answers `N`, or whose certificate
//! does not chain to `server_tls.ca_file` or is not valid for the host in `dbpool.server`, is
//! not used. The CA and client files are read once per process and again when they change.
//! Cancel requests stay on plain TCP, as libpq sends them.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use strata_core::tls::{ClientTls, Connector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::DbPoolConfig;

/// `SSLRequest`: length 8, then the code 1234 5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A connection to the server.
pub use strata_core::tls::ClientStream as ServerStream;

/// The connector for these files, made once and reloaded when they change.
fn connector(settings: &ClientTls) -> io::Result<Arc<Connector>> {
    static MADE: OnceLock<Mutex<HashMap<ClientTls, Arc<Connector>>>> = OnceLock::new();
    let mut made = MADE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(connector) = made.get(settings) {
        connector.reload_if_changed();
        return Ok(connector.clone());
    }
    let connector = Connector::new(settings, &[]).map_err(io::Error::other)?;
    made.insert(settings.clone(), connector.clone());
    Ok(connector)
}

/// A connection to `config.server`, with TLS as `server_sslmode` says.
pub async fn open(config: &DbPoolConfig) -> io::Result<ServerStream> {
    let mut tcp = TcpStream::connect(&config.server).await?;
    tcp.set_nodelay(true)?;
    if config.server_sslmode != "verify-full" {
        return Ok(ServerStream::Plain(tcp));
    }
    tcp.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(io::Error::other(
            "the server does not offer TLS (dbpool.server_sslmode = \"verify-full\")",
        ));
    }
    let host = config
        .server
        .rsplit_once(':')
        .map_or(config.server.as_str(), |(host, _)| host)
        .trim_matches(['[', ']']);
    let tls = connector(&config.server_tls)?.connect(host, tcp).await?;
    Ok(ServerStream::Tls(Box::new(tls)))
}
