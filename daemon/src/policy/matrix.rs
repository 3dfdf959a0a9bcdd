//! Reachability truth tables printed in the upstream netpol e2e format (rows from, columns to, `.` reachable, `X` blocked).

/// A from x to table of booleans, printed as the upstream `TruthTable.PrettyPrint` does:
/// a header `-` then the `to` names, one row per `from`, cells `.` (true), `X` (false) or `?`
/// (unknown), tab-separated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruthTable {
    froms: Vec<String>,
    tos: Vec<String>,
    /// Row-major: `values[from * tos.len() + to]`.
    values: Vec<Option<bool>>,
}

impl TruthTable {
    /// A table with every cell unknown.
    pub fn new(froms: Vec<String>, tos: Vec<String>) -> Self {
        let values = vec![None; froms.len() * tos.len()];
        TruthTable { froms, tos, values }
    }

    /// A square table over `items` with every cell `value`.
    pub fn filled(items: &[String], value: bool) -> Self {
        let mut t = TruthTable::new(items.to_vec(), items.to_vec());
        t.values.iter_mut().for_each(|v| *v = Some(value));
        t
    }

    /// Fills every cell with `f(from, to)`.
    pub fn from_fn(
        froms: Vec<String>,
        tos: Vec<String>,
        mut f: impl FnMut(&str, &str) -> bool,
    ) -> Self {
        let mut t = TruthTable::new(froms, tos);
        for fi in 0..t.froms.len() {
            for ti in 0..t.tos.len() {
                t.values[fi * t.tos.len() + ti] = Some(f(&t.froms[fi], &t.tos[ti]));
            }
        }
        t
    }

    pub fn froms(&self) -> &[String] {
        &self.froms
    }

    pub fn tos(&self) -> &[String] {
        &self.tos
    }

    fn index(&self, from: &str, to: &str) -> Option<usize> {
        let fi = self.froms.iter().position(|f| f == from)?;
        let ti = self.tos.iter().position(|t| t == to)?;
        Some(fi * self.tos.len() + ti)
    }

    /// Sets one cell; names not in the table are ignored.
    pub fn set(&mut self, from: &str, to: &str, value: bool) {
        if let Some(i) = self.index(from, to) {
            self.values[i] = Some(value);
        }
    }

    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        self.index(from, to).and_then(|i| self.values[i])
    }

    /// Cell by cell: `true` where both tables agree. With `ignore_loopback`, cells whose from
    /// and to are the same name count as agreeing (upstream ignores loopback: its semantics
    /// differ between implementations). Returns the comparison table and the number of
    /// disagreements.
    pub fn compare(&self, actual: &TruthTable, ignore_loopback: bool) -> (TruthTable, usize) {
        let mut wrong = 0;
        let table = TruthTable::from_fn(self.froms.clone(), self.tos.clone(), |from, to| {
            let same =
                (ignore_loopback && from == to) || self.get(from, to) == actual.get(from, to);
            wrong += usize::from(!same);
            same
        });
        (table, wrong)
    }

    /// The upstream format, every line prefixed with `indent`.
    pub fn pretty_print(&self, indent: &str) -> String {
        let mut lines = Vec::with_capacity(self.froms.len() + 1);
        let mut header = vec!["-\t".to_string()];
        header.extend(self.tos.iter().cloned());
        lines.push(format!("{indent}{}", header.join("\t")));
        for (fi, from) in self.froms.iter().enumerate() {
            let mut line = vec![from.clone()];
            for ti in 0..self.tos.len() {
                let mark = match self.values[fi * self.tos.len() + ti] {
                    None => "?",
                    Some(true) => ".",
                    Some(false) => "X",
                };
                line.push(format!("{mark}\t"));
            }
            lines.push(format!("{indent}{}", line.join("\t")));
        }
        lines.join("\n")
    }
}

impl std::fmt::Display for TruthTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.pretty_print(""))
    }
}

/// A pod pattern of the upstream `Peer`: `None` matches any namespace or pod name.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeerPattern<'a> {
    pub namespace: Option<&'a str>,
    pub pod: Option<&'a str>,
}

impl PeerPattern<'_> {
    fn matches(&self, pod: &str) -> bool {
        let (ns, name) = pod.split_once('/').unwrap_or(("", pod));
        self.namespace.is_none_or(|n| n == ns) && self.pod.is_none_or(|p| p == name)
    }
}

/// Expected reachability between `namespace/pod` names, built the way the upstream suite
/// builds it (`NewReachability`, `ExpectPeer`, `ExpectAllIngress`, `ExpectAllEgress`, `Expect`).
#[derive(Clone, Debug)]
pub struct Reachability {
    pub expected: TruthTable,
}

impl Reachability {
    pub fn new(pods: &[String], default: bool) -> Self {
        Reachability {
            expected: TruthTable::filled(pods, default),
        }
    }

    pub fn expect(&mut self, from: &str, to: &str, connected: bool) {
        self.expected.set(from, to, connected);
    }

    pub fn expect_peer(&mut self, from: PeerPattern<'_>, to: PeerPattern<'_>, connected: bool) {
        let pods = self.expected.froms.clone();
        for f in pods.iter().filter(|p| from.matches(p)) {
            for t in pods.iter().filter(|p| to.matches(p)) {
                self.expected.set(f, t, connected);
            }
        }
    }

    /// Every pod to `pod`.
    pub fn expect_all_ingress(&mut self, pod: &str, connected: bool) {
        let pods = self.expected.froms.clone();
        pods.iter()
            .for_each(|f| self.expected.set(f, pod, connected));
    }

    /// `pod` to every pod.
    pub fn expect_all_egress(&mut self, pod: &str, connected: bool) {
        let pods = self.expected.tos.clone();
        pods.iter()
            .for_each(|t| self.expected.set(pod, t, connected));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_format() {
        let pods: Vec<String> = ["x/a", "x/b"].iter().map(|s| s.to_string()).collect();
        let mut r = Reachability::new(&pods, true);
        r.expect_all_ingress("x/a", false);
        let mut t = r.expected.clone();
        t.values[3] = None;
        assert_eq!(
            t.pretty_print(""),
            "-\t\tx/a\tx/b\nx/a\tX\t\t.\t\nx/b\tX\t\t?\t"
        );
    }

    #[test]
    fn compare_ignores_loopback() {
        let pods: Vec<String> = ["x/a", "y/a"].iter().map(|s| s.to_string()).collect();
        let mut expected = Reachability::new(&pods, true);
        expected.expect_peer(
            PeerPattern {
                namespace: Some("x"),
                pod: None,
            },
            PeerPattern::default(),
            false,
        );
        let actual = TruthTable::from_fn(pods.clone(), pods.clone(), |f, t| {
            f == t || !f.starts_with('x')
        });
        assert_eq!(expected.expected.compare(&actual, true).1, 0);
        assert_eq!(expected.expected.compare(&actual, false).1, 1);
    }
}
