//! `nightshift-supervisor`: started by a provider inside each sandbox; reads its secrets line on stdin, then runs.

use std::io::BufRead;

use nightshift_sandbox::supervisor::{run, Settings};

#[tokio::main]
async fn main() {
    // `--egress-run -- argv…`: one command with the egress proxy as its only way out.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--egress-run") {
        let argv: Vec<String> = args.into_iter().skip_while(|a| a != "--").skip(1).collect();
        std::process::exit(nightshift_sandbox::supervisor::egress_run(&argv).await);
    }
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let secrets = nightshift_sandbox::boot::BootSecrets::parse(&line);
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
