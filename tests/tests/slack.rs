//! Slack end to end against the fake Slack and the fake GitHub: a mention becomes one session of the linked person with one status message that ends done with the pull request; a thread reply days later is a follow-up of the same session; an ambiguous request asks, and the pick starts the session there; someone unknown gets a one-time link and their request goes on once linked; duplicates, retries, other bots and bad signatures change nothing.

use std::time::{Duration, Instant};

use nightshift_core::github::Role;
use nightshift_core::slack::{Block, EventCallback, Text};
use nightshift_tests::fake_github::{FakeGithub, FakeGithubConfig};
use nightshift_tests::fake_slack::{FakeSlack, FakeSlackConfig, Message};
use nightshift_tests::{Server, User, RUN};
use serde_json::{json, Value};

const CHANNEL: &str = "C0GENERAL";
const ADA: &str = "U0ADA";

struct World {
    github: FakeGithub,
    slack: FakeSlack,
    server: Server,
    _compute: nightshift_tests::Compute,
}

/// The fakes, the Worker wired to both (and the chooser model to the scripted one), Ada signed
/// in with GitHub, and `repos` registered (`name` → `acme/name`, with its description).
async fn world(recording: Value, repos: &[(&str, &str)], slack_config: FakeSlackConfig) -> World {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    github.add_user("ada", "Ada Lovelace");
    github.add_user("bob", "Bob Builder");
    let full: Vec<String> = repos
        .iter()
        .map(|(name, _)| format!("acme/{name}"))
        .collect();
    for full_name in &full {
        github.add_repo(full_name, &[("ada", Role::Admin), ("bob", Role::Write)]);
    }
    let full_refs: Vec<&str> = full.iter().map(String::as_str).collect();
    let installation = github.install("acme", &full_refs);
    let slack = FakeSlack::start(slack_config).await;
    slack.add_user(ADA, "Ada Lovelace", "ada@example.com");
    slack.add_user("U0BOB", "Bob Builder", "bob@slack-only.example");
    let compute = nightshift_tests::Compute::start(&recording, &[]).await;
    let mut vars: Vec<(String, String)> = github
        .worker_vars()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    vars.extend(compute.vars().into_iter().map(|(k, v)| (k.to_string(), v)));
    vars.push(("HEARTBEAT_TIMEOUT_MS".into(), "900000".into()));
    vars.push(("SLACK_SIGNING_SECRET".into(), slack.signing_secret()));
    vars.push(("SLACK_BOT_TOKEN".into(), slack.bot_token()));
    vars.push(("SLACK_API_URL".into(), slack.api_url()));
    vars.push(("CHOOSER_MODEL_URL".into(), compute.model_url.clone()));
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = Server::start(&refs).await;
    github.deliver_to(&format!("{}/webhook/github", server.base));
    slack.deliver_to(&format!("{}/webhook/slack/events", server.base));
    slack.interactions_to(&format!("{}/webhook/slack/interactions", server.base));
    let (st, _) = github.deliver_installation_created(installation).await;
    assert_eq!(st, 202);
    let ada = sign_in(&server, &github, "ada").await;
    let api = server.client();
    for (name, description) in repos {
        let (st, v) = api
            .call(
                "POST",
                "/repositories",
                &ada,
                Some(json!({"name": name, "github": format!("acme/{name}"), "description": description})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    World {
        github,
        slack,
        server,
        _compute: compute,
    }
}

async fn sign_in(server: &Server, github: &FakeGithub, login: &str) -> User {
    User {
        user: login.into(),
        token: github.sign_in_through(&server.base, login).await,
    }
}

/// The text of every section and context block of a message.
fn block_text(message: &Message) -> String {
    let mut out = Vec::new();
    for block in &message.blocks {
        match block {
            Block::Section { text, .. } => out.push(text.text().to_string()),
            Block::Context { elements, .. } => {
                out.extend(elements.iter().map(|e: &Text| e.text().to_string()))
            }
            _ => {}
        }
    }
    out.join("\n")
}

/// The bot's status messages in `thread` (the ones with a stage line).
fn statuses(slack: &FakeSlack, channel: &str, thread: &str) -> Vec<Message> {
    slack
        .messages(channel)
        .into_iter()
        .filter(|m| m.thread_ts.as_deref() == Some(thread))
        .filter(|m| {
            m.blocks
                .iter()
                .any(|b| matches!(b, Block::Section { block_id: Some(id), .. } if id == "stage"))
        })
        .collect()
}

/// Waits for the bot's first message in `thread` (30 s) and answers it.
async fn first_reply(slack: &FakeSlack, channel: &str, thread: &str) -> Message {
    let in_thread = |m: &Message| m.thread_ts.as_deref() == Some(thread);
    let messages = slack
        .wait_for_messages(channel, Duration::from_secs(30), |m| {
            m.iter().any(in_thread)
        })
        .await;
    messages
        .into_iter()
        .find(in_thread)
        .unwrap_or_else(|| panic!("the bot said nothing in {thread}"))
}

/// Waits until the thread's status message says `stage` (`Done`, `Working`, …).
async fn status_says(slack: &FakeSlack, channel: &str, thread: &str, stage: &str) -> Message {
    let deadline = Instant::now() + RUN;
    loop {
        let found = statuses(slack, channel, thread);
        if let Some(message) = found.iter().find(|m| m.text.starts_with(stage)) {
            return message.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no status message saying {stage} in {thread}: {:?}",
            slack.messages(channel)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every prompt of a session's view: finished, running and queued, oldest first.
fn prompts_of(view: &Value) -> Vec<Value> {
    let queue = &view["queue"];
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let mut all = list(&queue["recent"]);
    if !queue["running"].is_null() {
        all.push(queue["running"].clone());
    }
    all.extend(list(&queue["queued"]));
    all
}

/// Waits until the thread's status message says done with its pull request's link (the pull
/// request is opened just after the prompt ends, so "done" may come first without it).
async fn done_with_pr(slack: &FakeSlack, channel: &str, thread: &str) -> Message {
    let deadline = Instant::now() + RUN;
    loop {
        let found = statuses(slack, channel, thread);
        let done = found
            .iter()
            .find(|m| m.text.starts_with("Done") && block_text(m).contains("/pull/"));
        if let Some(message) = done {
            return message.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no status message saying done with a pull request in {thread}: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn sessions_of(server: &Server, who: &User) -> Vec<Value> {
    let (st, v) = server.client().call("GET", "/sessions", who, None).await;
    assert_eq!(st, 200, "{v}");
    v["sessions"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_mention_is_one_session_with_one_status_message_that_ends_done_and_a_reply_days_later_follows_it_up(
) {
    let recording = json!({"turns": [
        {"text": "Writing the greeting.", "tool_calls": [{"name": "write", "arguments": {"filePath": "hello.txt", "content": "hello\n"}}]},
        {"text": "Created hello.txt."},
        {"text": "Shouting.", "tool_calls": [{"name": "write", "arguments": {"filePath": "hello.txt", "content": "HELLO\n"}}]},
        {"text": "Made it shout."}
    ]});
    // Every answer counts as slow, so Slack retries each event: the retries must add nothing.
    let config = FakeSlackConfig {
        ack_timeout: Duration::from_millis(1),
        ..FakeSlackConfig::default()
    };
    let mut w = world(recording, &[("web", "The website")], config).await;
    let ada = sign_in(&w.server, &w.github, "ada").await;

    let (event_id, ts) = w
        .slack
        .mention(CHANNEL, ADA, "Add a greeting file to the site")
        .await;
    let done = done_with_pr(&w.slack, CHANNEL, &ts).await;
    let text = block_text(&done);
    let pulls = w.github.pulls("acme/web");
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    let pr_url = format!("{}/acme/web/pull/{}", w.github.web_url(), pulls[0].0.number);
    assert!(text.contains(&pr_url), "{text}");
    assert!(
        text.contains("`web`") && text.contains(&format!("<@{ADA}>")),
        "{text}"
    );
    let buttons = w.slack.buttons(CHANNEL, &done.ts);
    assert!(
        buttons
            .iter()
            .any(|(id, _, url)| id == "open_pr" && url.as_deref() == Some(pr_url.as_str())),
        "{buttons:?}"
    );
    assert!(
        !buttons.iter().any(|(id, _, _)| id == "stop"),
        "{buttons:?}"
    );
    // One session, Ada's, in the repository; the status message links to it.
    let sessions = sessions_of(&w.server, &ada).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let id = sessions[0]["id"].as_str().expect("id").to_string();
    assert_eq!(sessions[0]["repository"], "web");
    assert!(
        buttons.iter().any(|(id_, _, url)| id_ == "view_session"
            && url
                .as_deref()
                .is_some_and(|u| u.ends_with(&format!("#/s/{id}")))),
        "{buttons:?}"
    );
    let reactions: Vec<String> = w
        .slack
        .reactions()
        .into_iter()
        .filter(|r| r.timestamp == ts)
        .map(|r| r.name)
        .collect();
    assert_eq!(reactions, vec!["eyes", "white_check_mark"]);

    // Slack retried every event after the "slow" answer; the same event once more, another
    // app's bot in the thread, and the bot's own words in the channel: nothing new.
    let retried = w
        .slack
        .deliveries()
        .iter()
        .filter(|d| d.event_id == event_id && d.retry_num > 0)
        .count();
    assert!(retried > 0, "the fake never retried");
    let first = w
        .slack
        .deliveries()
        .into_iter()
        .find(|d| d.event_id == event_id)
        .expect("delivered");
    let callback: EventCallback = serde_json::from_slice(&first.body).expect("callback");
    w.slack.deliver_callback(callback).await;
    w.slack
        .bot_message(
            CHANNEL,
            "B0OTHERBOT",
            Some(&ts),
            "<@U0FAKEBOT1> deploy everything",
        )
        .await;
    // The bot's own words (as `message.channels` delivers them) are not a request either.
    w.slack
        .bot_message(CHANNEL, "B0FAKEBOT1", None, "<@U0FAKEBOT1> start over")
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sessions_of(&w.server, &ada).await.len(), 1);
    let (_, view) = w
        .server
        .client()
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(prompts_of(&view).len(), 1, "{view}");
    assert_eq!(statuses(&w.slack, CHANNEL, &ts).len(), 1);

    // A forged and a stale request are refused and change nothing.
    let body = br#"{"type":"event_callback","team_id":"T0FAKETEAM","event_id":"Ev0FORGED","event":{"type":"app_mention","user":"U0ADA","text":"<@U0FAKEBOT1> delete it all","ts":"1.000001","channel":"C0GENERAL"}}"#;
    let (timestamp, _) = w.slack.signed_headers(body);
    let forged = "v0=".to_string() + &"0".repeat(64);
    let (st, answer) = w
        .slack
        .deliver_raw(body, Some(&timestamp), Some(&forged))
        .await;
    assert_eq!(st, 401, "{answer}");
    assert!(answer.contains("slack_signature_invalid"), "{answer}");
    let stale = (timestamp.parse::<u64>().expect("ts") - 600).to_string();
    let signed = nightshift_core::slack::sign(w.slack.signing_secret().as_bytes(), &stale, body);
    let (st, answer) = w.slack.deliver_raw(body, Some(&stale), Some(&signed)).await;
    assert_eq!(st, 401, "{answer}");
    assert!(answer.contains("slack_timestamp_stale"), "{answer}");

    // Three days later (both clocks moved), a plain reply in the thread is Ada's next prompt in
    // the same session, and the same status message says working, then done.
    let days = 3 * 24 * 3600;
    w.server
        .set_var("CLOCK_OFFSET_MS", &(days * 1000).to_string());
    w.server.restart().await;
    w.slack.set_clock_offset(days as i64);
    let updates_before = done.updated;
    w.slack
        .reply_in_thread(CHANNEL, ADA, &ts, "Now make it shout")
        .await;
    let deadline = Instant::now() + RUN;
    loop {
        let found = statuses(&w.slack, CHANNEL, &ts);
        assert_eq!(found.len(), 1, "a second status message: {found:?}");
        if found[0].text.starts_with("Done") && found[0].updated > updates_before + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never done again: {found:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, view) = w
        .server
        .client()
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    let prompts = prompts_of(&view);
    assert_eq!(prompts.len(), 2, "{view}");
    assert_eq!(prompts[1]["author"], "ada", "{view}");
    assert_eq!(sessions_of(&w.server, &ada).await.len(), 1);
}

#[tokio::test]
async fn an_ambiguous_request_asks_which_repository_and_the_pick_starts_the_session_there() {
    // The chooser model (asked first) says it does not know; the agent's one turn follows.
    let recording = json!({"turns": [
        {"when": "Which repository is this request about?", "text": "{\"repository\": \"unknown\", \"confidence\": 0.2, \"alternatives\": [\"api\", \"web\"]}"},
        {"when": "Tidy up", "text": "Tidied."}
    ]});
    let w = world(
        recording,
        &[("web", "The website"), ("api", "The HTTP service")],
        FakeSlackConfig::default(),
    )
    .await;
    let ada = sign_in(&w.server, &w.github, "ada").await;
    let (_, ts) = w.slack.mention(CHANNEL, ADA, "Tidy up the code").await;
    let question = first_reply(&w.slack, CHANNEL, &ts).await;
    assert!(question.text.contains("Which repository"), "{question:?}");
    let offered: Vec<String> = w
        .slack
        .buttons(CHANNEL, &question.ts)
        .into_iter()
        .filter(|(id, _, _)| id == "choose_repository")
        .filter_map(|(_, value, _)| value)
        .collect();
    // The model's alternatives come first, then "None of these".
    assert_eq!(offered, vec!["api", "web", "__none__"]);
    assert!(sessions_of(&w.server, &ada).await.is_empty());

    // Someone else's click picks nothing; Ada's pick starts the session in that repository.
    let other = w
        .slack
        .click("choose_repository", "web", "U0BOB", CHANNEL, &question.ts)
        .await;
    assert_eq!(other.status, 200);
    let picked = w
        .slack
        .click("choose_repository", "api", ADA, CHANNEL, &question.ts)
        .await;
    assert_eq!(picked.status, 200, "{}", picked.answer);
    status_says(&w.slack, CHANNEL, &ts, "Done").await;
    let sessions = sessions_of(&w.server, &ada).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["repository"], "api");
    let chosen = w
        .slack
        .messages(CHANNEL)
        .into_iter()
        .find(|m| m.ts == question.ts)
        .expect("question");
    assert!(chosen.text.contains("Starting in `api`"), "{chosen:?}");
}

#[tokio::test]
async fn someone_unknown_gets_a_one_time_link_and_their_request_starts_once_linked() {
    let recording = json!({"turns": [{"text": "Looked."}]});
    let w = world(
        recording,
        &[("web", "The website")],
        FakeSlackConfig::default(),
    )
    .await;
    let (_, ts) = w
        .slack
        .mention(CHANNEL, "U0BOB", "Look at the footer")
        .await;
    let messages = w
        .slack
        .wait_for_messages(CHANNEL, Duration::from_secs(30), |m| {
            m.iter().any(|m| m.text.contains("/#/slack/link/"))
        })
        .await;
    let offer = messages
        .iter()
        .find(|m| m.text.contains("/#/slack/link/"))
        .expect("a link was offered")
        .clone();
    assert_eq!(offer.thread_ts.as_deref(), Some(ts.as_str()));
    assert_eq!(
        offer.visible_to.as_deref(),
        Some("U0BOB"),
        "the link must be seen by Bob only: {offer:?}"
    );
    let link = offer
        .text
        .split("/#/slack/link/")
        .nth(1)
        .and_then(|rest| rest.split('|').next())
        .expect("link");
    let (team, code) = link.split_once('/').expect("team/code");
    let bob = sign_in(&w.server, &w.github, "bob").await;
    let api = w.server.client();
    // A made-up code is refused; the real one links once.
    let (st, v) = api
        .call(
            "POST",
            "/slack/link",
            &bob,
            Some(json!({"team": team, "code": "0".repeat(32)})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("slack_link_unknown")),
        "{v}"
    );
    let (st, v) = api
        .call(
            "POST",
            "/slack/link",
            &bob,
            Some(json!({"team": team, "code": code})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["slack_user"], "U0BOB");
    assert_eq!(v["resumed"], true);
    let (st, v) = api
        .call(
            "POST",
            "/slack/link",
            &bob,
            Some(json!({"team": team, "code": code})),
        )
        .await;
    assert_eq!(st, 404, "used twice: {v}");
    status_says(&w.slack, CHANNEL, &ts, "Done").await;
    let sessions = sessions_of(&w.server, &bob).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["repository"], "web");
}

#[tokio::test]
async fn slack_errors_and_rate_limits_lose_no_status_update_and_edits_deletions_and_strangers_start_nothing(
) {
    let recording = json!({"turns": [
        {"text": "Writing.", "tool_calls": [{"name": "write", "arguments": {"filePath": "notes.txt", "content": "notes\n"}}]},
        {"text": "Wrote notes.txt."}
    ]});
    let w = world(
        recording,
        &[("web", "The website")],
        FakeSlackConfig::default(),
    )
    .await;
    let ada = sign_in(&w.server, &w.github, "ada").await;
    // Carol signed in with GitHub but may not work in any registered repository.
    w.github.add_user("carol", "Carol Outsider");
    w.slack
        .add_user("U0CAROL", "Carol Outsider", "carol@example.com");
    let carol = sign_in(&w.server, &w.github, "carol").await;
    // Naming a repository she may not use says so; asking for anything says there is none.
    for (text, expected) in [
        ("Fix acme/web please", "You may not work in `acme/web`"),
        ("Fix the footer", "no repository here you may work in"),
    ] {
        let (_, carol_ts) = w.slack.mention(CHANNEL, "U0CAROL", text).await;
        let answer = first_reply(&w.slack, CHANNEL, &carol_ts).await;
        assert!(answer.text.contains(expected), "{answer:?}");
    }
    assert!(sessions_of(&w.server, &carol).await.is_empty());

    // Slack fails the status message once and rate-limits its updates: the message still
    // appears, and still ends done.
    w.slack.fail_next("chat.postMessage", "internal_error", 1);
    w.slack.rate_limit("chat.update", 3);
    let (_, ts) = w.slack.mention(CHANNEL, ADA, "Write some notes").await;
    done_with_pr(&w.slack, CHANNEL, &ts).await;
    assert_eq!(statuses(&w.slack, CHANNEL, &ts).len(), 1);
    let posts = w.slack.calls_of("chat.postMessage");
    assert!(
        posts
            .iter()
            .any(|c| c.error.as_deref() == Some("internal_error")),
        "the failure was never met"
    );
    let updates = w.slack.calls_of("chat.update");
    let limited = updates.iter().filter(|c| c.status == 429).count();
    assert_eq!(limited, 3, "{updates:?}");
    // After a 429 the next update waited at least the Retry-After second.
    let first_limited = updates.iter().position(|c| c.status == 429).expect("429");
    if let Some(next) = updates.get(first_limited + 1) {
        assert!(
            next.at.duration_since(updates[first_limited].at) >= Duration::from_millis(900),
            "retried before Retry-After"
        );
    }
    let sessions = sessions_of(&w.server, &ada).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let id = sessions[0]["id"].as_str().expect("id").to_string();
    // The pull request is Ada's.
    let pulls = w.github.pulls("acme/web");
    assert_eq!(pulls.len(), 1);
    assert_eq!(pulls[0].0.user.login, "ada", "{:?}", pulls[0].0);

    // Editing the request and deleting it afterwards start nothing.
    w.slack
        .edit(CHANNEL, ADA, &ts, "<@U0FAKEBOT1> Write many more notes")
        .await;
    w.slack.delete(CHANNEL, &ts).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, view) = w
        .server
        .client()
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(prompts_of(&view).len(), 1, "{view}");
    assert_eq!(sessions_of(&w.server, &ada).await.len(), 1);
}

#[tokio::test]
async fn the_stop_button_stops_the_work_and_the_status_says_so() {
    let recording = json!({"turns": [
        {"delay_ms": 20000, "text": "Thinking for a long time."}
    ]});
    let w = world(
        recording,
        &[("web", "The website")],
        FakeSlackConfig::default(),
    )
    .await;
    let ada = sign_in(&w.server, &w.github, "ada").await;
    let (_, ts) = w
        .slack
        .mention(CHANNEL, ADA, "Think about the footer")
        .await;
    let status = loop {
        let found = statuses(&w.slack, CHANNEL, &ts);
        if let Some(message) = found.into_iter().next() {
            break message;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sessions = sessions_of(&w.server, &ada).await;
    let id = sessions[0]["id"].as_str().expect("id").to_string();
    let stop = w
        .slack
        .buttons(CHANNEL, &status.ts)
        .into_iter()
        .find(|(action, _, _)| action == "stop")
        .expect("a Stop button");
    assert_eq!(stop.1.as_deref(), Some(id.as_str()));
    // Someone Nightshift does not know cannot stop it.
    w.slack
        .click("stop", &id, "U0NOBODY", CHANNEL, &status.ts)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!statuses(&w.slack, CHANNEL, &ts)[0]
        .text
        .starts_with("Failed"));
    let clicked = w.slack.click("stop", &id, ADA, CHANNEL, &status.ts).await;
    assert_eq!(clicked.status, 200, "{}", clicked.answer);
    let stopped = status_says(&w.slack, CHANNEL, &ts, "Failed").await;
    assert!(block_text(&stopped).contains("stopped"), "{stopped:?}");
    assert!(
        !w.slack
            .buttons(CHANNEL, &stopped.ts)
            .iter()
            .any(|(action, _, _)| action == "stop"),
        "a finished session keeps no Stop button"
    );
    assert!(w.github.pulls("acme/web").is_empty());
}
