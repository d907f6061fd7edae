//! [`RedisServer`]: launching a private `redis-server` on a free loopback port, stopping
//! and restarting it, and finding the binary ([`redis_server_path`]).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::TestkitError;
use crate::process::ChildProcess;
use crate::resp::{Connection, RespValue};

/// How long `start`/`restart` wait for the new server to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits for a graceful exit before killing.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect/read/write timeout of [`RedisServer::command`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect/read/write timeout of one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between two readiness (or exit) polls.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How many free ports `start` tries before giving up.
const PORT_ATTEMPTS: u32 = 5;
/// Redis' own log file inside the server directory.
const LOG_FILE: &str = "redis.log";
/// Lines of the log file and of each output stream quoted in errors.
const LOG_TAIL_LINES: usize = 30;

const INSTALL_HINT: &str = "install it with `apt-get install redis-server` (Debian/Ubuntu) \
     or `brew install redis` (macOS), or set REDIS_SERVER to the path of a redis-server binary";

/// A `redis-server` child process on a free loopback port, stopped (killed and reaped) on drop.
///
/// The server runs with `--save "" --appendonly no` in a fresh temporary
/// directory (removed on drop) that also holds its log. The process is a [`ChildProcess`]:
/// its output is captured and, with the log, quoted in start-up errors.
///
/// ```
/// use clouds_testkit::{ping, RedisServer};
/// use std::time::Duration;
///
/// let server = RedisServer::start()?;
/// let addr = format!("127.0.0.1:{}", server.port());
/// assert!(ping(&addr, Duration::from_secs(1)));
/// drop(server); // kills and reaps the process
/// assert!(!ping(&addr, Duration::from_millis(200)));
/// # Ok::<(), clouds_testkit::TestkitError>(())
/// ```
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
    password: Option<String>,
    /// A configuration file given before every other argument (Sentinel needs one it can
    /// rewrite).
    config_file: Option<PathBuf>,
    /// Serves TLS only (`--port 0 --tls-port <port>`): the helpers' connections use this
    /// client configuration (the server's CA, and its certificate as the client's when
    /// clients must show one).
    tls: Option<TlsClient>,
    child: Option<ChildProcess>,
}

/// How the helpers speak TLS to a TLS-only server.
struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    /// The name to check the server's certificate against (`None`: its IP address).
    server_name: Option<String>,
}

// By hand: rustls' configuration would list the client certificate's signing key.
impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The PEM files of a TLS server ([`RedisServer::start_tls`]).
///
/// ```
/// let files = clouds_testkit::TlsFiles::new("server.pem", "server.key", "ca.pem")
///     .require_client_certs(true);
/// assert!(files.require_client_certs);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TlsFiles {
    /// The server's certificate (chain).
    pub cert: PathBuf,
    /// The server certificate's private key.
    pub key: PathBuf,
    /// The CA certificate(s) that client certificates are checked against (Redis requires
    /// one even when clients are not asked for certificates); also what the testkit's own
    /// connections, and the nodes of a TLS cluster or Sentinel deployment between themselves,
    /// check the server certificate against.
    pub ca: PathBuf,
    /// Whether clients must show a certificate signed by `ca` (`--tls-auth-clients yes`;
    /// `no` otherwise).
    pub require_client_certs: bool,
    /// The name the testkit's own connections check the server certificate against; `None`
    /// (the default) checks it against the IP address 127.0.0.1.
    pub server_name: Option<String>,
}

impl TlsFiles {
    /// The files, with client certificates not required.
    ///
    /// ```
    /// let files = clouds_testkit::TlsFiles::new("server.pem", "server.key", "ca.pem");
    /// assert!(!files.require_client_certs);
    /// ```
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, ca: impl Into<PathBuf>) -> Self {
        TlsFiles {
            cert: cert.into(),
            key: key.into(),
            ca: ca.into(),
            require_client_certs: false,
            server_name: None,
        }
    }

    /// Sets the DNS name the testkit's own connections check the server certificate against,
    /// for a certificate that does not name 127.0.0.1.
    ///
    /// ```
    /// let files = clouds_testkit::TlsFiles::new("s.pem", "s.key", "ca.pem").server_name("localhost");
    /// assert_eq!(files.server_name.as_deref(), Some("localhost"));
    /// ```
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Sets whether clients must show a certificate (mutual TLS).
    ///
    /// ```
    /// let files = clouds_testkit::TlsFiles::new("s.pem", "s.key", "ca.pem").require_client_certs(true);
    /// assert!(files.require_client_certs);
    /// ```
    pub fn require_client_certs(mut self, required: bool) -> Self {
        self.require_client_certs = required;
        self
    }
}

