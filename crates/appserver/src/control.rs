//! The control channel between the master and a zygote: one JSON message per line over the
//! zygote's standard input, which is a Unix socket pair.
//!
//! The master first sends a [`ZygoteSpec`]; the zygote answers [`FromZygote::Ready`] once the
//! application is imported and warm (or [`FromZygote::Failed`] with the traceback), then forks
//! workers on [`ToZygote::Fork`] and reports the exit status of each worker it reaps.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::AppConfig;

/// Environment variable that makes a re-executed `strata` binary run as a zygote.
pub const ROLE_ENV: &str = "_STRATA_ROLE";

/// What the zygote needs to know, sent as the first line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZygoteSpec {
    /// Generation number, shown in process titles.
    pub generation: u32,
    /// The application settings.
    pub app: AppConfig,
    /// The master's Unix socket that workers connect to.
    pub socket: PathBuf,
    /// Log format and level, so zygote and workers log like the master.
    pub log: LogSpec,
}

/// How a child process logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogSpec {
    pub level: String,
    pub json: bool,
}

/// Master → zygote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToZygote {
    /// Fork a worker with this id.
    Fork { id: u32 },
    /// Stop forking and exit once the workers have exited.
    Quit,
}

/// Zygote → master.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromZygote {
    /// The application is imported and warm.
    Ready,
    /// The application could not be imported or warmed; the text says why.
    Failed { error: String },
    /// A worker was forked.
    Forked { id: u32, pid: u32 },
    /// A worker exited; `status` describes how (`exit code 0`, `killed by SIGSEGV`).
    Exited { pid: u32, status: String },
}

/// Encodes a message as one line.
pub fn to_line<T: Serialize>(message: &T) -> String {
    let mut line = serde_json::to_string(message).expect("control messages serialize");
    line.push('\n');
    line
}

/// Decodes one line.
pub fn from_line<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, serde_json::Error> {
    serde_json::from_str(line.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_lines() {
        let line = to_line(&ToZygote::Fork { id: 3 });
        assert_eq!(line, "{\"op\":\"fork\",\"id\":3}\n");
        assert_eq!(
            from_line::<ToZygote>(&line).unwrap(),
            ToZygote::Fork { id: 3 }
        );
        let failed = FromZygote::Failed {
            error: "Traceback\n  line\n".into(),
        };
        let line = to_line(&failed);
        assert_eq!(line.matches('\n').count(), 1, "one message per line");
        assert_eq!(from_line::<FromZygote>(&line).unwrap(), failed);
    }
}
