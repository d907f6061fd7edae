//! [`ChildProcess`]: the one harness for the child processes of tests and benchmarks.
//!
//! A child's stdout (and, unless told otherwise, its stderr) is read by two background
//! threads as it is written, so the child can never block on a full pipe, and kept: a
//! wait for a line is woken by the line itself, and every error quotes the tail of what
//! the child said. A child is killed and reaped when its [`ChildProcess`] is dropped, so a
//! test that panics leaks no process. Signals other than SIGKILL are sent with the `kill`
//! command, only to a child that has not been reaped yet (whose PID cannot have been
//! reused).
//!
//! Only std is used. Every wait is bounded by a deadline and polls the child's exit
//! status at most every few milliseconds; nothing sleeps hoping that something happened.

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Pause between two checks of whether the child exited.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long a child that exited may take to deliver the rest of its output.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines of each stream quoted in errors.
const TAIL_LINES: usize = 40;
/// The longest command line quoted in messages.
const NAME_LIMIT: usize = 120;

/// A signal [`ChildProcess::signal`] can send.
///
/// ```
/// use clouds_testkit::Signal;
///
/// assert_eq!(Signal::Term.name(), "TERM");
/// assert_eq!(Signal::Kill.to_string(), "SIGKILL");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Signal {
    /// SIGTERM: the polite request to stop (a graceful shutdown).
    Term,
    /// SIGINT: what Ctrl-C sends.
    Int,
    /// SIGKILL: the process dies at once, without a word.
    Kill,
}

impl Signal {
    /// The signal's name without the `SIG` prefix, as the `kill` command takes it.
    ///
    /// ```
    /// assert_eq!(clouds_testkit::Signal::Int.name(), "INT");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Int => "INT",
            Signal::Kill => "KILL",
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIG{}", self.name())
    }
}

/// How [`ChildProcess::spawn_with`] connects a child's stdin and stderr (stdout is always
/// captured).
///
/// The default: stdin is `/dev/null`, stderr is captured like stdout.
///
/// ```
/// use clouds_testkit::{ChildProcess, SpawnOptions};
/// use std::process::Command;
/// use std::time::Duration;
///
/// // `cat` echoes its stdin until the pipe closes.
/// let options = SpawnOptions { stdin_pipe: true, ..SpawnOptions::default() };
/// let mut cat = ChildProcess::spawn_with(&mut Command::new("cat"), options)?;
/// cat.close_stdin();
/// assert!(cat.wait(Duration::from_secs(10))?.success());
/// # Ok::<(), clouds_testkit::ChildError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpawnOptions {
    /// Give the child a pipe as its stdin, held open until [`ChildProcess::close_stdin`] or
    /// drop. A child that stops when its stdin closes then cannot outlive this process,
    /// even if this process is killed.
    pub stdin_pipe: bool,
    /// Let the child write its stderr straight to ours instead of capturing it.
    pub inherit_stderr: bool,
}

/// A child process whose output is captured, stopped (killed and reaped) on drop.
///
/// Start one with [`ChildProcess::spawn`], wait for it to say something with
/// [`ChildProcess::wait_for_line`], stop it with [`ChildProcess::terminate`] (SIGTERM, then
/// wait for the exit), [`ChildProcess::kill`] (SIGKILL) or [`ChildProcess::close_stdin`].
/// Every wait has a deadline; an error says what was awaited and quotes the tail of the
/// child's output. [`output_of`] runs a command to its end.
///
/// ```
/// use clouds_testkit::ChildProcess;
/// use std::process::Command;
/// use std::time::Duration;
///
/// let mut child = ChildProcess::spawn(
///     Command::new("sh").args(["-c", "echo starting; echo ready 42; exec sleep 60"]),
/// )?;
/// let line = child.wait_for_line("ready", Duration::from_secs(10))?;
/// assert_eq!(line, "ready 42");
/// let status = child.terminate(Duration::from_secs(10))?;
/// assert!(!status.success(), "ended by SIGTERM");
/// # Ok::<(), clouds_testkit::ChildError>(())
/// ```
pub struct ChildProcess {
    child: Child,
    name: String,
    pid: u32,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    /// Where in stdout the next [`ChildProcess::wait_for_line`] starts looking.
    cursor: usize,
    /// Set once the child has been reaped; from then on it gets no signal (its PID may be
    /// someone else's).
    status: Option<ExitStatus>,
}

