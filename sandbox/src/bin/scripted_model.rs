//! `nightshift-scripted-model`: serves a recorded conversation as an OpenAI-compatible streaming API, or records one.

use nightshift_sandbox::scripted::{router, Mode, Recording};

const USAGE: &str = "usage: nightshift-scripted-model [--port P] (--recording FILE | --upstream URL --record FILE)
  --recording FILE   replay FILE (see docs/scripted-model.md)
  --upstream URL     an OpenAI-compatible base URL (e.g. https://api.openai.com/v1); the key comes from OPENAI_API_KEY
  --record FILE      write each upstream reply to FILE as a replayable turn";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let port: u16 = arg("--port").and_then(|p| p.parse().ok()).unwrap_or(0);
    let mode = if let Some(file) = arg("--recording") {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| fail(&format!("cannot read {file}: {e}")));
        Mode::Replay(Recording::parse(&text).unwrap_or_else(|e| fail(&format!("{file}: {e}"))))
    } else if let (Some(upstream), Some(file)) = (arg("--upstream"), arg("--record")) {
        Mode::Record {
            upstream,
            api_key: std::env::var("OPENAI_API_KEY").ok(),
            file: file.into(),
        }
    } else {
        fail(USAGE)
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| fail(&format!("cannot listen on 127.0.0.1:{port}: {e}")));
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!("scripted model listening on http://{addr}/v1");
    if let Err(e) = axum::serve(listener, router(mode)).await {
        fail(&format!("server stopped: {e}"));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(2)
}
