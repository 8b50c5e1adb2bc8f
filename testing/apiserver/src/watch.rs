//! One WATCH stream: a task per request that writes JSON watch events, one per line, into the
//! chunked response body through a bounded channel.
//!
//! The task starts strictly after the requested resourceVersion (or with synthetic `ADDED` events
//! for the current state when it is unset or `0`, as the real server does), then follows the store's
//! history. Per watch it converts events like the API server's cacher: an update that stops
//! matching the selectors is sent as `DELETED` (previous content, new resourceVersion), one that
//! starts matching as `ADDED`. If the history it needs was compacted it sends one `ERROR` event with
//! a 410 `Expired` Status and ends the stream, like the real server.
//!
//! Test controls arrive through `Shared::control`: a changed `disconnect` epoch cuts the stream
//! (the body yields an error, so hyper closes the connection without the final chunk); a changed
//! `cut` epoch makes the next object event go out half-written before the cut; `bookmark` asks for
//! a bookmark now. The task ends when the client goes away, on `timeoutSeconds`, or on a cut.

use std::{io, sync::Arc, time::Duration};

use bytes::Bytes;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, watch},
    time::{Instant, sleep, sleep_until},
};
use tracing::debug;

use crate::{
    selector::{FieldSelector, LabelSelector},
    server::{Control, Shared},
    store::{Event, EventType, set_meta},
};

pub(crate) type Chunk = Result<Frame<Bytes>, io::Error>;

/// What the client asked for.
#[derive(Debug)]
pub(crate) struct WatchParams {
    /// `None` for unset or `"0"`: start with the current state as `ADDED` events.
    pub(crate) rv: Option<u64>,
    pub(crate) bookmarks: bool,
    pub(crate) send_initial_events: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

/// A running watch's view of its resource.
pub(crate) struct Watch {
    pub(crate) shared: Arc<Shared>,
    pub(crate) res: usize,
    pub(crate) kind: String,
    pub(crate) api_version: String,
    pub(crate) params: WatchParams,
    pub(crate) tx: mpsc::Sender<Chunk>,
}

enum Stop {
    /// Client gone or stream finished: just end.
    End,
}

// === impl Watch ===

impl Watch {
    fn passes(&self, obj: &Value) -> bool {
        let ns_ok = self
            .params
            .namespace
            .as_deref()
            .is_none_or(|ns| obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns));
        ns_ok && self.params.labels.matches(obj) && self.params.fields.matches(obj)
    }

    /// The event this watch sees for a write, if any (the cacher's `convertToWatchEvent`).
    fn convert(&self, ev: &Event) -> Option<(&'static str, Arc<Value>)> {
        let cur = ev.ty != EventType::Deleted && self.passes(&ev.obj);
        let old = ev.prev.as_deref().is_some_and(|p| self.passes(p));
        match (cur, old) {
            (true, false) => Some(("ADDED", ev.obj.clone())),
            (true, true) => Some(("MODIFIED", ev.obj.clone())),
            (false, true) => {
                if ev.ty == EventType::Deleted {
                    return Some(("DELETED", ev.obj.clone()));
                }
                // The previous content with this event's resourceVersion.
                let mut prev = ev.prev.as_deref().cloned().unwrap_or(Value::Null);
                set_meta(&mut prev, "resourceVersion", ev.rv.to_string().into());
                Some(("DELETED", Arc::new(prev)))
            }
            (false, false) => None,
        }
    }

    async fn send(&self, line: Bytes) -> Result<(), Stop> {
        self.tx.send(Ok(Frame::data(line))).await.map_err(|_| Stop::End)
    }

    async fn send_bookmark(&self, rv: u64, initial_end: bool) -> Result<(), Stop> {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": self.kind, "apiVersion": self.api_version, "metadata": metadata});
        self.send(event_line("BOOKMARK", &obj)).await
    }

    async fn send_expired(&self, rv: u64, compacted: u64) {
        let status = crate::server::status_json(
            410,
            "Expired",
            &format!("too old resource version: {rv} ({compacted})"),
        );
        let _ = self.send(event_line("ERROR", &status)).await;
    }

