//! The stored forms of the core's types: each JSON literal is exactly what the current code writes into Durable Object storage, so a serde change that would stop reading what is already stored fails here.
//!
//! Each `<type>_format_unchanged` test checks that (1) the pinned literal still deserializes,
//! (2) serializing it again gives the identical string, and (3) where fields were added with
//! defaults, the older form without them still reads. A failure here means stored rows would
//! no longer read back as written: keep the old shape readable (a `#[serde(default)]`, an
//! `alias`) before changing the literal.
//!
//! Where they are stored: session rows (`meta`, `members`, `clients`, `locks`, `prompts`,
//! `events`, `sandbox_link`) and the session's `kv` key `snapshots` in `src/store.rs`; the
//! repository object's `kv` keys `settings`, `registry` and `pool`; the scheduler's `kv` key
//! `scheduler` (durable_objects/).

use nightshift_core::background::Scheduler;
use nightshift_core::events::{Event, EventKind};
use nightshift_core::pool::Pool;
use nightshift_core::queue::{Prompt, PromptStatus};
use nightshift_core::repository::{Registry, Settings};
use nightshift_core::sandbox::{SandboxLink, Stage};
use nightshift_core::session::{Client, Lock, Member, Meta};
use nightshift_core::snapshot::Snapshots;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Reads `literal` as a `T` and checks that writing it again gives `literal` byte for byte.
fn pinned<T: Serialize + DeserializeOwned>(literal: &str) -> T {
    let value: T = serde_json::from_str(literal)
        .unwrap_or_else(|e| panic!("the stored form no longer reads: {e}\n{literal}"));
    let again = serde_json::to_string(&value)
        .unwrap_or_else(|e| panic!("the stored form no longer writes: {e}\n{literal}"));
    assert_eq!(again, literal, "the stored form changed");
    value
}

/// Reads an older stored form (fields added since are absent) as a `T`.
fn older<T: DeserializeOwned>(literal: &str) -> T {
    serde_json::from_str(literal)
        .unwrap_or_else(|e| panic!("an older stored form no longer reads: {e}\n{literal}"))
}

#[test]
fn meta_format_unchanged() {
    pinned::<Meta>(
        r##"{"id":"ses_1","title":"Fix the login","repository":"acme/web","owner":"u_ada","invite":"inv_7f3a","created_at":1700000000000,"status":"active","limits":{"max_clients_per_user":8,"max_members":200,"max_queued":50,"max_lock_ttl_ms":600000,"heartbeat_timeout_ms":60000,"max_prompt_bytes":32768,"max_locks":256},"next_arrival":5,"model":"claude-sonnet"}"##,
    );
    // Without a repository or a session model (both optional, skipped when empty).
    let m = older::<Meta>(
        r##"{"id":"ses_1","title":"Fix the login","owner":"u_ada","invite":"inv_7f3a","created_at":1700000000000,"status":"ended","limits":{"max_clients_per_user":8,"max_members":200,"max_queued":50,"max_lock_ttl_ms":600000,"heartbeat_timeout_ms":60000,"max_prompt_bytes":32768},"next_arrival":0}"##,
    );
    assert_eq!((m.repository, m.model), (None, None));
    // Stored before `max_locks` existed: the default bound applies.
    assert_eq!(m.limits.max_locks, 256);
}

#[test]
fn member_format_unchanged() {
    pinned::<Member>(
        r##"{"user":"u_ada","name":"Ada","email":"ada@example.com","role":"owner","joined_at":1700000000000}"##,
    );
    let m = older::<Member>(
        r##"{"user":"u_bob","name":"Bob","role":"member","joined_at":1700000000000}"##,
    );
    assert_eq!(m.email, None);
}

#[test]
fn client_format_unchanged() {
    pinned::<Client>(
        r##"{"id":"c_1","user":"u_ada","name":"Ada","kind":"browser","color":"#e6194b","connected_at":1700000000500,"last_seen":1700000004000,"cursor":{"file":"src/login.ts","line":12,"column":4},"typing":true}"##,
    );
    // Without a cursor or the typing flag.
    let c = older::<Client>(
        r##"{"id":"c_1","user":"u_ada","name":"Ada","kind":"browser","color":"#e6194b","connected_at":1700000000500,"last_seen":1700000004000}"##,
    );
    assert_eq!((c.cursor, c.typing), (None, false));
}

#[test]
fn lock_format_unchanged() {
    pinned::<Lock>(
        r##"{"resource":"src/login.ts","holder":"u_ada","acquired_at":1700000001000,"expires_at":1700000061000}"##,
    );
}

