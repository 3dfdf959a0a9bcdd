//! `kwire-cni`: a thin CNI plugin (spec 1.1.0; 0.4.0 and 1.0.0 configurations accepted). It
//! checks the environment and the network configuration, hands the request and the pod's
//! netns fd to the kwire daemon over its local socket, and prints the daemon's answer.
#![forbid(unsafe_code)]

use kwire_proto::cni::{
    code, parse_args, Command, Error, Request, Response, MAX_MESSAGE_BYTES, SUPPORTED_VERSIONS,
};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the daemon listens unless the configuration says `"socket"`.
pub const DEFAULT_SOCKET: &str = "/run/kwire/cni.sock";
/// Where DEL requests wait while the daemon is down (replayed when it starts).
pub const DEFAULT_DEL_QUEUE: &str = "/var/lib/kwire/cni-del-queue";
/// Most queued DELs kept; past that the oldest are dropped (GC reconciles what is lost).
pub const DEL_QUEUE_LIMIT: usize = 1024;
/// A plugin call must return within 10 s whatever the daemon does; this leaves margin.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(8);

/// What the plugin prints and its exit code.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub stdout: String,
    pub exit: i32,
}

fn fail(version: &str, e: Error) -> Outcome {
    let mut v = serde_json::to_value(&e).unwrap_or_else(|_| json!({"code": e.code, "msg": e.msg}));
    v["cniVersion"] = json!(if version.is_empty() { "1.1.0" } else { version });
    Outcome {
        stdout: v.to_string(),
        exit: 1,
    }
}

/// The parts of the network configuration kwire reads.
#[derive(Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub socket: PathBuf,
    pub del_queue: PathBuf,
}

fn parse_conf(stdin: &[u8]) -> Result<(Value, NetConf), Error> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        Error::new(
            code::DECODE_FAILURE,
            format!("network configuration on stdin is not valid JSON: {e}"),
        )
    })?;
    let obj = v.as_object().ok_or_else(|| {
        Error::new(
            code::DECODE_FAILURE,
            "network configuration on stdin must be a JSON object",
        )
    })?;
    let ver = obj.get("cniVersion").and_then(Value::as_str).unwrap_or("");
    if !SUPPORTED_VERSIONS.contains(&ver) {
        return Err(Error::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {ver:?} is not supported; use one of {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    match obj.get("type").and_then(Value::as_str) {
        Some("kwire") => {}
        other => {
            return Err(Error::new(
                code::INVALID_CONFIG,
                format!("\"type\" must be \"kwire\", got {other:?}"),
            ))
        }
    }
    if obj
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(Error::new(
            code::INVALID_CONFIG,
            "\"name\" (the network name) is missing",
        ));
    }
    let socket = match obj.get("socket") {
        None => PathBuf::from(DEFAULT_SOCKET),
        Some(Value::String(s)) if s.starts_with('/') => PathBuf::from(s),
        Some(other) => {
            return Err(Error::new(
                code::INVALID_CONFIG,
                format!("\"socket\" must be an absolute path, got {other}"),
            ))
        }
    };
    if let Some(m) = obj.get("mtu") {
        if !m.as_u64().is_some_and(|m| (576..=65535).contains(&m)) {
            return Err(Error::new(
                code::INVALID_CONFIG,
                format!("\"mtu\" must be a number from 576 to 65535, got {m}"),
            ));
        }
    }
    let del_queue = obj
        .get("delQueueDir")
        .and_then(Value::as_str)
        .map_or_else(|| PathBuf::from(DEFAULT_DEL_QUEUE), PathBuf::from);
    Ok((
        v.clone(),
        NetConf {
            cni_version: ver.to_string(),
            socket,
            del_queue,
        },
    ))
}

fn env_req<'a>(env: &'a HashMap<String, String>, k: &str) -> Result<&'a str, Error> {
    env.get(k)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Error::new(code::INVALID_ENV, format!("{k} is not set")))
}

