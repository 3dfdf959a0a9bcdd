//! A minimal blocking HTTPS client for the lab's own calls to the API stand-in (status, apply,
//! pods): one request per connection, JSON in and out, as the lab's administrator (the CA and
//! the admin token the supervisor wrote to the lab's directory).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// How long a call to the API stand-in may take.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);

/// A call to the API stand-in failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the lab's API credentials ({what}): is the lab up? (`kwire-lab status`)")]
    Credentials { what: String },
    #[error("cannot reach the API stand-in at {addr} (is the lab's supervisor running? see `kwire-lab status`)")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path} on the API stand-in failed: {detail}")]
    Protocol {
        method: String,
        path: String,
        detail: String,
    },
    #[error("{method} {path} on the API stand-in answered {status}: {body}")]
    Status {
        method: String,
        path: String,
        status: u16,
        body: String,
    },
}

/// The host part of `https://HOST:PORT`.
pub fn addr_of_url(url: &str) -> Option<SocketAddr> {
    url.strip_prefix("https://")?
        .trim_end_matches('/')
        .parse()
        .ok()
}

/// File in a lab's directory with the API's CA certificate.
pub const CA_FILE: &str = "ca.crt";
/// File in a lab's directory with the admin token (0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Where and how the lab reaches its API.
#[derive(Clone)]
pub struct ApiAccess {
    pub addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: String,
}

impl ApiAccess {
    /// The API at `url` (`https://127.0.0.1:PORT`) with the credentials in `lab_dir`.
    pub fn new(url: &str, lab_dir: &Path) -> Result<ApiAccess, ClientError> {
        let cred = |what: String| ClientError::Credentials { what };
        let addr = addr_of_url(url).ok_or_else(|| cred(format!("bad API url {url:?}")))?;
        let read = |f: &str| {
            std::fs::read_to_string(lab_dir.join(f))
                .map_err(|e| cred(format!("{}: {e}", lab_dir.join(f).display())))
        };
        let tls = crate::apiserver::tls::client_config(&read(CA_FILE)?).map_err(cred)?;
        Ok(ApiAccess {
            addr,
            tls,
            token: read(ADMIN_TOKEN_FILE)?.trim().to_string(),
        })
    }
}

/// Sends one request; the parsed JSON body of a 2xx answer.
pub fn request(
    api: &ApiAccess,
    method: &str,
    path: &str,
    body: Option<(&str, &Value)>,
) -> Result<Value, ClientError> {
    let addr = api.addr;
    let proto = |detail: String| ClientError::Protocol {
        method: method.to_string(),
        path: path.to_string(),
        detail,
    };
    let tcp = TcpStream::connect_timeout(&addr, API_TIMEOUT)
        .map_err(|source| ClientError::Connect { addr, source })?;
    tcp.set_read_timeout(Some(API_TIMEOUT)).ok();
    tcp.set_write_timeout(Some(API_TIMEOUT)).ok();
    let server_name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(api.tls.clone(), server_name)
        .map_err(|e| proto(format!("TLS: {e}")))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let payload = body.map(|(_, v)| v.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: {}\r\n",
        api.token,
        payload.len()
    );
    if let Some((content_type, _)) = body {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(payload.as_bytes()))
        .map_err(|e| proto(format!("sending: {e}")))?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .map_err(|e| proto(format!("reading the status line: {e}")))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| proto(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    let mut length = None;
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| proto(format!("reading headers: {e}")))?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let mut body_bytes = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            reader
                .read_line(&mut size_line)
                .map_err(|e| proto(format!("reading a chunk: {e}")))?;
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| proto(format!("bad chunk size {size_line:?}: {e}")))?;
            let mut chunk = vec![0; size + 2];
            reader
                .read_exact(&mut chunk)
                .map_err(|e| proto(format!("reading a chunk: {e}")))?;
            if size == 0 {
                break;
            }
            body_bytes.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = length {
        body_bytes.resize(n, 0);
        reader
            .read_exact(&mut body_bytes)
            .map_err(|e| proto(format!("reading the body: {e}")))?;
    } else {
        reader
            .read_to_end(&mut body_bytes)
            .map_err(|e| proto(format!("reading the body: {e}")))?;
    }
    if !(200..300).contains(&status) {
        return Err(ClientError::Status {
            method: method.to_string(),
            path: path.to_string(),
            status,
            body: String::from_utf8_lossy(&body_bytes).into_owned(),
        });
    }
    serde_json::from_slice(&body_bytes).map_err(|e| proto(format!("the body is not JSON: {e}")))
}

pub fn get(api: &ApiAccess, path: &str) -> Result<Value, ClientError> {
    request(api, "GET", path, None)
}
