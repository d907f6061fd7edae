//! Child processes of the bench: the binary re-executed in another role.
//!
//! The processes themselves are run by the testkit's harness, [`ChildProcess`] (the one the
//! tests use too): it captures their stdout, waits for a line with a deadline, and kills and
//! reaps them on drop. What is left here is the bench's protocol on top: a child reports on
//! stdout (`ready ...` once it serves, or one result line), writes progress and errors to
//! our stderr, and stops when its stdin closes, so it cannot outlive the parent even if the
//! parent is killed.
//!
//! The harness blocks while it waits; the waits here run in `block_in_place`, which needs the
//! multi-threaded runtime `main` builds.

use std::process::Command;
use std::time::{Duration, Instant};

use clouds_testkit::{ChildProcess, SpawnOptions};
use tokio::io::AsyncReadExt;

/// How long a child may take to say it is ready (a child that measures says how long it may
/// take itself: [`Proc::expect_within`]).
const STARTUP: Duration = Duration::from_secs(30);
/// How long a child may take to stop once its stdin is closed, before it is killed.
const GRACE: Duration = Duration::from_secs(10);

/// One child process: this binary in another role.
pub(crate) struct Proc {
    child: ChildProcess,
}

impl Proc {
    /// Starts this binary with `args`, its stdin a pipe (closed to stop it), its stdout
    /// captured and its stderr ours.
    pub(crate) fn spawn(args: &[String]) -> Result<Proc, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
        let options = SpawnOptions {
            stdin_pipe: true,
            inherit_stderr: true,
        };
        let child = ChildProcess::spawn_with(Command::new(exe).args(args), options)
            .map_err(|e| e.to_string())?;
        Ok(Proc { child })
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
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::task::block_in_place(|| self.child.wait_for_line(prefix, left))
                .map_err(|e| e.to_string())?;
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.trim().to_string());
            }
        }
    }

    /// Closes stdin (the child's signal to stop), waits for it to exit, kills it if it does
    /// not within the grace period, and always reaps it.
    pub(crate) async fn stop(mut self) {
        self.child.close_stdin();
        self.reap();
    }

    /// Waits for a child whose stdin is closed to exit; kills it after [`GRACE`].
    fn reap(&mut self) {
        let name = self.child.name().to_string();
        match tokio::task::block_in_place(|| self.child.wait(GRACE)) {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("`{name}` exited with {status}"),
            Err(e) => {
                eprintln!("{e}\n`{name}` did not stop within {GRACE:?}; killing it");
                let _ = self.child.kill();
            }
        }
    }
}

/// Stops every child, all at once: every stdin is closed before any is waited for.
pub(crate) async fn stop_all(mut procs: Vec<Proc>) {
    for proc in &mut procs {
        proc.child.close_stdin();
    }
    for mut proc in procs {
        proc.reap();
    }
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
