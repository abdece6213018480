//! The fake Slack itself, fast and without wrangler: signed events checked with the core's `verify`, Slack's retries after a slow answer, the Web API envelope with its 429 switch, updates and reactions recorded, and signed form-encoded clicks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use nightshift_core::slack::{
    self, AuthTestAnswer, Clicked, Empty, Envelope, Ignored, Intent, Interaction,
    PostMessageAnswer, RepliesAnswer, Stage, StatusView, UpdateAnswer, UsersInfoAnswer,
};
use nightshift_tests::fake_slack::{DeliveryKind, FakeSlack, FakeSlackConfig, Reaction};
use serde_json::{json, Value};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    retry_num: Option<String>,
    body: Vec<u8>,
}

/// How the receiver answers: a delay for each attempt in turn (the last repeats), a status,
/// and whether it says `X-Slack-No-Retry`.
#[derive(Debug, Clone, Default)]
struct Behaviour {
    delays: Vec<Duration>,
    status: Option<StatusCode>,
    no_retry: bool,
}

#[derive(Clone)]
struct Receiver {
    secret: String,
    inbox: Arc<Mutex<Vec<Received>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

async fn receive(
    State(receiver): State<Receiver>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let verified = slack::verify(
        receiver.secret.as_bytes(),
        header(slack::TIMESTAMP_HEADER),
        header(slack::SIGNATURE_HEADER),
        &body,
        nightshift_tests::fake_slack::now_seconds(),
    );
    if let Err(error) = verified {
        return (
            StatusCode::from_u16(error.status()).expect("status"),
            error.code(),
        )
            .into_response();
    }
    let attempt = {
        let mut inbox = receiver.inbox.lock().expect("inbox");
        inbox.push(Received {
            path: uri.path().to_string(),
            retry_num: header(slack::RETRY_NUM_HEADER).map(str::to_string),
            body: body.to_vec(),
        });
        inbox.len() - 1
    };
    if let Ok(Envelope::UrlVerification(verification)) = Envelope::parse(&body) {
        return verification.challenge.into_response();
    }
    let behaviour = receiver.behaviour.lock().expect("behaviour").clone();
    let delay = behaviour
        .delays
        .get(attempt)
        .or(behaviour.delays.last())
        .copied()
        .unwrap_or_default();
    tokio::time::sleep(delay).await;
    let mut response = behaviour.status.unwrap_or(StatusCode::OK).into_response();
    if behaviour.no_retry {
        response
            .headers_mut()
            .insert(slack::NO_RETRY_HEADER, "1".parse().expect("header"));
    }
    response
}

/// A tiny receiver on loopback for `/slack/events` and `/slack/interactions`; returns its base URL.
async fn start_receiver(secret: &str) -> (String, Receiver) {
    let receiver = Receiver {
        secret: secret.to_string(),
        inbox: Arc::default(),
        behaviour: Arc::default(),
    };
    let router = axum::Router::new()
        .fallback(receive)
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("http://{address}/slack"), receiver)
}

fn quick() -> FakeSlackConfig {
    FakeSlackConfig {
        ack_timeout: Duration::from_millis(300),
        retry_delays: vec![
            Duration::ZERO,
            Duration::from_millis(50),
            Duration::from_millis(50),
        ],
        ..FakeSlackConfig::default()
    }
}

async fn started(config: FakeSlackConfig) -> (FakeSlack, Receiver) {
    let fake = FakeSlack::start(config).await;
    let (base, receiver) = start_receiver(&fake.signing_secret()).await;
    fake.deliver_to(&format!("{base}/events"));
    (fake, receiver)
}

fn envelope(body: &[u8]) -> Envelope {
    Envelope::parse(body).expect("an Events API body")
}

fn intent_of(fake: &FakeSlack, body: &[u8]) -> Intent {
    match envelope(body) {
        Envelope::EventCallback(callback) => {
            assert_eq!(callback.bot_user_id(), Some(fake.bot_user_id().as_str()));
            slack::intent(&callback.event, &fake.bot_user_id())
        }
        other => panic!("not an event_callback: {other:?}"),
    }
}

