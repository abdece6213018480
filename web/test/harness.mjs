// Browser-test harness: starts the real Worker under wrangler dev on free ports with its own state, Chromium,
// and (for agent tests) the compute side: the scripted model and the local provider, as the Rust harness does.
import { spawn, execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, readlinkSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { createServer } from "node:net";
import { randomBytes } from "node:crypto";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const keepState = !!process.env.NIGHTSHIFT_KEEP_TEST_STATE;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A loopback port that was free a moment ago (another process may still take it: see `startServer`). */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

/** Whether a process of the group `pgid` holds the socket listening on 127.0.0.1:`port`. */
function portHeldByGroup(port, pgid) {
  const local = `0100007F:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  let tcp = "";
  try { tcp = readFileSync("/proc/net/tcp", "utf8"); } catch { return false; }
  const inodes = new Set(tcp.split("\n").slice(1).map((l) => l.trim().split(/\s+/)).filter((f) => f[1] === local && f[3] === "0A").map((f) => `socket:[${f[9]}]`));
  if (!inodes.size) return false;
  for (const pid of readdirSync("/proc").filter((n) => /^\d+$/.test(n))) {
    let stat = "";
    try { stat = readFileSync(`/proc/${pid}/stat`, "utf8"); } catch { continue; }
    const rest = stat.slice(stat.lastIndexOf(")") + 1).trim().split(/\s+/);
    if (Number(rest[2]) !== pgid) continue;
    let fds = [];
    try { fds = readdirSync(`/proc/${pid}/fd`); } catch { continue; }
    for (const fd of fds) {
      try { if (inodes.has(readlinkSync(`/proc/${pid}/fd/${fd}`))) return true; } catch {}
    }
  }
  return false;
}

/** One try of wrangler dev on `port`: resolves {child, log} once /health answers from this child's own listener, or null. */
async function tryWrangler(port, state, all) {
  const inspector = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const varArgs = Object.entries(all).map(([k, v]) => `--var '${k}:${String(v).replaceAll("{self}", base)}'`).join(" ");
  const cmd = `source scripts/env.sh && exec wrangler dev --ip 127.0.0.1 --port ${port} --inspector-port ${inspector} --persist-to '${state}/do' --show-interactive-dev-session=false --log-level warn ${varArgs}`;
  const child = spawn("bash", ["-c", cmd], { cwd: root, detached: true, stdio: ["ignore", "pipe", "pipe"] });
  const out = { child, log: "", exited: false };
  child.stdout.on("data", (d) => (out.log += d));
  child.stderr.on("data", (d) => (out.log += d));
  child.on("exit", () => (out.exited = true));
  const deadline = Date.now() + 60_000;
  let foreignSince = 0;
  for (;;) {
    if (out.exited) return { ...out, ok: false };
    try {
      const r = await fetch(`${base}/health`);
      if (r.ok) {
        if (portHeldByGroup(port, child.pid)) return { ...out, ok: true };
        // Someone else's server answers on this port: this child cannot bind it.
        foreignSince ||= Date.now();
        if (Date.now() - foreignSince > 10_000) {
          try { process.kill(-child.pid, "SIGKILL"); } catch {}
          return { ...out, ok: false };
        }
      }
    } catch {}
    if (Date.now() > deadline) throw new Error(`wrangler dev did not start:\n${out.log}`);
    await sleep(100);
  }
}

/**
 * Starts `wrangler dev` with the dev sign-in and the echo runner; returns {base, stop}. `{self}` in a
 * var's value stands for the server's own URL. A port taken between the check and wrangler's bind
 * (by anything, or a parallel test's server) is retried on another port.
 */
export async function startServer(vars = {}) {
  const state = mkdtempSync(join(root, ".state", "web-test-"));
  const all = { DEV_AUTH: "1", AUTH_SECRET: "web-test-secret", PROMPT_RUNNER: "echo", ECHO_RUN_MS: "1500", ...vars };
  let last = "";
  for (let i = 0; i < 5; i++) {
    const port = await freePort();
    const w = await tryWrangler(port, state, all);
    if (w.ok) {
      const stop = () => {
        try { process.kill(-w.child.pid, "SIGKILL"); } catch {}
        if (keepState) console.error(`kept the server's state in ${state}`);
        else rmSync(state, { recursive: true, force: true });
      };
      return { base: `http://127.0.0.1:${port}`, stop };
    }
    last = w.log;
  }
  throw new Error(`wrangler dev did not start on any of 5 ports:\n${last}`);
}

