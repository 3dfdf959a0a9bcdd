//! The kubeconfig file clients (kube-rs, kubectl) use to reach the stand-in.

use std::io::Write as _;
use std::path::Path;

/// The kubeconfig text for a server at `server_url` (`https://127.0.0.1:PORT`) whose
/// certificate `ca_pem` signed, with a bearer token. Cluster, user and context are all named
/// `kwire-lab`; the context's namespace is `default`.
pub fn kubeconfig_yaml(server_url: &str, ca_pem: &str, token: Option<&str>) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let user_block = match token {
        // A JSON string is a valid YAML double-quoted scalar.
        Some(t) => format!(
            "  user:\n    token: {}\n",
            serde_json::Value::String(t.to_string())
        ),
        None => "  user: {}\n".to_string(),
    };
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: kwire-lab\n  \
           cluster:\n    \
             certificate-authority-data: {ca}\n    \
             server: {server}\n\
         users:\n\
         - name: kwire-lab\n\
         {user_block}\
         contexts:\n\
         - name: kwire-lab\n  \
           context:\n    \
             cluster: kwire-lab\n    \
             user: kwire-lab\n    \
             namespace: default\n\
         current-context: kwire-lab\n\
         preferences: {{}}\n",
        server = serde_json::Value::String(server_url.to_string()),
    )
}

/// Writes the kubeconfig to `path` (mode 0600, created or replaced atomically by rename).
pub fn write_kubeconfig(
    path: &Path,
    server_url: &str,
    ca_pem: &str,
    token: Option<&str>,
) -> std::io::Result<()> {
    let text = kubeconfig_yaml(server_url, ca_pem, token);
    write_private(path, text.as_bytes())
}

/// Writes `bytes` to `path` (mode 0600, created or replaced atomically by rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_names_server_and_context() {
        let y = kubeconfig_yaml("https://127.0.0.1:6443", "CA", None);
        assert!(y.contains("server: \"https://127.0.0.1:6443\""), "{y}");
        assert!(y.contains("certificate-authority-data: Q0E=\n"), "{y}");
        assert!(y.contains("current-context: kwire-lab"));
        assert!(y.contains("  user: {}\n"), "{y}");
        let t = kubeconfig_yaml("https://127.0.0.1:6443", "CA", Some("s3cret"));
        assert!(t.contains("    token: \"s3cret\"\n"), "{t}");
    }
}
