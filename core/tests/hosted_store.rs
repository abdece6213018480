//! Scenario tests of the hosted session over its storage seam, written as data: a script of commands, alarms, evictions and injected write failures against the in-memory store, and the log of what was stored and sent; plus a sweep that fails each write of a script in turn.
//!
//! The executor here is the session object's, in miniature: each line is one turn — the core
//! decides, the storage effects are written through `core::store::write`, the turn commits
//! (people are sent its events) or, on a failed write, rolls back whole and forgets its cache
//! (the runtime resets the object), and the next line reloads what is stored. After every line:
//! the log is numbered 1..n with no gap or repeat, everything sent is stored, and a reload from
//! the store gives exactly the session in memory.

use nightshift_core::events::EventKind;
use nightshift_core::hosted::{Command, Effect, Entropy, HostedSession, Input, LinkTiming};
use nightshift_core::ids::Identity;
use nightshift_core::session::{Limits, Meta, PromptSubmission, Session, SessionStatus};
use nightshift_core::store::{self, MemStore, Written};

const TIMING: LinkTiming = LinkTiming {
    heartbeat_timeout_ms: 30_000,
    grace_ms: 10_000,
};
/// The echo runner answers a prompt this long after it starts.
const ECHO_MS: u64 = 1_000;

struct Counter(u32);

impl Entropy for Counter {
    fn token(&mut self) -> String {
        self.0 += 1;
        format!("token_{}", self.0)
    }
}

fn person(user: &str) -> Identity {
    Identity {
        user: user.into(),
        name: user.to_uppercase(),
        email: None,
    }
}

fn event(kind: &EventKind) -> String {
    match kind {
        EventKind::PromptQueued { prompt } => format!("prompt.queued {}", prompt.id),
        EventKind::PromptStarted { id, .. } => format!("prompt.started {id}"),
        EventKind::PromptFinished { id, ok, .. } => format!("prompt.finished {id} ok={ok}"),
        EventKind::PromptCancelled { id } => format!("prompt.cancelled {id}"),
        EventKind::AgentText { prompt, text } => format!("agent.text {prompt} {text}"),
        other => serde_json::to_value(other)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_string))
            .unwrap_or_default(),
    }
}

/// A session object over a [`MemStore`]: its store, its cache (none after a reset or an
/// eviction), and the event numbers people were sent.
struct Object {
    store: MemStore,
    cache: Option<(HostedSession, u64)>,
    sent: Vec<u64>,
    now: u64,
    entropy: Counter,
}

impl Object {
    /// A new session owned by alice; bob has joined.
    fn new() -> Object {
        let meta = Meta {
            id: "ses_1".into(),
            title: "t".into(),
            repository: None,
            owner: "alice".into(),
            invite: "inv".into(),
            created_at: 0,
            status: SessionStatus::Active,
            limits: Limits::default(),
            next_arrival: 0,
            model: None,
            pull_request: None,
            pull_request_action: None,
        };
        let (mut session, out) = Session::create(meta, &person("alice"));
        let mut store = MemStore::new();
        let events = store::create(&mut store, &mut session, 0, out.events).expect("create");
        let mut object = Object {
            store,
            cache: None,
            sent: events.iter().map(|e| e.seq).collect(),
            now: 0,
            entropy: Counter(0),
        };
        let join = Command::Join {
            invite: "inv".into(),
        };
        object.turn(|h, now, entropy| h.run(&person("bob"), join, now, entropy).map(|(_, fx)| fx));
        object
    }

    /// The session as stored, as the object builds it when it wakes.
    fn reload(store: &MemStore) -> (HostedSession, u64) {
        let stored = store::load(store).expect("load").expect("a session");
        let hosted = HostedSession::new(stored.session, stored.link, TIMING, false)
            .with_snapshots(stored.snapshots, 0)
            .with_echo(ECHO_MS, stored.jobs);
        (hosted, stored.last_seq)
    }