/** Waits until `file` holds `<marker>http://127.0.0.1:PORT` (the child bound port 0 itself); returns the port. */
async function listeningPort(file, marker, what, proc) {
  const deadline = Date.now() + 20_000;
  for (;;) {
    let text = "";
    try { text = readFileSync(file, "utf8"); } catch {}
    const m = text.match(new RegExp(`${marker}http://127\\.0\\.0\\.1:(\\d+)`));
    if (m) return Number(m[1]);
    if (proc.exitCode !== null || Date.now() > deadline) throw new Error(`${what} did not start:\n${text}`);
    await sleep(20);
  }
}

/** Every process (but this one) whose cwd is under `dir` or whose cmdline or environ names `dir`. */
export function processesNaming(dir) {
  const found = [];
  for (const pid of readdirSync("/proc").filter((n) => /^\d+$/.test(n))) {
    if (Number(pid) === process.pid) continue;
    const read = (f) => { try { return readFileSync(`/proc/${pid}/${f}`); } catch { return Buffer.alloc(0); } };
    let cwd = "";
    try { cwd = readlinkSync(`/proc/${pid}/cwd`); } catch {}
    const cmdline = read("cmdline");
    if (cwd === dir || cwd.startsWith(dir + "/") || cmdline.includes(dir) || read("environ").includes(dir)) {
      found.push(`${pid} ${cmdline.toString().replaceAll("\0", " ").trim()}`);
    }
  }
  return found;
}

const git = (cwd, ...args) => execFileSync("git", args, { cwd, encoding: "utf8" }).trim();

/**
 * The compute side for agent tests: the scripted model replaying `recording` and the local provider
 * (built binaries in target/debug). Returns {vars, dir, remoteRepo(name), stop()}; `stop` throws if any
 * process of it is left (found in /proc, not by the provider's own marks).
 */
export async function startCompute(recording) {
  const bin = (n) => {
    const p = join(root, "target/debug", n);
    if (!existsSync(p)) throw new Error(`${p} is missing: run \`cargo build -p nightshift-sandbox --bins\``);
    return p;
  };
  const dir = join(root, ".state", "web-test-compute-" + randomBytes(8).toString("hex"));
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "recording.json"), JSON.stringify(recording));
  const model = spawn(bin("nightshift-scripted-model"), ["--port", "0", "--recording", join(dir, "recording.json")], {
    stdio: ["ignore", openSync(join(dir, "model.log"), "w"), "ignore"],
  });
  const modelPort = await listeningPort(join(dir, "model.log"), "scripted model listening on ", "scripted model", model);
  const modelUrl = `http://127.0.0.1:${modelPort}/v1`;
  const secret = "provider-secret-" + randomBytes(8).toString("hex");
  const provider = spawn(bin("nightshift-provider"), ["--port", "0", "--root", join(dir, "provider")], {
    stdio: ["ignore", openSync(join(dir, "provider.log"), "w"), openSync(join(dir, "provider.err"), "w")],
    env: {
      ...process.env,
      PROVIDER_SECRET: secret,
      NIGHTSHIFT_DEV_MODE: "1",
      NIGHTSHIFT_OPENCODE_BIN: join(root, "node_modules/opencode-linux-x64/bin/opencode"),
      NIGHTSHIFT_PLUGIN_MODULES: join(root, "node_modules"),
      NIGHTSHIFT_MODEL: "nightshift/scripted",
      NIGHTSHIFT_MODEL_URL: modelUrl,
    },
  });
  const port = await listeningPort(join(dir, "provider.log"), "provider listening on ", "provider", provider);
  const providerUrl = `http://127.0.0.1:${port}`;
  const remoteRepo = (name, files = { "README.md": "# demo\n" }) => {
    const seed = join(dir, `${name}-seed`);
    mkdirSync(seed, { recursive: true });
    git(seed, "init", "-q", "-b", "main");
    for (const [f, text] of Object.entries(files)) writeFileSync(join(seed, f), text);
    git(seed, "add", ".");
    git(seed, "-c", "user.name=Seed", "-c", "user.email=seed@example.com", "commit", "-qm", "init");
    const bare = join(dir, `${name}.git`);
    git(dir, "clone", "-q", "--bare", seed, bare);
    return bare;
  };
  const stop = async () => {
    // The provider terminates its sandboxes on SIGTERM; the model goes after it.
    for (const p of [provider, model]) {
      if (p.exitCode !== null) continue;
      const gone = new Promise((r) => p.once("exit", r));
      p.kill("SIGTERM");
      await Promise.race([gone, sleep(5000)]);
      if (p.exitCode === null) p.kill("SIGKILL");
    }
    let left = processesNaming(dir);
    for (const until = Date.now() + 10_000; left.length && Date.now() < until; left = processesNaming(dir)) await sleep(100);
    for (const l of left) { try { process.kill(Number(l.split(" ")[0]), "SIGKILL"); } catch {} }
    if (keepState) console.error(`kept the compute's state in ${dir}`);
    else rmSync(dir, { recursive: true, force: true });
    if (left.length) throw new Error(`processes of ${dir} were still running 10 s after its compute stopped:\n${left.join("\n")}`);
  };
  const vars = { PROMPT_RUNNER: "sandbox", PROVIDER_URL: providerUrl, PROVIDER_SECRET: secret, CONTROL_URL: "{self}" };
  return { vars, dir, remoteRepo, stop, processes: () => processesNaming(dir) };
}

