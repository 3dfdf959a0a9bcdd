//! What one watch event costs the agent's Node watch thread, through the whole client stack
//! (TLS, HTTP, the watcher, the filter, the pacer), by turn (`--watch-turn`).
//!
//! `agent_scale` measures the whole agent at the goal size, which takes minutes and reads the
//! machine's hour as much as the agent. This starts only the Node watch thread
//! (`watches::start_nodes`, as the agent does) against the API stand-in in this process, sends
//! it Node status heartbeats at a steady rate (each dropped by the filter), and reads that
//! thread's own CPU time (`/proc/self/task/TID/schedstat`) and context switches over a window,
//! idle subtracted: per event, and per wake-up (each turn is one context switch).
//!
//! Run at several turns, it splits an event's cost in two: what a wake-up costs whatever it
//! reads (the thread starts cold: caches, the scheduler) and what each event read in it adds.
//!
//! ```text
//! cargo build --release -p kwire-tests --example watch_turn
//! target/release/examples/watch_turn [--nodes N] [--rate EVENTS_PER_S] [--secs S] [--turn-ms MS] [--json]
//! ```
//!
//! One turn per process: run it once per turn, interleaved, and compare runs taken together.

#[path = "../agent_scale/synth.rs"]
#[allow(dead_code)]
mod synth;

use kwire::agent::watches;
use kwire::node_state::FilterCounts;
use kwire_lab::apiserver::{ApiServer, ApiServerConfig};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str =
    "watch_turn [--nodes N] [--rate EVENTS_PER_S] [--secs S] [--turn-ms MS] [--json]";

struct Opts {
    nodes: usize,
    rate: f64,
    secs: f64,
    turn: Duration,
    json: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        nodes: 1000,
        rate: 200.0,
        secs: 10.0,
        turn: watches::WATCH_TURN,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| panic!("{a} needs a value\n{USAGE}"))
        };
        let bad = |what: &str| -> ! { panic!("{what}\n{USAGE}") };
        match a.as_str() {
            "--nodes" => {
                o.nodes = val()
                    .parse()
                    .unwrap_or_else(|_| bad("--nodes: not a number"))
            }
            "--rate" => {
                o.rate = val()
                    .parse()
                    .unwrap_or_else(|_| bad("--rate: not a number"))
            }
            "--secs" => {
                o.secs = val()
                    .parse()
                    .unwrap_or_else(|_| bad("--secs: not a number"))
            }
            "--turn-ms" => {
                o.turn = Duration::from_millis(
                    val()
                        .parse()
                        .unwrap_or_else(|_| bad("--turn-ms: not a number of milliseconds")),
                )
            }
            "--json" => o.json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bad(&format!("unknown argument {a}")),
        }
    }
    assert!(o.nodes >= 2 && o.rate > 0.0 && o.secs > 0.0, "{USAGE}");
    o
}

/// The ids of this process's threads named `name`.
fn threads(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| {
            let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            (comm.trim_end() == name).then_some(tid)
        })
        .collect()
}

/// One thread's time on a CPU and its context switches (voluntary and not).
#[derive(Clone, Copy)]
struct ThreadReading {
    cpu: Duration,
    switches: u64,
}

impl ThreadReading {
    fn take(tid: u32) -> ThreadReading {
        let sched =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).expect("schedstat");
        let ns: u64 = sched
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .expect("schedstat's first field");
        let status =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).expect("status");
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        ThreadReading {
            cpu: Duration::from_nanos(ns),
            switches,
        }
    }

    fn since(&self, before: &ThreadReading) -> (Duration, u64) {
        (self.cpu - before.cpu, self.switches - before.switches)
    }
}

