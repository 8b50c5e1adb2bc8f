//! The HTTP side: accept loop, routing, LIST/GET handlers, Status errors.
//!
//! `Shared` is the state every connection and watch task reads, and the control calls of
//! `ApiServer` write: the store (under a mutex), a `watch` channel carrying the current
//! resourceVersion (watch tasks wake on it), a `watch` channel of test controls, request counters.
//!
//! Routes (GET only, like a read-only client sees the API server):
//! `/api/v1/{plural}[/{name}]`, `/api/v1/namespaces/{ns}/{plural}[/{name}]` and the same under
//! `/apis/{group}/{version}/`; `?watch=true|1` turns a collection GET into a WATCH. Also `/version`,
//! `/healthz`, `/readyz`, `/livez`. Every request needs `Authorization: Bearer <token>`.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    ops::Bound,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use parking_lot::{Condvar, Mutex};
use serde::{Serialize, ser::SerializeMap};
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};
use tracing::{debug, warn};

use crate::{
    ResourceStats,
    resource::{ResourceId, ResourceType},
    selector::{FieldSelector, LabelSelector},
    store::{ObjKey, Store},
    watch::{Chunk, Watch, WatchParams},
};

pub(crate) type Body = BoxBody<Bytes, io::Error>;

/// Test controls every watch task follows; epochs are bumped by `ApiServer` methods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Control {
    pub(crate) disconnect: u64,
    pub(crate) cut: u64,
    pub(crate) bookmark: u64,
    pub(crate) bookmark_interval: Duration,
}

/// State shared by the control API, connections and watch tasks.
pub(crate) struct Shared {
    pub(crate) store: Mutex<Store>,
    pub(crate) rv_tx: watch::Sender<u64>,
    pub(crate) control: watch::Sender<Control>,
    pub(crate) unavailable: AtomicBool,
    pub(crate) rejected: AtomicU64,
    pub(crate) token: String,
    pub(crate) stats: Mutex<HashMap<ResourceId, ResourceStats>>,
    pub(crate) stats_cv: Condvar,
    pub(crate) stats_tx: watch::Sender<u64>,
}

/// Counts an open watch for as long as it lives.
pub(crate) struct OpenWatch {
    shared: Arc<Shared>,
    id: ResourceId,
}

/// Tells an accept loop to stop; it replies once the listener and all connections are closed.
pub(crate) type StopTx = oneshot::Sender<std::sync::mpsc::Sender<()>>;

// === impl Shared ===

impl Shared {
    pub(crate) fn new(token: String, bookmark_interval: Duration) -> Self {
        let store = Store::new();
        let rv = store.rv();
        Self {
            store: Mutex::new(store),
            rv_tx: watch::Sender::new(rv),
            control: watch::Sender::new(Control { disconnect: 0, cut: 0, bookmark: 0, bookmark_interval }),
            unavailable: AtomicBool::new(false),
            rejected: AtomicU64::new(0),
            token,
            stats: Mutex::new(HashMap::new()),
            stats_cv: Condvar::new(),
            stats_tx: watch::Sender::new(0),
        }
    }

    pub(crate) fn update_stats(&self, id: &ResourceId, f: impl FnOnce(&mut ResourceStats)) {
        f(self.stats.lock().entry(id.clone()).or_default());
        self.stats_cv.notify_all();
        self.stats_tx.send_modify(|n| *n += 1);
    }

    fn resource_type(&self, res: usize) -> ResourceType {
        self.store.lock().registry.get(res).clone()
    }
}

// === impl OpenWatch ===

impl OpenWatch {
    pub(crate) fn new(shared: Arc<Shared>, res: usize) -> Self {
        let id = shared.resource_type(res).id;
        shared.update_stats(&id, |s| s.open_watches += 1);
        Self { shared, id }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.shared.update_stats(&self.id, |s| s.open_watches = s.open_watches.saturating_sub(1));
    }
}

// === accept loop ===