/// Why one launch attempt failed.
enum LaunchError {
    /// The port was taken by someone else; worth retrying on another port.
    PortTaken(TestkitError),
    /// Anything else.
    Fatal(TestkitError),
}

impl From<io::Error> for LaunchError {
    fn from(e: io::Error) -> Self {
        LaunchError::Fatal(e.into())
    }
}

impl RedisServer {
    /// Starts `redis-server` on 127.0.0.1 on a free port with no persistence and
    /// waits (up to ~10 s) until it answers PING.
    ///
    /// ```
    /// let server = clouds_testkit::RedisServer::start()?;
    /// assert!(server.port() > 0);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn start() -> Result<RedisServer, TestkitError> {
        RedisServer::start_with(&[])
    }

    /// Like [`RedisServer::start`], with extra `redis-server` command-line arguments
    /// appended after the defaults (e.g. `["--requirepass", "secret"]`).
    ///
    /// The arguments must not change `--port`, `--bind`, `--dir`, `--logfile` or
    /// `--daemonize`. If they contain `--requirepass PASSWORD`, the helpers of this
    /// type (readiness checks, [`RedisServer::command`], [`RedisServer::stop`])
    /// authenticate with it; client URLs from [`RedisServer::url`] do not include it.
    ///
    /// ```
    /// use clouds_testkit::RedisServer;
    ///
    /// let server = RedisServer::start_with(&["--requirepass", "secret"])?;
    /// let reply = server.command(&["CONFIG", "GET", "requirepass"])?;
    /// assert_eq!(reply.as_str_vec(), Some(vec!["requirepass".into(), "secret".into()]));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn start_with(args: &[&str]) -> Result<RedisServer, TestkitError> {
        RedisServer::unstarted(args)?.start_on_free_port()
    }

    /// Launches the (unstarted) server on a free port, trying another one if it was taken.
    pub(crate) fn start_on_free_port(mut self) -> Result<RedisServer, TestkitError> {
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            self.port = free_port()?;
            match self.launch() {
                Ok(()) => return Ok(self),
                Err(LaunchError::PortTaken(err)) => {
                    last_log = match err {
                        TestkitError::Exited { log, .. } => log,
                        other => other.to_string(),
                    }
                }
                Err(LaunchError::Fatal(err)) => return Err(err),
            }
        }
        Err(TestkitError::NoFreePort {
            attempts: PORT_ATTEMPTS,
            log: last_log,
        })
    }

    /// Starts `redis-server` serving TLS only (`--port 0 --tls-port <free port>`) with the
    /// certificate, key and CA of `files`, and waits (up to ~10 s) until it answers `INFO`
    /// over TLS (or, when clients must show a certificate the helpers cannot show, until its
    /// log says it is ready and the port accepts connections). [`RedisServer::url`] is then a
    /// `rediss://` URL.
    ///
    /// The helpers ([`RedisServer::command`], [`RedisServer::command_as`]) speak TLS to it,
    /// trusting `files.ca` and checking the certificate for 127.0.0.1 (so the server
    /// certificate needs that IP address among its names, unless
    /// [another name is set](TlsFiles::server_name)), and, when
    /// [client certificates are required](TlsFiles::require_client_certs), showing the server's
    /// own certificate (which must then allow client authentication too). Stopping it kills
    /// it (no `SHUTDOWN`).
    ///
    /// ```no_run
    /// use clouds_testkit::{RedisServer, TlsFiles};
    ///
    /// let server = RedisServer::start_tls(&TlsFiles::new("server.pem", "server.key", "ca.pem"))?;
    /// assert!(server.url().starts_with("rediss://127.0.0.1:"));
    /// assert_eq!(server.command(&["PING"])?.as_text().as_deref(), Some("PONG"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn start_tls(files: &TlsFiles) -> Result<RedisServer, TestkitError> {
        RedisServer::unstarted_tls(files, &[])?.start_on_free_port()
    }

    /// Like [`RedisServer::unstarted`], serving TLS only with `files`; `args` come after the
    /// TLS ones.
    pub(crate) fn unstarted_tls(
        files: &TlsFiles,
        args: &[&str],
    ) -> Result<RedisServer, TestkitError> {
        let mut all: Vec<String> = tls_args(files);
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut server = RedisServer::unstarted(&all)?;
        server.tls = Some(TlsClient {
            config: client_config(files)?,
            server_name: files.server_name.clone(),
        });
        Ok(server)
    }

    /// The TCP port the server listens on (kept across [`RedisServer::stop`] and
    /// [`RedisServer::restart`]).
    ///
    /// ```
    /// let server = clouds_testkit::RedisServer::start()?;
    /// assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` for a [TLS server](RedisServer::start_tls)),
    /// without a database number.
    ///
    /// ```
    /// let server = clouds_testkit::RedisServer::start()?;
    /// assert!(server.url().starts_with("redis://127.0.0.1:"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT/DB`, selecting database `db`.
    ///
    /// ```
    /// let server = clouds_testkit::RedisServer::start()?;
    /// assert_eq!(server.url_db(3), format!("{}/3", server.url()));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn url_db(&self, db: u8) -> String {
        format!("{}/{db}", self.url())
    }

    /// The process id of the running server, or `None` after [`RedisServer::stop`].
    ///
    /// ```
    /// let mut server = clouds_testkit::RedisServer::start()?;
    /// assert!(server.pid().is_some());
    /// server.stop();
    /// assert_eq!(server.pid(), None);
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildProcess::pid)
    }

    /// Stops the server, keeping its port number so it can be [restarted](RedisServer::restart).
    ///
    /// Sends `SHUTDOWN NOSAVE` and waits up to 5 s for the process to exit; only
    /// if that fails is it killed. The process is always reaped. Does nothing if
    /// the server is already stopped.
    ///
    /// ```
    /// use clouds_testkit::{ping, RedisServer};
    /// use std::time::Duration;
    ///
    /// let mut server = RedisServer::start()?;
    /// server.stop();
    /// assert!(!ping(&format!("127.0.0.1:{}", server.port()), Duration::from_millis(200)));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.tls.is_none() && matches!(child.try_wait(), Ok(None)) {
            // A successful SHUTDOWN closes the connection without a reply, so the
            // result is irrelevant: we only look at whether the process exits.
            let _ = self
                .connect(STOP_TIMEOUT)
                .and_then(|mut conn| conn.call(&[b"SHUTDOWN", b"NOSAVE"]));
            if child.wait(STOP_TIMEOUT).is_err() {
                let _ = child.kill();
            }
        }
        // Reaps it, killing it first only if it is still running.
        let _ = child.kill();
    }

    /// Starts the server again on the same port (stopping it first if it is
    /// running) and waits until it answers PING. The data is gone: there is no
    /// persistence.
    ///
    /// ```
    /// let mut server = clouds_testkit::RedisServer::start()?;
    /// let port = server.port();
    /// server.stop();
    /// server.restart()?;
    /// assert_eq!(server.port(), port);
    /// assert_eq!(server.command(&["PING"])?.as_text().as_deref(), Some("PONG"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        match self.launch() {
            Ok(()) => Ok(()),
            Err(LaunchError::PortTaken(err) | LaunchError::Fatal(err)) => Err(err),
        }
    }

    /// Runs one command on a fresh raw RESP2 connection and returns the reply.
    ///
    /// Redis error replies come back as `Ok(RespValue::Error(..))`; `Err` means
    /// the server could not be reached or answered garbage. Each call uses its
    /// own connection (authenticated if `--requirepass` was given), with 10 s
    /// connect/read/write timeouts, so blocking commands must block for less.
    ///
    /// ```
    /// let server = clouds_testkit::RedisServer::start()?;
    /// server.command(&["ZADD", "z", "1", "a", "2", "b"])?;
    /// let members = server.command(&["ZRANGE", "z", "0", "-1"])?;
    /// assert_eq!(members.as_str_vec(), Some(vec!["a".into(), "b".into()]));
    /// assert_eq!(server.command(&["PUBLISH", "chan", "hi"])?.as_int(), Some(0));
    /// assert!(server.command(&["NO-SUCH-COMMAND"])?.is_error());
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn command(&self, args: &[&str]) -> Result<RespValue, TestkitError> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.command_bytes(&args)
    }

    /// Runs one command as the ACL user `user`: a fresh connection sends
    /// `AUTH user password`, then `args`. A refused `AUTH` is [`TestkitError::Auth`]; a
    /// command the user may not run comes back as a `NOPERM` [`RespValue::Error`].
    ///
    /// ```
    /// let server = clouds_testkit::RedisServer::start()?;
    /// server.command(&["ACL", "SETUSER", "reader", "on", ">pw", "~r:*", "+get"])?;
    /// assert!(!server.command_as("reader", "pw", &["GET", "r:1"])?.is_error());
    /// let denied = server.command_as("reader", "pw", &["SET", "r:1", "x"])?;
    /// assert!(matches!(&denied, clouds_testkit::RespValue::Error(e) if e.starts_with("NOPERM")));
    /// assert!(server.command_as("reader", "wrong", &["PING"]).is_err());
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn command_as(
        &self,
        user: &str,
        password: &str,
        args: &[&str],
    ) -> Result<RespValue, TestkitError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut conn = Connection::open_with(&addr, COMMAND_TIMEOUT, self.tls_settings())?;
        if let RespValue::Error(e) = conn.call(&[b"AUTH", user.as_bytes(), password.as_bytes()])? {
            return Err(TestkitError::Auth(e));
        }
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        conn.call(&args)
    }

    /// Like [`RedisServer::command`], with binary arguments.
    ///
    /// ```
    /// let server = clouds_testkit::RedisServer::start()?;
    /// let payload: &[u8] = &[0, 159, 146, 150, b'\r', b'\n'];
    /// server.command_bytes(&[b"SET", b"k", payload])?;
    /// assert_eq!(server.command_bytes(&[b"GET", b"k"])?.as_bytes(), Some(payload));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn command_bytes(&self, args: &[&[u8]]) -> Result<RespValue, TestkitError> {
        self.connect(COMMAND_TIMEOUT)?.call(args)
    }

    /// A server that is not running yet, with its directory created, for callers that
    /// choose the port themselves ([`RedisCluster`](crate::RedisCluster): its nodes need a
    /// free cluster bus port too). Start it with [`RedisServer::launch_on`].
    pub(crate) fn unstarted(args: &[&str]) -> Result<RedisServer, TestkitError> {
        let binary = redis_server_path()?;
        let dir = create_temp_dir()?;
        // From here on, dropping the server cleans up the directory (and any child).
        Ok(RedisServer {
            binary,
            port: 0,
            dir,
            extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
            password: find_password(args),
            config_file: None,
            tls: None,
            child: None,
        })
    }

    /// Appends `redis-server` arguments for the next launches (e.g. ones naming a file in
    /// [`RedisServer::dir`]).
    pub(crate) fn push_args<I, S>(&mut self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
    }

    /// Names a configuration file to give `redis-server` first, before every argument.
    pub(crate) fn set_config_file(&mut self, path: PathBuf) {
        self.config_file = Some(path);
    }

    /// The server's temporary directory (removed on drop).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the (stopped) server on `port` and waits until it answers PING. A port taken
    /// by someone else shows as an error for which [`port_taken`] is true.
    pub(crate) fn launch_on(&mut self, port: u16) -> Result<(), TestkitError> {
        self.stop();
        self.port = port;
        match self.launch() {
            Ok(()) => Ok(()),
            Err(LaunchError::PortTaken(err) | LaunchError::Fatal(err)) => Err(err),
        }
    }

    /// Kills the server at once (SIGKILL, no SHUTDOWN: nothing is saved or said) and reaps
    /// it, keeping its port and directory so it can be [restarted](RedisServer::restart).
    /// Does nothing if it is already stopped.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
        }
    }

    /// Spawns the child on `self.port` and waits until it answers.
    fn launch(&mut self) -> Result<(), LaunchError> {
        // A fresh log file per launch, so an error quotes only this attempt.
        let _ = fs::remove_file(self.dir.join(LOG_FILE));
        let mut command = Command::new(&self.binary);
        if let Some(config_file) = &self.config_file {
            command.arg(config_file);
        }
        if self.tls.is_some() {
            command.args(["--port", "0", "--tls-port"]);
        } else {
            command.arg("--port");
        }
        command
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "yes"])
            .args(["--daemonize", "no", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join(LOG_FILE))
            .args(&self.extra_args);
        // Early errors (bad arguments) go to its stderr, which the child process captures.
        let child = ChildProcess::spawn(&mut command).map_err(|e| LaunchError::Fatal(e.into()))?;
        let pid = child.pid();
        self.child = Some(child);

        let started = Instant::now();
        loop {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait().map_err(|e| LaunchError::Fatal(e.into()))?,
                None => None,
            };
            if let Some(status) = exited {
                // All it said, now that its pipes have closed.
                let output = self.child.take().map(|child| child.finish(Duration::ZERO));
                let (stdout, stderr) = match output {
                    Some(Ok(output)) => (
                        String::from_utf8_lossy(&output.stdout).into_owned(),
                        String::from_utf8_lossy(&output.stderr).into_owned(),
                    ),
                    _ => (String::new(), String::new()),
                };
                let err = TestkitError::Exited {
                    port: self.port,
                    status,
                    log: self.log_tail_with(&stdout, &stderr),
                };
                return Err(if port_taken(&err) {
                    LaunchError::PortTaken(err)
                } else {
                    LaunchError::Fatal(err)
                });
            }
            if self.probe(pid) {
                return Ok(());
            }
            if started.elapsed() >= READY_TIMEOUT {
                let log = self.log_tail();
                // Kill rather than stop(): the server is not answering anyway.
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                }
                return Err(LaunchError::Fatal(TestkitError::NotReady {
                    port: self.port,
                    waited: started.elapsed(),
                    log,
                }));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// True once *our* process (not whoever else might hold the port) answers.
    fn probe(&self, pid: u32) -> bool {
        if self.tls.is_some() {
            // Our process (alive, checked by the caller) says it is ready in its own log and
            // the port takes connections: enough when the helpers cannot get through the
            // handshake (a client certificate they cannot show). Sentinel logs no such line.
            let log = fs::read(self.dir.join(LOG_FILE)).unwrap_or_default();
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
            if String::from_utf8_lossy(&log).contains("Ready to accept connections")
                && std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok()
            {
                return true;
            }
        }
        let Ok(mut conn) = self.connect(PROBE_TIMEOUT) else {
            return false;
        };
        match conn.call(&[b"INFO", b"server"]) {
            Ok(RespValue::Bulk(Some(info))) => info_pid(&info) == Some(pid),
            // INFO renamed away: fall back to PING (the caller checked the child is alive).
            Ok(RespValue::Error(e)) if !e.starts_with("LOADING") => {
                matches!(conn.call(&[b"PING"]), Ok(RespValue::Simple(s)) if s == "PONG")
            }
            _ => false,
        }
    }

    /// Runs several commands, in order, on one fresh connection (as
    /// [`RedisServer::command`] does one), for commands whose effect is the connection's.
    pub(crate) fn commands(&self, commands: &[&[&str]]) -> Result<Vec<RespValue>, TestkitError> {
        let mut conn = self.connect(COMMAND_TIMEOUT)?;
        commands
            .iter()
            .map(|args| {
                let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
                conn.call(&args)
            })
            .collect()
    }

    /// The helpers' TLS settings: the client configuration and the name to check.
    fn tls_settings(&self) -> Option<(&Arc<rustls::ClientConfig>, Option<&str>)> {
        self.tls
            .as_ref()
            .map(|tls| (&tls.config, tls.server_name.as_deref()))
    }

    /// Opens an (authenticated) connection to the server.
    fn connect(&self, timeout: Duration) -> Result<Connection, TestkitError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut conn = Connection::open_with(&addr, timeout, self.tls_settings())?;
        if let Some(password) = &self.password
            && let RespValue::Error(e) = conn.call(&[b"AUTH", password.as_bytes()])?
        {
            return Err(TestkitError::Auth(e));
        }
        Ok(conn)
    }

    /// Everything in Redis' log file since the server was last (re)started: a test can look
    /// for what Redis did on its own, such as closing a client over its output buffer limit.
    ///
    /// ```
    /// let server = clouds_testkit::RedisServer::start()?;
    /// assert!(server.log().contains("Ready to accept connections"));
    /// # Ok::<(), clouds_testkit::TestkitError>(())
    /// ```
    pub fn log(&self) -> String {
        let log = fs::read(self.dir.join(LOG_FILE)).unwrap_or_default();
        String::from_utf8_lossy(&log).into_owned()
    }

    /// The last lines of the running child's output and of Redis' log file.
    pub(crate) fn log_tail(&self) -> String {
        match &self.child {
            Some(child) => self.log_tail_with(&child.stdout(), &child.stderr()),
            None => self.log_tail_with("", ""),
        }
    }

    /// The last lines of `stdout`, `stderr` and Redis' log file.
    fn log_tail_with(&self, stdout: &str, stderr: &str) -> String {
        let log = fs::read(self.dir.join(LOG_FILE)).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        let mut out = String::new();
        for (name, text) in [
            ("redis-server stdout", stdout),
            ("redis-server stderr", stderr),
            (LOG_FILE, &log),
        ] {
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                continue;
            }
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            out.push_str(&format!("--- {name} (last {} lines) ---\n", tail.len()));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        if out.is_empty() {
            out.push_str("(redis-server wrote no output)\n");
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Killed and reaped before its directory goes.
        drop(self.child.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Finds the `redis-server` binary: `$REDIS_SERVER` if set (and non-empty),
/// otherwise `redis-server` on `PATH`.
///
/// The error explains how to install it (`apt-get install redis-server` on
/// Debian/Ubuntu, `brew install redis` on macOS).
///
/// ```
/// let path = clouds_testkit::redis_server_path()?;
/// assert!(path.is_file());
/// # Ok::<(), clouds_testkit::TestkitError>(())
/// ```
pub fn redis_server_path() -> Result<PathBuf, TestkitError> {
    find_redis_server(std::env::var_os("REDIS_SERVER"), std::env::var_os("PATH"))
}

/// [`redis_server_path`] with the environment passed in (testable without `set_var`).
fn find_redis_server(
    env_override: Option<OsString>,
    path_var: Option<OsString>,
) -> Result<PathBuf, TestkitError> {
    if let Some(explicit) = env_override.filter(|v| !v.is_empty()) {
        let path = PathBuf::from(explicit);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(TestkitError::NotInstalled(format!(
                "REDIS_SERVER is set to {}, which is not an executable file; {INSTALL_HINT}",
                path.display()
            )))
        };
    }
    path_var
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            TestkitError::NotInstalled(format!(
                "redis-server was not found on PATH; {INSTALL_HINT}"
            ))
        })
}

