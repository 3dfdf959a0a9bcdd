//! Packet captures (tcpdump) that prove what is and is not on the wire.

#[allow(unused_imports)]
use crate::*;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

/// tcpdump on an interface of a namespace, writing a pcap; [`Capture::stop`] returns the packets
/// as `tcpdump -r FILE -nn` lines.
pub struct Capture {
    proc: Proc,
    pcap: PathBuf,
}

impl Capture {
    /// Starts capturing on `ifname` in `ns` with BPF `filter` (may be empty) and waits until
    /// tcpdump is listening.
    pub fn start(ns: &Netns, ifname: &str, filter: &str, scratch: &Scratch) -> Capture {
        Capture::start_in(ns.name(), ifname, filter, scratch)
    }

    /// [`Capture::start`] in the namespace named `netns` (one a lab made, say).
    pub fn start_in(netns: &str, ifname: &str, filter: &str, scratch: &Scratch) -> Capture {
        require_tool("tcpdump");
        let tag = format!("{netns}-{ifname}-{}", unique_id());
        let pcap = scratch.file(&format!("{tag}.pcap"));
        let log = scratch.file(&format!("{tag}.tcpdump.log"));
        let pcap_s = pcap.display().to_string();
        // --immediate-mode: hand each packet over at once (TPACKET_V3 otherwise holds a block
        // back for up to a second, and a capture stopped early loses it); -U: write each packet
        // at once; -Z root: Debian's tcpdump would otherwise switch to the tcpdump user and lose
        // write access to the scratch directory.
        let mut cmd = std::process::Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            netns,
            "tcpdump",
            "--immediate-mode",
            "-i",
            ifname,
            "-n",
            "-U",
            "-Z",
            "root",
            "-s",
            "256",
            "-w",
            &pcap_s,
        ]);
        if !filter.is_empty() {
            cmd.arg(filter);
        }
        let mut proc = Proc::spawn(cmd, "tcpdump", log).with_stop_signal(Signal::SIGINT);
        wait_until(
            Duration::from_secs(10),
            format!("tcpdump listening on {ifname} in {netns}"),
            || {
                assert!(
                    proc.is_running(),
                    "tcpdump on {ifname} in {netns} exited:\n{}",
                    proc.log()
                );
                proc.log().contains("listening on")
            },
        );
        Capture { proc, pcap }
    }

    /// [`Capture::stop`], and the pcap's bytes (to look for plaintext in any captured byte).
    pub fn stop_with_pcap(self) -> (Vec<String>, Vec<u8>) {
        let pcap = self.pcap.clone();
        let lines = self.stop();
        (lines, std::fs::read(&pcap).unwrap_or_default())
    }

    /// Stops tcpdump and returns the captured packets, one `tcpdump -r -nn` line each.
    pub fn stop(mut self) -> Vec<String> {
        self.proc.stop();
        let pcap = self.pcap.display().to_string();
        let text = run_host(&["tcpdump", "-r", &pcap, "-nn"]);
        text.lines().map(str::to_string).collect()
    }
}