/// Output of one stream so far.
#[derive(Debug, Default)]
struct Stream {
    bytes: Vec<u8>,
    /// Captured at all (stderr may be inherited instead).
    captured: bool,
    /// Not at end of file yet.
    open: bool,
}

impl Stream {
    fn captured() -> Stream {
        Stream {
            bytes: Vec::new(),
            captured: true,
            open: true,
        }
    }
}

#[derive(Debug, Default)]
struct Captured {
    stdout: Stream,
    stderr: Stream,
}

/// The captured output, shared with the threads reading the pipes; `changed` is notified
/// whenever output arrives or a pipe closes.
#[derive(Debug, Default)]
struct Shared {
    captured: Mutex<Captured>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Captured> {
        self.captured.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Stdout,
    Stderr,
}

impl Captured {
    fn stream(&mut self, which: Which) -> &mut Stream {
        match which {
            Which::Stdout => &mut self.stdout,
            Which::Stderr => &mut self.stderr,
        }
    }
}

impl ChildProcess {
    /// Starts `command` with stdin from `/dev/null` and stdout and stderr captured.
    ///
    /// Whatever stdio `command` was configured with is replaced; its program, arguments,
    /// environment and working directory are used as they are.
    ///
    /// ```
    /// use clouds_testkit::ChildProcess;
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let mut child = ChildProcess::spawn(Command::new("echo").arg("hello"))?;
    /// assert_eq!(child.wait_for_line("hello", Duration::from_secs(10))?, "hello");
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn spawn(command: &mut Command) -> Result<ChildProcess, ChildError> {
        ChildProcess::spawn_with(command, SpawnOptions::default())
    }

