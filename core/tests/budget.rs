//! Unit tests of the global budget (core `budget`) and of a shard's slot arithmetic (`Scheduler::slots_wanted`, `Scheduler::hold`); the exhaustive check is model_global_budget.rs.

use nightshift_core::background::{Limits, Scheduler, Spawn, Status};
use nightshift_core::budget::{Answer, Budget, Granted, Holding, Report, Request, Wake};

fn wake(shards: &[&str]) -> Vec<Wake> {
    shards.iter().map(|s| Wake(s.to_string())).collect()
}

#[test]
fn acquire_lends_what_is_free_and_a_short_changed_shard_waits() {
    let mut b = Budget::new(3);
    assert_eq!(
        b.acquire("a", 2),
        Granted {
            granted: 2,
            short: false
        }
    );
    assert_eq!(
        b.acquire("b", 2),
        Granted {
            granted: 1,
            short: true
        }
    );
    assert!(b.waiting.contains("b"));
    assert_eq!((b.lent(), b.free()), (3, 0));
    assert_eq!(b.acquire("c", 1).granted, 0, "nothing is free");
    // The alarm, while shards wait, wakes every holder and every waiter.
    assert_eq!(b.alarm(), wake(&["a", "b", "c"]));
    // a gives one back: the others that wait are woken, and stay waiting until served.
    assert_eq!(b.release("a", 1), wake(&["b", "c"]));
    assert_eq!(b.acquire("b", 1).granted, 1);
    assert!(!b.waiting.contains("b"), "served in full: off the list");
    assert!(b.waiting.contains("c"));
    // A lowered cap lends nothing more (never a negative count).
    b.cap = 1;
    assert_eq!((b.free(), b.acquire("a", 5).granted), (0, 0));
}

#[test]
fn a_release_that_frees_nothing_wakes_nobody() {
    let mut b = Budget::new(1);
    b.acquire("a", 1);
    b.acquire("b", 1);
    assert_eq!(b.release("c", 1), Vec::<Wake>::new());
    assert_eq!(b.release("a", 0), Vec::<Wake>::new());
    assert_eq!(
        b.release("a", 5),
        wake(&["b"]),
        "a release saturates at zero"
    );
    assert_eq!(b.held_by("a"), 0);
    assert!(!b.holds.contains_key("a"), "no zero rows in the core");
}

#[test]
fn a_report_of_fewer_slots_takes_the_lost_ones_back_and_a_late_one_is_ignored() {
    let mut b = Budget::new(2);
    // a's grant of 2 was lent, but its answer was lost: a still holds 0.
    b.exchange("a", Some(Report { seq: 1, held: 0 }), Request::Acquire(2));
    b.acquire("b", 1);
    assert!(b.waiting.contains("b"));
    // a's next exchange reports 0: the 2 come back (b is woken), and a takes 1.
    let answer = b.exchange("a", Some(Report { seq: 2, held: 0 }), Request::Acquire(1));
    assert_eq!(
        answer,
        Answer {
            granted: 1,
            wake: wake(&["b"])
        }
    );
    assert_eq!(b.held_by("a"), 1);
    // A report of more than is lent lends nothing.
    assert_eq!(b.reconcile("a", 5), Vec::<Wake>::new());
    assert_eq!(b.held_by("a"), 1);
    // A request numbered before one already seen (a dead instance's) changes nothing.
    let before = b.clone();
    assert_eq!(
        b.exchange("a", Some(Report { seq: 1, held: 0 }), Request::Release(1)),
        Answer::default()
    );
    assert_eq!(b, before);
    // Without a report (an older shard) the request is carried out as it stands.
    assert_eq!(
        b.exchange("a", None, Request::Release(1)).wake,
        wake(&["b"])
    );
}

#[test]
fn restore_drops_zero_rows() {
    let b = Budget::restore(
        4,
        [("a".to_string(), 0), ("b".to_string(), 2)],
        ["c".to_string()],
        [("b".to_string(), 7)],
    );
    assert_eq!(b.holds.len(), 1);
    assert_eq!((b.lent(), b.free()), (2, 2));
    assert_eq!(b.alarm(), wake(&["b", "c"]));
}

#[test]
fn a_holding_numbers_its_exchanges_and_gives_releases_up_at_once() {
    let mut h = Holding::default();
    assert_eq!(h.ask(0, false), None, "nothing to change");
    let ex = h.ask(0, true).expect("a woken shard reports");
    assert_eq!(
        (ex.report, ex.request),
        (Report { seq: 1, held: 0 }, Request::Acquire(0))
    );
    let ex = h.ask(3, false).expect("acquire");
    assert_eq!(
        (ex.report, ex.request),
        (Report { seq: 2, held: 0 }, Request::Acquire(3))
    );
    assert!(h.granted(2));
    assert!(!h.granted(0));
    let ex = h.ask(1, false).expect("release");
    assert_eq!(
        (ex.report, ex.request),
        (Report { seq: 3, held: 2 }, Request::Release(1))
    );
    assert_eq!(h.held, 1, "released before the call");
}

#[test]
fn slots_wanted_counts_running_and_queued_up_to_the_shards_own_limit() {
    let limits = Limits {
        max_concurrent: 3,
        max_per_user: 5,
        max_queued: 5,
        ..Limits::default()
    };
    let mut s = Scheduler::new(limits);
    assert_eq!(s.slots_wanted(0), 0);
    assert_eq!(s.slots_wanted(1), 1, "an agent about to be spawned");
    let spawn = |s: &mut Scheduler, id: &str| {
        s.spawn(Spawn {
            id: id.into(),
            user: "ada".into(),
            parent: None,
            parent_depth: 0,
        })
        .expect("spawn")
    };
    // Holding one slot: one starts, the other waits; both are wanted.
    s.hold(1);
    spawn(&mut s, "a1");
    spawn(&mut s, "a2");
    let status = |s: &Scheduler, id: &str| s.agents[id].status;
    assert_eq!(
        (status(&s, "a1"), status(&s, "a2")),
        (Status::Starting, Status::Queued)
    );
    s.limits = limits;
    assert_eq!(s.slots_wanted(0), 2);
    spawn(&mut s, "a3");
    spawn(&mut s, "a4");
    assert_eq!(s.slots_wanted(0), 3, "at most the shard's own limit");
    // hold never raises the shard's own limit.
    s.hold(10);
    assert_eq!(s.limits.max_concurrent, 3);
}
