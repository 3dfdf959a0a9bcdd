//! The test-support library itself: namespaces clean up after themselves, even on panic, and
//! `sweep_stale` removes what a crashed run left behind.

use std::path::Path;
use std::time::Duration;

use kwire_tests::*;

fn netns_exists(name: &str) -> bool {
    Path::new("/var/run/netns").join(name).exists()
}

#[test]
fn netns_drop_kills_processes_and_deletes_namespace_even_on_panic() {
    require_root!();
    let scratch = Scratch::new("harness");
    let log = scratch.file("sleep.log");
    let ns = Netns::new("h");
    // Started outside any guard, as a leaked process would be.
    let mut leaked = ns.command(&["sleep", "300"]).spawn().expect("spawn sleep");
    let pid = leaked.id();
    wait_until(
        Duration::from_secs(5),
        "sleep to show in ip netns pids",
        || ns.pids().contains(&pid),
    );
    assert!(ns.ping_once("127.0.0.1", None), "lo is not up in {ns}");
    let name = ns.name().to_string();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let ns = ns;
        let _guarded = ns.spawn(&["sleep", "300"], log);
        panic!("deliberate panic: the guards must still clean up");
    }));
    assert!(r.is_err());
    assert!(!netns_exists(&name), "{name} still exists after drop");
    let status = leaked.wait().expect("wait for the leaked process");
    assert!(
        !status.success(),
        "the process left in {name} was not killed"
    );
}

#[test]
fn interface_names_fit_and_are_unique() {
    require_root!();
    let a = Netns::new("a");
    let b = Netns::new("b");
    assert_ne!(a.name(), b.name());
    let ifa = a.ifname("kw");
    assert!(ifa.len() <= 15, "{ifa} longer than IFNAMSIZ-1");
    let veth = Veth::new(
        &a,
        &["198.51.100.1/24", "2001:db8:2::1/64"],
        &b,
        &["198.51.100.2/24", "2001:db8:2::2/64"],
        1500,
    );
    assert!(veth.a.len() <= 15 && veth.b.len() <= 15);
    a.wait_ping("198.51.100.2", Duration::from_secs(5));
    b.wait_ping("2001:db8:2::1", Duration::from_secs(5));
}

#[test]
fn sweep_removes_leftovers_of_dead_pids_only() {
    require_root!();
    // A pid that is not running: the highest possible, checked.
    let dead = (1..4_194_304u32)
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    let id = id_for_pid(dead);
    let name = format!("{NETNS_PREFIX}{id}-x");
    run_host(&["ip", "netns", "add", &name]);
    let mut leaked = std::process::Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "300"])
        .spawn()
        .expect("spawn sleep");
    std::fs::create_dir_all(WG_SOCKET_DIR).unwrap();
    let sock = Path::new(WG_SOCKET_DIR).join(format!("kw{id}.sock"));
    std::fs::write(&sock, b"").unwrap();
    let live = Netns::new("live");

    sweep_stale();

    assert!(!netns_exists(&name), "stale {name} not swept");
    assert!(!sock.exists(), "stale socket {} not swept", sock.display());
    let st = leaked.wait().expect("wait sleep");
    assert!(
        !st.success(),
        "the process in the stale namespace was not killed"
    );
    assert!(
        netns_exists(live.name()),
        "sweep removed a namespace of a live process"
    );
}