    /// Like [`ChildProcess::spawn`], with stdin and stderr connected as `options` says.
    ///
    /// ```
    /// use clouds_testkit::{ChildProcess, SpawnOptions};
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let options = SpawnOptions { inherit_stderr: true, ..SpawnOptions::default() };
    /// let mut child = ChildProcess::spawn_with(
    ///     Command::new("sh").args(["-c", "echo to-stdout; echo to-stderr >&2"]),
    ///     options,
    /// )?;
    /// child.wait(Duration::from_secs(10))?;
    /// assert_eq!(child.stderr(), "", "stderr went to ours");
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn spawn_with(
        command: &mut Command,
        options: SpawnOptions,
    ) -> Result<ChildProcess, ChildError> {
        let name = describe(command);
        command
            .stdin(if options.stdin_pipe {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(if options.inherit_stderr {
                Stdio::inherit()
            } else {
                Stdio::piped()
            });
        let mut child = command.spawn().map_err(|e| ChildError {
            name: name.clone(),
            pid: None,
            what: "starting it".into(),
            kind: ChildErrorKind::Spawn(e),
            output: String::new(),
        })?;
        let pid = child.id();
        let shared = Arc::new(Shared::default());
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let stdin = child.stdin.take();
        let process = ChildProcess {
            child,
            name,
            pid,
            stdin,
            shared,
            cursor: 0,
            status: None,
        };
        // From here on, dropping `process` kills and reaps the child.
        let pumps = [
            (
                Which::Stdout,
                stdout.map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
            (
                Which::Stderr,
                stderr.map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
        ];
        for (which, pipe) in pumps {
            let Some(pipe) = pipe else { continue };
            *process.shared.lock().stream(which) = Stream::captured();
            if let Err(e) = pump(pipe, Arc::clone(&process.shared), which, pid) {
                return Err(process.error("starting the threads reading its output", e.into()));
            }
        }
        Ok(process)
    }

    /// The command line the child was started with (shortened), as errors quote it.
    ///
    /// ```
    /// use clouds_testkit::ChildProcess;
    /// use std::process::Command;
    ///
    /// let child = ChildProcess::spawn(Command::new("sleep").arg("60"))?;
    /// assert_eq!(child.name(), "sleep 60");
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's process id.
    ///
    /// ```
    /// use clouds_testkit::ChildProcess;
    /// use std::process::Command;
    ///
    /// let child = ChildProcess::spawn(Command::new("sleep").arg("60"))?;
    /// assert!(child.pid() > 0);
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits up to `within` for the next line of stdout containing `marker` and returns it
    /// (without its line ending). Lines before it are skipped; the next call starts after
    /// it.
    ///
    /// Fails if the deadline passes, or if the child exits (or closes its stdout) without
    /// printing such a line; the error quotes the child's output.
    ///
    /// ```
    /// use clouds_testkit::{ChildErrorKind, ChildProcess};
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let mut child = ChildProcess::spawn(
    ///     Command::new("sh").args(["-c", "echo 'id node-1'; echo 'ready node-1'; exit 3"]),
    /// )?;
    /// let within = Duration::from_secs(10);
    /// assert_eq!(child.wait_for_line("ready", within)?, "ready node-1");
    /// // Only output after the last match counts, and the child ends without another one.
    /// let err = child.wait_for_line("node-1", within).unwrap_err();
    /// assert!(matches!(err.kind(), ChildErrorKind::Exited(status) if status.code() == Some(3)));
    /// assert!(err.to_string().contains("id node-1"), "the error quotes the output: {err}");
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn wait_for_line(&mut self, marker: &str, within: Duration) -> Result<String, ChildError> {
        let what = format!("waiting for a line containing {marker:?}");
        let deadline = Instant::now() + within;
        let shared = Arc::clone(&self.shared);
        // Once the child has exited: until when the rest of its output may still arrive.
        let mut drain_until: Option<Instant> = None;
        loop {
            {
                let captured = shared.lock();
                if let Some((line, end)) = find_line(&captured.stdout, self.cursor, marker) {
                    self.cursor = end;
                    return Ok(line);
                }
                let now = Instant::now();
                if !captured.stdout.open || drain_until.is_some_and(|until| now >= until) {
                    break;
                }
                if now >= deadline {
                    drop(captured);
                    return Err(self.error(&what, ChildErrorKind::TimedOut(within)));
                }
                let mut wait = deadline - now;
                match drain_until {
                    Some(until) => wait = wait.min(until - now),
                    None => wait = wait.min(POLL_INTERVAL * 5),
                }
                // Woken by new output; otherwise time to look at the exit status again.
                drop(shared.changed.wait_timeout(captured, wait));
            }
            if drain_until.is_none() && matches!(self.try_wait(), Ok(Some(_))) {
                drain_until = Some(Instant::now() + DRAIN_TIMEOUT);
            }
        }
        // The line can no longer come: say whether the child is gone, or only its stdout.
        let kind = match self.wait(DRAIN_TIMEOUT) {
            Ok(status) => ChildErrorKind::Exited(status),
            Err(_) => ChildErrorKind::OutputClosed,
        };
        Err(self.error(&what, kind))
    }

    /// Everything the child wrote to stdout so far (lossily decoded as UTF-8).
    ///
    /// ```
    /// use clouds_testkit::ChildProcess;
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let mut child = ChildProcess::spawn(Command::new("echo").arg("hi"))?;
    /// child.wait_for_line("hi", Duration::from_secs(10))?;
    /// assert_eq!(child.stdout(), "hi\n");
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock().stdout.bytes).into_owned()
    }

    /// Everything the child wrote to stderr so far; empty if its stderr was inherited
    /// ([`SpawnOptions::inherit_stderr`]).
    ///
    /// ```
    /// use clouds_testkit::ChildProcess;
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let mut child = ChildProcess::spawn(Command::new("sh").args(["-c", "echo oops >&2"]))?;
    /// child.wait(Duration::from_secs(10))?;
    /// assert_eq!(child.stderr(), "oops\n");
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock().stderr.bytes).into_owned()
    }

    /// The exit status if the child has exited (reaping it), `None` if it still runs.
    ///
    /// ```
    /// use clouds_testkit::ChildProcess;
    /// use std::process::Command;
    ///
    /// let mut child = ChildProcess::spawn(Command::new("sleep").arg("60"))?;
    /// assert_eq!(child.try_wait()?, None);
    /// child.kill()?;
    /// assert!(child.try_wait()?.is_some());
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ChildError> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        match self.child.try_wait() {
            Ok(status) => {
                self.status = status;
                Ok(status)
            }
            Err(e) => Err(self.error("checking whether it exited", ChildErrorKind::Io(e))),
        }
    }