/// Runs one plugin invocation. `env` is the process environment.
pub fn run(env: &HashMap<String, String>, stdin: &[u8]) -> Outcome {
    let cmd = match env.get("CNI_COMMAND").map(String::as_str) {
        Some("VERSION") => {
            let ver = serde_json::from_slice::<Value>(stdin)
                .ok()
                .and_then(|v| {
                    v.get("cniVersion")
                        .and_then(Value::as_str)
                        .map(String::from)
                })
                .unwrap_or_else(|| "1.1.0".into());
            return Outcome {
                stdout: json!({"cniVersion": ver, "supportedVersions": SUPPORTED_VERSIONS})
                    .to_string(),
                exit: 0,
            };
        }
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("STATUS") => Command::Status,
        Some("GC") => Command::Gc,
        Some(other) => {
            return fail(
                "",
                Error::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"
                    ),
                ),
            )
        }
        None => return fail(
            "",
            Error::new(
                code::INVALID_ENV,
                "CNI_COMMAND is not set (kwire-cni is a CNI plugin: a container runtime calls it)",
            ),
        ),
    };
    let (config, conf) = match parse_conf(stdin) {
        Ok(c) => c,
        Err(e) => return fail("", e),
    };
    let ver = conf.cni_version.clone();
    match build_request(cmd, env, config) {
        Ok(req) => dispatch(req, &conf, env),
        Err(e) => fail(&ver, e),
    }
}

fn build_request(
    cmd: Command,
    env: &HashMap<String, String>,
    config: Value,
) -> Result<Request, Error> {
    let per_container = matches!(cmd, Command::Add | Command::Del | Command::Check);
    let (container_id, ifname, netns) = if per_container {
        let netns = if cmd == Command::Del {
            env.get("CNI_NETNS").cloned().unwrap_or_default()
        } else {
            env_req(env, "CNI_NETNS")?.to_string()
        };
        (
            env_req(env, "CNI_CONTAINERID")?.to_string(),
            env_req(env, "CNI_IFNAME")?.to_string(),
            netns,
        )
    } else {
        (String::new(), String::new(), String::new())
    };
    if per_container && (ifname.len() > 15 || ifname.contains('/')) {
        return Err(Error::new(
            code::INVALID_ENV,
            format!(
                "CNI_IFNAME {ifname:?} is not a valid interface name (1 to 15 characters, no '/')"
            ),
        ));
    }
    let args = parse_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""))?;
    Ok(Request {
        command: cmd,
        container_id,
        netns,
        ifname,
        args,
        config,
    })
}

fn dispatch(req: Request, conf: &NetConf, _env: &HashMap<String, String>) -> Outcome {
    let ver = conf.cni_version.clone();
    let netns = if matches!(req.command, Command::Add | Command::Check) {
        match std::fs::File::open(&req.netns) {
            Ok(f) => Some(f),
            Err(e) => {
                return fail(
                    &ver,
                    Error::new(code::INVALID_ENV, format!("CNI_NETNS {}: {e}", req.netns)),
                )
            }
        }
    } else {
        None
    };
    match call_daemon(&conf.socket, &req, netns.as_ref().map(|f| f.as_raw_fd())) {
        Ok(Response::Ok(v)) => Outcome { stdout: if v.is_null() { String::new() } else { v.to_string() }, exit: 0 },
        Ok(Response::Error(e)) => fail(&ver, e),
        Err(DaemonDown(why)) => match req.command {
            // DEL must succeed with the daemon down: remember it, replay when it starts.
            Command::Del => match queue_del(&conf.del_queue, &req) {
                Ok(()) => Outcome { stdout: String::new(), exit: 0 },
                Err(e) => fail(&ver, Error::new(code::IO_FAILURE, format!("kwire daemon unreachable ({why}) and queueing the DEL in {} failed: {e}", conf.del_queue.display()))),
            },
            Command::Status => fail(&ver, Error::new(code::NOT_READY, format!("kwire daemon not ready: {why}"))),
            _ => fail(&ver, Error::new(code::TRY_AGAIN_LATER, format!("kwire daemon unreachable: {why}; it runs as the kwire DaemonSet on this node"))),
        },
    }
}

/// The daemon could not be asked (not running, or not answering in time).
pub struct DaemonDown(pub String);

