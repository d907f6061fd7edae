//! The raw RESP2 client behind [`RedisServer::command`](crate::RedisServer::command) and
//! [`ping`]: [`RespValue`], a minimal blocking connection, encoding and decoding.
//!
//! Deliberately minimal, for poking Redis from tests, not for production traffic.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::TestkitError;

/// A RESP2 reply, as returned by [`RedisServer::command`](crate::RedisServer::command).
///
/// `Display` renders it as text: bulk strings lossily as UTF-8, nils as
/// `(nil)`, errors as `(error) ...` and arrays as `[a, b, c]`.
///
/// ```
/// use clouds_testkit::RespValue;
///
/// let reply = RespValue::Array(Some(vec![
///     RespValue::Bulk(Some(b"a".to_vec())),
///     RespValue::Integer(2),
///     RespValue::Bulk(None),
/// ]));
/// assert_eq!(reply.to_string(), "[a, 2, (nil)]");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespValue {
    /// `+OK` style status reply.
    Simple(String),
    /// `-ERR ...` error reply (without the leading `-`).
    Error(String),
    /// `:42` integer reply.
    Integer(i64),
    /// `$n` bulk string; `None` is the nil bulk string (`$-1`).
    Bulk(Option<Vec<u8>>),
    /// `*n` array; `None` is the nil array (`*-1`).
    Array(Option<Vec<RespValue>>),
}

impl RespValue {
    /// The reply as an integer: an integer reply, or a status/bulk string that parses as one.
    ///
    /// ```
    /// use clouds_testkit::RespValue;
    ///
    /// assert_eq!(RespValue::Integer(3).as_int(), Some(3));
    /// assert_eq!(RespValue::Bulk(Some(b"-7".to_vec())).as_int(), Some(-7));
    /// assert_eq!(RespValue::Bulk(None).as_int(), None);
    /// ```
    pub fn as_int(&self) -> Option<i64> {
        match self {
            RespValue::Integer(n) => Some(*n),
            RespValue::Simple(_) | RespValue::Bulk(Some(_)) => self.as_text()?.trim().parse().ok(),
            _ => None,
        }
    }

    /// The reply as text: a status reply, a (lossily decoded) bulk string, or an integer.
    /// `None` for nils, errors and arrays.
    ///
    /// ```
    /// use clouds_testkit::RespValue;
    ///
    /// assert_eq!(RespValue::Simple("OK".into()).as_text().as_deref(), Some("OK"));
    /// assert_eq!(RespValue::Integer(5).as_text().as_deref(), Some("5"));
    /// assert_eq!(RespValue::Error("ERR no".into()).as_text(), None);
    /// ```
    pub fn as_text(&self) -> Option<String> {
        match self {
            RespValue::Simple(s) => Some(s.clone()),
            RespValue::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            RespValue::Integer(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// The raw bytes of a non-nil bulk string (or of a status reply).
    ///
    /// ```
    /// use clouds_testkit::RespValue;
    ///
    /// assert_eq!(RespValue::Bulk(Some(vec![0, 255])).as_bytes(), Some(&[0u8, 255][..]));
    /// assert_eq!(RespValue::Bulk(None).as_bytes(), None);
    /// ```
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            RespValue::Simple(s) => Some(s.as_bytes()),
            RespValue::Bulk(Some(b)) => Some(b),
            _ => None,
        }
    }

    /// An array of scalars as strings (see [`RespValue::as_text`]); `None` if this is
    /// not a non-nil array or an element is a nil, an error or a nested array.
    ///
    /// ```
    /// use clouds_testkit::RespValue;
    ///
    /// let reply = RespValue::Array(Some(vec![
    ///     RespValue::Bulk(Some(b"a".to_vec())),
    ///     RespValue::Bulk(Some(b"b".to_vec())),
    /// ]));
    /// assert_eq!(reply.as_str_vec(), Some(vec!["a".to_string(), "b".to_string()]));
    /// assert_eq!(RespValue::Array(None).as_str_vec(), None);
    /// ```
    pub fn as_str_vec(&self) -> Option<Vec<String>> {
        match self {
            RespValue::Array(Some(items)) => items.iter().map(RespValue::as_text).collect(),
            _ => None,
        }
    }

    /// True for the nil bulk string and the nil array.
    ///
    /// ```
    /// use clouds_testkit::RespValue;
    ///
    /// assert!(RespValue::Bulk(None).is_nil());
    /// assert!(!RespValue::Bulk(Some(Vec::new())).is_nil());
    /// ```
    pub fn is_nil(&self) -> bool {
        matches!(self, RespValue::Bulk(None) | RespValue::Array(None))
    }

    /// True for an error reply.
    ///
    /// ```
    /// use clouds_testkit::RespValue;
    ///
    /// assert!(RespValue::Error("ERR unknown command".into()).is_error());
    /// assert!(!RespValue::Simple("OK".into()).is_error());
    /// ```
    pub fn is_error(&self) -> bool {
        matches!(self, RespValue::Error(_))
    }
}

impl fmt::Display for RespValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespValue::Simple(s) => f.write_str(s),
            RespValue::Error(e) => write!(f, "(error) {e}"),
            RespValue::Integer(n) => write!(f, "{n}"),
            RespValue::Bulk(Some(b)) => f.write_str(&String::from_utf8_lossy(b)),
            RespValue::Bulk(None) | RespValue::Array(None) => f.write_str("(nil)"),
            RespValue::Array(Some(items)) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// True if a Redis server at `addr` (`host:port`) answers PING within `timeout`.
///
/// Makes a single attempt (connect, `PING`, read the reply) bounded by
/// `timeout`; loop yourself to wait for a server to come up. A `+PONG` counts,
/// and so does `-NOAUTH` (the server is up but wants a password).
///
/// ```
/// use std::time::Duration;
///
/// let server = clouds_testkit::RedisServer::start()?;
/// assert!(clouds_testkit::ping(&format!("127.0.0.1:{}", server.port()), Duration::from_secs(1)));
/// # Ok::<(), clouds_testkit::TestkitError>(())
/// ```
pub fn ping(addr: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let Ok(addrs) = addr.to_socket_addrs() else {
        return false;
    };
    for addr in addrs {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return false;
        }
        let Ok(mut conn) = Connection::open(&addr, remaining) else {
            continue;
        };
        return match conn.call(&[b"PING"]) {
            Ok(RespValue::Simple(s)) => s == "PONG",
            Ok(RespValue::Error(e)) => e.starts_with("NOAUTH"),
            _ => false,
        };
    }
    false
}

