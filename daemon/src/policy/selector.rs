//! Label selectors (matchLabels and matchExpressions with In, NotIn, Exists, DoesNotExist).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as metav1;

/// One matchExpressions requirement, or one matchLabels pair (`In` with one value).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Requirement {
    In { key: String, values: Vec<String> },
    NotIn { key: String, values: Vec<String> },
    Exists { key: String },
    DoesNotExist { key: String },
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            // NotIn also matches when the key is absent (Kubernetes semantics).
            Requirement::NotIn { key, values } => {
                labels.get(key).is_none_or(|v| !values.contains(v))
            }
            Requirement::Exists { key } => labels.contains_key(key),
            Requirement::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::In { key, values } if values.len() == 1 => {
                write!(f, "{key}={}", values[0])
            }
            Requirement::In { key, values } => write!(f, "{key} in ({})", values.join(",")),
            Requirement::NotIn { key, values } => write!(f, "{key} notin ({})", values.join(",")),
            Requirement::Exists { key } => write!(f, "{key}"),
            Requirement::DoesNotExist { key } => write!(f, "!{key}"),
        }
    }
}

/// A parsed LabelSelector: all requirements must hold. Empty selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// The selector that selects everything (`{}`).
    pub fn everything() -> Self {
        LabelSelector::default()
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// From a k8s-openapi LabelSelector, validating operators and value lists as the API server
    /// does (In/NotIn need values; Exists/DoesNotExist take none).
    pub fn from_k8s(sel: &metav1::LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in sel.match_labels.iter().flatten() {
            requirements.push(Requirement::In {
                key: key.clone(),
                values: vec![value.clone()],
            });
        }
        for expr in sel.match_expressions.iter().flatten() {
            let key = expr.key.clone();
            let values = expr.values.clone().unwrap_or_default();
            if key.is_empty() {
                return Err(SelectorError::EmptyKey);
            }
            let req = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError::MissingValues {
                        key,
                        operator: expr.operator.clone(),
                    })
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues {
                        key,
                        operator: expr.operator.clone(),
                    })
                }
                "In" => Requirement::In { key, values },
                "NotIn" => Requirement::NotIn { key, values },
                "Exists" => Requirement::Exists { key },
                "DoesNotExist" => Requirement::DoesNotExist { key },
                other => {
                    return Err(SelectorError::UnknownOperator {
                        key,
                        operator: other.to_string(),
                    })
                }
            };
            requirements.push(req);
        }
        Ok(LabelSelector { requirements })
    }
}

impl fmt::Display for LabelSelector {
    /// The kubectl form (`pod=a,ns in (x,y)`), or `{}` for the selector of everything.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// A LabelSelector the API server would have rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("matchExpressions entry has an empty key")]
    EmptyKey,
    #[error("matchExpressions key {key:?}: operator {operator:?} is not one of In, NotIn, Exists, DoesNotExist")]
    UnknownOperator { key: String, operator: String },
    #[error("matchExpressions key {key:?}: operator {operator} needs a non-empty values list")]
    MissingValues { key: String, operator: String },
    #[error("matchExpressions key {key:?}: operator {operator} takes no values")]
    UnexpectedValues { key: String, operator: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(json: serde_json::Value) -> Result<LabelSelector, SelectorError> {
        LabelSelector::from_k8s(&serde_json::from_value(json).unwrap())
    }

    #[test]
    fn operators() {
        let l = labels(&[("pod", "a"), ("tier", "web")]);
        assert!(sel(serde_json::json!({})).unwrap().matches(&l));
        assert!(sel(serde_json::json!({"matchLabels": {"pod": "a"}}))
            .unwrap()
            .matches(&l));
        assert!(
            !sel(serde_json::json!({"matchLabels": {"pod": "a", "x": "y"}}))
                .unwrap()
                .matches(&l)
        );
        let expr = |op: &str, vals: &[&str]| {
            let mut e = serde_json::json!({"key": "pod", "operator": op});
            if !vals.is_empty() {
                e["values"] = serde_json::json!(vals);
            }
            sel(serde_json::json!({"matchExpressions": [e]})).unwrap()
        };
        assert!(expr("In", &["a", "b"]).matches(&l));
        assert!(!expr("In", &["b"]).matches(&l));
        assert!(expr("NotIn", &["b"]).matches(&l));
        assert!(!expr("NotIn", &["a"]).matches(&l));
        assert!(
            expr("NotIn", &["a"]).matches(&labels(&[])),
            "NotIn matches an absent key"
        );
        assert!(expr("Exists", &[]).matches(&l));
        assert!(!expr("DoesNotExist", &[]).matches(&l));
        assert!(expr("DoesNotExist", &[]).matches(&labels(&[("other", "1")])));
    }

    #[test]
    fn invalid_selectors() {
        let e = |v| sel(v).unwrap_err();
        assert!(matches!(
            e(
                serde_json::json!({"matchExpressions": [{"key": "k", "operator": "Gt", "values": ["1"]}]})
            ),
            SelectorError::UnknownOperator { .. }
        ));
        assert!(matches!(
            e(serde_json::json!({"matchExpressions": [{"key": "k", "operator": "In"}]})),
            SelectorError::MissingValues { .. }
        ));
        assert!(matches!(
            e(
                serde_json::json!({"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["1"]}]})
            ),
            SelectorError::UnexpectedValues { .. }
        ));
    }

    #[test]
    fn display() {
        let s = sel(serde_json::json!({"matchLabels": {"pod": "a"}, "matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x", "y"]}]})).unwrap();
        assert_eq!(s.to_string(), "pod=a,ns notin (x,y)");
    }
}
