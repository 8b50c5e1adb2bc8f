//! The object store: current objects per resource plus an event history, like etcd behind the
//! API server's watch cache.
//!
//! Invariants:
//! - `rv` is one global revision across all resources; every write (create, update, delete) takes
//!   the next one. No-op updates (identical object) take none, like the real server.
//! - `history` holds every event with `rv > compacted`, in `rv` order; events at or below
//!   `compacted` are forgotten (a watch or continue token from there gets 410 Gone).
//! - Stored objects always carry `metadata.resourceVersion/uid/creationTimestamp/generation`.
//!
//! Written only under the server's store lock by control calls (`ApiServer::apply` etc.); read by
//! request handlers (lists, gets) and watch tasks under the same lock.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use serde_json::{Map, Value};

use crate::{
    ApplyError,
    resource::{Registry, ResourceType},
};

/// `(namespace, name)`; the namespace is empty for cluster-scoped objects. Orders like etcd keys.
pub(crate) type ObjKey = (String, String);

/// Objects of one resource, in key order.
pub(crate) type Objects = BTreeMap<ObjKey, Arc<Value>>;

/// By default the history never grows past this many events: older ones are compacted away (as
/// etcd's periodic compaction does), which bounds memory in long churn benchmarks.
pub(crate) const DEFAULT_HISTORY_LIMIT: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One write.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub(crate) rv: u64,
    pub(crate) res: usize,
    pub(crate) ty: EventType,
    pub(crate) key: ObjKey,
    /// The new state; for `Deleted` the last state carrying the deletion's resourceVersion.
    pub(crate) obj: Arc<Value>,
    /// The state before this write (`None` for `Added`).
    pub(crate) prev: Option<Arc<Value>>,
}

/// Returned when a requested revision is older than the compaction point.
#[derive(Debug)]
pub(crate) struct Compacted;

#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) registry: Registry,
    rv: u64,
    compacted: u64,
    objects: Vec<Objects>,
    history: VecDeque<Event>,
    history_limit: usize,
    next_uid: u64,
}

// === impl Store ===

impl Store {
    pub(crate) fn new() -> Self {
        let registry = Registry::with_defaults();
        // etcd starts at revision 1 for an empty cluster.
        Self {
            registry,
            rv: 1,
            compacted: 1,
            objects: Vec::new(),
            history: VecDeque::new(),
            history_limit: DEFAULT_HISTORY_LIMIT,
            next_uid: 1,
        }
    }

    /// The current global resourceVersion.
    pub(crate) fn rv(&self) -> u64 {
        self.rv
    }

    pub(crate) fn compacted(&self) -> u64 {
        self.compacted
    }

    pub(crate) fn register(&mut self, ty: ResourceType) -> usize {
        self.registry.register(ty)
    }

    fn objects_mut(&mut self, res: usize) -> &mut Objects {
        if self.objects.len() <= res {
            self.objects.resize_with(res + 1, BTreeMap::new);
        }
        &mut self.objects[res]
    }

    pub(crate) fn objects(&self, res: usize) -> Option<&Objects> {
        self.objects.get(res)
    }

    pub(crate) fn get(&self, res: usize, key: &ObjKey) -> Option<Arc<Value>> {
        self.objects.get(res)?.get(key).cloned()
    }

    /// Creates or replaces an object; returns the resourceVersion after the write.
    pub(crate) fn apply(&mut self, mut obj: Value) -> Result<u64, ApplyError> {
        let str_field = |obj: &Value, ptr: &'static str| {
            obj.pointer(ptr).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
        };
        if !obj.is_object() {
            return Err(ApplyError::NotAnObject);
        }
        let api_version = str_field(&obj, "/apiVersion").ok_or(ApplyError::MissingField("apiVersion"))?;
        let kind = str_field(&obj, "/kind").ok_or(ApplyError::MissingField("kind"))?;
        let name = str_field(&obj, "/metadata/name").ok_or(ApplyError::MissingField("metadata.name"))?;
        let namespace = str_field(&obj, "/metadata/namespace");
        let res = self.registry.find_or_guess(&api_version, &kind, namespace.is_some());
        let namespaced = self.registry.get(res).namespaced;
        let meta = obj
            .as_object_mut()
            .and_then(|o| o.get_mut("metadata"))
            .and_then(Value::as_object_mut)
            .ok_or(ApplyError::MissingField("metadata"))?;
        let namespace = if namespaced {
            let ns = namespace.unwrap_or_else(|| "default".to_owned());
            meta.insert("namespace".into(), Value::String(ns.clone()));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = (namespace, name);
        let prev = self.get(res, &key);
        match &prev {
            Some(prev) => {
                for field in ["uid", "creationTimestamp", "resourceVersion"] {
                    match prev.pointer(&format!("/metadata/{field}")) {
                        Some(v) => meta.insert(field.into(), v.clone()),
                        None => meta.remove(field),
                    };
                }
                let generation = prev.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
                meta.insert("generation".into(), generation.into());
                if obj == **prev {
                    return Ok(self.rv);
                }
                if spec_of(&obj) != spec_of(prev) {
                    set_meta(&mut obj, "generation", (generation + 1).into());
                }
            }
            None => {
                if !meta.get("uid").is_some_and(Value::is_string) {
                    let uid = format!("f3770000-0000-4000-8000-{:012x}", self.next_uid);
                    self.next_uid += 1;
                    meta.insert("uid".into(), uid.into());
                }
                if !meta.get("creationTimestamp").is_some_and(Value::is_string) {
                    let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
                    meta.insert("creationTimestamp".into(), now.into());
                }
                meta.insert("generation".into(), 1.into());
            }
        }
        let rv = self.rv + 1;
        set_meta(&mut obj, "resourceVersion", rv.to_string().into());
        let obj = Arc::new(obj);
        self.objects_mut(res).insert(key.clone(), obj.clone());
        let ty = if prev.is_some() { EventType::Modified } else { EventType::Added };
        self.push(Event { rv, res, ty, key, obj, prev });
        Ok(rv)
    }

