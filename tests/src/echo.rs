//! Long-lived TCP connections from lab pods, to prove they survive what a test does to the
//! agents (restarts, endpoint changes): [`EchoServer`] echoes lines on [`ECHO_PORT`] inside a
//! pod's namespace and counts the connections it accepted; [`Ticker`] sends a numbered line
//! every [`TICK`] on one connection and checks each echo; [`echo_once`] is one fresh
//! connection. [`PushServer`] and [`Listener`] are the other way round: the server speaks,
//! a line every [`TICK`], and the client only reads, so nothing the client sends re-opens the
//! flow on its node.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{run_in_netns, wait_until};

/// A line every this long on each long-lived connection.
pub const TICK: Duration = Duration::from_millis(100);
/// How long one echo may take. Covers an agent's outage: TCP retransmits with exponential
/// backoff (200 ms, 400 ms, ... 3.2 s) until the restarted agent carries the segments again.
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(15);
/// Port of the tests' echo servers inside pods (the lab's pod server uses 80).
pub const ECHO_PORT: u16 = 9000;

/// A TCP listener on `[::]:port` inside a pod that hands each accepted connection (blocking)
/// to `handle`, with the flag that is set once the listener is dropped; stops accepting then.
struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    fn start(
        netns: &str,
        port: u16,
        handle: impl Fn(TcpStream, &Arc<AtomicBool>) + Send + 'static,
    ) -> Acceptor {
        let listener = run_in_netns(netns, || TcpListener::bind(("::", port)))
            .unwrap_or_else(|e| panic!("listen on [::]:{port} in {netns}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        handle(conn, &s);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => return,
                }
            }
        });
        Acceptor {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP echo server listening on every address of a pod (dual-stack `[::]`), counting the
/// connections it accepts. Stops accepting on drop.
pub struct EchoServer {
    accepted: Arc<AtomicUsize>,
    _acceptor: Acceptor,
}

impl EchoServer {
    /// Listens on `[::]:ECHO_PORT` inside `netns`.
    pub fn start(netns: &str) -> EchoServer {
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let acceptor = Acceptor::start(netns, ECHO_PORT, move |conn, _| {
            a.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let Ok(mut r) = conn.try_clone() else { return };
                let mut w = conn;
                let _ = std::io::copy(&mut r, &mut w);
            });
        });
        EchoServer {
            accepted,
            _acceptor: acceptor,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A long-lived TCP connection from a pod and the thread that works it: the lines it got
/// right so far, the first failure, stopped (and the connection shut) on drop.
struct LineConn {
    what: String,
    stream: TcpStream,
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    lines: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl LineConn {
    /// Connects from `netns` to `to` and runs `work` on the connection, with the stop flag and
    /// the line count; what it returns is the failure.
    fn open(
        netns: &str,
        to: SocketAddr,
        what: &str,
        work: impl FnOnce(TcpStream, &AtomicBool, &AtomicU64) -> Option<String> + Send + 'static,
    ) -> LineConn {
        let stream = run_in_netns(netns, || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })
        .unwrap_or_else(|e| panic!("{what}: connect to {to} from {netns}: {e}"));
        let local = stream.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let (s, n, f) = (stop.clone(), lines.clone(), failure.clone());
        let conn = stream.try_clone().unwrap();
        let thread = std::thread::spawn(move || {
            if let Some(problem) = work(conn, &s, &n) {
                *f.lock().unwrap() = Some(problem);
            }
        });
        LineConn {
            what: what.to_string(),
            stream,
            local,
            stop,
            lines,
            failure,
            thread: Some(thread),
        }
    }

    fn lines(&self) -> u64 {
        self.lines.load(Ordering::SeqCst)
    }

    fn check(&self) {
        if let Some(f) = self.failure.lock().unwrap().as_ref() {
            panic!(
                "{} (local {}): the connection failed: {f}",
                self.what, self.local
            );
        }
    }

    /// Waits until `n` more lines (`noun`) came on this very connection.
    fn wait_more(&self, n: u64, deadline: Duration, noun: &str) {
        let from = self.lines();
        wait_until(
            deadline,
            format!("{}: {n} more {noun} after line {from}", self.what),
            || {
                self.check();
                self.lines() >= from + n
            },
        );
    }
}

impl Drop for LineConn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One long-lived TCP connection from a pod: a numbered line every [`TICK`], each echo read
/// back and checked. Any error (reset, timeout, wrong echo) is kept and fails [`Ticker::check`].
pub struct Ticker(LineConn);

impl Ticker {
    pub fn start(netns: &str, to: SocketAddr, what: &str) -> Ticker {
        let tag = what.to_string();
        Ticker(LineConn::open(
            netns,
            to,
            what,
            move |stream, stop, echoed| {
                stream.set_read_timeout(Some(ECHO_TIMEOUT)).unwrap();
                stream.set_nodelay(true).unwrap();
                let mut w = stream.try_clone().unwrap();
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let sent = format!("{tag} {seq}\n");
                    let t = Instant::now();
                    if let Err(err) = w.write_all(sent.as_bytes()) {
                        return Some(format!("writing line {seq}: {err}"));
                    }
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) => return Some(format!("closed by the server at line {seq}")),
                        Ok(_) if line == sent => echoed.store(seq, Ordering::SeqCst),
                        Ok(_) => return Some(format!("line {seq}: sent {sent:?}, got {line:?}")),
                        Err(_) if stop.load(Ordering::Relaxed) => return None,
                        Err(err) => {
                            return Some(format!(
                                "reading the echo of line {seq} after {:.1} s: {err}",
                                t.elapsed().as_secs_f64()
                            ))
                        }
                    }
                    std::thread::sleep(TICK);
                }
                None
            },
        ))
    }

    pub fn echoed(&self) -> u64 {
        self.0.lines()
    }

    /// Panics if the connection failed.
    pub fn check(&self) {
        self.0.check()
    }

    /// Waits until `n` more lines came back on this very connection.
    pub fn wait_more(&self, n: u64, deadline: Duration) {
        self.0.wait_more(n, deadline, "echoes")
    }
}

