//! `kwire install-cni`: what the DaemonSet's init container runs: copies the CNI plugin
//! (`kwire-cni`, static, so it runs on any node) onto the node as `<bin-dir>/kwire` (runtimes
//! run `CNI_PATH/<type>`) and the configuration list into `<conf-dir>`, each written to a
//! temporary file and renamed, so a runtime never sees half a file.

use anyhow::Context as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, clap::Args)]
pub struct InstallCniArgs {
    /// The plugin binary to install.
    #[arg(long, default_value = "/usr/local/bin/kwire-cni")]
    pub plugin: PathBuf,
    /// The configuration list to install.
    #[arg(long, default_value = "/etc/kwire/10-kwire.conflist")]
    pub conflist: PathBuf,
    /// The node's CNI plugin directory, as mounted in the container.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The node's CNI configuration directory, as mounted in the container.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
}

/// The plugin's name on the node: the configuration's `"type": "kwire"`.
pub const PLUGIN_NAME: &str = "kwire";

/// Copies `from` to `dir/name` through `dir/.name.tmp` and a rename.
pub fn install_file(from: &Path, dir: &Path, name: &str, mode: u32) -> anyhow::Result<PathBuf> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let to = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| {
            format!(
                "creating {} (is the host directory mounted?)",
                tmp.display()
            )
        })?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &to)
        .with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    Ok(to)
}

pub fn run(args: &InstallCniArgs) -> anyhow::Result<()> {
    let plugin = install_file(&args.plugin, &args.bin_dir, PLUGIN_NAME, 0o755)?;
    let name = args
        .conflist
        .file_name()
        .and_then(|n| n.to_str())
        .context("--conflist has no file name")?;
    let conf = install_file(&args.conflist, &args.conf_dir, name, 0o644)?;
    println!("installed {} and {}", plugin.display(), conf.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_plugin_and_conflist_by_rename() {
        let src = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let conf = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("kwire-cni"), b"\x7fELF").unwrap();
        std::fs::write(src.path().join("10-kwire.conflist"), b"{}").unwrap();
        let args = InstallCniArgs {
            plugin: src.path().join("kwire-cni"),
            conflist: src.path().join("10-kwire.conflist"),
            bin_dir: bin.path().into(),
            conf_dir: conf.path().into(),
        };
        run(&args).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let m = std::fs::metadata(bin.path().join("kwire")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o755);
        assert_eq!(
            std::fs::read(conf.path().join("10-kwire.conflist")).unwrap(),
            b"{}"
        );
        assert_eq!(
            std::fs::read_dir(bin.path()).unwrap().count(),
            1,
            "no temporary left"
        );
        let missing = InstallCniArgs {
            bin_dir: src.path().join("nope"),
            ..args
        };
        assert!(
            format!("{:#}", run(&missing).unwrap_err()).contains("is the host directory mounted?")
        );
    }
}
