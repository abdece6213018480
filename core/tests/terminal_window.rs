//! Bounded prompt state: a session keeps a window of terminal prompts and prunes older ones (rows named dirty, events untouched).

use std::collections::BTreeSet;

use nightshift_core::events::EventKind;
use nightshift_core::ids::Identity;
use nightshift_core::queue::{
    terminal_window, Prompt, PromptStatus, RECENT_PROMPTS, TERMINAL_WINDOW,
};
use nightshift_core::session::{
    Dirty, Limits, Meta, Outcome, PromptSubmission, Session, SessionStatus, Submitted,
};

fn person(user: &str) -> Identity {
    Identity {
        user: user.into(),
        name: user.into(),
        email: None,
    }
}

/// Ada owns it, Bob is a member; at most `max_queued` prompts wait.
fn session(max_queued: u32) -> Session {
    let meta = Meta {
        id: "ses".into(),
        title: "t".into(),
        repository: None,
        owner: "ada".into(),
        invite: "inv".into(),
        created_at: 0,
        status: SessionStatus::Active,
        limits: Limits {
            max_queued,
            ..Limits::default()
        },
        next_arrival: 0,
        model: None,
        pull_request: None,
        pull_request_action: None,
    };
    let (mut session, _) = Session::create(meta, &person("ada"));
    session.join(&person("bob"), "inv", 0).expect("bob joins");
    session.take_dirty();
    session
}

fn submission(id: &str, text: &str, priority: i32, key: Option<&str>) -> PromptSubmission {
    PromptSubmission {
        id: id.into(),
        text: text.into(),
        priority,
        model: None,
        key: key.map(String::from),
    }
}