/// A minimal blocking RESP2 connection, in plaintext or over TLS.
pub(crate) struct Connection {
    stream: BufReader<Stream>,
}

/// The byte stream under a [`Connection`].
enum Stream {
    Plain(TcpStream),
    /// rustls over TCP; the handshake runs on the first write or read, under the socket's
    /// timeouts.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

impl Connection {
    pub(crate) fn open(addr: &SocketAddr, timeout: Duration) -> io::Result<Connection> {
        Connection::open_with(addr, timeout, None)
    }

    /// A connection to `addr`, over TLS with `tls` when given: the client configuration and
    /// the DNS name to check the server's certificate against (`None`: `addr`'s IP address).
    pub(crate) fn open_with(
        addr: &SocketAddr,
        timeout: Duration,
        tls: Option<(&Arc<rustls::ClientConfig>, Option<&str>)>,
    ) -> io::Result<Connection> {
        let stream = TcpStream::connect_timeout(addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let stream = match tls {
            None => Stream::Plain(stream),
            Some((config, name)) => {
                let name = match name {
                    Some(name) => rustls::pki_types::ServerName::try_from(name.to_owned())
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                    None => rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
                };
                let conn = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(io::Error::other)?;
                Stream::Tls(Box::new(rustls::StreamOwned::new(conn, stream)))
            }
        };
        Ok(Connection {
            stream: BufReader::new(stream),
        })
    }

    pub(crate) fn call(&mut self, args: &[&[u8]]) -> Result<RespValue, TestkitError> {
        let stream = self.stream.get_mut();
        stream.write_all(&encode_command(args))?;
        stream.flush()?;
        read_value(&mut self.stream)
    }
}

/// Encodes a command as a RESP2 array of bulk strings.
fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut buf = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        buf.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        buf.extend_from_slice(arg);
        buf.extend_from_slice(b"\r\n");
    }
    buf
}

