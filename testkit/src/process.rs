//! Processes a test starts and waits for: `certo agent` and `certo serve` print
//! `listening on URL` as their first line once they are ready.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A process that said where it listens; killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Listening {
    pub child: Child,
    /// The URL from its `listening on URL` line.
    pub url: String,
}

impl Listening {
    /// Starts `cmd` with stdout piped and waits up to `timeout` for its first line, which
    /// must be `listening on URL`. Panics with what it said (or that it exited) otherwise.
    pub fn spawn(cmd: &mut Command, timeout: Duration) -> Listening {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            // Keep reading so the process never blocks on a full pipe.
            let mut rest = String::new();
            while reader.read_line(&mut rest).is_ok_and(|n| n > 0) {
                rest.clear();
            }
        });
        let line = match rx.recv_timeout(timeout) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => {
                let _ = child.kill();
                panic!("reading the first line of {cmd:?}: {e}");
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd:?} did not say where it listens within {timeout:?}");
            }
        };
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            let status = child.try_wait().ok().flatten();
            let _ = child.kill();
            panic!("{cmd:?} said {line:?} instead of `listening on URL` (exit: {status:?})");
        };
        Listening {
            url: url.to_owned(),
            child,
        }
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.kill();
    }
}
