//! Raw HTTP/1.1 over a plain TCP socket, for tests that must control every byte a client sends
//! (malformed requests, slow or abandoned clients) and see exactly how the server reacts: a
//! response, or a closed connection. Every read has a timeout, so no test can hang on a server that
//! says nothing.

#![allow(dead_code)] // each test binary uses part of the helper

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One response as it came off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased, values as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, or `None` if it is not JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `error.code` of a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        Some(self.json()?["error"]["code"].as_str()?.to_owned())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What the server did with the bytes it was sent.
#[derive(Debug)]
pub enum Answer {
    /// A complete response arrived.
    Response(RawResponse),
    /// The server closed (or reset) the connection without a complete response.
    Closed,
    /// Nothing conclusive arrived within the wait: the server is still holding the connection.
    Silent,
}

/// A raw client connection.
pub struct RawConn {
    stream: TcpStream,
    /// Bytes read but not yet consumed as a response.
    pending: Vec<u8>,
    /// The server closed its side (EOF or reset).
    closed: bool,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).expect("connecting to tallyd");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .expect("a write timeout");
        RawConn {
            stream,
            pending: Vec::new(),
            closed: false,
        }
    }

    /// Sends bytes. Returns false if the server had already closed or reset the connection, which
    /// is a legitimate reaction to a hostile request (e.g. a head too large to read).
    pub fn send(&mut self, bytes: &[u8]) -> bool {
        // Large writes go in pieces so that a server that answers early and closes is noticed
        // between pieces rather than as one opaque failure.
        for piece in bytes.chunks(64 * 1024) {
            if self.stream.write_all(piece).is_err() {
                return false;
            }
        }
        self.stream.flush().is_ok()
    }

    /// Sends bytes, giving up (false) if they cannot all be written within `wait`: the server has
    /// stopped reading.
    pub fn send_within(&mut self, bytes: &[u8], wait: Duration) -> bool {
        self.stream
            .set_write_timeout(Some(wait))
            .expect("a write timeout");
        let sent = self.stream.write_all(bytes).is_ok();
        self.stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .expect("a write timeout");
        sent
    }

    /// Half-closes the sending side (the client says "no more bytes").
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Waits up to `wait` for one complete final response (interim `1xx` responses such as
    /// `100 Continue` are skipped), or for the connection to close.
    pub fn read_answer(&mut self, wait: Duration) -> Answer {
        let until = Instant::now() + wait;
        loop {
            match self.take_response() {
                Some(response) if response.status >= 200 => return Answer::Response(response),
                Some(_interim) => continue,
                None => {}
            }
            if self.closed {
                return Answer::Closed;
            }
            if !self.fill(until) {
                return Answer::Silent;
            }
        }
    }

    /// Waits up to `wait` for the server to close the connection, discarding anything it sends.
    /// Returns whether it closed.
    pub fn wait_closed(&mut self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        while !self.closed {
            if !self.fill(until) {
                return false;
            }
        }
        true
    }

    /// Whether the server has sent nothing and not closed, checked without waiting long.
    pub fn still_open_and_silent(&mut self) -> bool {
        !self.fill(Instant::now() + Duration::from_millis(1)) && !self.closed && self.pending.is_empty()
    }

    /// Reads once, waiting at most until `until`. Returns false on timeout; true when bytes
    /// arrived or the connection closed.
    fn fill(&mut self, until: Instant) -> bool {
        if self.closed {
            return true;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        self.stream.set_read_timeout(Some(left)).expect("a read timeout");
        let mut buffer = [0u8; 16 * 1024];
        match self.stream.read(&mut buffer) {
            Ok(0) => {
                self.closed = true;
                true
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buffer[..n]);
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            Err(e) if e.kind() == ErrorKind::Interrupted => true,
            Err(_) => {
                // A reset: the server dropped the connection.
                self.closed = true;
                true
            }
        }
    }

    /// Parses one complete response off the front of `pending`, if there is one. tallyd's and
    /// hyper's responses always carry a `Content-Length`.
    fn take_response(&mut self) -> Option<RawResponse> {
        let head_end = find(&self.pending, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&self.pending[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next()?;
        let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let body_start = head_end + 4;
        if self.pending.len() < body_start + length {
            return None;
        }
        let body = self.pending[body_start..body_start + length].to_vec();
        self.pending.drain(..body_start + length);
        Some(RawResponse {
            status,
            headers,
            body,
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A request with the given method, path, extra header lines and body, with a correct
/// `Content-Length` (when `body` is `Some`) and `Connection: close` left to the caller.
pub fn request(method: &str, path: &str, headers: &[&str], body: Option<&[u8]>) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: tallyd\r\n").into_bytes();
    for header in headers {
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(body) = body {
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
    } else {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A `POST /transaction` with a JSON content type and the given body.
pub fn post_json(body: &[u8]) -> Vec<u8> {
    request(
        "POST",
        "/transaction",
        &["content-type: application/json"],
        Some(body),
    )
}
