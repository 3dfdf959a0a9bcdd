//! `healthCheckNodePort`: for each LoadBalancer Service with `externalTrafficPolicy: Local`,
//! this node answers HTTP on that port (every address) as kube-proxy does: `200` with the
//! count of the Service's ready endpoints on this node, `503` when it has none, so that the
//! load balancer sends the Service's traffic only to nodes that can serve it locally. The
//! servers follow the compiled service table: a port opens when a Service names it, its
//! answer changes with the local endpoints, and it closes when the Service goes.

use crate::services::table::HealthCheck;
use axum::extract::State;
use axum::http::{header, HeaderName, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

/// What one port answers (swapped when the table changes).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

/// The status and JSON body kube-proxy's health check server answers with.
fn respond(a: &Answer) -> (StatusCode, String) {
    let body = serde_json::json!({
        "service": {"namespace": a.namespace, "name": a.name},
        "localEndpoints": a.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let code = if a.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn serve_one(State(a): State<Arc<Mutex<Answer>>>) -> impl IntoResponse {
    let a = a.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (code, body) = respond(&a);
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (
                HeaderName::from_static("x-content-type-options"),
                "nosniff".to_string(),
            ),
            (
                HeaderName::from_static("x-load-balancing-endpoint-weight"),
                a.local_endpoints.to_string(),
            ),
        ],
        body,
    )
}

struct Server {
    answer: Arc<Mutex<Answer>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The health check servers of this node.
#[derive(Default)]
pub struct HealthServers {
    by_port: BTreeMap<u16, Server>,
}

impl HealthServers {
    /// Opens, updates and closes servers to match `wanted` (one per port; the first Service
    /// by name keeps a port two of them name).
    pub async fn apply(&mut self, wanted: &[HealthCheck]) {
        let mut want: BTreeMap<u16, Answer> = BTreeMap::new();
        for h in wanted {
            want.entry(h.port).or_insert_with(|| Answer {
                namespace: h.namespace.clone(),
                name: h.name.clone(),
                local_endpoints: h.local_endpoints,
            });
        }
        self.by_port.retain(|p, _| want.contains_key(p));
        for (port, answer) in want {
            if let Some(s) = self.by_port.get(&port) {
                *s.answer.lock().unwrap_or_else(|p| p.into_inner()) = answer;
                continue;
            }
            let listener = match bind(port).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(port, service = %format!("{}/{}", answer.namespace, answer.name), error = %e,
                        "cannot serve the Service's healthCheckNodePort; is another process on the port?");
                    continue;
                }
            };
            info!(port, service = %format!("{}/{}", answer.namespace, answer.name), "serving healthCheckNodePort");
            let shared = Arc::new(Mutex::new(answer));
            let app = Router::new()
                .fallback(get(serve_one))
                .with_state(shared.clone());
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    warn!(port, error = %e, "healthCheckNodePort server stopped");
                }
            });
            self.by_port.insert(
                port,
                Server {
                    answer: shared,
                    task,
                },
            );
        }
    }

    /// The ports served.
    pub fn ports(&self) -> Vec<u16> {
        self.by_port.keys().copied().collect()
    }
}

/// Every address of the node, both families (IPv4 alone when IPv6 is off).
async fn bind(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).await {
        Ok(l) => Ok(l),
        Err(_) => {
            tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_kube_proxy_does() {
        let mut a = Answer {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let (code, body) = respond(&a);
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "web");
        a.local_endpoints = 0;
        assert_eq!(respond(&a).0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn ports_open_change_and_close_with_the_table() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut s = HealthServers::default();
        let hc = |n| HealthCheck {
            port,
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: n,
        };
        s.apply(&[hc(0)]).await;
        assert_eq!(s.ports(), vec![port]);
        let get = || async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get().await.starts_with("HTTP/1.1 503"));
        s.apply(&[hc(1)]).await;
        let r = get().await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("\"localEndpoints\":1"), "{r}");
        s.apply(&[]).await;
        assert!(s.ports().is_empty());
    }
}