/// Serves connections on `listener` until told to stop (or the stop sender is dropped).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<std::sync::mpsc::Sender<()>>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            reply = &mut stop => {
                drop(listener);
                conns.shutdown().await;
                if let Ok(reply) = reply {
                    let _ = reply.send(());
                }
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc);
                        if let Err(error) = conn.await {
                            debug!(%peer, %error, "connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let resp = route(&shared, &req);
    debug!(method = %req.method(), uri = %req.uri(), status = resp.status().as_u16(), "request");
    Ok(resp)
}

// === routing ===

/// Parsed query parameters the server understands.
#[derive(Debug, Default)]
struct Query {
    watch: bool,
    resource_version: Option<String>,
    resource_version_match: Option<String>,
    allow_watch_bookmarks: bool,
    send_initial_events: bool,
    timeout_seconds: Option<String>,
    label_selector: String,
    field_selector: String,
    limit: Option<String>,
    continue_: Option<String>,
}

impl Query {
    fn parse(q: &str) -> Self {
        let mut out = Self::default();
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            let v = v.into_owned();
            match &*k {
                "watch" => out.watch = v == "true" || v == "1",
                "resourceVersion" => out.resource_version = Some(v).filter(|v| !v.is_empty()),
                "resourceVersionMatch" => out.resource_version_match = Some(v).filter(|v| !v.is_empty()),
                "allowWatchBookmarks" => out.allow_watch_bookmarks = v == "true" || v == "1",
                "sendInitialEvents" => out.send_initial_events = v == "true" || v == "1",
                "timeoutSeconds" => out.timeout_seconds = Some(v),
                "labelSelector" => out.label_selector = v,
                "fieldSelector" => out.field_selector = v,
                "limit" => out.limit = Some(v),
                "continue" => out.continue_ = Some(v).filter(|v| !v.is_empty()),
                _ => {}
            }
        }
        out
    }
}

/// What a resource path names.
struct Target {
    id: ResourceId,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    Some(Target {
        id: ResourceId::new(group, version, plural),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

/// The 503 every request gets while the test keeps the server unavailable (counted).
fn unavailable(shared: &Shared) -> Option<Response<Body>> {
    if !shared.unavailable.load(Ordering::SeqCst) {
        return None;
    }
    shared.rejected.fetch_add(1, Ordering::SeqCst);
    Some(status(503, "ServiceUnavailable", "the server is currently unable to handle the request"))
}

fn route(shared: &Arc<Shared>, req: &Request<Incoming>) -> Response<Body> {
    if let Some(refused) = unavailable(shared) {
        return refused;
    }
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == shared.token);
    if !authorized {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let path = req.uri().path();
    match path {
        "/version" => {
            let v = json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-ferry-test",
                           "platform": "linux/amd64"});
            return json_response(StatusCode::OK, &v);
        }
        "/healthz" | "/readyz" | "/livez" => {
            let mut r = Response::new(full(Bytes::from_static(b"ok")));
            r.headers_mut().insert(header::CONTENT_TYPE, "text/plain".parse().expect("static header"));
            return r;
        }
        _ => {}
    }
    let not_found = || status(404, "NotFound", "the server could not find the requested resource");
    let Some(target) = parse_path(path) else { return not_found() };
    let found = {
        let store = shared.store.lock();
        store.registry.index_of(&target.id).map(|i| (i, store.registry.get(i).clone()))
    };
    let Some((res, ty)) = found else { return not_found() };
    if target.namespace.is_some() && !ty.namespaced {
        return not_found();
    }
    if req.method() != Method::GET {
        return status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        );
    }
    let query = Query::parse(req.uri().query().unwrap_or(""));
    match (&target.name, query.watch) {
        (Some(name), false) => {
            shared.update_stats(&ty.id, |s| s.gets += 1);
            get(shared, res, &ty, target.namespace.as_deref(), name)
        }
        (Some(_), true) => status(405, "MethodNotAllowed", "watch a collection with a fieldSelector instead"),
        (None, true) => {
            shared.update_stats(&ty.id, |s| s.watches += 1);
            start_watch(shared, res, &ty, target.namespace, &query)
        }
        (None, false) => {
            shared.update_stats(&ty.id, |s| s.lists += 1);
            list(shared, res, &ty, target.namespace.as_deref(), &query)
        }
    }
}

fn selectors(q: &Query) -> Result<(LabelSelector, FieldSelector), Box<Response<Body>>> {
    let bad = |m: String| Box::new(status(400, "BadRequest", &m));
    let labels = LabelSelector::parse(&q.label_selector).map_err(bad)?;
    let fields = FieldSelector::parse(&q.field_selector).map_err(bad)?;
    Ok((labels, fields))
}

fn parse_rv(rv: &str) -> Result<u64, Box<Response<Body>>> {
    rv.parse::<u64>()
        .map_err(|_| Box::new(status(400, "BadRequest", &format!("invalid resource version: {rv:?}"))))
}

// === GET ===

