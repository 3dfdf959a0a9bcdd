//! The container runtime's side of CNI, as libcni does it: a network configuration list run
//! plugin by plugin (ADD in order, each getting the previous plugin's result as `prevResult`;
//! DEL in reverse order with the cached ADD result), the `CNI_*` environment, `runtimeConfig`
//! for the capabilities a plugin declares, and the spec's error objects on failure.
//!
//! Plugins run in the node's network namespace (a runtime runs them in the host's), through
//! `ip netns exec NODE`.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// How long one plugin call may take (the kubelet's CRI call would time out near here; the
/// kwire plugin itself returns within 10 s).
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(20);

/// A network configuration list (spec section "Configuration format").
#[derive(Debug, Clone, PartialEq)]
pub struct ConfList {
    pub cni_version: String,
    pub name: String,
    pub plugins: Vec<Value>,
}

impl ConfList {
    /// Parses a `.conflist` document.
    pub fn parse(v: &Value) -> Result<ConfList, CniError> {
        let bad = |what: &str| CniError::InvalidList(what.to_string());
        let cni_version = v["cniVersion"]
            .as_str()
            .ok_or_else(|| bad("\"cniVersion\" is missing"))?;
        let name = v["name"]
            .as_str()
            .ok_or_else(|| bad("\"name\" is missing"))?;
        let plugins = v["plugins"]
            .as_array()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad("\"plugins\" must be a non-empty list"))?;
        if let Some(p) = plugins.iter().find(|p| p["type"].as_str().is_none()) {
            return Err(bad(&format!("a plugin has no \"type\": {p}")));
        }
        Ok(ConfList {
            cni_version: cni_version.to_string(),
            name: name.to_string(),
            plugins: plugins.clone(),
        })
    }

    pub fn to_value(&self) -> Value {
        json!({"cniVersion": self.cni_version, "name": self.name, "plugins": self.plugins})
    }
}

/// What the runtime knows about the container (the `CNI_*` variables and capability args).
#[derive(Debug, Clone, Default)]
pub struct RuntimeConf {
    pub container_id: String,
    /// CNI_NETNS: a path such as /var/run/netns/NAME.
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS pairs (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID, ...).
    pub args: Vec<(String, String)>,
    /// Values for capabilities (`portMappings`, ...); passed in `runtimeConfig` only to plugins
    /// that declare the capability.
    pub capability_args: Map<String, Value>,
}

/// Where and how plugins are executed.
#[derive(Debug, Clone)]
pub struct Executor {
    /// CNI_PATH: directories searched for a plugin named by its `type`.
    pub cni_path: Vec<PathBuf>,
    /// Run plugins inside this named network namespace (the node's), or in ours when None.
    pub netns: Option<String>,
    pub timeout: Duration,
}

/// A CNI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("invalid network configuration list: {0}")]
    InvalidList(String),
    #[error("CNI plugin {plugin:?} not found in CNI_PATH {path}")]
    NotFound { plugin: String, path: String },
    #[error("cannot run CNI plugin {plugin}")]
    Spawn {
        plugin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin} {command} did not return within {secs} s")]
    Timeout {
        plugin: String,
        command: String,
        secs: u64,
    },
    #[error("CNI plugin {plugin} {command} failed with code {code}: {msg}{details}")]
    Plugin {
        plugin: String,
        command: String,
        code: u64,
        msg: String,
        details: String,
    },
    #[error("CNI plugin {plugin} {command} printed no valid result: {detail}")]
    BadOutput {
        plugin: String,
        command: String,
        detail: String,
    },
}