fn call_daemon(socket: &Path, req: &Request, fd: Option<i32>) -> Result<Response, DaemonDown> {
    let down =
        |what: &str, e: std::io::Error| DaemonDown(format!("{what} {}: {e}", socket.display()));
    let mut s = UnixStream::connect(socket).map_err(|e| down("connecting to", e))?;
    s.set_read_timeout(Some(DAEMON_TIMEOUT))
        .map_err(|e| down("configuring", e))?;
    s.set_write_timeout(Some(DAEMON_TIMEOUT))
        .map_err(|e| down("configuring", e))?;
    let body = serde_json::to_vec(req).map_err(|e| DaemonDown(format!("encoding request: {e}")))?;
    let mut msg = (body.len() as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    let fds: Vec<i32> = fd.into_iter().collect();
    let cmsg: Vec<ControlMessage> = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let sent = sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(&msg)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| down("sending to", e.into()))?;
    if sent < msg.len() {
        s.write_all(&msg[sent..])
            .map_err(|e| down("sending to", e))?;
    }
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .map_err(|e| down("reading the answer of", e))?;
    let n = u32::from_be_bytes(len);
    if n > MAX_MESSAGE_BYTES {
        return Err(DaemonDown(format!(
            "answer of {n} bytes from {} is too large",
            socket.display()
        )));
    }
    let mut buf = vec![0u8; n as usize];
    s.read_exact(&mut buf)
        .map_err(|e| down("reading the answer of", e))?;
    serde_json::from_slice(&buf)
        .map_err(|e| DaemonDown(format!("undecodable answer from {}: {e}", socket.display())))
}

fn queue_del(dir: &Path, req: &Request) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(Result::ok).collect();
    if entries.len() >= DEL_QUEUE_LIMIT {
        entries.sort_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
        for e in entries.iter().take(entries.len() + 1 - DEL_QUEUE_LIMIT) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let safe: String = format!("{}-{}", req.container_id, req.ifname)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let tmp = dir.join(format!(".{safe}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(req)?)?;
    std::fs::rename(tmp, dir.join(format!("{safe}.json")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn conf(extra: &str) -> Vec<u8> {
        format!(r#"{{"cniVersion":"1.1.0","name":"kwire","type":"kwire","socket":"/nonexistent/kwire.sock"{extra}}}"#).into_bytes()
    }

    fn code_of(o: &Outcome) -> u64 {
        serde_json::from_str::<Value>(&o.stdout).unwrap()["code"]
            .as_u64()
            .unwrap()
    }

    #[test]
    fn version() {
        let o = run(
            &env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.4.0"}"#,
        );
        assert_eq!(o.exit, 0);
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn errors_carry_spec_codes() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/proc/self/ns/net"),
        ];
        assert_eq!(code_of(&run(&env(&[]), b"{}")), 4);
        assert_eq!(code_of(&run(&env(&[("CNI_COMMAND", "FROB")]), b"{}")), 4);
        assert_eq!(code_of(&run(&env(&add), b"not json")), 6);
        assert_eq!(
            code_of(&run(
                &env(&add),
                br#"{"cniVersion":"9.9.9","name":"n","type":"kwire"}"#
            )),
            1
        );
        assert_eq!(
            code_of(&run(
                &env(&add),
                br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#
            )),
            7
        );
        assert_eq!(code_of(&run(&env(&add), &conf(r#","mtu":10"#))), 7);
        assert_eq!(
            code_of(&run(&env(&add[..3]), &conf(""))),
            4,
            "missing CNI_NETNS"
        );
        let mut bad_args = add.to_vec();
        bad_args.push(("CNI_ARGS", "nokey"));
        assert_eq!(code_of(&run(&env(&bad_args), &conf(""))), 4);
        // The daemon is not there: ADD says try again later, STATUS not ready.
        let o = run(&env(&add), &conf(""));
        assert_eq!((o.exit, code_of(&o)), (1, 11));
        assert!(o.stdout.contains("/nonexistent/kwire.sock"), "{}", o.stdout);
        assert_eq!(
            code_of(&run(&env(&[("CNI_COMMAND", "STATUS")]), &conf(""))),
            50
        );
    }

    #[test]
    fn del_succeeds_and_is_queued_when_the_daemon_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        let cfg = conf(&format!(r#","delQueueDir":"{}""#, q.display()));
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(
            run(&e, &cfg),
            Outcome {
                stdout: String::new(),
                exit: 0
            }
        );
        assert_eq!(run(&e, &cfg).exit, 0, "DEL twice is fine");
        let files: Vec<_> = std::fs::read_dir(&q).unwrap().collect();
        assert_eq!(files.len(), 1);
        let saved: Request =
            serde_json::from_slice(&std::fs::read(files[0].as_ref().unwrap().path()).unwrap())
                .unwrap();
        assert_eq!(
            (saved.command, saved.container_id.as_str()),
            (Command::Del, "abc")
        );
    }
}
