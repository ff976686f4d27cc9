//! The load balancer benchmark's ceiling for a proxy: a byte relay that reads nothing of HTTP.
//! Each client connection gets its own connection to the target, and bytes are copied both
//! ways as they come. With keep-alive on both sides this is the least work any HTTP/1.1 proxy
//! can do per request (one receive and one send each way, plus the TLS a workload asks for),
//! so its requests per second on the proxy's core, with the load generator and the backend on
//! the other, bound every proxy's.
//!
//! `relay LISTEN TARGET [tls-in CERT KEY] [tls-out CA NAME]`: `tls-in` terminates TLS from
//! clients (rustls, as Strata's listener), `tls-out` speaks TLS to the target, verifying its
//! certificate for NAME against CA (as Strata's client).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

struct Settings {
    target: String,
    tls_in: Option<strata_core::tls::TlsAcceptor>,
    tls_out: Option<(Arc<strata_core::tls::Connector>, String)>,
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> std::io::Error {
        eprintln!("usage: relay LISTEN TARGET [tls-in CERT KEY] [tls-out CA NAME]");
        std::process::exit(2)
    };
    let [listen, target, rest @ ..] = args.as_slice() else {
        return Err(usage());
    };
    let mut settings = Settings {
        target: target.clone(),
        tls_in: None,
        tls_out: None,
    };
    let mut rest = rest;
    loop {
        match rest {
            [] => break,
            [mode, cert, key, more @ ..] if mode == "tls-in" => {
                let (acceptor, _) =
                    strata_core::tls::acceptor(cert.as_ref(), key.as_ref(), &[b"http/1.1"])
                        .map_err(std::io::Error::other)?;
                settings.tls_in = Some(acceptor);
                rest = more;
            }
            [mode, ca, name, more @ ..] if mode == "tls-out" => {
                let client = strata_core::tls::ClientTls {
                    ca_file: ca.into(),
                    ..Default::default()
                };
                let connector = strata_core::tls::Connector::new(&client, &[b"http/1.1"])
                    .map_err(std::io::Error::other)?;
                settings.tls_out = Some((connector, name.clone()));
                rest = more;
            }
            _ => return Err(usage()),
        }
    }
    let settings = Arc::new(settings);
    // One thread, as the relay runs pinned to one core: no cross-thread wake-ups.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(listen).await?;
            loop {
                let (client, _) = listener.accept().await?;
                let settings = settings.clone();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    match &settings.tls_in {
                        Some(acceptor) => {
                            if let Ok(client) = acceptor.accept(client).await {
                                to_target(client, &settings).await;
                            }
                        }
                        None => to_target(client, &settings).await,
                    }
                });
            }
        })
}

async fn to_target<C: AsyncRead + AsyncWrite + Unpin>(mut client: C, settings: &Settings) {
    let Ok(server) = TcpStream::connect(&settings.target).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    match &settings.tls_out {
        Some((connector, name)) => {
            if let Ok(mut server) = connector.connect(name, server).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        }
        None => {
            let mut server = server;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        }
    }
}
