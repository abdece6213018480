//! `nightshift-provider`: the local provider on loopback (provider contract v1).

use std::collections::BTreeMap;
use std::path::PathBuf;

use nightshift_sandbox::procs;
use nightshift_sandbox::provider::{router, sweep_snapshots, watch_disk};
use nightshift_sandbox::state::{
    find_bwrap, probe_bubblewrap, Config, Isolation, Provider, DEFAULT_LIFETIME_MS,
};

const USAGE: &str = "usage: PROVIDER_SECRET=… nightshift-provider [--port 8790] [--root DIR]
  Environment passed to every sandbox's supervisor: NIGHTSHIFT_OPENCODE_BIN, NIGHTSHIFT_PLUGIN_MODULES,
  NIGHTSHIFT_MODEL, NIGHTSHIFT_MODEL_URL, NIGHTSHIFT_MODEL_KEY, NIGHTSHIFT_SYNC_DELAY_MS, *_API_KEY, *_BASE_URL.
  Sandboxes are isolated with bubblewrap (PROVIDER_BWRAP=/abs/path, default /usr/bin/bwrap); the provider refuses
  to start when it does not work, unless NIGHTSHIFT_ISOLATION=none (no isolation: every sandbox says so).
  PROVIDER_SANDBOX_LIFETIME_MS: a sandbox's default lifetime (24 h). Limits of every sandbox process (0: none):
  PROVIDER_LIMIT_MEMORY_MB (8192), PROVIDER_LIMIT_PROCS (2048), PROVIDER_LIMIT_FILE_MB (8192),
  PROVIDER_LIMIT_CPU_S (21600), PROVIDER_LIMIT_OPEN_FILES (8192), PROVIDER_LIMIT_CPUS (2, a whole sandbox),
  PROVIDER_LIMIT_DISK_MB (20480, a whole sandbox's folder, checked every PROVIDER_DISK_CHECK_MS, 30000).
  Where the host lets the provider make cgroups, PROCS, MEMORY_MB and CPUS also hold for a whole sandbox.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Without isolation the provider launches each sandbox process through itself (a reaper).
    if args.first().map(String::as_str) == Some("__reap") {
        let rest = match args.get(1).map(String::as_str) {
            Some("--") => &args[2..],
            _ => &args[1..],
        };
        procs::reap_main(rest);
    }
    let runtime = tokio::runtime::Runtime::new()
        .unwrap_or_else(|e| fail(&format!("cannot start the runtime: {e}")));
    runtime.block_on(serve(args));
}

async fn serve(args: Vec<String>) {
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
    let isolation = match std::env::var("NIGHTSHIFT_ISOLATION").as_deref() {
        Ok("none") => Isolation::None,
        Ok("bubblewrap") | Ok("") | Err(_) => Isolation::Bubblewrap,
        Ok(other) => fail(&format!(
            "NIGHTSHIFT_ISOLATION={other} is not known; leave it unset (bubblewrap) or set it to none"
        )),
    };
    let launcher = std::env::current_exe()
        .unwrap_or_else(|e| fail(&format!("cannot find the provider's own executable: {e}")));
    let bwrap = match isolation {
        Isolation::Bubblewrap => find_bwrap(std::env::var("PROVIDER_BWRAP").ok().as_deref())
            .unwrap_or_else(|e| fail(&format!("{e}; install bubblewrap, or set NIGHTSHIFT_ISOLATION=none to run sandboxes WITHOUT isolation"))),
        Isolation::None => PathBuf::new(),
    };
    let limits = procs::Limits::from_env(|k| std::env::var(k).ok()).unwrap_or_else(|e| fail(&e));
    let supervisor_env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("NIGHTSHIFT_")
                && k != "NIGHTSHIFT_ISOLATION"
                && k != "NIGHTSHIFT_DEV_MODE"
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
        bwrap,
        launcher,
        limits,
        groups: nightshift_sandbox::cgroup::Groups::detect(&root),
        supervisor,
        supervisor_env,
        dev_mode: std::env::var("NIGHTSHIFT_DEV_MODE").as_deref() == Ok("1"),
        allow_ssh: std::env::var("PROVIDER_ALLOW_SSH").as_deref() == Ok("1"),
        lifetime_ms: std::env::var("PROVIDER_SANDBOX_LIFETIME_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_LIFETIME_MS),
    });
    match isolation {
        Isolation::Bubblewrap => {
            if let Err(e) = probe_bubblewrap(&p, &root.join("host").join("probe")).await {
                fail(&format!("refusing to start: sandboxes cannot be isolated: {e}\nFix bubblewrap (user namespaces must be allowed), or set NIGHTSHIFT_ISOLATION=none to run sandboxes WITHOUT isolation."));
            }
            println!("provider: sandboxes are isolated with bubblewrap (fresh read-only root; own user, pid, ipc, uts, cgroup and network namespaces; new session; no capabilities; egress only through the allowlist proxy)");
        }
        Isolation::None => println!("provider: WARNING: NIGHTSHIFT_ISOLATION=none: sandboxes are NOT isolated; each is only a process tree in its own directory, and every sandbox's status says so"),
    }
    match p.process_limit() {
        "cgroup" => println!(
            "provider: each sandbox is a control group ({}): its processes, memory and CPU are limited as a whole",
            p.cgroups().join(", ")
        ),
        "rlimit" => println!("provider: no usable cgroups here: a sandbox's process count is limited per user (RLIMIT_NPROC), memory and CPU per process"),
        _ => println!("provider: WARNING: no usable cgroups and the provider runs as root: a sandbox's process count is NOT limited (give the provider a pids cgroup it may write, or run it as an unprivileged user)"),
    }
    // What an earlier run acknowledged is found again: images usable, sandboxes reported lost.
    let (images, sandboxes) = p.recover().await;
    if images + sandboxes > 0 {
        println!(
            "provider: found {images} image(s) and {sandboxes} sandbox(es) from an earlier run"
        );
    }
    let disk_every = std::env::var("PROVIDER_DISK_CHECK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    tokio::spawn(watch_disk(
        p.clone(),
        std::time::Duration::from_millis(disk_every),
    ));
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
