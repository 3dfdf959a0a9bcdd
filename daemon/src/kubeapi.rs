//! The Kubernetes API client every command that talks to the cluster builds the same way:
//! `--kubeconfig` if given, else the in-cluster configuration, else `$KUBECONFIG` or
//! `~/.kube/config`.

use anyhow::Context;
use kube::Client;
use std::path::Path;

/// The API configuration for `kubeconfig`, or for the environment the process runs in.
pub async fn config(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Config> {
    Ok(match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p).with_context(|| format!("reading --kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using --kubeconfig {}", p.display()))?
        }
        None => match kube::Config::incluster() {
            Ok(c) => c,
            Err(_) => kube::Config::infer()
                .await
                .context("no Kubernetes API configuration: not in a cluster, no $KUBECONFIG, no ~/.kube/config; pass --kubeconfig")?,
        },
    })
}

/// A client for `config`. Its connections and request queue live on the runtime this is
/// called on.
pub fn client_for(config: kube::Config) -> anyhow::Result<Client> {
    Client::try_from(config).context("building the Kubernetes API client")
}

/// A client for `kubeconfig`, or for the environment the process runs in.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    client_for(config(kubeconfig).await?)
}
