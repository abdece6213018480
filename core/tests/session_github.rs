//! The session's GitHub-facing rules: its pull request follows GitHub's newest word only, a prompt's pushed work calls for a pull request in the prompting person's name (once), and the owner removes members and rotates the invite.

use nightshift_core::events::{EventKind, PullRequestAction};
use nightshift_core::github::{Account, Branch, PrState, Pull, RepoRef};
use nightshift_core::ids::Identity;
use nightshift_core::session::{
    Limits, Meta, PromptSubmission, Session, SessionStatus, PR_TITLE_MAX,
};
use nightshift_core::CoreError;

fn person(user: &str) -> Identity {
    Identity {
        user: user.into(),
        name: user.to_uppercase(),
        email: Some(format!("{user}@example.com")),
    }
}

fn session(repository: Option<&str>) -> Session {
    let meta = Meta {
        id: "ses_1".into(),
        title: "t".into(),
        repository: repository.map(String::from),
        owner: "ada".into(),
        invite: "inv-1".into(),
        created_at: 0,
        status: SessionStatus::Active,
        limits: Limits::default(),
        next_arrival: 0,
        model: None,
        pull_request: None,
        pull_request_action: None,
    };
    Session::create(meta, &person("ada")).0
}

fn repo(id: u64) -> RepoRef {
    RepoRef {
        id,
        full_name: "acme/web".into(),
        name: "web".into(),
        owner: None,
        default_branch: Some("main".into()),
        private: true,
    }
}

fn pull(state: &str, merged: bool, updated_at: &str) -> Pull {
    let account = Account {
        login: "ada".into(),
        id: 1,
        kind: "User".into(),
    };
    Pull {
        id: 9,
        number: 7,
        state: state.into(),
        draft: false,
        merged,
        merged_at: None,
        title: "Greeting".into(),
        body: None,
        html_url: "https://github.com/acme/web/pull/7".into(),
        updated_at: updated_at.into(),
        closed_at: None,
        user: account,
        head: Branch {
            git_ref: "nightshift/ses_1".into(),
            sha: "abc".into(),
            repo: Some(repo(5)),
        },
        base: Branch {
            git_ref: "main".into(),
            sha: "def".into(),
            repo: Some(repo(5)),
        },
    }
}

fn kinds(out: &nightshift_core::session::Outcome) -> Vec<&'static str> {
    out.events.iter().map(|(_, k)| k.name()).collect()
}

#[test]
fn the_pull_request_follows_only_newer_news() {
    let mut s = session(Some("web"));
    let opened = s.pull_request("acme/web", &pull("open", false, "2026-12-01T10:00:00Z"));
    assert_eq!(kinds(&opened), ["pr.opened"]);
    // The same state again, and an older one delivered late: nothing.
    assert!(s
        .pull_request("acme/web", &pull("open", false, "2026-12-01T10:00:00Z"))
        .events
        .is_empty());
    let merged = s.pull_request("acme/web", &pull("closed", true, "2026-12-01T11:00:00Z"));
    assert_eq!(kinds(&merged), ["pr.merged"]);
    let late = s.pull_request("acme/web", &pull("open", false, "2026-12-01T10:30:00Z"));
    assert!(late.events.is_empty(), "{:?}", kinds(&late));
    let link = s.meta.pull_request.clone().expect("link");
    assert_eq!((link.state, link.number), (PrState::Merged, 7));
    // Closed without merging, on a PR that is still open.
    let mut t = session(Some("web"));
    t.pull_request("acme/web", &pull("open", false, "2026-12-01T10:00:00Z"));
    let closed = t.pull_request("acme/web", &pull("closed", false, "2026-12-01T10:05:00Z"));
    assert_eq!(kinds(&closed), ["pr.closed"]);
    let reopened = t.pull_request("acme/web", &pull("open", false, "2026-12-01T10:06:00Z"));
    assert_eq!(kinds(&reopened), ["pr.updated"]);
}