#[test]
fn prompt_format_unchanged() {
    pinned::<Prompt>(
        r##"{"id":"p_1","author":"u_ada","author_name":"Ada","text":"Fix the login form","priority":2,"arrival":4,"status":"completed","queued_at":1700000001000,"model":"claude-sonnet","started_at":1700000002000,"finished_at":1700000003000,"reason":"done"}"##,
    );
    // A queued prompt from before prompts carried a model.
    let p = older::<Prompt>(
        r##"{"id":"p_2","author":"u_bob","author_name":"Bob","text":"Add a test","priority":0,"arrival":5,"status":"queued","queued_at":1700000001000}"##,
    );
    assert_eq!(p.status, PromptStatus::Queued);
    assert_eq!(
        (p.model, p.started_at, p.finished_at, p.reason),
        (None, None, None, None)
    );
}

#[test]
fn event_format_unchanged() {
    // One of every kind, as the session's `events` table holds them.
    let stored = [
        r##"{"seq":7,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"session.created","title":"Fix the login","repository":"acme/web","owner":"u_ada"}"##,
        r##"{"seq":8,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"session.ended"}"##,
        r##"{"seq":9,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"member.joined","user":"u_bob","name":"Bob","role":"member"}"##,
        r##"{"seq":10,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"member.left","user":"u_bob"}"##,
        r##"{"seq":11,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"lock.acquired","resource":"src/login.ts","holder":"u_ada","expires_at":1700000061000}"##,
        r##"{"seq":12,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"lock.released","resource":"src/login.ts","holder":"u_ada","reason":"expired"}"##,
        r##"{"seq":13,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"prompt.queued","prompt":{"id":"p_1","author":"u_ada","author_name":"Ada","text":"Fix the login form","priority":2,"arrival":4,"status":"completed","queued_at":1700000001000,"model":"claude-sonnet","started_at":1700000002000,"finished_at":1700000003000,"reason":"done"}}"##,
        r##"{"seq":14,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"prompt.reprioritized","id":"p_1","priority":3}"##,
        r##"{"seq":15,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"prompt.cancelled","id":"p_1"}"##,
        r##"{"seq":16,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"prompt.started","id":"p_1","author":"u_ada"}"##,
        r##"{"seq":17,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"prompt.stopped","id":"p_1"}"##,
        r##"{"seq":18,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"prompt.finished","id":"p_1","ok":true,"reason":"done","branch":"nightshift/ses_1","commit":"4f2c9e1"}"##,
        r##"{"seq":19,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"agent.text","prompt":"p_1","text":"Looking at the form"}"##,
        r##"{"seq":20,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"sandbox.status","stage":"ready","detail":"synced"}"##,
        r##"{"seq":21,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"agent.tool","prompt":"p_1","call":"call_1","tool":"edit","status":"error","input":{"path":"src/login.ts"},"output":"partial","error":{"message":"conflict"}}"##,
        r##"{"seq":22,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"agent.step","prompt":"p_1","reason":"tool-calls","tokens":{"input":1200,"output":80},"cost":0.0042}"##,
        r##"{"seq":23,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"agent.error","prompt":"p_1","message":"model unavailable"}"##,
        r##"{"seq":24,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"agent.blocked","tool":"edit","message":"the checkout is still syncing"}"##,
        r##"{"seq":25,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"egress.changed","allow":["example.com","*.npmjs.org"]}"##,
        r##"{"seq":26,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"egress.blocked","host":"evil.example","tool":"bash"}"##,
        r##"{"seq":27,"at":1700000005000,"actor":{"user":"u_ada","name":"Ada"},"type":"background.child","id":"bg_acme_1f","status":"running","session":"ses_2","title":"Write tests","branch":"nightshift/ses_2"}"##,
    ];
    let mut names = Vec::new();
    for literal in stored {
        names.push(pinned::<Event>(literal).kind.name());
    }
    // No kind is pinned twice (a new kind needs a literal of its own here).
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), stored.len());
    // A finished prompt from before the branch and commit were recorded.
    let e = older::<Event>(
        r##"{"seq":18,"at":1700000005000,"actor":{"user":"system","name":"Nightshift"},"type":"prompt.finished","id":"p_1","ok":false,"reason":null}"##,
    );
    let EventKind::PromptFinished { branch, commit, .. } = e.kind else {
        panic!("not a prompt.finished: {e:?}");
    };
    assert_eq!((branch, commit), (None, None));
}

