//! The `default/kubernetes` Service, kept as kube-apiserver keeps it: a ClusterIP Service on
//! the first address of the (primary) service range, port 443 (`https`) to the API server's
//! secure port, and an EndpointSlice `default/kubernetes` (no selector, not managed by the
//! EndpointSlice controller) listing the address the API server advertises, which is a host
//! address outside the pod network. Recreated or repaired when deleted or changed (the real
//! server's bootstrap controller and endpoint reconciler), so in-cluster clients find the API
//! through it.

use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};

use super::error::ApiError;
use super::ApiServer;

pub const NAMESPACE: &str = "default";
pub const NAME: &str = "kubernetes";
/// The Service's port and its name, as kube-apiserver creates them.
pub const PORT: u16 = 443;
pub const PORT_NAME: &str = "https";

/// The Service kube-apiserver creates.
pub fn service(cluster_ip: IpAddr, endpoint: SocketAddr) -> Value {
    let family = if cluster_ip.is_ipv4() { "IPv4" } else { "IPv6" };
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "namespace": NAMESPACE,
            "name": NAME,
            "labels": {"component": "apiserver", "provider": "kubernetes"},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip.to_string(),
            "clusterIPs": [cluster_ip.to_string()],
            "ipFamilies": [family],
            "ipFamilyPolicy": "SingleStack",
            "sessionAffinity": "None",
            "ports": [{
                "name": PORT_NAME, "protocol": "TCP", "port": PORT,
                "targetPort": endpoint.port(),
            }],
        },
    })
}

/// Its EndpointSlice: the advertised address, ready.
pub fn slice(endpoint: SocketAddr) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": NAMESPACE,
            "name": NAME,
            "labels": {"kubernetes.io/service-name": NAME},
        },
        "addressType": if endpoint.is_ipv4() { "IPv4" } else { "IPv6" },
        "endpoints": [{
            "addresses": [endpoint.ip().to_string()],
            "conditions": {"ready": true},
        }],
        "ports": [{"name": PORT_NAME, "protocol": "TCP", "port": endpoint.port()}],
    })
}

impl ApiServer {
    /// Creates `default/kubernetes` and its slice when missing, puts back what changed in
    /// them; no write when both are as they should be. Does nothing unless the server
    /// advertises an address ([`super::ApiServerConfig::advertise`]) and has a service range.
    pub fn reconcile_kubernetes_service(&self) -> Result<(), ApiError> {
        let Some((cluster_ip, endpoint)) = self.kubernetes else {
            return Ok(());
        };
        let svc_kind = ApiServer::kind("v1", "Service").map_err(internal)?;
        let slice_kind =
            ApiServer::kind("discovery.k8s.io/v1", "EndpointSlice").map_err(internal)?;
        let want = service(cluster_ip, endpoint);
        match self.get(svc_kind, Some(NAMESPACE), NAME) {
            Err(e) if e.code == 404 => {
                self.create(want)?;
            }
            Err(e) => return Err(e),
            Ok(have) => {
                // A ClusterIP cannot change in place; the ports are put back.
                if have.pointer("/spec/ports") != want.pointer("/spec/ports") {
                    self.merge_patch(
                        svc_kind,
                        Some(NAMESPACE),
                        NAME,
                        &json!({"spec": {"ports": want["spec"]["ports"]}}),
                        false,
                    )?;
                }
            }
        }
        let want = slice(endpoint);
        match self.get(slice_kind, Some(NAMESPACE), NAME) {
            Err(e) if e.code == 404 => {
                self.create(want)?;
            }
            Err(e) => return Err(e),
            Ok(have) => {
                let same = ["addressType", "endpoints", "ports"]
                    .iter()
                    .all(|f| have.get(*f) == want.get(*f))
                    && have.pointer("/metadata/labels/kubernetes.io~1service-name")
                        == want.pointer("/metadata/labels/kubernetes.io~1service-name");
                if !same {
                    self.update(slice_kind, Some(NAMESPACE), NAME, want, false)?;
                }
            }
        }
        Ok(())
    }
}

fn internal(e: super::ApiServerError) -> ApiError {
    ApiError::internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_points_at_the_advertised_secure_port() {
        let ep: SocketAddr = "192.0.2.254:6443".parse().unwrap();
        let s = service("10.96.0.1".parse().unwrap(), ep);
        assert_eq!(s["spec"]["ports"][0]["port"], 443);
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 6443);
        assert!(
            s["spec"].get("selector").is_none(),
            "no selector: its own slice"
        );
        let sl = slice(ep);
        assert_eq!(sl["endpoints"][0]["addresses"][0], "192.0.2.254");
        assert_eq!(sl["ports"][0]["port"], 6443);
        assert!(
            sl["metadata"]["labels"]
                .get(kwire_proto::endpoints::MANAGED_BY)
                .is_none(),
            "not the EndpointSlice controller's"
        );
    }

    #[test]
    fn kept_on_the_first_service_address_and_repaired() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let config = crate::apiserver::ApiServerConfig {
                advertise: Some("192.0.2.254:6443".parse().unwrap()),
                ..Default::default()
            };
            let server = ApiServer::start(config).await.unwrap();
            let svc_kind = ApiServer::kind("v1", "Service").unwrap();
            let slice_kind = ApiServer::kind("discovery.k8s.io/v1", "EndpointSlice").unwrap();
            let svc = server.get(svc_kind, Some(NAMESPACE), NAME).unwrap();
            assert_eq!(svc["spec"]["clusterIP"], "10.96.0.1");
            let sl = server.get(slice_kind, Some(NAMESPACE), NAME).unwrap();
            assert_eq!(sl["endpoints"][0]["addresses"], json!(["192.0.2.254"]));
            let rv = sl["metadata"]["resourceVersion"].clone();
            server.reconcile_kubernetes_service().unwrap();
            let sl = server.get(slice_kind, Some(NAMESPACE), NAME).unwrap();
            assert_eq!(
                sl["metadata"]["resourceVersion"], rv,
                "no write when in line"
            );

            server.delete(slice_kind, Some(NAMESPACE), NAME).unwrap();
            server
                .merge_patch(
                    svc_kind,
                    Some(NAMESPACE),
                    NAME,
                    &json!({"spec": {"ports": [{"name": "x", "port": 8443, "protocol": "TCP"}]}}),
                    false,
                )
                .unwrap();
            server.reconcile_kubernetes_service().unwrap();
            let svc = server.get(svc_kind, Some(NAMESPACE), NAME).unwrap();
            assert_eq!(svc["spec"]["ports"][0]["port"], 443);
            assert!(server.get(slice_kind, Some(NAMESPACE), NAME).is_ok());
            // Another Service never gets the kubernetes address.
            let other = server
                .create(json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"namespace": "default", "name": "web"},
                    "spec": {"ports": [{"port": 80}]}}))
                .unwrap();
            assert_ne!(other["spec"]["clusterIP"], "10.96.0.1");
            server.stop().await;
        });
    }
}