/// Ids whose rows a `take_dirty` list deletes: named dirty, gone from the queue.
fn deleted(session: &Session, dirty: &[Dirty]) -> Vec<String> {
    dirty
        .iter()
        .filter_map(|d| match d {
            Dirty::Prompt(id) if !session.queue.prompts.contains_key(id) => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// The queue view's recent list: the newest terminal prompts by arrival.
fn recent(session: &Session) -> Vec<Prompt> {
    let mut terminal: Vec<&Prompt> = session
        .queue
        .prompts
        .values()
        .filter(|p| p.status.is_terminal())
        .collect();
    terminal.sort_by_key(|p| std::cmp::Reverse(p.arrival));
    terminal.into_iter().take(RECENT_PROMPTS).cloned().collect()
}

#[test]
fn the_window_is_one_hundred_or_more_for_a_large_queue_bound() {
    assert_eq!(TERMINAL_WINDOW, 100);
    assert_eq!(terminal_window(Limits::default().max_queued), 100);
    assert_eq!(terminal_window(200), 200 + RECENT_PROMPTS + 1);
    assert_eq!(session(50).terminal_window(), 100);
}

/// One member looping enqueue/cancel: the queue keeps the window, every pruned row is named
/// dirty in the command that pruned it, the events are all there, and the running and the
/// queued prompts are never pruned.
#[test]
fn an_enqueue_cancel_loop_keeps_the_window_and_every_event() {
    let mut session = session(50);
    let window = session.terminal_window();
    let cycles = 3 * window + 7;
    session
        .submit_prompt(&person("ada"), submission("run", "runs", 0, None), 0)
        .expect("running");
    session
        .submit_prompt(&person("ada"), submission("wait", "waits", -10, None), 0)
        .expect("queued");
    session.take_dirty();
    let bob = person("bob");
    let mut events: Vec<EventKind> = Vec::new();
    let mut pruned: Vec<String> = Vec::new();
    for i in 0..cycles {
        let now = 1 + i as u64;
        let id = format!("p{i}");
        let (submitted, out) = session
            .submit_prompt(&bob, submission(&id, "loop", 0, None), now)
            .expect("enqueue");
        assert!(submitted.is_new());
        events.extend(out.events.into_iter().map(|(_, kind)| kind));
        let out = session.cancel_prompt(&bob, &id, now).expect("cancel");
        events.extend(out.events.into_iter().map(|(_, kind)| kind));
        let dirty = session.take_dirty();
        assert!(dirty.contains(&Dirty::Prompt(id.clone())), "{dirty:?}");
        let gone = deleted(&session, &dirty);
        // From the first cycle past the window on, each cancel prunes exactly the oldest one.
        let expected = (i >= window).then(|| format!("p{}", i - window));
        assert_eq!(gone, expected.into_iter().collect::<Vec<_>>(), "cycle {i}");
        pruned.extend(gone);
        assert!(session.queue.terminal_count() <= window, "cycle {i}");
        assert_eq!(session.queue.running.as_deref(), Some("run"));
        assert_eq!(
            session.queue.get("wait").map(|p| p.status),
            Ok(PromptStatus::Queued)
        );
    }
    assert_eq!(session.queue.terminal_count(), window);
    assert_eq!(session.queue.prompts.len(), window + 2);
    let expected: Vec<String> = (0..cycles - window).map(|i| format!("p{i}")).collect();
    assert_eq!(pruned, expected);
    let kept: BTreeSet<&str> = session
        .queue
        .prompts
        .values()
        .filter(|p| p.status.is_terminal())
        .map(|p| p.id.as_str())
        .collect();
    let newest: Vec<String> = (cycles - window..cycles).map(|i| format!("p{i}")).collect();
    assert_eq!(kept, newest.iter().map(String::as_str).collect());
    // Every event of every cycle was produced (the log keeps what the queue forgot).
    let queued = events
        .iter()
        .filter(|k| matches!(k, EventKind::PromptQueued { .. }))
        .count();
    let cancelled: Vec<&str> = events
        .iter()
        .filter_map(|k| match k {
            EventKind::PromptCancelled { id } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        (queued, cancelled.len(), events.len()),
        (cycles, cycles, 2 * cycles)
    );
    assert!(pruned.iter().all(|id| cancelled.contains(&id.as_str())));
}

/// A prompt that waited long (low priority) and is cancelled after many newer ones ended is the
/// oldest by arrival, yet it just ended: it stays (the cancel's answer reads it back).
#[test]
fn the_prompt_that_just_ended_is_kept_however_early_it_arrived() {
    let mut session = session(50);
    let bob = person("bob");
    session
        .submit_prompt(&person("ada"), submission("run", "runs", 0, None), 0)
        .expect("running");
    session
        .submit_prompt(&bob, submission("old", "waits", -10, None), 0)
        .expect("queued");
    let window = session.terminal_window();
    for i in 0..window + 5 {
        let id = format!("p{i}");
        session
            .submit_prompt(&bob, submission(&id, "loop", 0, None), 1 + i as u64)
            .expect("enqueue");
        session
            .cancel_prompt(&bob, &id, 1 + i as u64)
            .expect("cancel");
    }
    session.take_dirty();
    session
        .cancel_prompt(&bob, "old", 10_000)
        .expect("cancel old");
    assert_eq!(
        session.queue.get("old").map(|p| p.status),
        Ok(PromptStatus::Cancelled)
    );
    assert_eq!(session.queue.terminal_count(), window);
    let dirty = session.take_dirty();
    assert_eq!(deleted(&session, &dirty), vec![format!("p{}", 5)]);
}

/// A tiny deterministic generator (the test needs no crate for it).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Random prompt traffic (priorities, cancels, stops, finishes) on a pruned session and on one
/// that keeps everything: the same outcomes, queue order, running prompt and recent list at
/// every step, for the default queue bound and a large one.
#[test]
fn the_recent_list_and_the_queue_are_those_of_an_unpruned_session() {
    for (max_queued, seed) in [(50, 1), (50, 2), (200, 3), (200, 4)] {
        let mut pruned = session(max_queued);
        let mut kept = session(max_queued).with_terminal_window(usize::MAX);
        let mut lcg = Lcg(seed);
        for step in 0..2_500u64 {
            let now = 1 + step;
            let who = person(if lcg.below(2) == 0 { "ada" } else { "bob" });
            let queued: Vec<String> = kept
                .queue
                .queued_in_order()
                .iter()
                .map(|p| p.id.clone())
                .collect();
            let apply = |s: &mut Session, lcg: &mut Lcg| -> Option<Outcome> {
                match lcg.below(10) {
                    0..=4 => {
                        let priority = lcg.below(21) as i32 - 10;
                        let id = format!("p{step}");
                        s.submit_prompt(&who, submission(&id, "x", priority, None), now)
                            .ok()
                            .map(|(_, out)| out)
                    }
                    5 | 6 if !queued.is_empty() => {
                        let pick = &queued[lcg.below(queued.len() as u64) as usize];
                        s.cancel_prompt(&person("ada"), pick, now).ok()
                    }
                    7 => s.stop_prompt(&person("ada"), now).ok(),
                    _ => {
                        let ok = lcg.below(2) == 0;
                        let running = s.queue.running.clone()?;
                        s.finish_prompt(&running, ok, None, now).ok()
                    }
                }
            };
            // The same random choices for both sessions.
            let mut twin = Lcg(lcg.0);
            let a = apply(&mut pruned, &mut lcg);
            let b = apply(&mut kept, &mut twin);
            assert_eq!(a, b, "max_queued {max_queued}, step {step}");
            assert_eq!(pruned.queue.running, kept.queue.running);
            assert_eq!(
                pruned.queue.queued_in_order(),
                kept.queue.queued_in_order(),
                "step {step}"
            );
            assert_eq!(
                recent(&pruned),
                recent(&kept),
                "max_queued {max_queued}, step {step}"
            );
            assert!(pruned.queue.terminal_count() <= pruned.terminal_window());
        }
        assert!(
            kept.queue.terminal_count() > 4 * pruned.terminal_window(),
            "the traffic went far past the window"
        );
    }
}

/// Why the window grows with the queue bound: with 200 allowed to wait, 81 prompts that waited
/// end after a newer one (X) and 19 newer ones end too. X is among the 20 newest by arrival but
/// 100 prompts ended after it: a window of 100 would drop it from the recent list.
#[test]
fn a_large_queue_bound_widens_the_window_so_the_recent_list_is_whole() {
    let mut pruned = session(200);
    let mut kept = session(200).with_terminal_window(usize::MAX);
    for s in [&mut pruned, &mut kept] {
        let ada = person("ada");
        let mut now = 0;
        let mut tick = || {
            now += 1;
            now
        };
        s.submit_prompt(&ada, submission("run", "runs", 0, None), tick())
            .expect("running");
        for i in 0..81 {
            s.submit_prompt(&ada, submission(&format!("l{i}"), "w", 0, None), tick())
                .expect("waits");
        }
        s.submit_prompt(&ada, submission("x", "newer", 0, None), tick())
            .expect("x");
        s.cancel_prompt(&ada, "x", tick()).expect("cancel x");
        for i in 0..81 {
            s.cancel_prompt(&ada, &format!("l{i}"), tick())
                .expect("cancel an older one");
        }
        for i in 0..19 {
            let id = format!("h{i}");
            s.submit_prompt(&ada, submission(&id, "newest", 0, None), tick())
                .expect("h");
            s.cancel_prompt(&ada, &id, tick()).expect("cancel h");
        }
    }
    assert_eq!(kept.queue.terminal_count(), 101);
    assert!(recent(&kept).iter().any(|p| p.id == "x"));
    assert_eq!(recent(&pruned), recent(&kept));
}

/// A pruned prompt's idempotency key is forgotten with it: the same key is a new prompt then.
/// Until then it answers with the stored prompt.
#[test]
fn a_pruned_prompts_key_is_no_longer_known() {
    let mut session = session(50);
    let bob = person("bob");
    session
        .submit_prompt(&person("ada"), submission("run", "runs", 0, None), 0)
        .expect("running");
    session
        .submit_prompt(&bob, submission("k1", "keyed", 0, Some("key")), 1)
        .expect("keyed");
    session.cancel_prompt(&bob, "k1", 1).expect("cancel");
    let window = session.terminal_window();
    for i in 0..window - 1 {
        let id = format!("p{i}");
        session
            .submit_prompt(&bob, submission(&id, "loop", 0, None), 2 + i as u64)
            .expect("enqueue");
        session
            .cancel_prompt(&bob, &id, 2 + i as u64)
            .expect("cancel");
    }
    // Still in the window: the key names the stored prompt, and nothing changes.
    let (again, out) = session
        .submit_prompt(&bob, submission("k2", "keyed", 0, Some("key")), 500)
        .expect("retry");
    assert_eq!(
        (again, out.events.len()),
        (Submitted::Existing("k1".into()), 0)
    );
    // One more prompt ends: the keyed one is the oldest and goes.
    session
        .submit_prompt(&bob, submission("last", "loop", 0, None), 501)
        .expect("enqueue");
    session.cancel_prompt(&bob, "last", 501).expect("cancel");
    assert!(session.queue.get("k1").is_err());
    assert!(session.queue.find_by_key("bob", "key").is_none());
    let (fresh, out) = session
        .submit_prompt(&bob, submission("k3", "keyed", 0, Some("key")), 502)
        .expect("a new prompt");
    assert_eq!(fresh, Submitted::Queued("k3".into()));
    assert_eq!(out.events.len(), 1, "queued again, with its event");
}

/// A session stored before the window existed (more terminal rows than it) is pruned when it is
/// restored: the excess is named dirty, so the shell's first write after the load deletes it.
#[test]
fn a_session_stored_with_more_than_the_window_is_pruned_on_restore() {
    let mut old = session(50).with_terminal_window(usize::MAX);
    let bob = person("bob");
    old.submit_prompt(&person("ada"), submission("run", "runs", 0, None), 0)
        .expect("running");
    old.submit_prompt(&bob, submission("wait", "waits", -10, None), 0)
        .expect("queued");
    for i in 0..300u64 {
        let id = format!("p{i}");
        old.submit_prompt(&bob, submission(&id, "loop", 0, None), 1 + i)
            .expect("enqueue");
        old.cancel_prompt(&bob, &id, 1 + i).expect("cancel");
    }
    old.take_dirty();
    assert_eq!(old.queue.terminal_count(), 300);
    let mut restored = Session::restore(
        old.meta.clone(),
        old.members.values().cloned().collect(),
        old.clients.values().cloned().collect(),
        old.locks.values().cloned().collect(),
        old.queue.prompts.values().cloned().collect(),
    );
    let window = restored.terminal_window();
    assert_eq!(restored.queue.terminal_count(), window);
    assert_eq!(restored.queue.running.as_deref(), Some("run"));
    assert!(restored.queue.get("wait").is_ok());
    assert_eq!(recent(&restored), recent(&old));
    let dirty = restored.take_dirty();
    let gone: BTreeSet<String> = deleted(&restored, &dirty).into_iter().collect();
    let expected: BTreeSet<String> = (0..300 - window).map(|i| format!("p{i}")).collect();
    assert_eq!(gone, expected);
    assert_eq!(dirty.len(), 300 - window, "only the pruned rows: {dirty:?}");
    // Loaded again (the deletions written), it is already within the window.
    let mut again = Session::restore(
        restored.meta.clone(),
        restored.members.values().cloned().collect(),
        restored.clients.values().cloned().collect(),
        restored.locks.values().cloned().collect(),
        restored.queue.prompts.values().cloned().collect(),
    );
    assert_eq!(again.take_dirty(), vec![]);
}

/// Ending the session cancels every queued prompt at once; the window still holds afterwards,
/// and the prompts it just ended are the ones kept.
#[test]
fn ending_a_session_with_a_full_queue_keeps_the_window() {
    let mut session = session(50);
    let bob = person("bob");
    let window = session.terminal_window();
    session
        .submit_prompt(&person("ada"), submission("run", "runs", 0, None), 0)
        .expect("running");
    for i in 0..window as u64 {
        let id = format!("p{i}");
        session
            .submit_prompt(&bob, submission(&id, "loop", 0, None), 1 + i)
            .expect("enqueue");
        session.cancel_prompt(&bob, &id, 1 + i).expect("cancel");
    }
    for i in 0..50 {
        session
            .submit_prompt(&bob, submission(&format!("q{i}"), "wait", 0, None), 1_000)
            .expect("queued");
    }
    session.take_dirty();
    session.end(&person("ada"), 2_000).expect("end");
    assert_eq!(session.queue.terminal_count(), window);
    assert!(session.queue.get("run").is_ok(), "stopped, just now");
    assert!((0..50).all(|i| session.queue.get(&format!("q{i}")).is_ok()));
    let dirty = session.take_dirty();
    let gone: BTreeSet<String> = deleted(&session, &dirty).into_iter().collect();
    assert_eq!(gone, (0..51).map(|i| format!("p{i}")).collect());
}
