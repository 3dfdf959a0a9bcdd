//! `kwire-lab graph`: the whole lab's mesh as one picture, by asking every node's agent for its
//! status (`kwire graph` with each node's run directory) plus the API's Nodes.

use super::{find_kwire, kubeconfig};
use crate::cluster::naming::LabNames;
use crate::cluster::state::load_running;
use crate::cluster::LabError;
use std::path::PathBuf;
use std::process::Command;

/// What `kwire graph` printed (DOT or SVG) for the lab `name`.
pub fn graph(name: &str, kwire: Option<PathBuf>, format: &str) -> Result<String, LabError> {
    let names = LabNames::new(name)?;
    let (lab, _) = load_running(&names)?;
    let bin = find_kwire(kwire)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("graph").arg("--format").arg(format);
    // Nodes whose agent is down have no socket; the API still names them.
    let mut asked = 0;
    for n in &lab.nodes {
        if n.run_dir.join("status.sock").exists() {
            cmd.arg("--run-dir").arg(&n.run_dir);
            asked += 1;
        }
    }
    if asked == 0 {
        return Err(LabError::Usage(format!(
            "no agent of lab {name} serves its status socket: are the agents running? (`kwire-lab status --name {name}`)"
        )));
    }
    if let Ok(k) = kubeconfig(name, None) {
        if k.exists() {
            cmd.arg("--kubeconfig").arg(k);
        }
    }
    let out = cmd
        .output()
        .map_err(|e| LabError::io(format!("running {} graph", bin.display()), e))?;
    if !out.status.success() {
        return Err(LabError::Usage(format!(
            "{} graph failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
