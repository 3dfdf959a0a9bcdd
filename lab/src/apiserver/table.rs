//! Server-side printing (`meta.k8s.io/v1` Table), which `kubectl get` asks for, with the
//! columns kubectl users expect for the kinds kwire uses.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::resources::ResourceKind;

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (fractional seconds ignored) to seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// A short age like kubectl prints (`45s`, `12m`, `3h`, `9d`).
pub fn human_age(created: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Some(t) = parse_rfc3339(created) else {
        return "<unknown>".to_string();
    };
    let s = now.saturating_sub(t);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn col(name: &str, kind: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": kind, "format": format, "description": name, "priority": priority})
}

fn s<'a>(o: &'a Value, ptr: &str) -> &'a str {
    o.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn node_status(o: &Value) -> String {
    let ready = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
    let mut status = match ready.and_then(|c| c["status"].as_str()) {
        Some("True") => "Ready".to_string(),
        Some("False") => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    status
}

fn service_ports(o: &Value) -> String {
    let ports = o
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ports.is_empty() {
        return "<none>".to_string();
    }
    ports
        .iter()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_u64) {
                Some(n) => format!("{}:{n}/{proto}", p["port"]),
                None => format!("{}/{proto}", p["port"]),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn columns_and_cells(kind: &ResourceKind, o: &Value) -> (Vec<Value>, Vec<Value>) {
    let name = json!(s(o, "/metadata/name"));
    let age = json!(human_age(s(o, "/metadata/creationTimestamp")));
    match (kind.group, kind.plural) {
        ("", "nodes") => (
            vec![
                col("Name", "string", 0),
                col("Status", "string", 0),
                col("Roles", "string", 0),
                col("Age", "string", 0),
                col("Version", "string", 0),
                col("Pod-CIDRs", "string", 1),
            ],
            vec![
                name,
                json!(node_status(o)),
                json!("<none>"),
                age,
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(o
                    .pointer("/spec/podCIDRs")
                    .and_then(Value::as_array)
                    .map(|a| a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or_default()),
            ],
        ),
        ("", "pods") => {
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let ready = statuses
                .iter()
                .filter(|c| c["ready"].as_bool() == Some(true))
                .count();
            let restarts: u64 = statuses
                .iter()
                .filter_map(|c| c["restartCount"].as_u64())
                .sum();
            let ip = s(o, "/status/podIP");
            let node = s(o, "/spec/nodeName");
            (
                vec![
                    col("Name", "string", 0),
                    col("Ready", "string", 0),
                    col("Status", "string", 0),
                    col("Restarts", "string", 0),
                    col("Age", "string", 0),
                    col("IP", "string", 1),
                    col("Node", "string", 1),
                ],
                vec![
                    name,
                    json!(format!("{ready}/{total}")),
                    json!(s(o, "/status/phase")),
                    json!(restarts.to_string()),
                    age,
                    json!(if ip.is_empty() { "<none>" } else { ip }),
                    json!(if node.is_empty() { "<none>" } else { node }),
                ],
            )
        }
        ("", "namespaces") => (
            vec![
                col("Name", "string", 0),
                col("Status", "string", 0),
                col("Age", "string", 0),
            ],
            vec![name, json!(s(o, "/status/phase")), age],
        ),
        ("", "services") => {
            let ip = s(o, "/spec/clusterIP");
            (
                vec![
                    col("Name", "string", 0),
                    col("Type", "string", 0),
                    col("Cluster-IP", "string", 0),
                    col("External-IP", "string", 0),
                    col("Port(s)", "string", 0),
                    col("Age", "string", 0),
                ],
                vec![
                    name,
                    json!(s(o, "/spec/type")),
                    json!(if ip.is_empty() { "<none>" } else { ip }),
                    json!("<none>"),
                    json!(service_ports(o)),
                    age,
                ],
            )
        }
        _ => (
            vec![col("Name", "string", 0), col("Age", "string", 0)],
            vec![name, age],
        ),
    }
}

/// A Table of `items` (rows carry the full object, so kubectl can add NAMESPACE and labels).
pub fn list_table(kind: &ResourceKind, items: &[Value], metadata: Value) -> Value {
    let (columns, _) = columns_and_cells(kind, &json!({}));
    let rows: Vec<Value> = items
        .iter()
        .map(|o| json!({"cells": columns_and_cells(kind, o).1, "object": o}))
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata, "columnDefinitions": columns, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::strategy::rfc3339;

    #[test]
    fn parses_what_it_formats() {
        for t in [0, 86_399, 951_782_400, 1_709_251_199, 1_893_456_000] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59.123456Z"),
            Some(1_709_251_199)
        );
        assert_eq!(parse_rfc3339("nope"), None);
    }
}