    /// One turn: decide, write the storage effects, commit (and send) or roll back.
    fn turn(
        &mut self,
        decide: impl FnOnce(
            &mut HostedSession,
            u64,
            &mut Counter,
        ) -> nightshift_core::CoreResult<Vec<Effect>>,
    ) -> Vec<String> {
        let Object {
            store,
            cache,
            sent,
            now,
            entropy,
        } = self;
        let (hosted, last_seq) = cache.get_or_insert_with(|| Object::reload(store));
        store.begin();
        let effects = match decide(hosted, *now, entropy) {
            Ok(effects) => effects,
            Err(e) => {
                store.commit();
                return vec![format!("refused: {}", e.code())];
            }
        };
        let mut log = Vec::new();
        let mut sending = Vec::new();
        for effect in effects {
            if let Effect::SaveRunnerJob { prompt, due } = &effect {
                log.push(match due {
                    Some(due) => format!("echo job {prompt} at {due}"),
                    None => format!("echo job {prompt} done"),
                });
            }
            match store::write(store, hosted, last_seq, *now, effect) {
                Ok(Written::Stored(events)) => {
                    for e in events {
                        log.push(format!("#{} {}", e.seq, event(&e.kind)));
                        sending.push(e.seq);
                    }
                }
                Ok(Written::Other(other)) => log.push(format!("{other:?}")),
                Err(e) => {
                    store.rollback();
                    *cache = None;
                    log.push(format!("{e}: the turn is undone and the object resets"));
                    return log;
                }
            }
        }
        store.commit();
        sent.extend(sending);
        log
    }

    /// One script line; its log lines.
    fn line(&mut self, line: &str) -> Vec<String> {
        let (who, what) = line
            .split_once(": ")
            .or_else(|| line.split_once(' '))
            .unwrap_or((line, ""));
        let words: Vec<&str> = what.split_whitespace().collect();
        let run = |command: Command, object: &mut Object| {
            let who = person(who);
            object.turn(move |h, now, entropy| h.run(&who, command, now, entropy).map(|(_, fx)| fx))
        };
        match (who, words.as_slice()) {
            ("evict", _) => {
                self.cache = None;
                Vec::new()
            }
            ("writes", ["fail", "after", n]) => {
                self.store.fail_after(n.parse().expect("a number"));
                Vec::new()
            }
            ("writes", ["heal"]) => {
                self.store.heal();
                Vec::new()
            }
            ("alarm", _) => {
                let ms: u64 = what
                    .trim_start_matches('+')
                    .trim_end_matches("ms")
                    .parse()
                    .expect("alarm +<ms>ms");
                self.now += ms;
                self.turn(|h, now, entropy| Ok(h.handle(Input::Alarm, now, entropy)))
            }
            (_, ["prompt", id]) => {
                let submission = PromptSubmission {
                    id: id.to_string(),
                    text: id.to_string(),
                    priority: 0,
                    model: None,
                    key: Some(format!("key-{id}")),
                };
                run(Command::Submit(submission), self)
            }
            (_, ["cancel", id]) => run(
                Command::Cancel {
                    prompt: id.to_string(),
                },
                self,
            ),
            (_, ["lock", resource]) => run(
                Command::Lock {
                    resource: resource.to_string(),
                    ttl_ms: 60_000,
                },
                self,
            ),
            (_, ["stop"]) => run(Command::Stop, self),
            _ => panic!("unknown script line {line:?}"),
        }
    }

    /// What must hold after every line.
    fn check(&self, line: &str) {
        let events = self.store.events();
        let numbers: Vec<u64> = events.iter().map(|(seq, _)| *seq).collect();
        let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert_eq!(
            numbers, expected,
            "after {line:?}: the log has a gap or a repeat"
        );
        for seq in &self.sent {
            assert!(
                numbers.contains(seq),
                "after {line:?}: event {seq} was sent to people but is not stored"
            );
        }
        if let Some((hosted, last_seq)) = &self.cache {
            let (stored, stored_seq) = Object::reload(&self.store);
            assert_eq!(*last_seq, stored_seq, "after {line:?}: the log's end");
            assert_eq!(
                hosted.session, stored.session,
                "after {line:?}: the session in memory is not the stored one"
            );
            assert_eq!(hosted.jobs, stored.jobs, "after {line:?}: runner jobs");
        }
        // Every prompt the queue holds was announced, and every announced prompt is held
        // (the window of ended prompts aside: none of these scripts reaches it).
        let (reloaded, _) = Object::reload(&self.store);
        let queued: Vec<String> = events
            .iter()
            .filter_map(|(_, body)| {
                let v: serde_json::Value = serde_json::from_str(body).ok()?;
                (v["type"] == "prompt.queued")
                    .then(|| v["prompt"]["id"].as_str().map(String::from))?
            })
            .collect();
        let held: Vec<String> = reloaded.session.queue.prompts.keys().cloned().collect();
        let mut announced = queued.clone();
        announced.sort();
        assert_eq!(
            announced, held,
            "after {line:?}: prompts stored without their event, or the reverse"
        );
    }

