//! A Kubernetes API server for two resources — v1 Services and discovery.k8s.io/v1
//! EndpointSlices — speaking the wire protocol the agent's real `kube::Client` uses: list
//! with a resourceVersion, in pages when asked (`limit`, `continue`, as kube-rs's watcher
//! asks for 500 objects at a time), streamed watch events (ADDED, MODIFIED, DELETED,
//! BOOKMARK), and "410 Gone" for a watch from a compacted resourceVersion. It listens on
//! 127.0.0.1 only.
//!
//! Tests drive it: apply and delete objects, break every open watch mid-stream, compact the
//! history (so the next watch gets a 410 and the client relists), or hold the list of one
//! resource to see what the agent does before both initial lists are in.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// The two resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
}

impl Resource {
    const fn path(self) -> &'static str {
        match self {
            Resource::Services => "/api/v1/services",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
        }
    }

    const fn api_version(self) -> &'static str {
        match self {
            Resource::Services => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    const fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
        }
    }

    fn of(object: &Value) -> anyhow::Result<Self> {
        match object["kind"].as_str() {
            Some("Service") => Ok(Resource::Services),
            Some("EndpointSlice") => Ok(Resource::EndpointSlices),
            other => bail!("not served: kind {other:?}"),
        }
    }
}

type Key = (String, String);

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: BTreeMap<Resource, BTreeMap<Key, Value>>,
    /// Every change, in order: (resourceVersion, resource, event type, object).
    history: Vec<(u64, Resource, &'static str, Value)>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    compacted_below: u64,
    /// Bumped to end every open watch.
    watch_generation: u64,
    held: BTreeSet<Resource>,
    /// Requests served, as "GET path?query", for tests to inspect.
    requests: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The server; stops and joins its threads on drop.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// How long a watch may last at most, whatever the client asks: bounds every thread.
const MAX_WATCH: Duration = Duration::from_secs(60);

impl ApiServer {
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                resource_version: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let acceptor_shared = shared.clone();
        let acceptor = std::thread::spawn(move || {
            while !acceptor_shared.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let shared = acceptor_shared.clone();
                        std::thread::spawn(move || {
                            drop(serve(&shared, stream));
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points at this server.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\nusers:\n- name: test\n  user: {{token: test}}\n",
            self.url()
        );
        std::fs::write(path, text)?;
        Ok(())
    }

    /// Creates or replaces every object of a YAML stream (ADDED or MODIFIED events).
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        use serde::Deserialize as _;
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value: Value = serde_yaml::Value::deserialize(document)
                .and_then(serde_yaml::from_value)
                .context("manifest")?;
            if !value.is_null() {
                self.apply(value)?;
            }
        }
        Ok(())
    }

    pub fn apply(&self, mut object: Value) -> anyhow::Result<()> {
        let resource = Resource::of(&object)?;
        let key = key_of(&object)?;
        let mut state = self.shared.lock();
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["namespace"].is_null() {
            object["metadata"]["namespace"] = json!("default");
        }
        let objects = state.objects.entry(resource).or_default();
        let kind = if objects.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.history.push((rv, resource, kind, object));
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Creates or replaces many objects at once, under one lock: the bulk load of a large
    /// cluster (100k Services and their slices) before a client lists it. Their history is
    /// compacted, so that it holds no copy of them: a watch from the resourceVersion of a
    /// list after the load goes on, one from before it gets 410 Gone and relists.
    pub fn apply_many(&self, objects: impl IntoIterator<Item = Value>) -> anyhow::Result<()> {
        let mut state = self.shared.lock();
        for mut object in objects {
            let resource = Resource::of(&object)?;
            let key = key_of(&object)?;
            state.resource_version += 1;
            let rv = state.resource_version;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            if object["metadata"]["namespace"].is_null() {
                object["metadata"]["namespace"] = json!("default");
            }
            state
                .objects
                .entry(resource)
                .or_default()
                .insert(key, object);
        }
        state.compacted_below = state.resource_version;
        state.history.clear();
        state.watch_generation += 1;
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> anyhow::Result<()> {
        let mut state = self.shared.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let Some(mut object) = state.objects.entry(resource).or_default().remove(&key) else {
            bail!("no {resource:?} {namespace}/{name}");
        };
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.history.push((rv, resource, "DELETED", object));
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Ends every open watch at once, mid-stream, as a broken connection would.
    pub fn break_watches(&self) {
        self.shared.lock().watch_generation += 1;
        self.shared.changed.notify_all();
    }

    /// Forgets the history: every watch from an older resourceVersion gets 410 Gone, and
    /// the open watches are broken so that their clients come back with one.
    pub fn compact(&self) {
        let mut state = self.shared.lock();
        state.compacted_below = state.resource_version + 1;
        state.watch_generation += 1;
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Holds (or releases) the answers to list requests of `resource`.
    pub fn hold_list(&self, resource: Resource, held: bool) {
        let mut state = self.shared.lock();
        if held {
            state.held.insert(resource);
        } else {
            state.held.remove(&resource);
        }
        drop(state);
        self.shared.changed.notify_all();
    }

    /// The requests served so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        if let Some(acceptor) = self.acceptor.take() {
            drop(acceptor.join());
        }
    }
}

fn key_of(object: &Value) -> anyhow::Result<Key> {
    let name = object["metadata"]["name"]
        .as_str()
        .context("metadata.name missing")?;
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    Ok((namespace.to_owned(), name.to_owned()))
}

/// Whether `object` matches a label selector of existence requirements ("a,!b": label a
/// present, label b absent), as the API server reads them.
fn selected(object: &Value, selector: Option<&str>) -> bool {
    selector.is_none_or(|selector| {
        selector
            .split(',')
            .filter(|k| !k.is_empty())
            .all(|requirement| match requirement.strip_prefix('!') {
                Some(key) => object["metadata"]["labels"][key].is_null(),
                None => !object["metadata"]["labels"][requirement].is_null(),
            })
    })
}

fn serve(shared: &Shared, stream: TcpStream) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let target = request_line
        .split_whitespace()
        .nth(1)
        .context("no request target")?
        .to_owned();
    shared.lock().requests.push(format!("GET {target}"));
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    let resource = match path {
        p if p == Resource::Services.path() => Resource::Services,
        p if p == Resource::EndpointSlices.path() => Resource::EndpointSlices,
        _ => return respond(&stream, 404, &json!({"kind": "Status", "code": 404})),
    };
    let selector = params.get("labelSelector").map(String::as_str);
    if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = params
            .get("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0);
        let timeout = params
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(MAX_WATCH, Duration::from_secs)
            .min(MAX_WATCH);
        watch(shared, &stream, resource, selector, from, timeout)
    } else {
        let page = Page {
            limit: params
                .get("limit")
                .and_then(|l| l.parse().ok())
                .filter(|l| *l > 0),
            after: params.get("continue").cloned().filter(|c| !c.is_empty()),
        };
        list(shared, &stream, resource, selector, page)
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => match u8::from_str_radix(&String::from_utf8_lossy(hex), 16) {
                Ok(byte) => {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            (b'+', _) => out.push(b' '),
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(mut stream: &TcpStream, code: u16, body: &Value) -> anyhow::Result<()> {
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// Which part of a list a request asks for, as `limit` and `continue` say.
struct Page {
    limit: Option<usize>,
    /// The continue token of the page before: `{resourceVersion}/{namespace}/{name}` of its
    /// last item.
    after: Option<String>,
}

/// A list, or a page of one (`limit`, `continue`) as the API server pages: each page
/// says the resourceVersion of the first, so that a watch from there replays whatever
/// changed while the client paged (the server keeps no snapshot; replayed changes apply
/// again, harmlessly).
fn list(
    shared: &Shared,
    stream: &TcpStream,
    resource: Resource,
    selector: Option<&str>,
    page: Page,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + MAX_WATCH;
    let mut state = shared.lock();
    while state.held.contains(&resource)
        && !shared.stop.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        state = shared
            .changed
            .wait_timeout(state, Duration::from_millis(100))
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
    let (list_rv, after) = match page.after.as_deref().and_then(|token| {
        let (rv, key) = token.split_once('/')?;
        let (namespace, name) = key.split_once('/')?;
        Some((rv.parse().ok()?, (namespace.to_owned(), name.to_owned())))
    }) {
        Some((rv, key)) => (rv, Some(key)),
        None if page.after.is_some() => {
            return respond(
                stream,
                400,
                &json!({"kind": "Status", "code": 400, "message": "bad continue token"}),
            );
        }
        None => (state.resource_version, None),
    };
    // Written out under the lock, item by item, without a copy of the objects: a list of
    // 100k Services is most of what the bench's API server does.
    // The metadata goes last, once the continue token is known: the items are written
    // once, straight into the body.
    let mut body = Vec::new();
    write!(
        body,
        r#"{{"apiVersion":"{}","kind":"{}List","items":["#,
        resource.api_version(),
        resource.kind()
    )?;
    let objects = state.objects.get(&resource);
    let mut items = objects
        .into_iter()
        .flat_map(|objects| match &after {
            Some(key) => objects
                .range::<Key, _>((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded)),
            None => objects.range::<Key, _>(..),
        })
        .filter(|(_, o)| selected(o, selector))
        .peekable();
    let mut last = None;
    let mut count = 0;
    while let Some((key, item)) = items.next_if(|_| page.limit.is_none_or(|l| count < l)) {
        if count > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, item)?;
        count += 1;
        last = Some(key);
    }
    let more = items.peek().is_some();
    let continue_token = match (more, last) {
        (true, Some((namespace, name))) => format!("{list_rv}/{namespace}/{name}"),
        _ => String::new(),
    };
    write!(
        body,
        r#"],"metadata":{{"resourceVersion":"{list_rv}","continue":{}}}}}"#,
        serde_json::to_string(&continue_token)?
    )?;
    drop(state);
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(&body)?;
    Ok(())
}

fn chunk(mut stream: &TcpStream, line: &Value) -> std::io::Result<()> {
    let text = format!("{line}\n");
    write!(stream, "{:x}\r\n{text}\r\n", text.len())?;
    stream.flush()
}

fn watch(
    shared: &Shared,
    stream: &TcpStream,
    resource: Resource,
    selector: Option<&str>,
    from: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let deadline = Instant::now() + timeout;
    let mut state = shared.lock();
    if from < state.compacted_below {
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410,
        }});
        drop(state);
        chunk(stream, &gone)?;
        write!(out, "0\r\n\r\n")?;
        return Ok(());
    }
    let generation = state.watch_generation;
    let mut sent = from;
    let mut last_bookmark = Instant::now();
    loop {
        if state.watch_generation != generation || shared.stop.load(Ordering::Relaxed) {
            // Broken mid-stream: no terminating chunk, the connection just ends.
            return Ok(());
        }
        // The history is in resourceVersion order: only what follows `sent` is read.
        let newer = state.history.partition_point(|(rv, ..)| *rv <= sent);
        let events: Vec<Value> = state.history[newer..]
            .iter()
            .filter(|(rv, r, _, object)| *rv > sent && *r == resource && selected(object, selector))
            .map(|(_, _, kind, object)| json!({"type": kind, "object": object}))
            .collect();
        let now_rv = state.resource_version;
        drop(state);
        for event in &events {
            chunk(stream, event)?;
        }
        if last_bookmark.elapsed() > Duration::from_millis(500) {
            let bookmark = json!({"type": "BOOKMARK", "object": {
                "kind": resource.kind(), "apiVersion": resource.api_version(),
                "metadata": {"resourceVersion": now_rv.to_string()},
            }});
            chunk(stream, &bookmark)?;
            last_bookmark = Instant::now();
        }
        sent = sent.max(now_rv);
        if Instant::now() >= deadline {
            write!(out, "0\r\n\r\n")?;
            return Ok(());
        }
        state = shared.lock();
        if state.resource_version == sent && state.watch_generation == generation {
            state = shared
                .changed
                .wait_timeout(state, Duration::from_millis(200))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}
