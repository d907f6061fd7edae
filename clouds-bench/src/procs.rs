//! Child processes of the bench: the binary re-executed in another role.
//!
//! A child reports on stdout (`ready ...` once it serves, or one result line) and stops when
//! its stdin closes, so it cannot outlive the parent even if the parent is killed.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// How long a child may take to say it is ready (a child that measures says how long it may
/// take itself: [`Proc::expect_within`]).
const STARTUP: Duration = Duration::from_secs(30);
/// How long a child may take to stop once its stdin is closed, before it is killed.
const GRACE: Duration = Duration::from_secs(10);

/// One child process with its stdout read line by line.
pub(crate) struct Proc {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    what: String,
}

impl Proc {
    /// Starts this binary with `args`.
    pub(crate) fn spawn(args: &[String]) -> Result<Proc, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
        let what = args.join(" ");
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // The fallback if this value is dropped without `stop` (a panic): no leaked child.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start `{what}`: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| format!("`{what}` has no stdout"))?;
        Ok(Proc {
            child,
            lines: BufReader::new(stdout).lines(),
            what,
        })
    }

    /// The next line starting with `prefix` (other lines are skipped), without the prefix,
    /// within [`STARTUP`].
    pub(crate) async fn expect(&mut self, prefix: &str) -> Result<String, String> {
        self.expect_within(prefix, STARTUP).await
    }

    /// [`Proc::expect`], waiting at most `limit`.
    pub(crate) async fn expect_within(
        &mut self,
        prefix: &str,
        limit: Duration,
    ) -> Result<String, String> {
        let wait = async {
            loop {
                match self.lines.next_line().await {
                    Ok(Some(line)) => {
                        if let Some(rest) = line.strip_prefix(prefix) {
                            return Ok(rest.trim().to_string());
                        }
                    }
                    Ok(None) => return Err(format!("`{}` exited early", self.what)),
                    Err(e) => return Err(format!("reading from `{}`: {e}", self.what)),
                }
            }
        };
        tokio::time::timeout(limit, wait)
            .await
            .map_err(|_| format!("`{}` said nothing within {limit:?}", self.what))?
    }

    /// Closes stdin (the child's signal to stop), waits for it to exit, kills it if it does
    /// not within the grace period, and always reaps it.
    pub(crate) async fn stop(mut self) {
        drop(self.child.stdin.take());
        match tokio::time::timeout(GRACE, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => eprintln!("`{}` exited with {status}", self.what),
            Ok(Err(e)) => eprintln!("waiting for `{}`: {e}", self.what),
            Err(_) => {
                eprintln!("`{}` did not stop within {GRACE:?}; killing it", self.what);
                let _ = self.child.kill().await;
            }
        }
    }
}

/// Stops every child, all at once.
pub(crate) async fn stop_all(procs: Vec<Proc>) {
    futures_util::future::join_all(procs.into_iter().map(Proc::stop)).await;
}

/// In a child: resolves when the parent closes our stdin (or dies).
pub(crate) async fn parent_gone() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
