//! `nightshift-provider`: the local provider on loopback (provider contract v1).

use std::collections::BTreeMap;
use std::path::PathBuf;

use nightshift_sandbox::provider::{
    router, sweep_snapshots, Config, Isolation, Provider, DEFAULT_LIFETIME_MS,
};

const USAGE: &str = "usage: PROVIDER_SECRET=… nightshift-provider [--port 8790] [--root DIR]
  Environment passed to every sandbox's supervisor: NIGHTSHIFT_OPENCODE_BIN, NIGHTSHIFT_PLUGIN_MODULES,
  NIGHTSHIFT_MODEL, NIGHTSHIFT_MODEL_URL, NIGHTSHIFT_MODEL_KEY, NIGHTSHIFT_SYNC_DELAY_MS, *_API_KEY, *_BASE_URL.
  NIGHTSHIFT_ISOLATION=none turns bubblewrap off. PROVIDER_SANDBOX_LIFETIME_MS: a sandbox's default lifetime (24 h).";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let port: u16 = arg("--port").and_then(|p| p.parse().ok()).unwrap_or(8790);
    let root = PathBuf::from(arg("--root").unwrap_or(".state/provider".into()));
    let Ok(secret) = std::env::var("PROVIDER_SECRET") else {
        fail(&format!("PROVIDER_SECRET is not set; it must equal the control plane's PROVIDER_SECRET\n{USAGE}"));
    };
    let root = std::fs::create_dir_all(&root)
        .and_then(|_| root.canonicalize())
        .unwrap_or_else(|e| fail(&format!("cannot use {}: {e}", root.display())));
    let supervisor = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("nightshift-supervisor")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            fail("nightshift-supervisor is not beside nightshift-provider; build the sandbox crate")
        });
    let isolation = if std::env::var("NIGHTSHIFT_ISOLATION").as_deref() == Ok("none") {
        Isolation::None
    } else {
        Isolation::detect()
    };
    match isolation {
        Isolation::Bubblewrap => println!("provider: sandboxes are isolated with bubblewrap (own pid and ipc namespaces, read-only root)"),
        Isolation::None => println!("provider: WARNING: sandboxes are NOT isolated (bubblewrap is not installed or does not work here); each is only a process group in its own directory"),
    }
    let supervisor_env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("NIGHTSHIFT_") && k != "NIGHTSHIFT_ISOLATION"
                || k.ends_with("_API_KEY")
                || k.ends_with("_BASE_URL")
        })
        .collect();
    let ro_paths = Config::derive_ro_paths(&supervisor, &supervisor_env);
    let p = Provider::new(Config {
        ro_paths,
        root: root.clone(),
        secret: secret.into_bytes(),
        isolation,
        supervisor,
        supervisor_env,
        lifetime_ms: std::env::var("PROVIDER_SANDBOX_LIFETIME_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_LIFETIME_MS),
    });
    tokio::spawn(sweep_snapshots(
        p.clone(),
        std::time::Duration::from_secs(60),
    ));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| fail(&format!("cannot listen on 127.0.0.1:{port}: {e}")));
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!(
        "provider listening on http://{addr} (sandboxes under {})",
        root.display()
    );
    let shutdown = p.clone();
    let stop = async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        println!("provider: shutting down; terminating every sandbox");
        shutdown.shutdown().await;
    };
    if let Err(e) = axum::serve(listener, router(p))
        .with_graceful_shutdown(stop)
        .await
    {
        fail(&format!("server stopped: {e}"));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(2)
}
