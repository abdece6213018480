//! The fake GitHub as a process, for the browser tests: serves with the browser user `ada` (Ada Lovelace), prints one JSON line of its URLs and App credentials, and runs until killed.

use nightshift_tests::fake_github::{FakeGithub, FakeGithubConfig};
use serde_json::json;

#[tokio::main]
async fn main() {
    let fake = FakeGithub::start(FakeGithubConfig::default()).await;
    fake.add_user("ada", "Ada Lovelace");
    fake.set_browser_user("ada");
    let ready = json!({
        "web_url": fake.web_url(),
        "api_url": fake.api_url(),
        "git_url": fake.git_url(),
        "client_id": fake.client_id(),
        "client_secret": fake.client_secret(),
        "app_id": fake.app_id(),
        "private_key_pem": fake.private_key_pem(),
        "webhook_secret": fake.webhook_secret(),
    });
    println!("{ready}");
    // Serves until SIGTERM or ctrl-c, then drops the fake (which removes its repositories).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("listen for SIGTERM");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(fake);
}