fn get(shared: &Shared, res: usize, ty: &ResourceType, ns: Option<&str>, name: &str) -> Response<Body> {
    let key: ObjKey = (ns.unwrap_or_default().to_owned(), name.to_owned());
    match shared.store.lock().get(res, &key) {
        Some(obj) => json_response(StatusCode::OK, &obj),
        None => {
            let mut s = status_json(404, "NotFound", &format!("{} \"{name}\" not found", ty.id.plural));
            s["details"] = json!({"name": name, "group": ty.id.group, "kind": ty.id.plural});
            json_response(StatusCode::NOT_FOUND, &s)
        }
    }
}

// === LIST ===

/// An opaque continue token: the list's snapshot revision and the last key returned.
fn encode_continue(rv: u64, key: &ObjKey) -> String {
    let raw = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{}/{}", key.0, key.1)}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(u64, ObjKey)> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok()).collect();
    let v: Value = serde_json::from_slice(&bytes?).ok()?;
    let rv = v.get("rv")?.as_u64()?;
    let (ns, name) = v.get("start")?.as_str()?.split_once('/')?;
    Some((rv, (ns.to_owned(), name.to_owned())))
}

fn too_large(rv: u64, current: u64) -> Response<Body> {
    let mut s = status_json(504, "Timeout", &format!("Too large resource version: {rv}, current: {current}"));
    s["details"] = json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                          "retryAfterSeconds": 1});
    json_response(StatusCode::GATEWAY_TIMEOUT, &s)
}

fn list(shared: &Shared, res: usize, ty: &ResourceType, ns: Option<&str>, q: &Query) -> Response<Body> {
    let (labels, fields) = match selectors(q) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let limit = match q.limit.as_deref().map(str::parse::<usize>) {
        None => None,
        Some(Ok(0)) => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return status(400, "BadRequest", "invalid limit"),
    };
    let store = shared.store.lock();
    let current = store.rv();
    let (at, start) = if let Some(token) = &q.continue_ {
        if q.resource_version.is_some() {
            return status(
                400,
                "BadRequest",
                "specifying resource version is not allowed when using continue",
            );
        }
        match decode_continue(token) {
            Some((rv, key)) => (rv, Some(key)),
            None => return status(400, "BadRequest", "continue key is not valid"),
        }
    } else {
        let rv = match q.resource_version.as_deref().map(parse_rv) {
            None => None,
            Some(Ok(rv)) => Some(rv),
            Some(Err(r)) => return *r,
        };
        match (rv, q.resource_version_match.as_deref()) {
            (None, Some(_)) => {
                return status(
                    422,
                    "Invalid",
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                );
            }
            // Unset: most recent (consistent read); "0": any, we serve the latest.
            (None, None) | (Some(0), None | Some("NotOlderThan")) => (current, None),
            (Some(rv), None | Some("NotOlderThan")) if rv > current => return too_large(rv, current),
            (Some(_), None | Some("NotOlderThan")) => (current, None),
            (Some(0), Some("Exact")) => {
                return status(
                    422,
                    "Invalid",
                    "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
                );
            }
            (Some(rv), Some("Exact")) if rv > current => return too_large(rv, current),
            (Some(rv), Some("Exact")) => (rv, None),
            (Some(_), Some(other)) => {
                return status(422, "Invalid", &format!("unsupported resourceVersionMatch {other:?}"));
            }
        }
    };
    let objects = match store.state_at(res, at) {
        Ok(o) => o,
        Err(_) if start.is_some() => {
            return status(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. You can start \
                 a new list without the continue parameter, or use the continue token in this response to \
                 retrieve the remainder of the results.",
            );
        }
        Err(_) => {
            return status(
                410,
                "Expired",
                &format!("too old resource version: {at} ({})", store.compacted()),
            );
        }
    };
    drop(store);

    let lower = start.map_or(Bound::Unbounded, Bound::Excluded);
    let mut matching = objects
        .range((lower, Bound::Unbounded))
        .filter(|(k, o)| ns.is_none_or(|ns| k.0 == ns) && labels.matches(o) && fields.matches(o));
    let mut items = Vec::new();
    let mut last_key = None;
    for (k, o) in matching.by_ref() {
        items.push(o.clone());
        if limit.is_some_and(|l| items.len() >= l) {
            last_key = Some(k.clone());
            break;
        }
    }
    let mut metadata = json!({"resourceVersion": at.to_string()});
    if let Some(key) = last_key {
        let remaining = matching.count();
        if remaining > 0 {
            metadata["continue"] = encode_continue(at, &key).into();
            if labels.is_empty() && fields.is_empty() {
                metadata["remainingItemCount"] = remaining.into();
            }
        }
    }
    let list = ListBody {
        kind: format!("{}List", ty.kind),
        api_version: ty.id.api_version(),
        metadata,
        items: items.iter().map(|o| WithoutTypeMeta(o)).collect(),
    };
    json_response(StatusCode::OK, &list)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListBody<'a> {
    kind: String,
    api_version: String,
    metadata: Value,
    items: Vec<WithoutTypeMeta<'a>>,
}

