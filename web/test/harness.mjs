// Browser-test harness: starts the real Worker under wrangler dev on free ports with its own state, and Chromium.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

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

/** Starts `wrangler dev` with the dev sign-in and the echo runner; returns {base, stop}. */
export async function startServer(vars = {}) {
  const port = await freePort();
  const inspector = await freePort();
  const state = mkdtempSync(join(root, ".state", "web-test-"));
  const all = { DEV_AUTH: "1", AUTH_SECRET: "web-test-secret", PROMPT_RUNNER: "echo", ECHO_RUN_MS: "1500", ...vars };
  const varArgs = Object.entries(all).map(([k, v]) => `--var '${k}:${v}'`).join(" ");
  const cmd = `source scripts/env.sh && exec wrangler dev --ip 127.0.0.1 --port ${port} --inspector-port ${inspector} --persist-to '${state}/do' --show-interactive-dev-session=false --log-level warn ${varArgs}`;
  const child = spawn("bash", ["-c", cmd], { cwd: root, detached: true, stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  child.stdout.on("data", (d) => (log += d));
  child.stderr.on("data", (d) => (log += d));
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      const r = await fetch(`${base}/health`);
      if (r.ok) break;
    } catch {}
    if (Date.now() > deadline) throw new Error(`wrangler dev did not start:\n${log}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const stop = () => {
    try { process.kill(-child.pid, "SIGKILL"); } catch {}
    rmSync(state, { recursive: true, force: true });
  };
  return { base, stop };
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
export async function newSession(page, title, firstPrompt = "") {
  await page.fill("input[name=title]", title);
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
