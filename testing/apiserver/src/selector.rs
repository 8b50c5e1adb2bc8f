//! Label and field selectors, parsed from `labelSelector` / `fieldSelector` query parameters.
//!
//! Label selectors support the full set-based syntax the API server accepts for list/watch:
//! `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` (exists) and `!k` (does not exist),
//! comma = AND. As in Kubernetes, `!=` and `notin` also match objects without the label.
//! Field selectors support `metadata.name` and `metadata.namespace` with `=`, `==`, `!=` (the fields
//! every resource supports); any other field is rejected like the real server does.

use serde_json::Value;

/// A parsed label selector (AND of requirements); empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<LabelReq>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelReq {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed field selector (AND of requirements).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<FieldReq>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldReq {
    field: Field,
    value: String,
    negated: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
}

// === impl LabelSelector ===

impl LabelSelector {
    /// Parses a selector; the error is the message for a 400 `BadRequest` Status.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            reqs.push(parse_label_req(part).ok_or_else(|| format!("unable to parse requirement: {part:?}"))?);
        }
        Ok(Self(reqs))
    }

    /// Whether an object (full JSON) matches.
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 316
        && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Splits an equality requirement (`k=v`, `k==v`, `k!=v`, shared by label and field selectors)
/// into key, value and whether it is negated.
fn split_equality(part: &str) -> Option<(&str, &str, bool)> {
    if let Some((k, v)) = part.split_once("!=") {
        Some((k, v, true))
    } else if let Some((k, v)) = part.split_once("==") {
        Some((k, v, false))
    } else {
        part.split_once('=').map(|(k, v)| (k, v, false))
    }
}

fn parse_label_req(part: &str) -> Option<LabelReq> {
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        return valid_key(key).then(|| LabelReq::NotExists(key.to_owned()));
    }
    if let Some(open) = part.find('(') {
        let list = part[open..].strip_prefix('(')?.strip_suffix(')')?;
        let head = part[..open].trim();
        let (key, op) = head.rsplit_once(char::is_whitespace)?;
        let key = key.trim();
        let values: Vec<String> = list.split(',').map(|v| v.trim().to_owned()).collect();
        if !valid_key(key) || !values.iter().all(|v| valid_value(v)) {
            return None;
        }
        return match op {
            "in" => Some(LabelReq::In(key.to_owned(), values)),
            "notin" => Some(LabelReq::NotIn(key.to_owned(), values)),
            _ => None,
        };
    }
    let Some((key, value, negated)) = split_equality(part) else {
        return valid_key(part).then(|| LabelReq::Exists(part.to_owned()));
    };
    let (key, value) = (key.trim(), value.trim());
    if !valid_key(key) || !valid_value(value) {
        return None;
    }
    Some(if negated {
        LabelReq::NotEquals(key.to_owned(), value.to_owned())
    } else {
        LabelReq::Equals(key.to_owned(), value.to_owned())
    })
}

// === impl FieldSelector ===

impl FieldSelector {
    /// Parses a selector; the error is the message for a 400 `BadRequest` Status.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((field, value, negated)) = split_equality(part) else {
                return Err(format!("invalid selector: '{part}'; can't understand '{part}'"));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => return Err(format!("field label not supported: {other}")),
            };
            reqs.push(FieldReq { field, value: value.trim().to_owned(), negated });
        }
        Ok(Self(reqs))
    }

    /// Whether an object (full JSON) matches.
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let ptr = match r.field {
                Field::Name => "/metadata/name",
                Field::Namespace => "/metadata/namespace",
            };
            let actual = obj.pointer(ptr).and_then(Value::as_str).unwrap_or("");
            (actual == r.value) != r.negated
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: &Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn kube_proxy_selector() {
        let sel =
            LabelSelector::parse("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless")
                .expect("valid selector");
        assert!(sel.matches(&obj(&json!({"app": "x"}))));
        assert!(sel.matches(&json!({"metadata": {"name": "a"}})));
        assert!(!sel.matches(&obj(&json!({"service.kubernetes.io/headless": ""}))));
        assert!(!sel.matches(&obj(&json!({"service.kubernetes.io/service-proxy-name": "cilium"}))));
    }

    #[test]
    fn set_and_equality_requirements() {
        let sel = LabelSelector::parse("app in (a, b),tier notin (db),env!=prod,team,x==1").expect("parse");
        let base = json!({"app": "a", "env": "dev", "team": "t", "x": "1"});
        assert!(sel.matches(&obj(&base)));
        let mut o = base.clone();
        o["app"] = json!("c");
        assert!(!sel.matches(&obj(&o)));
        let mut o = base.clone();
        o["tier"] = json!("db");
        assert!(!sel.matches(&obj(&o)));
        let mut o = base.clone();
        o["env"] = json!("prod");
        assert!(!sel.matches(&obj(&o)));
        let mut o = base;
        o.as_object_mut().expect("labels object").remove("team");
        assert!(!sel.matches(&obj(&o)));
        assert!(LabelSelector::parse("").expect("parse").is_empty());
        assert!(LabelSelector::parse("a in (b").is_err());
        assert!(LabelSelector::parse("a b").is_err());
        assert!(LabelSelector::parse("a=b c").is_err());
    }

    #[test]
    fn field_selectors() {
        let sel = FieldSelector::parse("metadata.name=a,metadata.namespace!=kube-system").expect("parse");
        assert!(sel.matches(&obj(&json!({}))));
        assert!(!FieldSelector::parse("metadata.name==b").expect("parse").matches(&obj(&json!({}))));
        assert!(FieldSelector::parse("spec.clusterIP=1").is_err());
    }
}