    /// Writes half of `line`, lets hyper flush it, then cuts the connection.
    async fn cut_mid_event(&self, line: Bytes) {
        let half = line.slice(..line.len() / 2);
        if self.send(half).await.is_err() {
            return;
        }
        // Wait (bounded) until hyper took the frame, then give it a moment to write it out before
        // the body error tears the connection down.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.tx.capacity() < self.tx.max_capacity() && Instant::now() < deadline {
            sleep(Duration::from_millis(2)).await;
        }
        sleep(Duration::from_millis(50)).await;
        let _ = self.tx.send(Err(io::Error::other("watch cut in the middle of an event by the test"))).await;
    }

    /// Runs the watch until it ends.
    /// `ctl_rx` was subscribed when the request was accepted (before this watch counts as open), so
    /// a cut asked for after that is newer than what this watch has seen.
    pub(crate) async fn run(self, mut ctl_rx: watch::Receiver<Control>) {
        let seen: Control = ctl_rx.borrow_and_update().clone();
        let mut rv_rx = self.shared.rv_tx.subscribe();
        rv_rx.borrow_and_update();
        let _open = crate::server::OpenWatch::new(self.shared.clone(), self.res);
        let _ = self.run_inner(ctl_rx, seen, rv_rx).await;
        debug!(kind = %self.kind, "watch ended");
    }

    async fn run_inner(
        &self,
        mut ctl_rx: watch::Receiver<Control>,
        mut seen: Control,
        mut rv_rx: watch::Receiver<u64>,
    ) -> Result<(), Stop> {
        let deadline = self.params.timeout.map(|t| Instant::now() + t);
        let mut next_bookmark = Instant::now() + seen.bookmark_interval;
        let mut cut_pending = false;
        let mut bookmark_due = false;
        let mut ctl_pending = false;

        let start = {
            let store = self.shared.store.lock();
            match self.params.rv {
                None => {
                    let objs: Vec<Arc<Value>> = store
                        .objects(self.res)
                        .map(|m| m.values().filter(|o| self.passes(o)).cloned().collect())
                        .unwrap_or_default();
                    Ok((store.rv(), objs))
                }
                Some(rv) if rv < store.compacted() => Err((rv, store.compacted())),
                Some(rv) => Ok((rv, Vec::new())),
            }
        };
        let (mut cursor, initial) = match start {
            Ok(s) => s,
            Err((rv, compacted)) => {
                self.send_expired(rv, compacted).await;
                return Ok(());
            }
        };
        for obj in initial {
            self.send(event_line("ADDED", &obj)).await?;
        }
        if self.params.send_initial_events {
            self.send_bookmark(cursor, true).await?;
        }

        loop {
            rv_rx.borrow_and_update();
            let (ctl, batch) = {
                let store = self.shared.store.lock();
                // Read the controls under the store lock: a control set before a write (the test's
                // program order) is then always seen together with, or before, that write.
                let ctl_changed = std::mem::take(&mut ctl_pending) || ctl_rx.has_changed().unwrap_or(false);
                let ctl = ctl_changed.then(|| ctl_rx.borrow_and_update().clone());
                let batch = store
                    .events_after(self.res, cursor)
                    .map(|evs| (evs, store.rv()))
                    .map_err(|_| store.compacted());
                (ctl, batch)
            };
            if let Some(ctl) = ctl {
                if ctl.disconnect != seen.disconnect {
                    let _ = self.tx.send(Err(io::Error::other("watch disconnected by the test"))).await;
                    return Ok(());
                }
                cut_pending |= ctl.cut != seen.cut;
                bookmark_due |= ctl.bookmark != seen.bookmark;
                if ctl.bookmark_interval != seen.bookmark_interval {
                    next_bookmark = Instant::now() + ctl.bookmark_interval;
                }
                seen = ctl;
            }
            let (events, now_rv) = match batch {
                Ok(b) => b,
                Err(compacted) => {
                    self.send_expired(cursor, compacted).await;
                    return Ok(());
                }
            };
            for ev in &events {
                let Some((ty, obj)) = self.convert(ev) else { continue };
                let line = event_line(ty, &obj);
                if cut_pending {
                    self.cut_mid_event(line).await;
                    return Ok(());
                }
                self.send(line).await?;
            }
            cursor = now_rv.max(cursor);
            if bookmark_due && self.params.bookmarks {
                self.send_bookmark(cursor, false).await?;
            }
            bookmark_due = false;

            tokio::select! {
                // Test controls first: a cut asked for before a write must happen before it.
                biased;
                // `changed()` marks the value seen: remember to handle it at the top of the loop.
                changed = ctl_rx.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    ctl_pending = true;
                }
                _ = rv_rx.changed() => {}
                () = sleep_until(next_bookmark), if self.params.bookmarks => {
                    bookmark_due = true;
                    next_bookmark = Instant::now() + seen.bookmark_interval;
                }
                () = sleep_until(deadline.unwrap_or(next_bookmark)), if deadline.is_some() => return Ok(()),
                () = self.tx.closed() => return Err(Stop::End),
            }
        }
    }
}

/// `{"type":TYPE,"object":OBJ}\n`
fn event_line(ty: &str, obj: &Value) -> Bytes {
    let mut line = format!("{{\"type\":\"{ty}\",\"object\":").into_bytes();
    // Serializing a `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut line, obj);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}
