//! `kwire-flamegraph`: turns what `perf script` printed for a recording into a flame graph SVG
//! (inferno) and prints the symbols the samples were in (self time, as `perf report
//! --no-children`), so that `make profile` shows where time goes without knowing perf.

use anyhow::{bail, Context, Result};
use clap::Parser;
use inferno::collapse::perf::{Folder, Options as CollapseOptions};
use inferno::collapse::Collapse;
use inferno::flamegraph::{self, Options as FlameOptions};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::PathBuf;

/// A flame graph and the top symbols of a perf recording.
#[derive(Parser, Debug)]
#[command(
    name = "kwire-flamegraph",
    version,
    after_help = "Example:\n  perf script -i perf.data > perf.txt\n  kwire-flamegraph perf.txt --svg flame.svg --top 25"
)]
struct Args {
    /// `perf script` output (text) of a `perf record -g` recording.
    input: PathBuf,
    /// Where to write the flame graph.
    #[arg(long, default_value = "flamegraph.svg")]
    svg: PathBuf,
    /// Also write the folded stacks ("frame;frame;... count" per line) here.
    #[arg(long)]
    folded: Option<PathBuf>,
    /// How many symbols to list (by samples taken in them, not in what they called).
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// The flame graph's title.
    #[arg(long, default_value = "kwire")]
    title: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let input = File::open(&args.input)
        .with_context(|| format!("opening {} (perf script output)", args.input.display()))?;
    let mut folded = Vec::new();
    Folder::from(CollapseOptions::default())
        .collapse(BufReader::new(input), &mut folded)
        .context("reading perf script output")?;
    let folded = String::from_utf8_lossy(&folded).into_owned();
    if folded.trim().is_empty() {
        bail!(
            "no stacks in {}: was it written by `perf script` from a `perf record -g` recording?",
            args.input.display()
        );
    }
    if let Some(path) = &args.folded {
        std::fs::write(path, &folded).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut opts = FlameOptions::default();
    opts.title = args.title.clone();
    opts.count_name = "samples".into();
    let out =
        File::create(&args.svg).with_context(|| format!("creating {}", args.svg.display()))?;
    flamegraph::from_lines(&mut opts, folded.lines(), BufWriter::new(out))
        .context("writing the flame graph")?;
    print!("{}", summary(&folded, args.top));
    println!("flame graph: {}", args.svg.display());
    Ok(())
}

/// The `top` symbols by self weight (the last frame of each stack) with their shares, and
/// the weight per thread name (the first frame), as a plain-text table.
fn summary(folded: &str, top: usize) -> String {
    let mut total = 0u64;
    let mut leaf: HashMap<&str, u64> = HashMap::new();
    let mut comm: HashMap<&str, u64> = HashMap::new();
    for line in folded.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        total += n;
        let mut frames = stack.split(';');
        *comm.entry(frames.next().unwrap_or("?")).or_default() += n;
        *leaf
            .entry(stack.rsplit(';').next().unwrap_or("?"))
            .or_default() += n;
    }
    // perf weighs each sample by its period: nanoseconds with cpu-clock (no PMU, as in most
    // VMs), cycles with a PMU; the shares are what matters.
    let mut out = format!(
        "total weight {total} (perf sample periods: ns with cpu-clock, cycles with a PMU)\n\n\
         thread                   weight  share\n"
    );
    for (name, n) in sorted(comm).into_iter().take(top) {
        out += &format!("{name:<16} {n:>15}  {:>5.1}%\n", pct(n, total));
    }
    out += "\n    self weight  share  symbol (samples in it, not in what it called)\n";
    for (name, n) in sorted(leaf).into_iter().take(top) {
        out += &format!("{n:>15}  {:>5.1}%  {name}\n", pct(n, total));
    }
    out
}

fn sorted(m: HashMap<&str, u64>) -> Vec<(&str, u64)> {
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v
}

fn pct(n: u64, total: u64) -> f64 {
    n as f64 * 100.0 / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_self_samples_and_threads() {
        let folded = "kwire-udp-0;main;open;chacha 6\nkwire-tun-0;main;seal;chacha 2\nkwire-tun-0;main;write 2\n";
        let s = summary(folded, 5);
        assert!(s.starts_with("total weight 10 "), "{s}");
        assert!(s.contains("\n              8   80.0%  chacha\n"), "{s}");
        assert!(s.contains("\n              2   20.0%  write\n"), "{s}");
        assert!(
            s.contains("\nkwire-tun-0                    4   40.0%\n"),
            "{s}"
        );
    }

    #[test]
    fn perf_script_stacks_become_a_flame_graph() {
        let perf = "kwire-udp-0 1234 [000] 100.000001: 1010101 cycles:P: \n\
            \t    55d0c0de0001 chacha20_poly1305_open+0x11 (/usr/bin/kwire)\n\
            \t    55d0c0de0002 kwire::datapath::from_network::Message::step+0x22 (/usr/bin/kwire)\n\
            \n\
            kwire-tun-0 1235 [001] 100.000002: 1010101 cycles:P: \n\
            \t    55d0c0de0003 chacha20_poly1305_seal+0x33 (/usr/bin/kwire)\n\
            \n";
        let mut folded = Vec::new();
        Folder::from(CollapseOptions::default())
            .collapse(perf.as_bytes(), &mut folded)
            .unwrap();
        let folded = String::from_utf8(folded).unwrap();
        assert!(folded.contains("chacha20_poly1305_open 1"), "{folded}");
        let mut svg = Vec::new();
        flamegraph::from_lines(&mut FlameOptions::default(), folded.lines(), &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.starts_with("<?xml") && svg.contains("chacha20_poly1305_seal"));
    }
}