    /// Waits up to `within` for the child to exit and returns how it ended; by then its
    /// output has been read to the end (unless a process it started keeps the pipes open,
    /// which is waited for two seconds at most). On timeout the child is left running
    /// (dropping it still kills it).
    ///
    /// ```
    /// use clouds_testkit::{ChildErrorKind, ChildProcess};
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let mut child = ChildProcess::spawn(Command::new("sleep").arg("60"))?;
    /// let err = child.wait(Duration::from_millis(50)).unwrap_err();
    /// assert!(matches!(err.kind(), ChildErrorKind::TimedOut(_)));
    ///
    /// let mut quick = ChildProcess::spawn(&mut Command::new("true"))?;
    /// assert!(quick.wait(Duration::from_secs(10))?.success());
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn wait(&mut self, within: Duration) -> Result<ExitStatus, ChildError> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait()? {
                self.drain(DRAIN_TIMEOUT);
                return Ok(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.error("waiting for it to exit", ChildErrorKind::TimedOut(within)));
            }
            thread::sleep(POLL_INTERVAL.min(deadline - now));
        }
    }

    /// Sends `signal` to the child. Fails with [`ChildErrorKind::Exited`] if the child has
    /// already exited: a reaped child's PID may belong to another process by now.
    ///
    /// SIGKILL is sent by std ([`Child::kill`]), the others with the `kill` command.
    ///
    /// ```
    /// use clouds_testkit::{ChildProcess, Signal};
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let mut child = ChildProcess::spawn(Command::new("sleep").arg("60"))?;
    /// child.signal(Signal::Int)?;
    /// let status = child.wait(Duration::from_secs(10))?;
    /// # #[cfg(unix)]
    /// assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(2));
    /// assert!(child.signal(Signal::Term).is_err(), "already gone");
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn signal(&mut self, signal: Signal) -> Result<(), ChildError> {
        let what = format!("sending {signal}");
        if let Some(status) = self.try_wait()? {
            return Err(self.error(&what, ChildErrorKind::Exited(status)));
        }
        // Not reaped (at worst a zombie), so the PID is still this child's.
        send_signal(&mut self.child, signal).map_err(|e| self.error(&what, ChildErrorKind::Io(e)))
    }

    /// Stops the child gracefully: SIGTERM, then waits up to `within` for it to exit. If it
    /// does not, it is killed and the error says so, quoting its output. Returns at once if
    /// the child has already exited.
    ///
    /// ```
    /// use clouds_testkit::ChildProcess;
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let mut child = ChildProcess::spawn(Command::new("sleep").arg("60"))?;
    /// let status = child.terminate(Duration::from_secs(10))?;
    /// # #[cfg(unix)]
    /// assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(15));
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn terminate(&mut self, within: Duration) -> Result<ExitStatus, ChildError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        match self.signal(Signal::Term) {
            Ok(()) => {}
            // It exited on its own in the meantime.
            Err(ChildError {
                kind: ChildErrorKind::Exited(status),
                ..
            }) => return Ok(status),
            Err(e) => return Err(e),
        }
        self.wait(within).map_err(|mut e| {
            let _ = self.kill();
            e.what = "waiting for it to exit after SIGTERM (so it was killed)".into();
            e
        })
    }

    /// Kills the child (SIGKILL) and reaps it; returns how it ended (which is how it exited
    /// if it had already). The child gets no chance to clean up.
    ///
    /// ```
    /// use clouds_testkit::ChildProcess;
    /// use std::process::Command;
    ///
    /// let mut child = ChildProcess::spawn(Command::new("sleep").arg("60"))?;
    /// let status = child.kill()?;
    /// assert!(!status.success());
    /// assert_eq!(child.kill()?, status, "killing again changes nothing");
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn kill(&mut self) -> Result<ExitStatus, ChildError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        if let Err(e) = self.child.kill() {
            // InvalidInput: it had exited already; the wait below reaps it.
            if e.kind() != io::ErrorKind::InvalidInput {
                return Err(self.error("killing it", ChildErrorKind::Io(e)));
            }
        }
        match self.child.wait() {
            Ok(status) => {
                self.status = Some(status);
                Ok(status)
            }
            Err(e) => Err(self.error("reaping it", ChildErrorKind::Io(e))),
        }
    }

    /// Closes the child's stdin pipe (see [`SpawnOptions::stdin_pipe`]); a child that reads
    /// its stdin sees the end of file. Does nothing if stdin was not a pipe or is closed.
    ///
    /// ```
    /// use clouds_testkit::{ChildProcess, SpawnOptions};
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let options = SpawnOptions { stdin_pipe: true, ..SpawnOptions::default() };
    /// let mut child = ChildProcess::spawn_with(
    ///     Command::new("sh").args(["-c", "echo waiting; read line; echo stdin closed"]),
    ///     options,
    /// )?;
    /// child.wait_for_line("waiting", Duration::from_secs(10))?;
    /// child.close_stdin();
    /// child.wait_for_line("stdin closed", Duration::from_secs(10))?;
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// Waits up to `within` for the child to exit, then returns its status and all its
    /// output. On timeout the child is killed and the error quotes its output.
    ///
    /// ```
    /// use clouds_testkit::ChildProcess;
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let child = ChildProcess::spawn(Command::new("sh").args(["-c", "echo out; exit 2"]))?;
    /// let output = child.finish(Duration::from_secs(10))?;
    /// assert_eq!(output.status.code(), Some(2));
    /// assert_eq!(output.stdout, b"out\n");
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn finish(mut self, within: Duration) -> Result<Output, ChildError> {
        let status = self.wait(within).inspect_err(|_| {
            let _ = self.kill();
        })?;
        let captured = self.shared.lock();
        Ok(Output {
            status,
            stdout: captured.stdout.bytes.clone(),
            stderr: captured.stderr.bytes.clone(),
        })
    }

    /// Waits up to `within` for the captured streams to reach end of file.
    fn drain(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut captured = self.shared.lock();
        while captured.stdout.open || captured.stderr.open {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            captured = match self.shared.changed.wait_timeout(captured, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// An error about this child, quoting its output.
    fn error(&self, what: &str, kind: ChildErrorKind) -> ChildError {
        ChildError {
            name: self.name.clone(),
            pid: Some(self.pid),
            what: what.to_owned(),
            kind,
            output: self.transcript(),
        }
    }

    /// The last lines of each captured stream.
    fn transcript(&self) -> String {
        let captured = self.shared.lock();
        let mut out = String::new();
        for (label, stream) in [("stdout", &captured.stdout), ("stderr", &captured.stderr)] {
            if !stream.captured {
                out.push_str(&format!("--- {label}: not captured (inherited) ---\n"));
                continue;
            }
            let text = String::from_utf8_lossy(&stream.bytes);
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                out.push_str(&format!("--- {label}: empty ---\n"));
                continue;
            }
            let tail = &lines[lines.len().saturating_sub(TAIL_LINES)..];
            out.push_str(&format!(
                "--- {label} (last {} of {} lines) ---\n",
                tail.len(),
                lines.len()
            ));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl fmt::Debug for ChildProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildProcess")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.close_stdin();
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `command` to its end (stdin from `/dev/null`, stdout and stderr captured) and
/// returns its status and output. If it has not exited within `within`, it is killed and
/// the error quotes what it wrote.
///
/// ```
/// use clouds_testkit::{output_of, ChildErrorKind};
/// use std::process::Command;
/// use std::time::Duration;
///
/// let output = output_of(Command::new("echo").arg("done"), Duration::from_secs(10))?;
/// assert!(output.status.success());
/// assert_eq!(output.stdout, b"done\n");
///
/// let err = output_of(
///     Command::new("sh").args(["-c", "echo about to hang; exec sleep 60"]),
///     Duration::from_millis(300),
/// )
/// .unwrap_err();
/// assert!(matches!(err.kind(), ChildErrorKind::TimedOut(_)));
/// assert!(err.output().contains("about to hang"));
/// # Ok::<(), clouds_testkit::ChildError>(())
/// ```
pub fn output_of(command: &mut Command, within: Duration) -> Result<Output, ChildError> {
    ChildProcess::spawn(command)?.finish(within)
}

/// What went wrong with a child process: what was being done, why it failed, and the
/// tail of the child's output.
///
/// Its `Debug` output is the same readable text as `Display`, so a test's
/// `.expect("...")` shows the child's output line by line.
///
/// ```
/// use clouds_testkit::{ChildErrorKind, ChildProcess};
/// use std::process::Command;
/// use std::time::Duration;
///
/// let mut child = ChildProcess::spawn(
///     Command::new("sh").args(["-c", "echo booting; exec sleep 60"]),
/// )?;
/// let err = child.wait_for_line("ready", Duration::from_millis(200)).unwrap_err();
/// assert!(matches!(err.kind(), ChildErrorKind::TimedOut(_)));
/// let message = err.to_string();
/// assert!(message.contains(r#"waiting for a line containing "ready""#), "{message}");
/// assert!(message.contains("booting"), "{message}");
/// # Ok::<(), clouds_testkit::ChildError>(())
/// ```
pub struct ChildError {
    name: String,
    pid: Option<u32>,
    what: String,
    kind: ChildErrorKind,
    output: String,
}

/// Why a [`ChildError`] happened.
///
/// ```
/// use clouds_testkit::{ChildErrorKind, ChildProcess};
/// use std::process::Command;
///
/// let err = ChildProcess::spawn(&mut Command::new("/nonexistent/program")).unwrap_err();
/// assert!(matches!(err.kind(), ChildErrorKind::Spawn(_)));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum ChildErrorKind {
    /// The child could not be started.
    Spawn(io::Error),
    /// Waiting for, signalling or reading from the child failed.
    Io(io::Error),
    /// The child exited (with this status) before what was awaited happened.
    Exited(ExitStatus),
    /// The child closed its stdout, without exiting, before printing the awaited line.
    OutputClosed,
    /// The deadline (this long) passed first.
    TimedOut(Duration),
}

impl ChildError {
    /// Why it failed.
    ///
    /// ```
    /// use clouds_testkit::{ChildErrorKind, ChildProcess};
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let mut child = ChildProcess::spawn(&mut Command::new("true"))?;
    /// let err = child.wait_for_line("never", Duration::from_secs(10)).unwrap_err();
    /// assert!(matches!(err.kind(), ChildErrorKind::Exited(status) if status.success()));
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn kind(&self) -> &ChildErrorKind {
        &self.kind
    }

    /// The tail of the child's stdout and stderr when the error happened.
    ///
    /// ```
    /// use clouds_testkit::ChildProcess;
    /// use std::process::Command;
    /// use std::time::Duration;
    ///
    /// let mut child = ChildProcess::spawn(Command::new("echo").arg("last words"))?;
    /// let err = child.wait_for_line("never", Duration::from_secs(10)).unwrap_err();
    /// assert!(err.output().contains("last words"));
    /// # Ok::<(), clouds_testkit::ChildError>(())
    /// ```
    pub fn output(&self) -> &str {
        &self.output
    }
}

impl fmt::Display for ChildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match self.pid {
            Some(pid) => format!("`{}` (pid {pid})", self.name),
            None => format!("`{}`", self.name),
        };
        let what = &self.what;
        match &self.kind {
            ChildErrorKind::Spawn(e) => write!(f, "cannot start `{}`: {e}", self.name)?,
            ChildErrorKind::Io(e) => write!(f, "{who}: {e}, while {what}")?,
            ChildErrorKind::Exited(status) => write!(f, "{who} ended ({status}) while {what}")?,
            ChildErrorKind::OutputClosed => write!(f, "{who} closed its stdout while {what}")?,
            ChildErrorKind::TimedOut(after) => write!(f, "{who}: still {what} after {after:?}")?,
        }
        if !self.output.is_empty() {
            write!(f, "\n{}", self.output.trim_end())?;
        }
        Ok(())
    }
}

/// The same text as `Display`, so that `.expect()` shows the child's output readably.
impl fmt::Debug for ChildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for ChildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ChildErrorKind::Spawn(e) | ChildErrorKind::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ChildErrorKind {
    fn from(e: io::Error) -> Self {
        ChildErrorKind::Io(e)
    }
}

/// Reads `pipe` into `shared` on a thread of its own until end of file.
fn pump(
    mut pipe: Box<dyn Read + Send>,
    shared: Arc<Shared>,
    which: Which,
    pid: u32,
) -> io::Result<()> {
    let name = match which {
        Which::Stdout => format!("child-{pid}-stdout"),
        Which::Stderr => format!("child-{pid}-stderr"),
    };
    thread::Builder::new().name(name).spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            shared
                .lock()
                .stream(which)
                .bytes
                .extend_from_slice(&buf[..n]);
            shared.changed.notify_all();
        }
        shared.lock().stream(which).open = false;
        shared.changed.notify_all();
    })?;
    Ok(())
}

