//! The session object's storage seam: typed keys over rows of JSON bodies, how a session is written (exactly the rows a step touched) and read back, and an in-memory store with injectable write failures for tests.
//!
//! The Worker implements [`Rows`] over Durable Object SQLite (`src/store.rs`, one table per
//! [`Table`], the layout in `src/session_schema.sql`); tests use [`MemStore`]. Everything
//! above the seam — which rows a command touched, how events are numbered, how a stored
//! session is rebuilt — is decided here, once, for both.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::events::{Event, EventKind};
use crate::hosted::{Effect, HostedSession};
use crate::ids::Actor;
use crate::queue::Prompt;
use crate::sandbox::SandboxLink;
use crate::session::{Client, Dirty, Lock, Member, Meta, Session};
use crate::snapshot::Snapshots;

/// The tables of a session object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Meta,
    Members,
    Clients,
    Locks,
    Prompts,
    /// The echo runner's scheduled completions (prompt → due time).
    Runner,
    /// The sandbox link (one row).
    Link,
    /// Small values beside the state, named by [`Kv`].
    Kv,
}

impl Table {
    /// The SQL table's name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Members => "members",
            Table::Clients => "clients",
            Table::Locks => "locks",
            Table::Prompts => "prompts",
            Table::Runner => "runner",
            Table::Link => "sandbox_link",
            Table::Kv => "kv",
        }
    }
}

/// The small values a session keeps beside its state, each under one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kv {
    /// The session's snapshots (`core::snapshot::Snapshots`).
    Snapshots,
    /// The session's egress allow-list.
    Egress,
    /// Where the session's repository is cloned from.
    Source,
    /// The branch the session's work was last pushed to.
    Branch,
    /// A background agent's session: its agent.
    AgentLink,
    /// A background agent's session: the sessions it spawned.
    Children,
    /// Review rounds and the replies owed (`core::pr_review::SessionReviews`).
    Reviews,
}

impl Kv {
    /// The stored key (unchanged since these values were first stored).
    pub fn name(self) -> &'static str {
        match self {
            Kv::Snapshots => "snapshots",
            Kv::Egress => "session_egress",
            Kv::Source => "repository_source",
            Kv::Branch => "branch",
            Kv::AgentLink => "background",
            Kv::Children => "children",
            Kv::Reviews => "reviews",
        }
    }
}

/// One row of a session object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Meta,
    Member(String),
    Client(String),
    Lock(String),
    Prompt(String),
    /// A runner job; its body is the due time, as a decimal number.
    RunnerJob(String),
    Link,
    Kv(Kv),
}

impl Key {
    pub fn table(&self) -> Table {
        match self {
            Key::Meta => Table::Meta,
            Key::Member(_) => Table::Members,
            Key::Client(_) => Table::Clients,
            Key::Lock(_) => Table::Locks,
            Key::Prompt(_) => Table::Prompts,
            Key::RunnerJob(_) => Table::Runner,
            Key::Link => Table::Link,
            Key::Kv(_) => Table::Kv,
        }
    }

    /// The row's id within its table.
    pub fn id(&self) -> &str {
        match self {
            Key::Meta => "session",
            Key::Link => "1",
            Key::Kv(kv) => kv.name(),
            Key::Member(id)
            | Key::Client(id)
            | Key::Lock(id)
            | Key::Prompt(id)
            | Key::RunnerJob(id) => id,
        }
    }