    /// Runs a script, checking after each line; returns the log.
    fn script(&mut self, script: &str) -> String {
        let mut log = String::new();
        for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
            log.push_str(line);
            log.push('\n');
            for entry in self.line(line) {
                log.push_str("  ");
                log.push_str(&entry);
                log.push('\n');
            }
            self.check(line);
        }
        log
    }
}

fn check(script: &str, expected: &str) {
    let got = Object::new().script(script);
    let lines: Vec<&str> = script.lines().map(str::trim).collect();
    let want: String = expected
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| match lines.contains(&l) {
            true => format!("{l}\n"),
            false => format!("  {l}\n"),
        })
        .collect();
    assert_eq!(got, want, "\n--- got ---\n{got}\n--- want ---\n{want}");
}

#[test]
fn the_echo_runner_survives_an_eviction_between_start_and_answer() {
    check(
        "alice: prompt p1
         evict
         alarm +1000ms",
        "alice: prompt p1
           #4 prompt.queued p1
           #5 prompt.started p1
           echo job p1 at 1000
         evict
         alarm +1000ms
           echo job p1 done
           #6 agent.text p1 echo: p1
           #7 prompt.finished p1 ok=true",
    );
}

#[test]
fn a_failed_write_undoes_its_whole_turn_and_the_retry_stores_it_once() {
    // The second write of the prompt's turn fails: neither its row nor its events are stored,
    // nobody was sent them, and the same submission (same key) afterwards is stored once.
    check(
        "writes fail after 1
         alice: prompt p1
         writes heal
         alice: prompt p1
         alarm +1000ms",
        "writes fail after 1
         alice: prompt p1
           storage: injected write failure: the turn is undone and the object resets
         writes heal
         alice: prompt p1
           #4 prompt.queued p1
           #5 prompt.started p1
           echo job p1 at 1000
         alarm +1000ms
           echo job p1 done
           #6 agent.text p1 echo: p1
           #7 prompt.finished p1 ok=true",
    );
}

/// A script that touches every kind of row: prompts (queued, running, cancelled, answered),
/// runner jobs, locks and the log.
const BUSY: &str = "alice: prompt p1
    bob: prompt p2
    bob: lock src/a.rs
    evict
    alice: cancel p2
    bob: prompt p3
    alarm +1000ms
    evict
    alarm +1000ms
    alice: stop";

#[test]
fn failing_any_one_write_loses_nothing_acknowledged_and_leaves_no_half_turn() {
    // How many writes the script makes when nothing fails.
    let mut clean = Object::new();
    let before = clean.store.writes;
    clean.script(BUSY);
    let writes = clean.store.writes - before;
    assert!(writes > 20, "the script writes {writes} times");
    for k in 0..writes {
        let mut object = Object::new();
        object.store.fail_after(k);
        let mut failed = false;
        for line in BUSY.lines().map(str::trim) {
            let log = object.line(line);
            object.check(line);
            if log.iter().any(|l| l.contains("injected write failure")) {
                failed = true;
                object.store.heal();
            }
        }
        assert!(failed, "write {k} of {writes} never failed");
        let (hosted, _) = Object::reload(&object.store);
        assert!(
            hosted.session.queue.running.is_none() || !hosted.jobs.is_empty(),
            "failing write {k}: a running prompt with no runner job would never end"
        );
    }
}

#[test]
fn an_eviction_anywhere_changes_nothing() {
    let lines: Vec<&str> = BUSY.lines().map(str::trim).collect();
    let mut clean = Object::new();
    clean.script(BUSY);
    for at in 0..=lines.len() {
        let mut object = Object::new();
        for (i, line) in lines.iter().enumerate() {
            if i == at {
                object.cache = None;
            }
            object.line(line);
            object.check(line);
        }
        assert_eq!(
            object.store, clean.store,
            "an eviction before line {at} changed what is stored"
        );
    }
}