#[test]
fn sandbox_link_format_unchanged() {
    pinned::<SandboxLink>(
        r##"{"stage":"ready","sandbox":"sbx_9","token_hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","last_n":41,"spawned_at":1700000000000,"last_seen":1700000004000,"disconnected_at":1700000004500,"expires_at":1700003600000,"working_on":"p_1","handovers":1,"failures":2,"retry_at":1700000010000,"prompt_events":12,"prompt_bytes":3456}"##,
    );
    // Before `expires_at`, `working_on`, `handovers`, `failures`, `retry_at`, `prompt_events`
    // and `prompt_bytes` were added.
    let old = r##"{"stage":"spawning","sandbox":null,"token_hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","last_n":0,"spawned_at":1700000000000,"last_seen":1700000000000,"disconnected_at":null}"##;
    let l = older::<SandboxLink>(old);
    assert_eq!(l.stage, Stage::Spawning);
    assert_eq!(
        (l.expires_at, l.working_on.as_deref(), l.retry_at),
        (None, None, None)
    );
    assert_eq!((l.handovers, l.failures), (0, 0));
    assert_eq!((l.prompt_events, l.prompt_bytes), (0, 0));
    // Written back, it only gains `expires_at` (null); the other new fields stay out when empty.
    let again = serde_json::to_string(&l).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        again,
        old.replace(
            r#""disconnected_at":null"#,
            r#""disconnected_at":null,"expires_at":null"#
        )
    );
}

#[test]
fn snapshots_format_unchanged() {
    pinned::<Snapshots>(
        r##"{"snaps":[{"id":"snap_1","turn":1,"taken_at":1700000100000,"expires_at":1700604900000},{"id":"snap_2","turn":2,"taken_at":1700000200000,"expires_at":1700605000000}],"turns":3,"taking":3,"to_delete":["snap_0"]}"##,
    );
}

#[test]
fn pool_format_unchanged() {
    pinned::<Pool>(
        r##"{"target":2,"image":"img_3","entries":{"k1":{"sandbox":"sbx_1","image":"img_3","slot":"ready","since":1700000000000},"k2":{"sandbox":null,"image":null,"slot":"requested","since":1700000001000},"k3":{"sandbox":"sbx_3","image":"img_3","slot":"booting","since":1700000002000},"k4":{"sandbox":"sbx_4","image":"img_2","slot":"draining","since":1699999000000}},"claims":{"ses_1":"sbx_0"},"next_key":5,"sweeps":["k0"]}"##,
    );
    // Before unrecorded creates were swept (`sweeps`).
    let p = older::<Pool>(r##"{"target":2,"image":null,"entries":{},"claims":{},"next_key":0}"##);
    assert!(p.sweeps.is_empty());
}

#[test]
fn settings_format_unchanged() {
    pinned::<Settings>(
        r##"{"name":"acme/web","clone_url":"https://github.com/acme/web.git","base_branch":"develop","setup":["npm ci"],"test":"npm test","pool_size":2,"build_every_min":60,"egress":["registry.example.com"]}"##,
    );
    // Only the required fields: the rest take their defaults.
    let s =
        older::<Settings>(r##"{"name":"acme/web","clone_url":"https://github.com/acme/web.git"}"##);
    assert_eq!(s.base_branch, "main");
    assert_eq!(s.build_every_min, 30);
    assert_eq!((s.pool_size, s.test), (0, None));
    assert!(s.setup.is_empty() && s.egress.is_empty());
}

#[test]
fn registry_format_unchanged() {
    pinned::<Registry>(
        r##"{"builds":[{"image":"img_2","status":"failed","reason":"manual","started_at":1700000000000,"finished_at":1700000300000,"commit":null,"test_exit_code":1,"error":"tests failed"},{"image":"img_3","status":"ready","reason":"cron:28333333","started_at":1700000400000,"finished_at":1700000700000,"commit":"4f2c9e1","test_exit_code":0,"error":null}],"latest":"img_3"}"##,
    );
}

#[test]
fn scheduler_format_unchanged() {
    pinned::<Scheduler>(
        r##"{"limits":{"max_concurrent":8,"max_per_user":4,"max_per_session":4,"max_queued":100,"max_depth":3,"max_children":20},"agents":{"bg_acme_1f":{"id":"bg_acme_1f","user":"u_ada","parent":"ses_1","depth":2,"status":"running","arrival":0,"session":"ses_2"},"bg_acme_2a":{"id":"bg_acme_2a","user":"u_bob","parent":null,"depth":1,"status":"queued","arrival":1,"session":null}},"spawned":{"ses_1":1},"next_arrival":2}"##,
    );
}