    /// The row a session's dirty mark names.
    pub fn of(dirty: &Dirty) -> Key {
        match dirty {
            Dirty::Meta => Key::Meta,
            Dirty::Member(user) => Key::Member(user.clone()),
            Dirty::Client(client) => Key::Client(client.clone()),
            Dirty::Lock(resource) => Key::Lock(resource.clone()),
            Dirty::Prompt(prompt) => Key::Prompt(prompt.clone()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    /// The store refused or failed a read or write.
    #[error("storage: {0}")]
    Io(String),
    /// A stored body no longer reads as its type.
    #[error("storage: the row {key} does not read: {message}")]
    Format { key: String, message: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The rows of one session object. Each call is one statement; the Durable Object runtime
/// commits the writes of one request together.
pub trait Rows {
    /// Creates the tables (a new session; idempotent).
    fn create(&mut self) -> StoreResult<()>;
    /// True when the object holds a session (reads only).
    fn exists(&self) -> StoreResult<bool>;
    fn get(&self, key: &Key) -> StoreResult<Option<String>>;
    fn put(&mut self, key: &Key, body: &str) -> StoreResult<()>;
    fn delete(&mut self, key: &Key) -> StoreResult<()>;
    /// Every row of a table: (id, body).
    fn scan(&self, table: Table) -> StoreResult<Vec<(String, String)>>;
    /// Appends one event's body under its number.
    fn append(&mut self, seq: u64, at: u64, body: &str) -> StoreResult<()>;
    /// The newest event's number (0: none).
    fn last_seq(&self) -> StoreResult<u64>;
    /// The bodies of the events after `since`, in order, at most `limit`.
    fn events_after(&self, since: u64, limit: u32) -> StoreResult<Vec<String>>;
}

fn encode<T: Serialize>(key: &Key, value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Format {
        key: format!("{key:?}"),
        message: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(key: &str, body: &str) -> StoreResult<T> {
    serde_json::from_str(body).map_err(|e| StoreError::Format {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// Writes `value` under `key`, or deletes the row when there is none.
pub fn put<T: Serialize>(rows: &mut dyn Rows, key: &Key, value: Option<&T>) -> StoreResult<()> {
    match value {
        Some(value) => rows.put(key, &encode(key, value)?),
        None => rows.delete(key),
    }
}

/// Reads the value under `key`.
pub fn get<T: DeserializeOwned>(rows: &dyn Rows, key: &Key) -> StoreResult<Option<T>> {
    match rows.get(key)? {
        Some(body) => decode(key.id(), &body).map(Some),
        None => Ok(None),
    }
}

fn all<T: DeserializeOwned>(rows: &dyn Rows, table: Table) -> StoreResult<Vec<T>> {
    rows.scan(table)?
        .into_iter()
        .map(|(id, body)| decode(&id, &body))
        .collect()
}

/// Writes the rows named by `dirty` from the session's current state.
pub fn persist(rows: &mut dyn Rows, session: &Session, dirty: &[Dirty]) -> StoreResult<()> {
    for mark in dirty {
        let key = Key::of(mark);
        match mark {
            Dirty::Meta => put(rows, &key, Some(&session.meta))?,
            Dirty::Member(user) => put(rows, &key, session.members.get(user))?,
            Dirty::Client(client) => put(rows, &key, session.clients.get(client))?,
            Dirty::Lock(resource) => put(rows, &key, session.locks.get(resource))?,
            Dirty::Prompt(prompt) => put(rows, &key, session.queue.prompts.get(prompt))?,
        }
    }
    Ok(())
}

/// Appends events to the log, numbering them after `last_seq`; returns them as stored. A failed
/// write leaves `last_seq` at the last event that was written.
pub fn append(
    rows: &mut dyn Rows,
    last_seq: &mut u64,
    at: u64,
    events: Vec<(Actor, EventKind)>,
) -> StoreResult<Vec<Event>> {
    let mut stored = Vec::with_capacity(events.len());
    for (actor, kind) in events {
        let event = Event {
            seq: *last_seq + 1,
            at,
            actor,
            kind,
        };
        let body = serde_json::to_string(&event).map_err(|e| StoreError::Format {
            key: format!("event {}", event.seq),
            message: e.to_string(),
        })?;
        rows.append(event.seq, at, &body)?;
        *last_seq = event.seq;
        stored.push(event);
    }
    Ok(stored)
}

/// A stored session as it was read: its state, its sandbox link, its runner jobs and the
/// number of its newest event.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub session: Session,
    pub link: Option<SandboxLink>,
    pub snapshots: Snapshots,
    pub jobs: BTreeMap<String, u64>,
    pub last_seq: u64,
}

/// Reads the whole stored session (None: the object holds none).
pub fn load(rows: &dyn Rows) -> StoreResult<Option<Stored>> {
    if !rows.exists()? {
        return Ok(None);
    }
    let metas: Vec<Meta> = all(rows, Table::Meta)?;
    let Some(meta) = metas.into_iter().next() else {
        return Ok(None);
    };
    let members: Vec<Member> = all(rows, Table::Members)?;
    let clients: Vec<Client> = all(rows, Table::Clients)?;
    let locks: Vec<Lock> = all(rows, Table::Locks)?;
    let prompts: Vec<Prompt> = all(rows, Table::Prompts)?;
    let mut jobs = BTreeMap::new();
    for (prompt, due) in rows.scan(Table::Runner)? {
        jobs.insert(prompt.clone(), decode(&prompt, &due)?);
    }
    Ok(Some(Stored {
        session: Session::restore(meta, members, clients, locks, prompts),
        link: get(rows, &Key::Link)?,
        snapshots: get(rows, &Key::Kv(Kv::Snapshots))?.unwrap_or_default(),
        jobs,
        last_seq: rows.last_seq()?,
    }))
}

/// Creates a new session's tables and writes its first state and events.
pub fn create(
    rows: &mut dyn Rows,
    session: &mut Session,
    at: u64,
    events: Vec<(Actor, EventKind)>,
) -> StoreResult<Vec<Event>> {
    rows.create()?;
    let dirty = session.take_dirty();
    persist(rows, session, &dirty)?;
    let mut last_seq = 0;
    append(rows, &mut last_seq, at, events)
}

/// What carrying out one effect against the rows did.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// Rows written; these events were stored (to be broadcast).
    Stored(Vec<Event>),
    /// Not a storage effect: handed back for the shell to carry out.
    Other(Effect),
}

/// Carries out one of a hosted session's storage effects from its current state; any other
/// effect is handed back.
pub fn write(
    rows: &mut dyn Rows,
    hosted: &HostedSession,
    last_seq: &mut u64,
    at: u64,
    effect: Effect,
) -> StoreResult<Written> {
    let none = Ok(Written::Stored(Vec::new()));
    match effect {
        Effect::Store { dirty, events } => {
            persist(rows, &hosted.session, &dirty)?;
            append(rows, last_seq, at, events).map(Written::Stored)
        }
        Effect::SaveLink => match &hosted.link {
            Some(link) => put(rows, &Key::Link, Some(link)).and(none),
            None => none,
        },
        Effect::SaveSnapshots => {
            put(rows, &Key::Kv(Kv::Snapshots), Some(&hosted.snapshots)).and(none)
        }
        Effect::RememberBranch(branch) => put(rows, &Key::Kv(Kv::Branch), Some(&branch)).and(none),
        Effect::SaveEgress(allow) => put(rows, &Key::Kv(Kv::Egress), Some(&allow)).and(none),
        Effect::SaveRunnerJob { prompt, due } => {
            let key = Key::RunnerJob(prompt);
            match due {
                Some(due) => rows.put(&key, &due.to_string()),
                None => rows.delete(&key),
            }
            .and(none)
        }
        other => Ok(Written::Other(other)),
    }
}

/// The tables of a [`MemStore`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tables {
    created: bool,
    rows: BTreeMap<Table, BTreeMap<String, String>>,
    events: BTreeMap<u64, String>,
}

/// An in-memory [`Rows`]: the tables as maps, with writes that can be made to fail, and turns
/// committed or rolled back whole — as the Durable Object runtime commits the writes of one
/// event together, and holds its outgoing messages until they are (a failed write resets the
/// object: nothing of that turn is stored or sent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemStore {
    tables: Tables,
    /// The tables as the open turn found them.
    turn: Option<Tables>,
    /// Writes still allowed before every later write fails (None: never fail).
    pub writes_left: Option<usize>,
    /// Writes carried out so far.
    pub writes: usize,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// After `n` more successful writes, every write fails until [`MemStore::heal`].
    pub fn fail_after(&mut self, n: usize) {
        self.writes_left = Some(n);
    }

    pub fn heal(&mut self) {
        self.writes_left = None;
    }

    /// Opens a turn: its writes are kept by [`MemStore::commit`] or undone by
    /// [`MemStore::rollback`].
    pub fn begin(&mut self) {
        self.turn = Some(self.tables.clone());
    }

    pub fn commit(&mut self) {
        self.turn = None;
    }

    /// Undoes the open turn's writes.
    pub fn rollback(&mut self) {
        if let Some(before) = self.turn.take() {
            self.tables = before;
        }
    }

    fn write(&mut self) -> StoreResult<()> {
        match &mut self.writes_left {
            Some(0) => Err(StoreError::Io("injected write failure".into())),
            Some(n) => {
                *n -= 1;
                self.writes += 1;
                Ok(())
            }
            None => {
                self.writes += 1;
                Ok(())
            }
        }
    }

    /// Every stored event: (number, body), in order.
    pub fn events(&self) -> Vec<(u64, &str)> {
        let events = self.tables.events.iter();
        events.map(|(seq, body)| (*seq, body.as_str())).collect()
    }

    /// The rows of one table.
    pub fn table(&self, table: Table) -> Option<&BTreeMap<String, String>> {
        self.tables.rows.get(&table)
    }
}

impl Rows for MemStore {
    fn create(&mut self) -> StoreResult<()> {
        self.write()?;
        self.tables.created = true;
        Ok(())
    }

    fn exists(&self) -> StoreResult<bool> {
        Ok(self.tables.created && self.tables.rows.contains_key(&Table::Meta))
    }

    fn get(&self, key: &Key) -> StoreResult<Option<String>> {
        let table = self.tables.rows.get(&key.table());
        Ok(table.and_then(|t| t.get(key.id())).cloned())
    }

    fn put(&mut self, key: &Key, body: &str) -> StoreResult<()> {
        self.write()?;
        let table = self.tables.rows.entry(key.table()).or_default();
        table.insert(key.id().to_string(), body.to_string());
        Ok(())
    }

    fn delete(&mut self, key: &Key) -> StoreResult<()> {
        self.write()?;
        if let Some(table) = self.tables.rows.get_mut(&key.table()) {
            table.remove(key.id());
        }
        Ok(())
    }

    fn scan(&self, table: Table) -> StoreResult<Vec<(String, String)>> {
        let rows = self.tables.rows.get(&table).into_iter().flatten();
        Ok(rows.map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn append(&mut self, seq: u64, _at: u64, body: &str) -> StoreResult<()> {
        self.write()?;
        if self.tables.events.contains_key(&seq) {
            return Err(StoreError::Io(format!("event {seq} is already stored")));
        }
        self.tables.events.insert(seq, body.to_string());
        Ok(())
    }

    fn last_seq(&self) -> StoreResult<u64> {
        Ok(self.tables.events.keys().next_back().copied().unwrap_or(0))
    }

    fn events_after(&self, since: u64, limit: u32) -> StoreResult<Vec<String>> {
        let after = self.tables.events.range(since.saturating_add(1)..);
        Ok(after
            .take(limit as usize)
            .map(|(_, body)| body.clone())
            .collect())
    }
}