    /// Deletes an object; returns the deletion's resourceVersion, `None` if it did not exist.
    pub(crate) fn delete(&mut self, res: usize, key: &ObjKey) -> Option<u64> {
        let prev = self.objects_mut(res).remove(key)?;
        let rv = self.rv + 1;
        let mut obj = (*prev).clone();
        set_meta(&mut obj, "resourceVersion", rv.to_string().into());
        let ev =
            Event { rv, res, ty: EventType::Deleted, key: key.clone(), obj: Arc::new(obj), prev: Some(prev) };
        self.push(ev);
        Some(rv)
    }

    fn push(&mut self, ev: Event) {
        self.rv = ev.rv;
        self.history.push_back(ev);
        if self.history.len() > self.history_limit {
            let drop = self.history.len() - self.history_limit / 2;
            if let Some(last) = self.history.get(drop - 1) {
                self.compacted = last.rv;
            }
            self.history.drain(..drop);
        }
    }

    /// Sets the number of events kept before the oldest half is compacted away (at least 2).
    pub(crate) fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit.max(2);
    }

    /// Forgets all history up to now.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// The objects of `res` as they were at revision `at` (`at <= rv`).
    pub(crate) fn state_at(&self, res: usize, at: u64) -> Result<Objects, Compacted> {
        if at < self.compacted {
            return Err(Compacted);
        }
        let mut objects = self.objects(res).cloned().unwrap_or_default();
        for ev in self.history.iter().rev().take_while(|e| e.rv > at) {
            if ev.res != res {
                continue;
            }
            match (&ev.prev, ev.ty) {
                (_, EventType::Added) | (None, _) => objects.remove(&ev.key),
                (Some(prev), EventType::Modified | EventType::Deleted) => {
                    objects.insert(ev.key.clone(), prev.clone())
                }
            };
        }
        Ok(objects)
    }

    /// Events of `res` with `rv > after`, or `Compacted` if some of them are forgotten.
    pub(crate) fn events_after(&self, res: usize, after: u64) -> Result<Vec<Event>, Compacted> {
        if after < self.compacted {
            return Err(Compacted);
        }
        let start = self.history.partition_point(|e| e.rv <= after);
        Ok(self.history.range(start..).filter(|e| e.res == res).cloned().collect())
    }
}

/// Everything but metadata and status: a change here bumps metadata.generation.
fn spec_of(obj: &Value) -> Map<String, Value> {
    let mut m = obj.as_object().cloned().unwrap_or_default();
    m.remove("metadata");
    m.remove("status");
    m
}

pub(crate) fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(field.to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, port: u16) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"},
               "spec": {"ports": [{"port": port}]}})
    }

    #[test]
    fn writes_fill_metadata_and_history_reconstructs_old_states() {
        let mut s = Store::new();
        let r1 = s.apply(svc("a", 80)).expect("apply");
        assert_eq!(r1, 2);
        assert_eq!(s.apply(svc("a", 80)).expect("apply"), 2, "identical update is a no-op");
        let r2 = s.apply(svc("a", 81)).expect("apply");
        let r3 = s.apply(svc("b", 80)).expect("apply");
        let res = s.registry.find("v1", "services").expect("services registered");
        let a = s.get(res, &("ns".into(), "a".into())).expect("get");
        assert_eq!(a["metadata"]["resourceVersion"], json!(r2.to_string()));
        assert_eq!(a["metadata"]["generation"], json!(2));
        assert!(a["metadata"]["uid"].is_string());
        assert!(a["metadata"]["creationTimestamp"].is_string());
        let r4 = s.delete(res, &("ns".into(), "a".into())).expect("delete object");
        assert_eq!(r4, r3 + 1);
        assert_eq!(s.state_at(res, r1).expect("history kept").len(), 1);
        assert_eq!(
            s.state_at(res, r1).expect("history kept").values().next().expect("one object")["spec"]["ports"]
                [0]["port"],
            json!(80)
        );
        assert_eq!(s.state_at(res, r3).expect("history kept").len(), 2);
        assert_eq!(s.state_at(res, r4).expect("history kept").len(), 1);
        assert_eq!(s.events_after(res, r1).expect("history kept").len(), 3);
        s.compact();
        assert!(s.state_at(res, r3).is_err());
        assert!(s.events_after(res, r3).is_err());
        assert!(s.events_after(res, r4).expect("history kept").is_empty());

        // Automatic compaction keeps the newest half of the limit.
        s.set_history_limit(4);
        for port in 1..=5 {
            s.apply(svc("c", port)).expect("apply");
        }
        assert_eq!(s.history.len(), 2, "the 5th event exceeds 4: the oldest 3 are dropped");
        assert_eq!(s.compacted(), s.rv() - 2);
        assert!(s.events_after(res, s.rv() - 3).is_err());
        assert_eq!(s.events_after(res, s.rv() - 2).expect("kept").len(), 2);
    }
}