#[test]
fn a_compare_action_is_offered_once_and_a_pull_request_replaces_it() {
    let mut s = session(Some("web"));
    let action = PullRequestAction {
        kind: "create_pull_request".into(),
        url: "https://github.com/acme/web/compare/main...nightshift/ses_1?expand=1".into(),
        reason: "no token".into(),
    };
    assert_eq!(kinds(&s.pull_request_action(action.clone())), ["pr.action"]);
    assert!(s.pull_request_action(action.clone()).events.is_empty());
    s.pull_request("acme/web", &pull("open", false, "2026-12-01T10:00:00Z"));
    assert_eq!(s.meta.pull_request_action, None);
    assert!(s.pull_request_action(action).events.is_empty());
}

fn finished(s: &mut Session, who: &Identity, text: &str) -> Vec<nightshift_core::events::Event> {
    let prompt = PromptSubmission {
        id: "prm_1".into(),
        text: text.into(),
        priority: 0,
        model: None,
        key: None,
    };
    s.submit_prompt(who, prompt, 1).expect("submit");
    vec![nightshift_core::events::Event {
        seq: 9,
        at: 2,
        actor: nightshift_core::ids::Actor::system(),
        kind: EventKind::PromptFinished {
            id: "prm_1".into(),
            ok: true,
            reason: None,
            branch: Some("nightshift/ses_1".into()),
            commit: Some("abc123".into()),
            patch: None,
        },
    }]
}

#[test]
fn pushed_work_calls_for_a_pull_request_in_the_prompting_persons_name_once() {
    let mut s = session(Some("web"));
    let bob = person("bob");
    let invite = s.meta.invite.clone();
    s.join(&bob, &invite, 1).expect("join");
    let long = format!("{}\nand more detail", "x".repeat(100));
    let events = finished(&mut s, &bob, &long);
    let due = s.pull_request_due(&events).expect("due");
    assert_eq!(due.author, "bob");
    assert_eq!(due.branch, "nightshift/ses_1");
    assert_eq!(due.title.chars().count(), PR_TITLE_MAX);
    assert!(due.title.ends_with('…'), "{}", due.title);
    assert!(due.body.contains("> and more detail"), "{}", due.body);
    assert!(due.body.contains("abc123"), "{}", due.body);
    // Once a pull request exists, later pushes update it on GitHub: nothing more to open.
    s.pull_request("acme/web", &pull("open", false, "2026-12-01T10:00:00Z"));
    assert_eq!(s.pull_request_due(&events), None);
    // Nothing pushed, a failed prompt, or no repository: nothing to open.
    let mut plain = session(None);
    let events = finished(&mut plain, &person("ada"), "Hi");
    assert_eq!(plain.pull_request_due(&events), None);
    let mut t = session(Some("web"));
    let mut events = finished(&mut t, &person("ada"), "Hi");
    if let EventKind::PromptFinished { ok, .. } = &mut events[0].kind {
        *ok = false;
    }
    assert_eq!(t.pull_request_due(&events), None);
}

#[test]
fn the_owner_removes_members_and_rotates_the_invite() {
    let mut s = session(None);
    let (ada, bob, eve) = (person("ada"), person("bob"), person("eve"));
    let invite = s.meta.invite.clone();
    s.join(&bob, &invite, 1).expect("join");
    s.join(&eve, &invite, 1).expect("join");
    assert_eq!(
        s.remove_member(&bob, "eve").err(),
        Some(CoreError::OwnerOnly)
    );
    assert_eq!(
        s.remove_member(&ada, "ada").err(),
        Some(CoreError::OwnerCannotLeave)
    );
    assert!(s.remove_member(&ada, "nobody").is_err());
    let out = s.remove_member(&ada, "bob").expect("remove");
    assert_eq!(kinds(&out), ["member.left"]);
    assert!(!s.is_member("bob"));
    assert_eq!(
        s.rotate_invite(&eve, "x".into()).err(),
        Some(CoreError::OwnerOnly)
    );
    let out = s.rotate_invite(&ada, "inv-2".into()).expect("rotate");
    assert_eq!(kinds(&out), ["invite.rotated"]);
    // The old link admits nobody; the new one does.
    assert_eq!(s.join(&bob, "inv-1", 2).err(), Some(CoreError::BadInvite));
    assert!(s.join(&bob, "inv-2", 2).is_ok());
}
