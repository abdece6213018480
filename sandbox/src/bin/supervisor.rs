//! `nightshift-supervisor`: started by a provider inside each sandbox; reads its secrets line on stdin, then runs.

use std::io::BufRead;

use nightshift_sandbox::supervisor::{run, Settings};

#[tokio::main]
async fn main() {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let secrets: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or(serde_json::Value::Null);
    let env = std::env::vars().collect();
    let settings = match Settings::from(env, &secrets) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("supervisor: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(settings).await {
        eprintln!("supervisor: {e}");
        std::process::exit(1);
    }
}