/// One new connection from a pod: a line out, its echo back.
pub fn echo_once(netns: &str, to: SocketAddr) -> Result<(), String> {
    let mut s = run_in_netns(netns, || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5))
    })
    .map_err(|e| format!("connect {to}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"fresh\n").map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    (line == "fresh\n")
        .then_some(())
        .ok_or_else(|| format!("echo {line:?}"))
}

/// Port of the tests' push servers inside pods.
pub const PUSH_PORT: u16 = 9001;

/// A TCP server on `[::]:PUSH_PORT` inside a pod that, on every connection, writes a numbered
/// line every [`TICK`] until the connection fails or the server is dropped; it reads nothing.
pub struct PushServer {
    _acceptor: Acceptor,
}

impl PushServer {
    pub fn start(netns: &str) -> PushServer {
        let acceptor = Acceptor::start(netns, PUSH_PORT, |mut conn, stop| {
            let _ = conn.set_nodelay(true);
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    if conn.write_all(format!("push {seq}\n").as_bytes()).is_err() {
                        return;
                    }
                    std::thread::sleep(TICK);
                }
                let _ = conn.shutdown(Shutdown::Both);
            });
        });
        PushServer {
            _acceptor: acceptor,
        }
    }
}

/// One long-lived TCP connection from a pod to a [`PushServer`] that only reads, checking that
/// the lines come in order. An error (reset, a gap, the end) is kept and fails
/// [`Listener::check`].
pub struct Listener(LineConn);

impl Listener {
    pub fn start(netns: &str, to: SocketAddr, what: &str) -> Listener {
        Listener(LineConn::open(netns, to, what, |stream, stop, read| {
            let mut r = BufReader::new(stream);
            let mut line = String::new();
            loop {
                line.clear();
                let got = r.read_line(&mut line);
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                let want = format!("push {}\n", read.load(Ordering::SeqCst) + 1);
                match got {
                    Ok(0) => return Some("closed by the server".to_string()),
                    Ok(_) if line == want => {
                        read.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => return Some(format!("expected {want:?}, got {line:?}")),
                    Err(e) => return Some(format!("reading: {e}")),
                }
            }
        }))
    }

    /// Lines read so far.
    pub fn read(&self) -> u64 {
        self.0.lines()
    }

    /// Panics if the connection failed.
    pub fn check(&self) {
        self.0.check()
    }

    /// Waits until `n` more lines came on this very connection.
    pub fn wait_more(&self, n: u64, deadline: Duration) {
        self.0.wait_more(n, deadline, "lines")
    }
}