/**
 * The fake GitHub (tests/src/fake_github.rs) as a process: built (a no-op when fresh; the built
 * binary serves when the build fails), started on a free port with the browser user `ada`. Returns
 * {web_url, api_url, git_url, client_id, client_secret, app_id, private_key_pem, webhook_secret,
 * vars, stop()}; `vars` configure the Worker's GitHub sign-in against it.
 */
export async function startFakeGithub() {
  const bin = join(root, "target/debug/fake-github");
  try {
    // Not under flock here: the browser tests themselves run under the heavy-work lock.
    execFileSync("bash", ["-c", "source scripts/env.sh && cargo build -q -p nightshift-tests --bin fake-github"], { cwd: root, stdio: ["ignore", "ignore", "pipe"] });
  } catch (e) {
    if (!existsSync(bin)) throw new Error(`building the fake GitHub failed:\n${e.stderr}`);
    console.error(`building the fake GitHub failed; using the built ${bin}`);
  }
  const child = spawn(bin, [], { stdio: ["ignore", "pipe", "pipe"] });
  let err = "";
  child.stderr.on("data", (d) => (err += d));
  const line = await new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`the fake GitHub did not start:\n${err}`)), 20_000);
    child.stdout.on("data", (d) => {
      out += d;
      const nl = out.indexOf("\n");
      if (nl >= 0) { clearTimeout(timer); resolve(out.slice(0, nl)); }
    });
    child.on("exit", (code) => { clearTimeout(timer); reject(new Error(`the fake GitHub exited (${code}):\n${err}`)); });
  });
  const fake = JSON.parse(line);
  const vars = {
    GITHUB_APP_CLIENT_ID: fake.client_id,
    GITHUB_APP_CLIENT_SECRET: fake.client_secret,
    GITHUB_API_URL: fake.api_url,
    GITHUB_WEB_URL: fake.web_url,
    GITHUB_GIT_URL: fake.git_url,
    GITHUB_APP_ID: String(fake.app_id),
    // One line for --var: the key reader takes literal "\n" sequences for newlines.
    GITHUB_APP_PRIVATE_KEY: fake.private_key_pem.trim().replaceAll("\n", "\\n"),
    GITHUB_WEBHOOK_SECRET: fake.webhook_secret,
    TOKEN_ENCRYPTION_KEY: randomBytes(32).toString("base64"),
  };
  const stop = async () => {
    if (child.exitCode !== null) return;
    const gone = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    await Promise.race([gone, sleep(5000)]);
    if (child.exitCode === null) child.kill("SIGKILL");
  };
  return { ...fake, vars, stop };
}

export async function launchBrowser() {
  const executablePath = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
  const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
  // Every page fails fast with a clear message instead of hanging the suite.
  const newContext = browser.newContext.bind(browser);
  browser.newContext = async (opts) => {
    const ctx = await newContext(opts);
    ctx.setDefaultTimeout(15_000);
    return ctx;
  };
  return browser;
}

/** Signs a person in through the sign-in screen. */
export async function signIn(page, base, user, name) {
  await page.goto(`${base}/#/`);
  await page.fill("input[name=name]", name);
  await page.fill("input[name=user]", user);
  await page.fill("input[name=email]", `${user}@example.com`);
  await page.click("#signin button[type=submit]");
  await page.waitForSelector("#new");
}

/** Creates a session through the new-session form; returns its id. */
export async function newSession(page, title, firstPrompt = "", repository = "") {
  await page.fill("input[name=title]", title);
  if (repository) await page.fill("input[name=repository]", repository);
  if (firstPrompt) await page.fill("textarea[name=prompt]", firstPrompt);
  await page.click("#new button[type=submit]");
  await page.waitForURL(/#\/s\/ses_/);
  await page.waitForSelector("#conn.ok");
  return page.url().split("/s/")[1];
}

export async function shareLink(page) {
  await page.click("#share");
  return page.inputValue("#share-url");
}

export async function sendPrompt(page, text) {
  await page.fill("#prompt", text);
  await page.press("#prompt", "Enter");
  await page.waitForFunction((t) => [...document.querySelectorAll("#log .row.prompt .text")].some((e) => e.textContent === t), text);
}
