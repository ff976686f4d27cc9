//! The pooler benchmark's floor: a bare TCP relay that gives every client its own server
//! connection and copies bytes both ways on one thread, one receive and one send per
//! message, with no protocol parsing and no pooling. What it costs per transaction is the
//! least any pooler's data path can cost on the same machine.
//!
//! `relay LISTEN_ADDR SERVER_ADDR`

use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:6433".into());
    let server = args.next().unwrap_or_else(|| "127.0.0.1:5432".into());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(&listen).await?;
            loop {
                let (mut client, _) = listener.accept().await?;
                let server = server.clone();
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(&server).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        })
}