fn main() {
    let o = opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let api = rt
        .block_on(ApiServer::start(ApiServerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            history_size: 100_000,
            ..ApiServerConfig::default()
        }))
        .expect("API stand-in");
    let node_kind = ApiServer::kind("v1", "Node").expect("the Node kind");
    let ip = |i: usize| format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255);
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    for i in 0..o.nodes {
        let name = format!("node-{i:05}");
        api.create(synth::node(
            &name,
            &ip(i),
            key,
            &format!("198.51.100.1:{}", 10000 + i),
        ))
        .unwrap_or_else(|e| panic!("creating {name}: {e:?}"));
    }
    let dir = std::env::temp_dir().join(format!("kwire-watch-turn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let config = rt
        .block_on(kwire::kubeapi::config(Some(&kubeconfig)))
        .expect("client config");
    let _ = std::fs::remove_dir_all(&dir);

    // The watch thread, as the agent starts it; what passes its filter is drained here.
    let tally = Arc::new(FilterCounts::default());
    let before = threads("kwire-nodes");
    let mut rx = watches::start_nodes(config, "node-00000".into(), o.turn, tally.clone())
        .expect("the Node watch thread");
    // The thread names itself once it runs.
    let t = Instant::now();
    let tid = loop {
        if let Some(tid) = threads("kwire-nodes")
            .into_iter()
            .find(|t| !before.contains(t))
        {
            break tid;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no new kwire-nodes thread after 10 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let listed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = listed.clone();
    rt.spawn(async move {
        while let Some(item) = rx.recv().await {
            if matches!(item, Ok(kube::runtime::watcher::Event::InitDone)) {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let t = Instant::now();
    while !listed.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the Node list did not arrive in 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut beat = 0u64;
    let mut heartbeats = |n: usize, rng: &mut u64| {
        let t0 = Instant::now();
        for k in 0..n {
            let due = t0 + Duration::from_secs_f64(k as f64 / o.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            let i = 1 + (*rng % (o.nodes as u64 - 1)) as usize;
            beat += 1;
            let body = synth::node_status_body(&ip(i), &format!("node-{i:05}"), beat);
            api.merge_patch(node_kind, None, &format!("node-{i:05}"), &body, true)
                .expect("heartbeat");
        }
    };
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    // Warm up, then an idle window, then the measured one.
    heartbeats((o.rate as usize).max(1), &mut rng);
    std::thread::sleep(Duration::from_secs(1));
    let idle_secs = 2.0;
    let r0 = ThreadReading::take(tid);
    std::thread::sleep(Duration::from_secs_f64(idle_secs));
    let (idle_cpu, idle_sw) = ThreadReading::take(tid).since(&r0);
    let dropped0 = tally.get().1;
    let events = (o.rate * o.secs).round() as usize;
    let r1 = ThreadReading::take(tid);
    let w = Instant::now();
    heartbeats(events, &mut rng);
    // Until the thread has read them all (each dropped by the filter), then the window ends.
    let t = Instant::now();
    while tally.get().1 - dropped0 < events as u64 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the watch thread read {} of {events} heartbeats",
            tally.get().1 - dropped0
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let wall = w.elapsed();
    let (cpu, sw) = ThreadReading::take(tid).since(&r1);
    let idle_rate = idle_cpu.as_secs_f64() / idle_secs;
    let net = (cpu.as_secs_f64() - idle_rate * wall.as_secs_f64()).max(0.0);
    let per_event_us = net / events as f64 * 1e6;
    let wakeups = sw.saturating_sub((idle_sw as f64 * wall.as_secs_f64() / idle_secs) as u64);
    let per_wakeup_us = net / wakeups.max(1) as f64 * 1e6;
    let out = json!({
        "turn_ms": o.turn.as_secs_f64() * 1e3,
        "nodes": o.nodes,
        "rate": o.rate,
        "events": events,
        "cpu_ms": (cpu.as_secs_f64() * 1e4).round() / 10.0,
        "idle_cpu_cores": (idle_rate * 1e5).round() / 1e5,
        "per_event_us": (per_event_us * 10.0).round() / 10.0,
        "wakeups": wakeups,
        "events_per_wakeup": ((events as f64 / wakeups.max(1) as f64) * 100.0).round() / 100.0,
        "per_wakeup_us": (per_wakeup_us * 10.0).round() / 10.0,
    });
    if o.json {
        println!("{out}");
    } else {
        println!(
            "turn {:?}: {events} Node heartbeats at {}/s, {} µs of the watch thread's CPU each; {} wake-ups ({} events each, {} µs each)",
            o.turn, o.rate, out["per_event_us"], wakeups, out["events_per_wakeup"], out["per_wakeup_us"]
        );
    }
    rt.block_on(api.stop());
}