impl CniError {
    /// The spec's error code when a plugin gave one (11 = try again later).
    pub fn code(&self) -> Option<u64> {
        match self {
            CniError::Plugin { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The configuration one plugin of `list` gets on stdin (spec "Deriving execution
/// configuration from plugin configuration").
pub fn plugin_config(
    list: &ConfList,
    plugin: &Value,
    prev_result: Option<&Value>,
    rt: &RuntimeConf,
) -> Value {
    let mut conf = plugin.clone();
    conf["cniVersion"] = json!(list.cni_version);
    conf["name"] = json!(list.name);
    let mut runtime_config = Map::new();
    if let Some(caps) = plugin["capabilities"].as_object() {
        for (cap, on) in caps {
            if on.as_bool() == Some(true) {
                if let Some(v) = rt.capability_args.get(cap) {
                    runtime_config.insert(cap.clone(), v.clone());
                }
            }
        }
    }
    if let Some(m) = conf.as_object_mut() {
        m.remove("runtimeConfig");
        if !runtime_config.is_empty() {
            m.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
        match prev_result {
            Some(p) => {
                m.insert("prevResult".into(), p.clone());
            }
            None => {
                m.remove("prevResult");
            }
        }
    }
    conf
}

impl Executor {
    /// ADD: each plugin in order; the last plugin's result. When a plugin fails, the whole
    /// list is deleted again (as libcni's callers do) and the plugin's error returned.
    pub fn add(&self, list: &ConfList, rt: &RuntimeConf) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in &list.plugins {
            let conf = plugin_config(list, plugin, prev.as_ref(), rt);
            match self.exec("ADD", &conf, rt) {
                Ok(result) => prev = Some(result),
                Err(e) => {
                    if let Err(del) = self.del(list, rt, prev.as_ref()) {
                        tracing::warn!(container = %rt.container_id, error = %del, "DEL after a failed ADD failed");
                    }
                    return Err(e);
                }
            }
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL: each plugin in reverse order with `prev_result` (the cached ADD result). Every
    /// plugin is called; the first error is returned.
    pub fn del(
        &self,
        list: &ConfList,
        rt: &RuntimeConf,
        prev_result: Option<&Value>,
    ) -> Result<(), CniError> {
        let mut first = None;
        for plugin in list.plugins.iter().rev() {
            let conf = plugin_config(list, plugin, prev_result, rt);
            if let Err(e) = self.exec("DEL", &conf, rt) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// CHECK: each plugin in order with the cached result.
    pub fn check(
        &self,
        list: &ConfList,
        rt: &RuntimeConf,
        prev_result: &Value,
    ) -> Result<(), CniError> {
        for plugin in &list.plugins {
            let conf = plugin_config(list, plugin, Some(prev_result), rt);
            self.exec("CHECK", &conf, rt)?;
        }
        Ok(())
    }

    fn find(&self, plugin: &str) -> Result<PathBuf, CniError> {
        if !plugin.contains('/') {
            for dir in &self.cni_path {
                let p = dir.join(plugin);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(CniError::NotFound {
            plugin: plugin.to_string(),
            path: self.cni_path_var(),
        })
    }

    fn cni_path_var(&self) -> String {
        self.cni_path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Runs one plugin: environment, config on stdin, result or error object on stdout.
    fn exec(&self, command: &str, conf: &Value, rt: &RuntimeConf) -> Result<Value, CniError> {
        let plugin = conf["type"].as_str().unwrap_or_default().to_string();
        let bin = self.find(&plugin)?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        // The runtime's own environment, minus any CNI_* of ours, plus the call's.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        let args: Vec<String> = rt.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &rt.container_id)
            .env("CNI_NETNS", &rt.netns)
            .env("CNI_IFNAME", &rt.ifname)
            .env("CNI_ARGS", args.join(";"))
            .env("CNI_PATH", self.cni_path_var());
        let out =
            run_with_stdin(cmd, conf.to_string().as_bytes(), self.timeout).map_err(
                |e| match e {
                    RunError::Spawn(source) => CniError::Spawn {
                        plugin: bin.display().to_string(),
                        source,
                    },
                    RunError::Timeout => CniError::Timeout {
                        plugin: plugin.clone(),
                        command: command.to_string(),
                        secs: self.timeout.as_secs(),
                    },
                },
            )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let parsed: Option<Value> = serde_json::from_str(text.trim()).ok();
        if !out.success {
            let e = parsed.unwrap_or(Value::Null);
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let details = e["details"]
                .as_str()
                .filter(|d| !d.is_empty())
                .map(|d| format!(" ({d})"))
                .unwrap_or_else(|| {
                    if stderr.is_empty() {
                        String::new()
                    } else {
                        format!(" (stderr: {stderr})")
                    }
                });
            return Err(CniError::Plugin {
                plugin,
                command: command.to_string(),
                code: e["code"].as_u64().unwrap_or(999),
                msg: e["msg"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("exit without an error object: {}", text.trim())),
                details,
            });
        }
        match (command, parsed) {
            ("ADD", Some(v)) if v.is_object() => Ok(v),
            ("ADD", _) => Err(CniError::BadOutput {
                plugin,
                command: command.to_string(),
                detail: format!("{:?}", text.trim()),
            }),
            (_, v) => Ok(v.unwrap_or(Value::Null)),
        }
    }
}

/// A finished child's exit and output.
pub struct RunOutput {
    pub success: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

pub enum RunError {
    Spawn(std::io::Error),
    Timeout,
}

/// Runs `cmd` with `stdin`, collecting its output; kills it after `timeout`.
pub fn run_with_stdin(
    mut cmd: Command,
    stdin: &[u8],
    timeout: Duration,
) -> Result<RunOutput, RunError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let mut input = child.stdin.take().expect("piped");
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::Timeout);
            }
        }
    };
    let _ = writer.join();
    Ok(RunOutput {
        success: status.success(),
        stdout: reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// The addresses (without prefix length) of a CNI result's `ips`.
pub fn result_ips(result: &Value) -> Vec<std::net::IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// Makes `dir/kwire` point at the `kwire-cni` binary: the configuration says `"type":
/// "kwire"`, so a runtime executes CNI_PATH/kwire (the DaemonSet installs it under that name).
pub fn install_plugin_link(dir: &Path, kwire_cni: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let link = dir.join("kwire");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(kwire_cni, link)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn list() -> ConfList {
        ConfList::parse(&json!({
            "cniVersion": "1.0.0", "name": "kwire-lab",
            "plugins": [
                {"type": "first", "socket": "/run/x.sock"},
                {"type": "second", "capabilities": {"portMappings": true, "bandwidth": false}},
            ]
        }))
        .unwrap()
    }

    #[test]
    fn plugin_config_carries_name_version_prev_result_and_declared_capabilities() {
        let l = list();
        let mut rt = RuntimeConf::default();
        rt.capability_args
            .insert("portMappings".into(), json!([{"hostPort": 8080}]));
        rt.capability_args.insert("bandwidth".into(), json!({}));
        let c0 = plugin_config(&l, &l.plugins[0], None, &rt);
        assert_eq!(
            c0,
            json!({"type": "first", "socket": "/run/x.sock", "cniVersion": "1.0.0", "name": "kwire-lab"})
        );
        let prev = json!({"cniVersion": "1.0.0", "ips": []});
        let c1 = plugin_config(&l, &l.plugins[1], Some(&prev), &rt);
        assert_eq!(c1["prevResult"], prev);
        assert_eq!(
            c1["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080}]})
        );
        assert!(
            ConfList::parse(&json!({"cniVersion": "1.0.0", "name": "x", "plugins": []})).is_err()
        );
        assert!(
            ConfList::parse(&json!({"cniVersion": "1.0.0", "name": "x", "plugins": [{}]})).is_err()
        );
    }

    /// A fake plugin that logs its command, env and stdin, then answers per `script`.
    fn fake(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nin=$(cat)\necho \"{name} $CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME $CNI_NETNS $CNI_ARGS $in\" >> {log}\n{body}\n",
                log = dir.join("calls.log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn calls(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn rt() -> RuntimeConf {
        RuntimeConf {
            container_id: "cid1".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            args: vec![("K8S_POD_NAME".into(), "web".into())],
            capability_args: Map::new(),
        }
    }

    #[test]
    fn add_chains_results_and_del_runs_in_reverse() {
        let dir = tempfile::tempdir().unwrap();
        fake(
            dir.path(),
            "first",
            r#"[ "$CNI_COMMAND" = ADD ] && echo '{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.5/32"},{"address":"fd00::5/128"}]}'; exit 0"#,
        );
        // The second plugin answers with what it got as prevResult, as portmap does.
        fake(
            dir.path(),
            "second",
            r#"case "$in" in *'"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.5/32"},{"address":"fd00::5/128"}]}'*) ;; *) exit 1;; esac
[ "$CNI_COMMAND" = ADD ] && echo '{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.5/32"},{"address":"fd00::5/128"}]}'; exit 0"#,
        );
        let ex = Executor {
            cni_path: vec!["/nonexistent".into(), dir.path().to_path_buf()],
            netns: None,
            timeout: Duration::from_secs(10),
        };
        let r = ex.add(&list(), &rt()).unwrap();
        assert_eq!(
            result_ips(&r),
            vec![
                "10.244.1.5".parse::<std::net::IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        ex.del(&list(), &rt(), Some(&r)).unwrap();
        let c = calls(dir.path());
        let order: Vec<String> = c
            .iter()
            .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            order,
            ["first ADD", "second ADD", "second DEL", "first DEL"]
        );
        assert!(
            c[0].contains("cid1 eth0 /var/run/netns/x K8S_POD_NAME=web"),
            "{}",
            c[0]
        );
        assert!(!c[0].contains("prevResult"));
        assert!(c[1].contains("\"prevResult\""), "{}", c[1]);
        assert!(
            c[3].contains("\"prevResult\""),
            "DEL gets the cached result: {}",
            c[3]
        );
    }

    #[test]
    fn a_failed_add_is_deleted_and_reports_the_spec_error() {
        let dir = tempfile::tempdir().unwrap();
        fake(
            dir.path(),
            "first",
            r#"[ "$CNI_COMMAND" = ADD ] && echo '{"cniVersion":"1.0.0","ips":[]}'; exit 0"#,
        );
        fake(
            dir.path(),
            "second",
            r#"[ "$CNI_COMMAND" = ADD ] && { echo '{"cniVersion":"1.0.0","code":11,"msg":"later"}'; exit 1; }; exit 0"#,
        );
        let ex = Executor {
            cni_path: vec![dir.path().to_path_buf()],
            netns: None,
            timeout: Duration::from_secs(10),
        };
        let e = ex.add(&list(), &rt()).unwrap_err();
        assert_eq!(e.code(), Some(11), "{e}");
        assert!(e.to_string().contains("later"));
        let order: Vec<String> = calls(dir.path())
            .iter()
            .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            order,
            ["first ADD", "second ADD", "second DEL", "first DEL"]
        );
        let missing = Executor {
            cni_path: vec!["/nonexistent".into()],
            netns: None,
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            missing.add(&list(), &rt()),
            Err(CniError::NotFound { .. })
        ));
    }
}
