//! The CNI plugin's request to the daemon and the daemon's answer, as JSON over the local
//! socket (`/run/kwire/cni.sock`). One request per connection: a 4-byte big-endian length,
//! then the JSON; ADD and CHECK carry the pod's netns fd alongside (SCM_RIGHTS).

use serde::{Deserialize, Serialize};

/// CNI spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// Largest message either side accepts, in bytes.
pub const MAX_MESSAGE_BYTES: u32 = 1 << 20;

/// CNI error codes (spec "Error" section) kwire uses.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_READY: u32 = 50;
    pub const NO_ADDRESS: u32 = 100;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
}

/// What the plugin forwards to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    #[serde(default)]
    pub container_id: String,
    /// CNI_NETNS as given (the fd travels separately for ADD and CHECK).
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub ifname: String,
    /// CNI_ARGS, parsed into key/value pairs (K8S_POD_NAMESPACE, K8S_POD_NAME, ...).
    #[serde(default)]
    pub args: Vec<(String, String)>,
    /// The network configuration from stdin, unchanged.
    pub config: serde_json::Value,
}

/// The daemon's answer: a CNI result (printed as is) or a CNI error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Ok(serde_json::Value),
    Error(Error),
}

/// A CNI error object (spec: `code`, `msg`, `details`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}")]
pub struct Error {
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl Error {
    pub fn new(code: u32, msg: impl Into<String>) -> Error {
        Error {
            cni_version: String::new(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
}

/// Parses `CNI_ARGS` (`K=V;K2=V2`). Refuses pairs without `=`.
pub fn parse_args(s: &str) -> Result<Vec<(String, String)>, Error> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    Error::new(
                        code::INVALID_ENV,
                        format!("CNI_ARGS: {p:?} is not KEY=VALUE"),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_and_round_trip() {
        assert_eq!(
            parse_args("IgnoreUnknown=1;K8S_POD_NAME=web").unwrap(),
            vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAME".into(), "web".into())
            ]
        );
        assert_eq!(parse_args("oops").unwrap_err().code, code::INVALID_ENV);
        let r = Request {
            command: Command::Add,
            container_id: "c".into(),
            netns: "/n".into(),
            ifname: "eth0".into(),
            args: vec![],
            config: serde_json::json!({"type":"kwire"}),
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"ADD\""));
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        let e = Response::Error(Error::new(11, "later"));
        assert_eq!(
            serde_json::from_str::<Response>(&serde_json::to_string(&e).unwrap()).unwrap(),
            e
        );
    }
}