/// The first line of `stream` from byte `from` on containing `marker`, and the offset just
/// after it. Only complete lines count, and a last line without a line ending once the
/// stream has ended.
fn find_line(stream: &Stream, from: usize, marker: &str) -> Option<(String, usize)> {
    let bytes = stream.bytes.get(from..)?;
    let mut start = 0;
    while start < bytes.len() {
        let (line, next) = match bytes[start..].iter().position(|&b| b == b'\n') {
            Some(len) => (&bytes[start..start + len], start + len + 1),
            None if !stream.open => (&bytes[start..], bytes.len()),
            None => return None,
        };
        let text = String::from_utf8_lossy(line);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        if text.contains(marker) {
            return Some((text.to_owned(), from + next));
        }
        start = next;
    }
    None
}

/// `program args...` of `command`, the program by its file name only, shortened.
fn describe(command: &Command) -> String {
    let program = command.get_program();
    let program = std::path::Path::new(program).file_name().unwrap_or(program);
    let mut name = lossy(program);
    for arg in command.get_args() {
        name.push(' ');
        name.push_str(&lossy(arg));
    }
    if name.chars().count() > NAME_LIMIT {
        name = name.chars().take(NAME_LIMIT - 3).collect::<String>() + "...";
    }
    name
}

fn lossy(s: &OsStr) -> String {
    s.to_string_lossy().into_owned()
}