#[cfg(unix)]
pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
pub(crate) fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// The `redis-server` arguments serving TLS with `files` (the port arguments aside).
pub(crate) fn tls_args(files: &TlsFiles) -> Vec<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let auth = if files.require_client_certs {
        "yes"
    } else {
        "no"
    };
    [
        "--tls-cert-file".to_owned(),
        path(&files.cert),
        "--tls-key-file".to_owned(),
        path(&files.key),
        "--tls-ca-cert-file".to_owned(),
        path(&files.ca),
        "--tls-auth-clients".to_owned(),
        auth.to_owned(),
    ]
    .into()
}

/// The helpers' TLS client configuration for a server started with `files`: trusting
/// `files.ca`, and showing `files.cert` when client certificates are required.
fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TestkitError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        TestkitError::Tls(format!("{what} {}: {e}", path.display()))
    };
    let certs = |path: &Path, what: &str| -> Result<Vec<CertificateDer<'static>>, TestkitError> {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(what, path, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(what, path, &e))?;
        if certs.is_empty() {
            return Err(bad(what, path, &"no PEM CERTIFICATE block"));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(&files.ca, "the CA certificate file")? {
        roots
            .add(cert)
            .map_err(|e| bad("the CA certificate file", &files.ca, &e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TestkitError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = if files.require_client_certs {
        let chain = certs(&files.cert, "the certificate file")?;
        // The key's bytes never go into an error: only its path and what was wrong.
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|_| bad("the key file", &files.key, &"no usable PEM private key"))?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad("the certificate file", &files.cert, &e))?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The value following the last `--requirepass` argument.
fn find_password(args: &[&str]) -> Option<String> {
    args.windows(2)
        .rev()
        .find(|pair| pair[0] == "--requirepass")
        .map(|pair| pair[1].to_owned())
        .filter(|p| !p.is_empty())
}

/// Asks the OS for a currently free loopback port.
pub(crate) fn free_port() -> io::Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()
        .map(|a| a.port())
}

/// Creates a fresh, uniquely named directory under the system temp directory.
fn create_temp_dir() -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last_err = None;
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!(
            "clouds-testkit-redis-{}-{nanos}-{n}",
            std::process::id()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("could not create a temp directory")))
}

