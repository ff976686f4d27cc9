//! The benchmarks' ceiling for cache hits: a bare hyper HTTP/1.1 server answering every
//! request with the same body, on the same runtime Strata uses; with a certificate and key,
//! over TLS (rustls, ALPN `http/1.1`), as a TLS backend. The body is `x` repeated in the clear
//! and `t` over TLS, so a benchmark can check which of the two answered through a proxy.
//!
//! `fixed_body ADDR BYTES [CERT KEY]`

use std::convert::Infallible;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8090".into());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let tls = match (args.next(), args.next()) {
        (Some(cert), Some(key)) => Some(
            strata_core::tls::acceptor(cert.as_ref(), key.as_ref(), &[b"http/1.1"])
                .map_err(std::io::Error::other)?
                .0,
        ),
        _ => None,
    };
    let body = Bytes::from(vec![if tls.is_some() { b't' } else { b'x' }; size]);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(&addr).await?;
            loop {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_request| {
                        let mut response = Response::new(Full::new(body.clone()));
                        *response.status_mut() = StatusCode::OK;
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let http = http1::Builder::new();
                    match tls {
                        Some(tls) => {
                            if let Ok(secure) = tls.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(secure), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        })
}