#[tokio::test]
async fn signed_events_verify_and_say_what_they_ask() {
    let (fake, receiver) = started(quick()).await;
    let (status, answer, challenge) = fake.url_verification().await;
    assert_eq!((status, answer), (200, challenge));

    let (event_id, ts) = fake
        .mention("C0GENERAL", "U0ANA", "fix the login page")
        .await;
    let deliveries = fake.wait_for_deliveries(3, Duration::from_secs(5)).await;
    assert_eq!(
        deliveries.len(),
        3,
        "url_verification, app_mention and message"
    );
    assert!(deliveries
        .iter()
        .all(|delivery| delivery.acknowledged && delivery.status == 200));
    assert_eq!(deliveries[1].event_id, event_id);
    assert_eq!(deliveries[1].kind, DeliveryKind::Event);
    assert!(deliveries[1].elapsed < Duration::from_secs(3));
    assert_ne!(
        deliveries[2].event_id, event_id,
        "each event has its own id"
    );
    match intent_of(&fake, &deliveries[1].body) {
        Intent::Start {
            text,
            ts: started_ts,
            channel,
            user,
            direct,
        } => {
            assert_eq!(text, "fix the login page");
            assert_eq!(
                (started_ts, channel.as_str(), user.as_str(), direct),
                (ts.clone(), "C0GENERAL", "U0ANA", false)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        intent_of(&fake, &deliveries[2].body),
        Intent::Ignore(Ignored::MentionEvent)
    );

    // A thread reply without a mention, a direct message, an edit, a deletion, another bot.
    let (_, reply_ts) = fake
        .reply_in_thread("C0GENERAL", "U0ANA", &ts, "and the footer")
        .await;
    fake.direct_message("U0BEN", "add a README").await;
    fake.edit("C0GENERAL", "U0ANA", &reply_ts, "and the header")
        .await;
    fake.delete("C0GENERAL", &reply_ts).await;
    fake.bot_message("C0GENERAL", "B0OTHER", Some(&ts), "beep")
        .await;
    let deliveries = fake.wait_for_deliveries(8, Duration::from_secs(5)).await;
    let intents: Vec<Intent> = deliveries[3..]
        .iter()
        .map(|delivery| intent_of(&fake, &delivery.body))
        .collect();
    assert!(
        matches!(&intents[0], Intent::FollowUp { thread_ts, mentioned: false, .. } if *thread_ts == ts),
        "{:?}",
        intents[0]
    );
    assert!(
        matches!(&intents[1], Intent::Start { direct: true, channel, .. } if *channel == fake.dm_channel("U0BEN"))
    );
    assert_eq!(intents[2], Intent::Ignore(Ignored::Edited));
    assert_eq!(intents[3], Intent::Ignore(Ignored::Deleted));
    assert_eq!(intents[4], Intent::Ignore(Ignored::Bot));
    assert_eq!(
        fake.conversation("C0GENERAL")
            .iter()
            .filter(|message| message.deleted)
            .count(),
        1
    );
    assert_eq!(receiver.inbox.lock().expect("inbox").len(), 8);

    // Forged, stale and unsigned requests are refused by the receiver and not recorded.
    let body = br#"{"type":"event_callback","team_id":"T0FAKETEAM","event_id":"Ev0FORGED","event":{"type":"app_mention"}}"#;
    let (timestamp, signature) = fake.signed_headers(body);
    assert_eq!(
        fake.deliver_raw(body, Some(&timestamp), Some(&signature))
            .await
            .0,
        200
    );
    let forged = slack::sign(b"another secret", &timestamp, body);
    assert_eq!(
        fake.deliver_raw(body, Some(&timestamp), Some(&forged))
            .await,
        (401, "slack_signature_invalid".to_string())
    );
    let stale = (nightshift_tests::fake_slack::now_seconds() - 600).to_string();
    let stale_signature = slack::sign(fake.signing_secret().as_bytes(), &stale, body);
    assert_eq!(
        fake.deliver_raw(body, Some(&stale), Some(&stale_signature))
            .await,
        (401, "slack_timestamp_stale".to_string())
    );
    assert_eq!(fake.deliver_raw(body, Some(&timestamp), None).await.0, 401);
    assert_eq!(fake.deliveries().len(), 8, "raw requests are not recorded");
}

#[tokio::test]
async fn a_slow_answer_is_retried_with_the_same_event_id() {
    let (fake, receiver) = started(FakeSlackConfig {
        message_events: false,
        ..quick()
    })
    .await;
    receiver.behaviour.lock().expect("behaviour").delays =
        vec![Duration::from_millis(800), Duration::ZERO];
    let (event_id, _) = fake.mention("C0GENERAL", "U0ANA", "fix it").await;
    let deliveries = fake.wait_for_deliveries(2, Duration::from_secs(5)).await;
    assert_eq!(deliveries.len(), 2);
    assert!(!deliveries[0].acknowledged);
    assert_eq!(deliveries[0].status, 0, "nothing answered in time");
    assert_eq!(deliveries[0].retry_num, 0);
    assert_eq!(deliveries[1].event_id, event_id);
    assert_eq!(deliveries[1].body, deliveries[0].body, "the same bytes");
    assert_eq!(deliveries[1].retry_num, 1);
    assert_eq!(deliveries[1].retry_reason.as_deref(), Some("http_timeout"));
    assert!(deliveries[1].acknowledged);
    let inbox = receiver.inbox.lock().expect("inbox").clone();
    assert_eq!(inbox[1].retry_num.as_deref(), Some("1"));
    assert!(inbox
        .iter()
        .all(|received| received.path == "/slack/events"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        fake.deliveries().len(),
        2,
        "no retry after an acknowledgement"
    );

    // A receiver that keeps failing gets three retries, then no more.
    *receiver.behaviour.lock().expect("behaviour") = Behaviour {
        status: Some(StatusCode::INTERNAL_SERVER_ERROR),
        ..Behaviour::default()
    };
    let (failing_id, _) = fake.mention("C0GENERAL", "U0ANA", "again").await;
    let deliveries = fake.wait_for_deliveries(6, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts: Vec<(u32, Option<String>)> = fake
        .deliveries()
        .into_iter()
        .filter(|delivery| delivery.event_id == failing_id)
        .map(|delivery| (delivery.retry_num, delivery.retry_reason))
        .collect();
    assert_eq!(deliveries.len(), 6);
    assert_eq!(
        attempts,
        [
            (0, None),
            (1, Some("http_error".to_string())),
            (2, Some("http_error".to_string())),
            (3, Some("http_error".to_string()))
        ]
    );

    // `X-Slack-No-Retry: 1` on a deliberate refusal stops retries.
    receiver.behaviour.lock().expect("behaviour").no_retry = true;
    let (refused_id, _) = fake.mention("C0GENERAL", "U0ANA", "refused").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = fake
        .deliveries()
        .into_iter()
        .filter(|delivery| delivery.event_id == refused_id)
        .count();
    assert_eq!(refused, 1);
}

async fn call(
    fake: &FakeSlack,
    token: Option<&str>,
    method: &str,
    body: Value,
) -> (u16, Option<String>, Vec<u8>) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/{method}", fake.api_url()))
        .header("content-type", "application/json; charset=utf-8")
        .body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("web api");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    (
        status,
        retry_after,
        response.bytes().await.expect("body").to_vec(),
    )
}

fn status_view(stage: Stage) -> StatusView {
    StatusView {
        task: "fix the login page".to_string(),
        repository: "acme/web".to_string(),
        branch: "nightshift/fix-login".to_string(),
        model: "scripted".to_string(),
        asked_by: "<@U0ANA>".to_string(),
        stage,
        session_id: "s-1".to_string(),
        session_url: "http://127.0.0.1/sessions/s-1".to_string(),
        pr_url: None,
    }
}

#[tokio::test]
async fn the_web_api_speaks_slacks_envelope() {
    let fake = FakeSlack::start(quick()).await;
    let token = fake.bot_token();
    let token = Some(token.as_str());
    let (status, _, body) = call(&fake, Some("xoxb-wrong"), "auth.test", json!({})).await;
    assert_eq!(status, 200, "errors come as HTTP 200");
    assert_eq!(
        slack::read_answer::<AuthTestAnswer>(status, None, &body),
        Err(slack::SlackError::Api("invalid_auth".to_string()))
    );
    let (status, _, body) = call(&fake, None, "auth.test", json!({})).await;
    assert_eq!(
        slack::read_answer::<AuthTestAnswer>(status, None, &body),
        Err(slack::SlackError::Api("not_authed".to_string()))
    );
    let (status, _, body) = call(&fake, token, "auth.test", json!({})).await;
    let auth: AuthTestAnswer = slack::read_answer(status, None, &body).expect("auth.test");
    assert_eq!(auth.user_id, fake.bot_user_id());

    // The status message: posted once, updated in place.
    let (_, mention_ts) = fake
        .mention("C0GENERAL", "U0ANA", "fix the login page")
        .await;
    let starting = status_view(Stage::Starting);
    let (status, _, body) = call(
        &fake,
        token,
        "chat.postMessage",
        json!({
            "channel": "C0GENERAL", "thread_ts": mention_ts, "text": slack::status_text(&starting),
            "blocks": slack::status_blocks(&starting), "unfurl_links": false
        }),
    )
    .await;
    let posted: PostMessageAnswer = slack::read_answer(status, None, &body).expect("posted");
    assert_eq!(
        posted.message.thread_ts.as_deref(),
        Some(mention_ts.as_str())
    );
    let done = status_view(Stage::Done {
        pr_url: Some("http://127.0.0.1/pull/1".to_string()),
    });
    let update = json!({"channel": "C0GENERAL", "ts": posted.ts, "text": slack::status_text(&done), "blocks": slack::status_blocks(&done)});

    // The 429 switch: the next call is refused with Retry-After, then it goes through.
    fake.rate_limit("chat.update", 1);
    let (status, retry_after, body) = call(&fake, token, "chat.update", update.clone()).await;
    assert_eq!((status, retry_after.as_deref()), (429, Some("1")));
    assert_eq!(slack::retry_after(status, retry_after.as_deref()), Some(1));
    assert_eq!(
        slack::read_answer::<UpdateAnswer>(status, retry_after.as_deref(), &body),
        Err(slack::SlackError::RateLimited(1))
    );
    let (status, _, body) = call(&fake, token, "chat.update", update).await;
    let updated: UpdateAnswer = slack::read_answer(status, None, &body).expect("updated");
    assert_eq!(updated.ts, posted.ts);
    let messages = fake.messages("C0GENERAL");
    assert_eq!(messages.len(), 1, "one status message");
    assert_eq!(messages[0].updated, 1);
    assert_eq!(messages[0].blocks, slack::status_blocks(&done));
    assert_eq!(messages[0].text, "Done: fix the login page");
    let buttons = fake.buttons("C0GENERAL", &posted.ts);
    assert!(buttons
        .iter()
        .any(|(action_id, _, url)| action_id == slack::ACTION_OPEN_PR
            && url.as_deref() == Some("http://127.0.0.1/pull/1")));
    assert!(buttons
        .iter()
        .all(|(action_id, _, _)| action_id != slack::ACTION_STOP));
    let (_, _, body) = call(
        &fake,
        token,
        "chat.update",
        json!({"channel": "C0GENERAL", "ts": mention_ts, "text": "x"}),
    )
    .await;
    assert_eq!(
        slack::read_answer::<UpdateAnswer>(200, None, &body),
        Err(slack::SlackError::Api("cant_update_message".to_string()))
    );
    let too_many = vec![slack::Block::Divider {}; slack::MAX_BLOCKS + 1];
    let (_, _, body) = call(
        &fake,
        token,
        "chat.postMessage",
        json!({"channel": "C0GENERAL", "text": "x", "blocks": too_many}),
    )
    .await;
    assert_eq!(
        slack::read_answer::<PostMessageAnswer>(200, None, &body),
        Err(slack::SlackError::Api("invalid_blocks".to_string()))
    );

    // Reactions: one each, a repeat is `already_reacted`.
    let eyes = json!({"channel": "C0GENERAL", "timestamp": mention_ts, "name": "eyes"});
    let (status, _, body) = call(&fake, token, "reactions.add", eyes.clone()).await;
    assert_eq!(
        slack::read_answer::<Empty>(status, None, &body),
        Ok(Empty {})
    );
    let (_, _, body) = call(&fake, token, "reactions.add", eyes).await;
    assert_eq!(
        slack::read_answer::<Empty>(200, None, &body),
        Err(slack::SlackError::Api("already_reacted".to_string()))
    );
    assert_eq!(
        fake.reactions(),
        [Reaction {
            channel: "C0GENERAL".to_string(),
            timestamp: mention_ts.clone(),
            name: "eyes".to_string()
        }]
    );

    // users.info and conversations.replies, as form and query.
    fake.add_user("U0ANA", "Ana Lima", "ana@example.com");
    let response = reqwest::Client::new()
        .post(format!("{}/users.info", fake.api_url()))
        .header("authorization", format!("Bearer {}", fake.bot_token()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("user=U0ANA")
        .send()
        .await
        .expect("users.info");
    let info: UsersInfoAnswer =
        slack::read_answer(200, None, &response.bytes().await.expect("body")).expect("users.info");
    assert_eq!(info.user.email(), Some("ana@example.com"));
    let (_, _, body) = call(&fake, token, "users.info", json!({"user": "U0NOBODY"})).await;
    assert_eq!(
        slack::read_answer::<UsersInfoAnswer>(200, None, &body),
        Err(slack::SlackError::Api("user_not_found".to_string()))
    );
    let response = reqwest::Client::new()
        .get(format!(
            "{}/conversations.replies?channel=C0GENERAL&ts={mention_ts}&limit=10",
            fake.api_url()
        ))
        .bearer_auth(fake.bot_token())
        .send()
        .await
        .expect("replies");
    let replies: RepliesAnswer =
        slack::read_answer(200, None, &response.bytes().await.expect("body")).expect("replies");
    assert_eq!(
        replies.messages.len(),
        2,
        "the mention and the status message"
    );
    assert_eq!(replies.messages[0].ts, mention_ts);

    let methods: Vec<String> = fake.calls().into_iter().map(|call| call.method).collect();
    assert_eq!(
        methods
            .iter()
            .filter(|method| *method == "chat.update")
            .count(),
        3
    );
    assert_eq!(fake.calls_of("chat.update")[0].status, 429);
    assert_eq!(
        fake.calls_of("chat.postMessage")[0].body["channel"],
        "C0GENERAL"
    );
}

#[tokio::test]
async fn clicks_are_signed_form_encoded_interactions() {
    let (fake, receiver) = started(quick()).await;
    let (_, mention_ts) = fake.mention("C0GENERAL", "U0ANA", "fix the login").await;
    let options = vec![
        slack::Ranked {
            repository: "acme/web".to_string(),
            why: "The website".to_string(),
            score: 3.0,
        },
        slack::Ranked {
            repository: "acme/mobile".to_string(),
            why: "The app".to_string(),
            score: 2.0,
        },
    ];
    let question = "Which repository is this for?";
    let (status, _, body) = call(
        &fake,
        Some(&fake.bot_token()),
        "chat.postMessage",
        json!({
            "channel": "C0GENERAL", "thread_ts": mention_ts, "text": slack::choice_text(question),
            "blocks": slack::choice_blocks(question, &options)
        }),
    )
    .await;
    let posted: PostMessageAnswer = slack::read_answer(status, None, &body).expect("posted");

    let delivery = fake
        .click(
            slack::ACTION_CHOOSE_REPOSITORY,
            "acme/mobile",
            "U0ANA",
            "C0GENERAL",
            &posted.ts,
        )
        .await;
    assert_eq!(delivery.kind, DeliveryKind::Interaction);
    assert!(delivery.acknowledged && delivery.elapsed < Duration::from_secs(3));
    let received = receiver
        .inbox
        .lock()
        .expect("inbox")
        .last()
        .cloned()
        .expect("received");
    assert_eq!(received.path, "/slack/interactions");
    assert!(received.body.starts_with(b"payload="));
    let Ok(Interaction::BlockActions(actions)) = Interaction::parse(&received.body) else {
        panic!("not block_actions");
    };
    assert_eq!(
        actions.clicked(),
        Clicked::Choose {
            repository: Some("acme/mobile".to_string())
        }
    );
    assert_eq!(actions.actions[0].block_id, "choice_1");
    assert_eq!(actions.thread_ts(), Some(mention_ts.as_str()));
    assert_eq!(actions.team_id(), Some(fake.team_id().as_str()));

    // The response_url replaces the clicked message.
    let response_url = actions.response_url.clone().expect("response_url");
    let answered = reqwest::Client::new()
        .post(&response_url)
        .json(&json!({"replace_original": true, "text": "Starting in acme/mobile"}))
        .send()
        .await
        .expect("response_url");
    assert_eq!(answered.status().as_u16(), 200);
    let choice = fake
        .messages("C0GENERAL")
        .into_iter()
        .find(|message| message.ts == posted.ts)
        .expect("choice");
    assert_eq!(
        (choice.text.as_str(), choice.updated, choice.blocks.len()),
        ("Starting in acme/mobile", 1, 0)
    );
    // Interactions are not retried, even when the answer is slow.
    receiver.behaviour.lock().expect("behaviour").delays = vec![Duration::from_millis(600)];
    let slow = fake
        .click(slack::ACTION_STOP, "s-1", "U0ANA", "C0GENERAL", &posted.ts)
        .await;
    assert!(!slow.acknowledged);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let interactions = fake
        .deliveries()
        .into_iter()
        .filter(|delivery| delivery.kind == DeliveryKind::Interaction)
        .count();
    assert_eq!(interactions, 2);
}