/// Whether an early exit was caused by the port being taken.
pub(crate) fn port_taken(err: &TestkitError) -> bool {
    matches!(err, TestkitError::Exited { log, .. }
        if log.contains("Address already in use") || log.contains("Failed listening on port"))
}

/// The `process_id:` field of an `INFO server` reply.
fn info_pid(info: &[u8]) -> Option<u32> {
    String::from_utf8_lossy(info)
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ping;

    fn addr(server: &RedisServer) -> String {
        format!("127.0.0.1:{}", server.port())
    }

    #[test]
    fn start_ping_set_get() {
        let server = RedisServer::start().expect("start redis-server");
        assert!(ping(&addr(&server), Duration::from_secs(1)));
        assert_eq!(
            server.command(&["SET", "k", "v"]).expect("SET"),
            RespValue::Simple("OK".into())
        );
        assert_eq!(
            server.command(&["GET", "k"]).expect("GET"),
            RespValue::Bulk(Some(b"v".to_vec()))
        );
        assert!(server.command(&["GET", "missing"]).expect("GET").is_nil());
        assert_eq!(
            server.command(&["INCR", "n"]).expect("INCR").as_int(),
            Some(1)
        );
        assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
        assert_eq!(
            server.url_db(15),
            format!("redis://127.0.0.1:{}/15", server.port())
        );
    }

    #[test]
    fn persistence_is_off() {
        let server = RedisServer::start().expect("start redis-server");
        let save = server.command(&["CONFIG", "GET", "save"]).expect("CONFIG");
        assert_eq!(save.as_str_vec(), Some(vec!["save".into(), String::new()]));
        let aof = server
            .command(&["CONFIG", "GET", "appendonly"])
            .expect("CONFIG");
        assert_eq!(
            aof.as_str_vec(),
            Some(vec!["appendonly".into(), "no".into()])
        );
        let dir = server.command(&["CONFIG", "GET", "dir"]).expect("CONFIG");
        let dir = dir.as_str_vec().expect("array");
        assert_eq!(
            fs::canonicalize(&dir[1]).expect("dir exists"),
            fs::canonicalize(&server.dir).expect("dir exists")
        );
    }

    #[test]
    fn command_replies() {
        let server = RedisServer::start().expect("start redis-server");
        server
            .command(&["ZADD", "z", "2", "b", "1", "a"])
            .expect("ZADD");
        let range = server.command(&["ZRANGE", "z", "0", "-1"]).expect("ZRANGE");
        assert_eq!(range.as_str_vec(), Some(vec!["a".into(), "b".into()]));
        assert_eq!(
            server.command(&["PUBLISH", "chan", "x"]).expect("PUBLISH"),
            RespValue::Integer(0)
        );
        let killed = server
            .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .expect("CLIENT KILL");
        assert_eq!(killed.as_int(), Some(0));
        let err = server.command(&["NO-SUCH-COMMAND"]).expect("reply");
        assert!(err.is_error(), "{err}");
        let payload: &[u8] = &[0, 1, 255, b'\r', b'\n', b'$'];
        server
            .command_bytes(&[b"SET", b"bin", payload])
            .expect("SET");
        let got = server.command_bytes(&[b"GET", b"bin"]).expect("GET");
        assert_eq!(got.as_bytes(), Some(payload));
    }

    #[test]
    fn stop_and_restart_on_same_port() {
        let mut server = RedisServer::start().expect("start redis-server");
        let port = server.port();
        let first_pid = server.pid().expect("running");
        server.command(&["SET", "k", "v"]).expect("SET");

        server.stop();
        assert_eq!(server.pid(), None);
        // Graceful: SHUTDOWN NOSAVE, not SIGKILL.
        let log = server.log_tail();
        assert!(log.contains("ready to exit"), "{log}");
        assert!(!ping(&addr(&server), Duration::from_millis(300)));
        assert!(server.command(&["PING"]).is_err());
        server.stop(); // idempotent

        server.restart().expect("restart");
        assert_eq!(server.port(), port);
        assert_ne!(server.pid(), Some(first_pid));
        assert!(ping(&addr(&server), Duration::from_secs(1)));
        assert!(server.command(&["GET", "k"]).expect("GET").is_nil());

        // Restarting a running server stops it first.
        server.restart().expect("second restart");
        assert_eq!(server.port(), port);
        assert!(ping(&addr(&server), Duration::from_secs(1)));
    }

    #[test]
    fn restart_reports_a_taken_port() {
        let mut server = RedisServer::start().expect("start redis-server");
        server.stop();
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, server.port())).expect("bind");
        let err = server.restart().expect_err("port is taken");
        assert!(port_taken(&err), "{err}");
        assert_eq!(server.pid(), None);
        drop(squatter);
        server.restart().expect("restart once the port is free");
        assert!(ping(&addr(&server), Duration::from_secs(1)));
    }

    #[test]
    fn drop_kills_and_cleans_up() {
        let server = RedisServer::start().expect("start redis-server");
        let pid = server.pid().expect("running");
        let address = addr(&server);
        let dir = server.dir.clone();
        assert!(dir.is_dir());
        drop(server);
        assert!(!ping(&address, Duration::from_millis(300)));
        assert!(!dir.exists(), "temp dir {} left behind", dir.display());
        if cfg!(target_os = "linux") {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "pid {pid} alive"
            );
        }
    }

    #[test]
    fn panicking_test_does_not_leak_the_server() {
        let (tx, rx) = std::sync::mpsc::channel();
        let result = thread::spawn(move || {
            let server = RedisServer::start().expect("start redis-server");
            tx.send((server.pid().expect("running"), addr(&server)))
                .expect("send");
            panic!("deliberate panic while the server is running");
        })
        .join();
        assert!(result.is_err());
        let (pid, address) = rx.recv().expect("server info");
        assert!(!ping(&address, Duration::from_millis(300)));
        if cfg!(target_os = "linux") {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "pid {pid} alive"
            );
        }
    }

    #[test]
    fn requirepass_is_used_by_helpers() {
        let mut server =
            RedisServer::start_with(&["--requirepass", "s3cret"]).expect("start redis-server");
        // The raw ping() is not authenticated but still sees a live server.
        assert!(ping(&addr(&server), Duration::from_secs(1)));
        assert_eq!(
            server.command(&["PING"]).expect("PING"),
            RespValue::Simple("PONG".into())
        );
        server.restart().expect("restart");
        assert_eq!(
            server.command(&["PING"]).expect("PING"),
            RespValue::Simple("PONG".into())
        );
    }

    #[test]
    fn bad_arguments_fail_fast_with_log() {
        let started = Instant::now();
        let err =
            RedisServer::start_with(&["--definitely-not-an-option", "1"]).expect_err("must fail");
        assert!(started.elapsed() < READY_TIMEOUT);
        match &err {
            TestkitError::Exited { log, .. } => {
                assert!(log.contains("definitely-not-an-option"), "{log}");
            }
            other => panic!("unexpected error: {other}"),
        }
        assert!(err.to_string().contains("exited before answering PING"));
    }

    #[test]
    fn finds_binary() {
        let real = redis_server_path().expect("redis-server installed");
        let dir = real.parent().expect("has a parent").as_os_str().to_owned();
        assert_eq!(
            find_redis_server(None, Some(dir.clone())).expect("found on PATH"),
            real
        );
        assert_eq!(
            find_redis_server(Some(real.clone().into()), None).expect("explicit"),
            real
        );
        // An empty REDIS_SERVER is ignored.
        assert!(find_redis_server(Some(OsString::new()), Some(dir)).is_ok());

        let missing = find_redis_server(None, Some(OsString::new())).expect_err("missing");
        let msg = missing.to_string();
        assert!(msg.contains("apt-get install redis-server"), "{msg}");
        assert!(msg.contains("brew install redis"), "{msg}");
        let bad = find_redis_server(Some("/nonexistent/redis-server".into()), None)
            .expect_err("bad override");
        assert!(matches!(bad, TestkitError::NotInstalled(_)));
        assert!(bad.to_string().contains("REDIS_SERVER"));
    }

    #[test]
    fn password_parsing() {
        assert_eq!(find_password(&[]), None);
        assert_eq!(
            find_password(&["--requirepass", "a", "--requirepass", "b"]),
            Some("b".into())
        );
        assert_eq!(find_password(&["--maxmemory", "1mb"]), None);
    }
}
