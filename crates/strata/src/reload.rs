//! `strata reload`: asks a running node's admin listener for a new generation and reports
//! the outcome. A plain HTTP/1.1 exchange over a blocking socket; no runtime needed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;

/// Sends `POST /reload` and waits for the answer (which comes once the rollout is done).
pub fn request(admin: SocketAddr, token: Option<&str>) -> std::io::Result<ExitCode> {
    let mut stream = TcpStream::connect(admin)?;
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "POST /reload HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\n{authorization}Connection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split(' ').nth(1).unwrap_or("");
    let body = body.trim();
    let parsed: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    if status == "200" {
        println!(
            "reloaded: generation {} serves every request",
            parsed["generation"]
        );
        return Ok(ExitCode::SUCCESS);
    }
    match parsed["error"].as_str() {
        Some(error) => eprintln!("reload failed; the running generation keeps serving:\n{error}"),
        None => eprintln!("reload failed: HTTP {status}: {body}"),
    }
    Ok(ExitCode::from(1))
}