/// Serializes an object without `kind`/`apiVersion`, as the real server writes list items.
struct WithoutTypeMeta<'a>(&'a Value);

impl Serialize for WithoutTypeMeta<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_object() {
            Some(map) => {
                let mut m = s.serialize_map(None)?;
                for (k, v) in map.iter().filter(|(k, _)| *k != "kind" && *k != "apiVersion") {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
            None => self.0.serialize(s),
        }
    }
}

// === WATCH ===

fn start_watch(
    shared: &Arc<Shared>,
    res: usize,
    ty: &ResourceType,
    ns: Option<String>,
    q: &Query,
) -> Response<Body> {
    let (labels, fields) = match selectors(q) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let rv = match q.resource_version.as_deref().map(parse_rv) {
        None | Some(Ok(0)) => None,
        Some(Ok(rv)) => Some(rv),
        Some(Err(r)) => return *r,
    };
    if q.send_initial_events {
        if q.resource_version_match.as_deref() != Some("NotOlderThan") {
            return status(422, "Invalid", "sendInitialEvents requires resourceVersionMatch=NotOlderThan");
        }
        if !q.allow_watch_bookmarks {
            return status(422, "Invalid", "sendInitialEvents requires allowWatchBookmarks=true");
        }
    } else if q.resource_version_match.is_some() {
        return status(
            422,
            "Invalid",
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        );
    }
    let timeout = match q.timeout_seconds.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(s)) => Some(Duration::from_secs(s)),
        Some(Err(_)) => return status(400, "BadRequest", "invalid timeoutSeconds"),
    };
    // With sendInitialEvents, a given resourceVersion still means "the state not older than it".
    let rv = if q.send_initial_events { None } else { rv };
    let params = WatchParams {
        rv,
        bookmarks: q.allow_watch_bookmarks,
        send_initial_events: q.send_initial_events,
        timeout,
        namespace: ns,
        labels,
        fields,
    };
    // Subscribe to the test controls before the last availability check: a test that makes the
    // server unavailable and then cuts watches either sees this request refused or sees it cut.
    let ctl_rx = shared.control.subscribe();
    if let Some(refused) = unavailable(shared) {
        return refused;
    }
    let (tx, rx) = mpsc::channel(64);
    let watch = Watch {
        shared: shared.clone(),
        res,
        kind: ty.kind.clone(),
        api_version: ty.id.api_version(),
        params,
        tx,
    };
    tokio::spawn(watch.run(ctl_rx));
    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("static header"));
    resp
}

/// A response body fed by a watch task.
struct ChannelBody(mpsc::Receiver<Chunk>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.get_mut().0.poll_recv(cx)
    }
}

// === responses ===

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

fn json_response(code: StatusCode, v: &impl Serialize) -> Response<Body> {
    // Serializing a JSON value or our list body into a Vec cannot fail.
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("static header"));
    r
}

/// A `meta/v1` Status object.
pub(crate) fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let sc = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(sc, &status_json(code, reason, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_continue_tokens() {
        let t = parse_path("/api/v1/namespaces/ns/services/a").expect("valid path");
        assert_eq!(
            (t.id, t.namespace.as_deref(), t.name.as_deref()),
            (ResourceId::core("services"), Some("ns"), Some("a"))
        );
        let t = parse_path("/apis/discovery.k8s.io/v1/endpointslices").expect("valid path");
        assert_eq!((t.id, t.namespace, t.name), (ResourceId::endpoint_slices(), None, None));
        let t = parse_path("/api/v1/namespaces/kube-system").expect("valid path");
        assert_eq!((t.id.plural.as_str(), t.name.as_deref()), ("namespaces", Some("kube-system")));
        assert!(parse_path("/api/v1/namespaces/ns/services/a/status").is_none());
        let key = ("ns".to_owned(), "a".to_owned());
        assert_eq!(decode_continue(&encode_continue(7, &key)), Some((7, key)));
        assert_eq!(decode_continue("zz"), None);
    }
}