/// Reads one RESP2 value.
fn read_value<R: BufRead>(reader: &mut R) -> Result<RespValue, TestkitError> {
    let line = read_line(reader)?;
    let Some((&kind, rest)) = line.split_first() else {
        return Err(TestkitError::Protocol("empty reply line".into()));
    };
    let text = || String::from_utf8_lossy(rest).into_owned();
    match kind {
        b'+' => Ok(RespValue::Simple(text())),
        b'-' => Ok(RespValue::Error(text())),
        b':' => Ok(RespValue::Integer(parse_int(rest)?)),
        b'$' => {
            let Ok(len) = usize::try_from(parse_int(rest)?) else {
                return Ok(RespValue::Bulk(None));
            };
            let mut data = vec![0; len + 2];
            reader.read_exact(&mut data)?;
            if !data.ends_with(b"\r\n") {
                return Err(TestkitError::Protocol(
                    "bulk string not terminated by CRLF".into(),
                ));
            }
            data.truncate(len);
            Ok(RespValue::Bulk(Some(data)))
        }
        b'*' => {
            let Ok(len) = usize::try_from(parse_int(rest)?) else {
                return Ok(RespValue::Array(None));
            };
            let mut items = Vec::with_capacity(len.min(1024));
            for _ in 0..len {
                items.push(read_value(reader)?);
            }
            Ok(RespValue::Array(Some(items)))
        }
        other => Err(TestkitError::Protocol(format!(
            "unsupported reply type byte {:?}",
            char::from(other)
        ))),
    }
}

/// Reads a CRLF-terminated line, without the CRLF.
fn read_line<R: BufRead>(reader: &mut R) -> Result<Vec<u8>, TestkitError> {
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed by redis-server",
        )
        .into());
    }
    if !line.ends_with(b"\r\n") {
        return Err(TestkitError::Protocol(format!(
            "line not terminated by CRLF: {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn parse_int(bytes: &[u8]) -> Result<i64, TestkitError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            TestkitError::Protocol(format!(
                "invalid integer {:?}",
                String::from_utf8_lossy(bytes)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(bytes: &[u8]) -> Result<RespValue, TestkitError> {
        read_value(&mut Cursor::new(bytes))
    }

    #[test]
    fn ping_nothing_listening() {
        let port = crate::server::free_port().expect("free port");
        assert!(!ping(
            &format!("127.0.0.1:{port}"),
            Duration::from_millis(300)
        ));
        assert!(!ping("not an address", Duration::from_millis(300)));
    }

    #[test]
    fn resp_encoding() {
        assert_eq!(
            encode_command(&[b"SET", b"k", b""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn resp_decoding() {
        assert_eq!(
            parse(b"+OK\r\n").expect("simple"),
            RespValue::Simple("OK".into())
        );
        assert_eq!(
            parse(b"-ERR bad\r\n").expect("error"),
            RespValue::Error("ERR bad".into())
        );
        assert_eq!(parse(b":-12\r\n").expect("int"), RespValue::Integer(-12));
        assert_eq!(parse(b"$-1\r\n").expect("nil"), RespValue::Bulk(None));
        assert_eq!(parse(b"*-1\r\n").expect("nil"), RespValue::Array(None));
        assert_eq!(
            parse(b"$4\r\na\r\nb\r\n").expect("bulk with CRLF inside"),
            RespValue::Bulk(Some(b"a\r\nb".to_vec()))
        );
        let nested = parse(b"*3\r\n:1\r\n*2\r\n$1\r\nx\r\n$-1\r\n*0\r\n\r\n").expect("nested");
        assert_eq!(
            nested,
            RespValue::Array(Some(vec![
                RespValue::Integer(1),
                RespValue::Array(Some(vec![
                    RespValue::Bulk(Some(b"x".to_vec())),
                    RespValue::Bulk(None)
                ])),
                RespValue::Array(Some(vec![])),
            ]))
        );
        assert_eq!(nested.to_string(), "[1, [x, (nil)], []]");
        assert_eq!(nested.as_str_vec(), None);

        assert!(matches!(parse(b"%1\r\n"), Err(TestkitError::Protocol(_))));
        assert!(matches!(parse(b":x\r\n"), Err(TestkitError::Protocol(_))));
        assert!(matches!(parse(b"+OK\n"), Err(TestkitError::Protocol(_))));
        assert!(matches!(
            parse(b"$3\r\nabcd\r\n"),
            Err(TestkitError::Protocol(_))
        ));
        assert!(matches!(parse(b""), Err(TestkitError::Io(_))));
        assert!(matches!(parse(b"$5\r\nab"), Err(TestkitError::Io(_))));
    }
}
