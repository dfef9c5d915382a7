//! A minimal HTTP/1.1 client over a plain TCP stream: one request per
//! connection, chunked bodies decoded. Used by `sollol bench --url` and the
//! server tests; not a general client (no TLS, no keep-alive).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends a request and reads the whole response. Panics on I/O errors: for
/// tests and benchmarks against a server that must be there.
pub fn request(addr: &str, method: &str, path: &str, body: Option<&str>, extra: &[(&str, &str)]) -> Reply {
    try_request(addr, method, path, body, extra).expect("HTTP request")
}

/// [`request`] for callers that report a missing server as an error.
pub fn try_request(addr: &str, method: &str, path: &str, body: Option<&str>, extra: &[(&str, &str)]) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    // A server may answer and close before the whole body is sent (413 on
    // a body past its limit): the answer is still there to read.
    let sent = write_request(&mut s, addr, method, path, body, extra);
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    if raw.is_empty() {
        sent?;
        read?;
    }
    if !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"));
    }
    Ok(parse(&raw))
}

/// Writes a request; the caller reads the response as it arrives.
pub fn send_head(s: &mut TcpStream, addr: &str, method: &str, path: &str, body: Option<&str>, extra: &[(&str, &str)]) {
    write_request(s, addr, method, path, body, extra).expect("send an HTTP request");
}

fn write_request(
    s: &mut TcpStream,
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    extra: &[(&str, &str)],
) -> std::io::Result<()> {
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())?;
    s.write_all(body.as_bytes())
}

pub fn get(addr: &str, path: &str) -> Reply {
    request(addr, "GET", path, None, &[])
}

pub fn post(addr: &str, path: &str, body: &str) -> Reply {
    request(addr, "POST", path, Some(body), &[])
}

fn parse(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))).collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Reply { status, headers, body: String::from_utf8_lossy(&body).to_string() }
}

/// Chunked transfer decoding; a body cut short keeps what arrived whole.
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        let Some(chunk) = b.get(eol + 2..eol + 2 + size).filter(|_| size > 0) else {
            break;
        };
        out.extend_from_slice(chunk);
        b = b.get(eol + 2 + size + 2..).unwrap_or_default();
    }
    out
}