#[cfg(unix)]
fn send_signal(child: &mut Child, signal: Signal) -> io::Result<()> {
    if signal == Signal::Kill {
        return child.kill();
    }
    let out = Command::new("kill")
        .args(["-s", signal.name(), &child.id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`kill -s {} {}` failed ({}): {}",
            signal.name(),
            child.id(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(not(unix))]
fn send_signal(child: &mut Child, signal: Signal) -> io::Result<()> {
    match signal {
        Signal::Kill => child.kill(),
        other => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{other} can only be sent on Unix"),
        )),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::path::Path;

    const WITHIN: Duration = Duration::from_secs(10);

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    fn alive(pid: u32) -> bool {
        // A reaped process has no /proc entry (a zombie would still have one).
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn lines_are_found_in_order_and_consumed() {
        let mut child =
            ChildProcess::spawn(&mut sh("printf 'a 1\\r\\nb 2\\nb 3\\n'")).expect("spawn");
        assert_eq!(child.wait_for_line("b", WITHIN).expect("b"), "b 2");
        assert_eq!(child.wait_for_line("b", WITHIN).expect("b"), "b 3");
        // "a 1" was skipped on the way to "b 2": consumed.
        let err = child.wait_for_line("a 1", WITHIN).expect_err("consumed");
        assert!(
            matches!(err.kind(), ChildErrorKind::Exited(s) if s.success()),
            "{err}"
        );
        // CRLF endings are stripped.
        let mut child = ChildProcess::spawn(&mut sh("printf 'a 1\\r\\n'")).expect("spawn");
        assert_eq!(child.wait_for_line("a", WITHIN).expect("a"), "a 1");
        let mut child = ChildProcess::spawn(&mut sh(
            "printf 'partial'; sleep 0.2; printf ' line\\n'; printf 'last'",
        ))
        .expect("spawn");
        // A line written in two pieces is matched whole, once complete.
        assert_eq!(
            child.wait_for_line("partial", WITHIN).expect("partial"),
            "partial line"
        );
        // A last line without a line ending counts once the stream has ended.
        assert_eq!(child.wait_for_line("last", WITHIN).expect("last"), "last");
        assert_eq!(child.stdout(), "partial line\nlast");
    }

    #[test]
    fn a_full_pipe_never_blocks_the_child() {
        // 2 MB of output before the marker: far more than a pipe buffer holds.
        let mut child = ChildProcess::spawn(&mut sh(
            "head -c 2000000 /dev/zero | tr '\\0' x; echo; echo done; exec sleep 60",
        ))
        .expect("spawn");
        assert_eq!(child.wait_for_line("done", WITHIN).expect("done"), "done");
        assert_eq!(child.stdout().len(), 2_000_000 + 1 + 5);
    }

    #[test]
    fn errors_say_what_was_awaited_and_quote_the_output() {
        let mut child =
            ChildProcess::spawn(&mut sh("echo out-1; echo err-1 >&2; exit 7")).expect("spawn");
        let err = child.wait_for_line("ready", WITHIN).expect_err("exits");
        assert!(
            matches!(err.kind(), ChildErrorKind::Exited(s) if s.code() == Some(7)),
            "{err}"
        );
        let text = format!("{err:?}");
        assert!(
            text.contains(r#"waiting for a line containing "ready""#),
            "{text}"
        );
        assert!(text.contains("ended (exit status: 7)"), "{text}");
        assert!(text.contains("out-1") && text.contains("err-1"), "{text}");
        assert!(text.contains(&format!("(pid {})", child.pid())), "{text}");

        let started = Instant::now();
        let mut slow = ChildProcess::spawn(&mut sh("echo booting; exec sleep 60")).expect("spawn");
        let err = slow
            .wait_for_line("ready", Duration::from_millis(300))
            .expect_err("times out");
        assert!(matches!(err.kind(), ChildErrorKind::TimedOut(_)), "{err}");
        assert!(started.elapsed() < WITHIN);
        assert!(err.output().contains("booting"), "{err}");
        assert!(
            err.to_string().contains("still waiting for a line"),
            "{err}"
        );
    }

    #[test]
    fn a_closed_stdout_ends_the_wait() {
        let mut child =
            ChildProcess::spawn(&mut sh("echo hi; exec >&-; exec sleep 60")).expect("spawn");
        let err = child.wait_for_line("never", WITHIN).expect_err("closed");
        assert!(matches!(err.kind(), ChildErrorKind::OutputClosed), "{err}");
        assert_eq!(child.try_wait().expect("status"), None, "still running");
    }

    #[test]
    fn terminate_kills_a_child_that_ignores_sigterm() {
        let mut child =
            ChildProcess::spawn(&mut sh("trap '' TERM; echo ready; exec sleep 60")).expect("spawn");
        child.wait_for_line("ready", WITHIN).expect("ready");
        let pid = child.pid();
        let err = child
            .terminate(Duration::from_millis(300))
            .expect_err("ignores SIGTERM");
        assert!(matches!(err.kind(), ChildErrorKind::TimedOut(_)), "{err}");
        assert!(err.to_string().contains("so it was killed"), "{err}");
        let status = child.try_wait().expect("status").expect("reaped");
        assert_eq!(status.signal(), Some(9));
        assert!(!alive(pid));
        // Gone: no signal can reach another process with a reused PID.
        let err = child.signal(Signal::Term).expect_err("exited");
        assert!(matches!(err.kind(), ChildErrorKind::Exited(_)), "{err}");
        assert_eq!(child.terminate(WITHIN).expect("already ended"), status);
    }

    #[test]
    fn stdin_pipe_closes_on_request() {
        let options = SpawnOptions {
            stdin_pipe: true,
            ..SpawnOptions::default()
        };
        let mut child = ChildProcess::spawn_with(&mut Command::new("cat"), options).expect("spawn");
        assert!(child.wait(Duration::from_millis(200)).is_err(), "cat waits");
        child.close_stdin();
        assert!(child.wait(WITHIN).expect("exits").success());
        // Without a pipe, stdin is /dev/null: cat ends at once.
        let output = output_of(&mut Command::new("cat"), WITHIN).expect("cat");
        assert!(output.status.success() && output.stdout.is_empty());
    }

    #[test]
    fn output_of_kills_on_timeout() {
        let err = output_of(
            &mut sh("echo $$; echo hanging; exec sleep 60"),
            Duration::from_millis(300),
        )
        .expect_err("hangs");
        assert!(matches!(err.kind(), ChildErrorKind::TimedOut(_)), "{err}");
        let pid: u32 = err
            .output()
            .lines()
            .find_map(|l| l.parse().ok())
            .expect("pid in the output");
        assert!(!alive(pid), "pid {pid} left running");
    }

    #[test]
    fn drop_kills_and_reaps() {
        let child = ChildProcess::spawn(Command::new("sleep").arg("60")).expect("spawn");
        let pid = child.pid();
        assert!(alive(pid));
        drop(child);
        assert!(!alive(pid), "pid {pid} alive");
    }

    #[test]
    fn a_panicking_test_leaks_no_child() {
        let (tx, rx) = std::sync::mpsc::channel();
        let result = thread::spawn(move || {
            let child = ChildProcess::spawn(Command::new("sleep").arg("60")).expect("spawn");
            tx.send(child.pid()).expect("send");
            panic!("deliberate panic while the child runs");
        })
        .join();
        assert!(result.is_err());
        let pid = rx.recv().expect("pid");
        assert!(!alive(pid), "pid {pid} alive");
    }

    #[test]
    fn spawn_errors_name_the_program() {
        let err = ChildProcess::spawn(&mut Command::new("/nonexistent/prog")).expect_err("spawn");
        assert!(matches!(err.kind(), ChildErrorKind::Spawn(_)), "{err}");
        assert!(err.to_string().starts_with("cannot start `prog`"), "{err}");
    }

    #[test]
    fn names_are_short() {
        let child = ChildProcess::spawn(Command::new("/bin/echo").args(["a", "b"])).expect("spawn");
        assert_eq!(child.name(), "echo a b");
        let long = "x".repeat(500);
        let child = ChildProcess::spawn(Command::new("echo").arg(&long)).expect("spawn");
        assert_eq!(child.name().chars().count(), NAME_LIMIT);
        assert!(child.name().ends_with("..."));
    }
}
