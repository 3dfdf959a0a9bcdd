//! The `kwire-cni` binary: reads the CNI environment and stdin, prints the result.

use std::io::{Read, Write};

fn main() {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("kwire-cni: the kwire CNI plugin. A container runtime runs it with CNI_COMMAND and the\nnetwork configuration on stdin (\"type\": \"kwire\", optional \"socket\", \"mtu\"); it asks the\nkwire daemon on this node over its local socket (default /run/kwire/cni.sock).");
        return;
    }
    let env = std::env::vars().collect();
    let mut stdin = Vec::new();
    if std::io::stdin()
        .take(1 << 20)
        .read_to_end(&mut stdin)
        .is_err()
    {
        stdin.clear();
    }
    let out = kwire_cni::run(&env, &stdin);
    let mut so = std::io::stdout().lock();
    let _ = so.write_all(out.stdout.as_bytes());
    let _ = so.flush();
    std::process::exit(out.exit);
}
