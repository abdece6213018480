// Browser tests: Chromium (headless) drives the real app served by the Worker under wrangler dev.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { startServer, startCompute, startFakeGithub, launchBrowser, signIn, newSession, shareLink, sendPrompt } from "./harness.mjs";

// `server` runs no prompt to its end (`none`): a running prompt runs until someone stops it, so
// the tests drive every queue transition themselves. `echoServer` answers each prompt after 4 s
// (the wait test needs an answer to arrive).
let server;
let echoServer;
let browser;

before(async () => {
  [server, echoServer, browser] = await Promise.all([startServer({ PROMPT_RUNNER: "none" }), startServer({ ECHO_RUN_MS: "4000" }), launchBrowser()]);
});

after(async () => {
  await browser?.close();
  server?.stop();
  echoServer?.stop();
});

/** Signs `user` in through the API and joins the session of `link` (a share link); returns {token, id}. */
async function joinByApi(base, link, user) {
  const r = await fetch(`${base}/auth/dev`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ user, name: user.toUpperCase(), email: `${user}@example.com` }) });
  const { token } = await r.json();
  const [id, query] = link.split("/s/")[1].split("?");
  const invite = new URLSearchParams(query).get("invite");
  const j = await fetch(`${base}/multiplayer/${id}/join`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${token}` }, body: JSON.stringify({ invite }) });
  assert.ok(j.ok, `join: ${j.status} ${await j.text()}`);
  return { token, id };
}

async function apiCall(base, token, method, path, body) {
  const r = await fetch(`${base}${path}`, { method, headers: { "content-type": "application/json", authorization: `Bearer ${token}` }, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

const promptTexts = (page) => page.$$eval("#log .row.prompt", (rows) => rows.map((r) => `${r.querySelector("strong").textContent}: ${r.querySelector(".text").textContent}`));
const queueTexts = (page) => page.$$eval("#queue .queued li .text", (els) => els.map((e) => e.textContent));

test("two people share a session: presence, typing, ordered prompts with authors, queue reorder and cancel, reload without duplicates", { timeout: 90_000 }, async () => {
  const a = await (await browser.newContext()).newPage();
  const b = await (await browser.newContext()).newPage();
  await signIn(a, server.base, "ada", "Ada Lovelace");
  await signIn(b, server.base, "bob", "Bob Noyce");
  await newSession(a, "Pairing on the parser");
  const link = await shareLink(a);
  assert.match(link, /#\/s\/ses_[0-9a-f]+\?invite=/);
  await b.goto(link);
  await b.waitForSelector("#conn.ok");

  // Each sees the other.
  await a.waitForSelector('#presence .avatar[data-user="bob"]');
  await b.waitForSelector('#presence .avatar[data-user="ada"]');

  // Bob types: Ada sees it, then it stops when Bob stops.
  await b.fill("#prompt", "thinking about it");
  await b.dispatchEvent("#prompt", "input");
  await a.waitForSelector('#presence .avatar.is-typing[data-user="bob"]');
  await a.waitForFunction(() => document.querySelector("#typing").textContent.includes("Bob Noyce is typing"));
  await a.waitForSelector('#presence .avatar.is-typing[data-user="bob"]', { state: "detached", timeout: 10_000 });

  // Prompts from both appear in the same order for both, with their authors.
  await sendPrompt(a, "first from ada");
  await sendPrompt(b, "second from bob");
  await sendPrompt(a, "third from ada");
  const want = ["Ada Lovelace: first from ada", "Bob Noyce: second from bob", "Ada Lovelace: third from ada"];
  await a.waitForFunction((n) => document.querySelectorAll("#log .row.prompt").length === n, want.length);
  await b.waitForFunction((n) => document.querySelectorAll("#log .row.prompt").length === n, want.length);
  assert.deepEqual(await promptTexts(a), want);
  assert.deepEqual(await promptTexts(b), want);

  // The first runs; the other two wait. Ada moves hers up, then Bob cancels his.
  await a.waitForFunction(() => document.querySelectorAll("#queue .queued li").length === 2);
  assert.deepEqual(await queueTexts(a), ["second from bob", "third from ada"]);
  // A member controls only their own queued prompts (the owner may control everyone's).
  await b.waitForFunction(() => document.querySelectorAll("#queue .queued li").length === 2);
  assert.ok((await b.$('#queue li:has-text("third from ada") button[data-act="cancel"]')) === null, "Bob cannot cancel Ada's prompt");
  assert.ok((await b.$('#queue li:has-text("second from bob") button[data-act="cancel"]')) !== null, "Bob can cancel his own");
  await a.click('#queue li:has-text("third from ada") button[data-act="up"]');
  await b.waitForFunction(() => document.querySelector("#queue .queued li .text")?.textContent === "third from ada");
  assert.deepEqual(await queueTexts(a), ["third from ada", "second from bob"]);
  await b.click('#queue li:has-text("second from bob") button[data-act="cancel"]');
  await a.waitForFunction(() => document.querySelectorAll("#queue .queued li").length === 1);
  assert.deepEqual(await queueTexts(b), ["third from ada"]);
  await a.waitForSelector('#log .row:has-text("cancelled a queued prompt")');

  // A reload resumes the stream: same rows once each, and new events keep coming.
  const before = await b.$$eval("#log .row[data-seq]", (rows) => rows.map((r) => r.dataset.seq));
  await b.reload();
  await b.waitForSelector("#conn.ok");
  await b.waitForFunction((n) => document.querySelectorAll("#log .row[data-seq]").length >= n, before.length);
  const afterReload = await b.$$eval("#log .row[data-seq]", (rows) => rows.map((r) => r.dataset.seq));
  assert.deepEqual(afterReload.slice(0, before.length), before);
  assert.equal(new Set(afterReload).size, afterReload.length, "no row twice");
  // Nothing ends on its own here: Ada stops the running prompt and hers runs next.
  await a.click('#queue button[data-act="stop"]');
  await b.waitForSelector('#log .row:has-text("Stopped by Ada Lovelace")');
  await a.waitForFunction(() => document.querySelectorAll("#queue .queued li").length === 0);
  await a.waitForSelector('#log .row.prompt:has-text("third from ada") [data-status]:has-text("running")');
  await sendPrompt(a, "fourth from ada");
  await b.waitForFunction(() => [...document.querySelectorAll("#log .row.prompt .text")].some((e) => e.textContent === "fourth from ada"));
  const seqs = (await b.$$eval("#log .row[data-seq]", (rows) => rows.map((r) => Number(r.dataset.seq))));
  assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), "rows in log order");
});

test("errors say what happened: a session you are not in, and an empty prompt", { timeout: 90_000 }, async () => {
  const page = await (await browser.newContext()).newPage();
  await signIn(page, server.base, "eve", "Eve");
  await page.goto(`${server.base}/#/s/ses_00000000000000000000000000000000`);
  await page.waitForSelector("text=Cannot open this session");
  const ada = await (await browser.newContext()).newPage();
  await signIn(ada, server.base, "ada2", "Ada Two");
  const id = await newSession(ada, "Private");
  await page.goto(`${server.base}/#/s/${id}`);
  await page.waitForSelector("text=not a member");
  await ada.press("#prompt", "Enter");
  await ada.waitForSelector(".toast.show:has-text('Write a prompt first')");
});

test("the session view fits a phone without sideways scrolling, and the app is installable", { timeout: 90_000 }, async () => {
  const ctx = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  const page = await ctx.newPage();
  await signIn(page, server.base, "pat", "Pat Phone");
  await newSession(page, "A session with a rather long title that has to wrap on a small screen", "check the layout on a phone");
  await page.waitForSelector("#log .row.prompt");
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= 390, `page is ${width}px wide on a 390px screen`);
  const manifest = await (await fetch(`${server.base}/manifest.webmanifest`)).json();
  assert.equal(manifest.display, "standalone");
  assert.ok(manifest.icons.some((i) => i.sizes === "512x512"));
  const sw = await page.evaluate(async () => (await navigator.serviceWorker.ready).active?.scriptURL);
  assert.match(sw, /\/sw\.js$/);
});

test("the service worker serves only the app shell: API requests always reach the server, never the cache, and fail offline", { timeout: 90_000 }, async () => {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  const fromWorker = new Map();
  page.on("response", (r) => fromWorker.set(new URL(r.url()).pathname, r.fromServiceWorker()));
  await signIn(page, server.base, "sol", "Sol Worker");
  await page.evaluate(() => navigator.serviceWorker.ready);
  await page.reload();
  await page.waitForSelector("#new");
  assert.ok(await page.evaluate(() => navigator.serviceWorker.controller !== null), "the service worker controls the page");
  // Online: the shell is answered through the worker (network first), the API past it.
  assert.equal(fromWorker.get("/app.js"), true, "the shell goes through the service worker");
  const online = await page.evaluate(async () => {
    const health = await fetch("/health");
    const sessions = await fetch("/sessions");
    return { health: health.status, sessions: sessions.status, code: (await sessions.json()).error?.code };
  });
  assert.deepEqual(online, { health: 200, sessions: 401, code: "unauthenticated" });
  assert.equal(fromWorker.get("/health"), false, "an API answer never comes from the service worker");
  assert.equal(fromWorker.get("/sessions"), false);
  const cached = await page.evaluate(async () => {
    const names = await caches.keys();
    const urls = [];
    for (const name of names) for (const req of await (await caches.open(name)).keys()) urls.push(new URL(req.url).pathname);
    return urls.sort();
  });
  const shell = ["/", "/app.js", "/icon.svg", "/index.html", "/manifest.webmanifest", "/style.css"];
  assert.ok(cached.length > 0 && cached.every((p) => shell.includes(p)), `the cache holds only shell files: ${cached}`);
  // Offline: the shell still loads from the cache; an API request fails instead of being answered.
  await ctx.setOffline(true);
  const offline = await page.evaluate(async () => {
    const shellFile = await fetch("/app.js").then((r) => r.status, (e) => `failed: ${e}`);
    const api = await fetch("/health").then((r) => `answered ${r.status}`, () => "failed");
    return { shellFile, api };
  });
  assert.deepEqual(offline, { shellFile: 200, api: "failed" });
  await ctx.close();
});

test("between a prompt's start and its first output the session shows the wait: what is awaited and the seconds ticking", { timeout: 90_000 }, async () => {
  const page = await (await browser.newContext()).newPage();
  await signIn(page, echoServer.base, "wes", "Wes Wait");
  // The echo runner answers after ECHO_RUN_MS (4 s on echoServer) with no sandbox: the wait is for the model.
  await newSession(page, "Waiting", "take your time");
  await page.waitForSelector("#wait:not([hidden])");
  assert.equal(await page.textContent("#wait .wait-label"), "Waiting for the model");
  assert.equal(await page.textContent("#stage"), "Waiting for the model", "the header never says idle meanwhile");
  const secs = () => page.$eval("#wait .wait-secs", (e) => parseInt(e.textContent, 10));
  const first = await secs();
  await page.waitForFunction((n) => parseInt(document.querySelector("#wait .wait-secs").textContent, 10) > n, first, { timeout: 5_000 });
  assert.ok((await secs()) > first, "the seconds tick");
  // The first output ends the wait.
  await page.waitForSelector('#log .row.agent:has-text("echo: take your time")');
  await page.waitForSelector("#wait", { state: "hidden" });
  assert.notEqual(await page.textContent("#stage"), "Waiting for the model");
});

test("a dropped socket resumes from its last event: what happened meanwhile appears once and in order", { timeout: 90_000 }, async () => {
  const ctx = await browser.newContext();
  // Record every socket the app opens, and hold reconnects (to a closed port) while `__hold` is set.
  await ctx.addInitScript(() => {
    window.__wsUrls = [];
    window.__hold = false;
    const Real = window.WebSocket;
    window.WebSocket = class extends Real {
      constructor(url, ...rest) {
        const held = window.__hold;
        super(held ? "ws://127.0.0.1:9/held" : url, ...rest);
        if (!held) {
          window.__wsUrls.push(String(url));
          window.__live = this;
        }
      }
    };
  });
  const page = await ctx.newPage();
  await signIn(page, server.base, "dru", "Dru Drop");
  await newSession(page, "Dropping");
  const link = await shareLink(page);
  const rob = await joinByApi(server.base, link, "rob");
  await page.waitForSelector('#log .row:has-text("ROB joined")');
  const ada = await page.evaluate(() => localStorage.getItem("nightshift.token"));
  const head = (await apiCall(server.base, ada, "GET", `/multiplayer/${rob.id}/events?since=0`)).body.last_seq;
  const rowSeqs = () => page.$$eval("#log .row[data-seq]", (rows) => rows.map((r) => Number(r.dataset.seq)));
  assert.equal(Math.max(...(await rowSeqs())), head, "the page has everything up to the head");

  // Drop the socket; while the page is away, Rob keeps the session busy.
  await page.evaluate(() => { window.__hold = true; window.__live.close(); });
  await page.waitForSelector("#conn:not(.ok)");
  const texts = ["away one", "away two", "away three"];
  for (const text of texts) {
    const r = await apiCall(server.base, rob.token, "POST", `/multiplayer/${rob.id}/prompt`, { text });
    assert.equal(r.status, 202, JSON.stringify(r.body));
  }
  assert.equal((await apiCall(server.base, rob.token, "POST", `/multiplayer/${rob.id}/lock`, { resource: "away.txt" })).status, 200);
  const missed = (await apiCall(server.base, ada, "GET", `/multiplayer/${rob.id}/events?since=${head}`)).body.events;
  assert.ok(missed.length >= 5, `events while away: ${JSON.stringify(missed)}`);
  assert.equal(await page.$$eval("#log .row.prompt", (rows) => rows.length), 0, "nothing arrived while away");

  // Back: the socket resumes with `since` = the last event it had, and the missed rows appear once each.
  await page.evaluate(() => { window.__hold = false; });
  await page.waitForSelector("#conn.ok", { timeout: 20_000 });
  await page.waitForFunction((n) => document.querySelectorAll("#log .row.prompt").length === n, texts.length);
  const urls = await page.evaluate(() => window.__wsUrls);
  assert.equal(urls.length, 2, `one socket before the drop, one after: ${urls}`);
  assert.equal(new URL(urls[1]).searchParams.get("since"), String(head), "the reconnect resumes from the last event");
  // Events keep coming on the resumed socket.
  assert.equal((await apiCall(server.base, rob.token, "POST", `/multiplayer/${rob.id}/prompt`, { text: "after return" })).status, 202);
  await page.waitForFunction(() => [...document.querySelectorAll("#log .row.prompt .text")].some((e) => e.textContent === "after return"));
  const prompts = await page.$$eval("#log .row.prompt .text", (els) => els.map((e) => e.textContent));
  assert.deepEqual(prompts, [...texts, "after return"], "each prompt once, in order");
  const seqs = await rowSeqs();
  assert.equal(new Set(seqs).size, seqs.length, "no row twice");
  assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), "rows in log order");
  const queuedSeqs = missed.filter((e) => e.type === "prompt.queued").map((e) => e.seq);
  const promptRowSeqs = await page.$$eval("#log .row.prompt", (rows) => rows.map((r) => Number(r.dataset.seq)));
  assert.deepEqual(promptRowSeqs.slice(0, 3), queuedSeqs, "the rows are the log's events");
  await ctx.close();
});

test("the agent's work in a real sandbox renders in the session: text, tool calls with results, diffs, the pushed branch", { timeout: 300_000 }, async () => {
  // The scripted model drives real OpenCode in a sandbox of the local provider.
  const compute = await startCompute({
    turns: [
      { text: "I'll create the greeting file.", tool_calls: [{ name: "write", arguments: { filePath: "hello.txt", content: "hello\nworld\n" } }] },
      { text: "Reading it back.", tool_calls: [{ name: "read", arguments: { filePath: "hello.txt" } }] },
      { text: "Changing the second line.", tool_calls: [{ name: "edit", arguments: { filePath: "hello.txt", oldString: "world", newString: "nightshift" } }] },
      { text: "Done: hello.txt now greets nightshift." },
    ],
  });
  let agentServer;
  try {
    agentServer = await startServer(compute.vars);
    const remote = compute.remoteRepo("web-agent");
    const page = await (await browser.newContext()).newPage();
    await signIn(page, agentServer.base, "ari", "Ari Agent");
    const id = await newSession(page, "Agent work", "Create hello.txt", remote);
    await page.waitForSelector("#log .row.done", { timeout: 240_000 });
    assert.match(await page.textContent("#log .row.done"), /^Done/);

    const agentText = await page.$$eval("#log .row.agent .agent-text", (els) => els.map((e) => e.textContent).join(" "));
    for (const t of ["I'll create the greeting file.", "Reading it back.", "Changing the second line.", "Done: hello.txt now greets nightshift."]) {
      assert.ok(agentText.includes(t), `agent text has "${t}": ${agentText}`);
    }
    const tools = await page.$$eval("#log .row.tool", (rows) => rows.map((r) => ({
      seq: Number(r.dataset.seq),
      cls: r.className,
      name: r.querySelector(".tool-name")?.textContent,
      summary: r.querySelector("summary")?.textContent,
      add: [...r.querySelectorAll("pre.diff .dadd")].map((s) => s.textContent),
      del: [...r.querySelectorAll("pre.diff .ddel")].map((s) => s.textContent),
      pre: r.querySelector("pre")?.textContent,
    })));
    assert.deepEqual(tools.map((t) => t.name), ["write", "read", "edit"], JSON.stringify(tools));
    for (const t of tools) {
      assert.match(t.cls, /\bcompleted\b/, `${t.name} completed: ${JSON.stringify(t)}`);
      assert.ok(t.summary.includes("hello.txt"), `${t.name} names its file: ${t.summary}`);
    }
    const [write, read, edit] = tools;
    assert.deepEqual(write.add.slice(0, 2), ["+ hello", "+ world"], "the write shows the file's lines as added");
    assert.ok(edit.del.includes("- world") && edit.add.includes("+ nightshift"), `the edit shows its diff: ${JSON.stringify(edit)}`);
    assert.ok(read.pre.includes("world"), `the read shows its output: ${read.pre}`);
    // One row per tool call (a finished call replaces its running row), in the log's order.
    const seqs = await page.$$eval("#log .row[data-seq]", (rows) => rows.map((r) => Number(r.dataset.seq)));
    assert.equal(new Set(seqs).size, seqs.length, "no row twice");
    assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), "rows in log order");
    // The branch the done row names holds the agent's file.
    const done = await page.textContent("#log .row.done");
    assert.ok(done.includes(`nightshift/${id}`), done);
    assert.ok(done.includes("hello.txt"), `files changed: ${done}`);
    assert.equal(execFileSync("git", ["show", `nightshift/${id}:hello.txt`], { cwd: remote, encoding: "utf8" }), "hello\nnightshift\n");
    assert.ok(compute.processes().length > 0, "the leak check below sees the running sandbox");
  } finally {
    agentServer?.stop();
    await compute.stop();
  }
});

test("sign in with GitHub: authorize, land back signed in where you were, stay signed in on reload, sign out ends the token; the app is served with its CSP", { timeout: 120_000 }, async () => {
  const fake = await startFakeGithub();
  let ghServer;
  try {
    // Five-minute tokens: less than the ten minutes the app renews before, so it renews at once.
    ghServer = await startServer({ ...fake.vars, TOKEN_TTL_MS: "300000" });
    const base = ghServer.base;
    // The static assets carry the _headers file's security headers.
    const shell = await fetch(`${base}/`);
    assert.equal(shell.status, 200);
    assert.equal(shell.headers.get("content-security-policy"), "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'");
    assert.equal(shell.headers.get("x-content-type-options"), "nosniff");
    assert.equal(shell.headers.get("referrer-policy"), "no-referrer");
    assert.equal(shell.headers.get("x-frame-options"), "DENY");
    assert.equal(shell.headers.get("permissions-policy"), "camera=(), microphone=(), geolocation=()");
    const options = await (await fetch(`${base}/auth/config`)).json();
    assert.deepEqual([options.github, options.dev], [true, true]);
    assert.match(options.install_url, /\/apps\/[^/]+\/installations\/new$/);

    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    const violations = [];
    page.on("console", (m) => { if (/Content Security Policy/i.test(m.text())) violations.push(m.text()); });
    page.on("pageerror", (e) => violations.push(`page error: ${e.message}`));
    const meText = () => page.textContent("#whoami #me");
    let landing = null; // the token the callback handed over (in its redirect's fragment)
    page.on("response", async (r) => {
      if (new URL(r.url()).pathname === "/auth/github/callback") landing = new URLSearchParams((r.headers().location || "").split("?")[1]).get("token");
    });

    await page.goto(`${base}/#/`);
    await page.click("text=Sign in with GitHub");
    await page.waitForURL((u) => u.href.startsWith(fake.web_url + "/login/oauth/authorize"));
    assert.match(await page.textContent("body"), /nightshift-test/);
    await page.click("#authorize");
    await page.waitForSelector("#new");
    assert.equal(await meText(), "Ada Lovelace");
    assert.equal(await page.getAttribute("#whoami #me", "data-user"), "ada");
    assert.ok(!page.url().includes("token="), `the token is out of the address: ${page.url()}`);
    const stored = await page.evaluate(() => ({ token: localStorage.getItem("nightshift.token"), exp: Number(localStorage.getItem("nightshift.expires_at")), user: JSON.parse(localStorage.getItem("nightshift.user")) }));
    assert.ok(stored.token, "a token is stored");
    assert.ok(stored.exp > Date.now(), `its expiry is stored: ${stored.exp}`);
    assert.deepEqual({ user: stored.user.user, name: stored.user.name }, { user: "ada", name: "Ada Lovelace" });
    // Under ten minutes left: the app renewed the token it landed with.
    assert.ok(landing, "the callback redirected with a token");
    await page.waitForFunction((t) => localStorage.getItem("nightshift.token") !== t, landing);
    stored.token = await page.evaluate(() => localStorage.getItem("nightshift.token"));
    const me = await fetch(`${base}/auth/me`, { headers: { authorization: `Bearer ${stored.token}` } });
    assert.equal(me.status, 200);
    assert.equal((await me.json()).user, "ada");

    // A reload keeps the sign-in; the session view works on a ticketed socket, its avatar coloured through the CSSOM.
    await page.reload();
    await page.waitForSelector("#new");
    assert.equal(await meText(), "Ada Lovelace");
    const id = await newSession(page, "Signed in with GitHub");
    const avatar = await page.$eval("#whoami .avatar", (e) => getComputedStyle(e).getPropertyValue("--c").trim());
    assert.match(avatar, /^#[0-9a-f]{6}$/, `the avatar has its colour: "${avatar}"`);

    // Sign out: back at the sign-in page, and the old token is refused by the server.
    await page.click("#signout");
    await page.waitForSelector("#github-signin");
    assert.equal(await page.textContent("#whoami"), "");
    assert.equal(await page.evaluate(() => localStorage.getItem("nightshift.token")), null);
    const after = await fetch(`${base}/auth/me`, { headers: { authorization: `Bearer ${stored.token}` } });
    assert.equal(after.status, 401, "the signed-out token no longer works");

    // Opening a session's link signed out: signing in with GitHub comes back to that session.
    await page.goto(`${base}/#/s/${id}`);
    await page.click("#github-signin");
    await page.click("#authorize");
    await page.waitForURL((u) => u.hash === `#/s/${id}`);
    await page.waitForSelector("#conn.ok");
    assert.equal(await page.textContent(".session h1"), "Signed in with GitHub");
    assert.deepEqual(violations, [], "nothing broke under the CSP");
    await ctx.close();
  } finally {
    ghServer?.stop();
    await fake.stop();
  }
});

test("the pull request card: the snapshot's create-pull-request link, then the pull request live from pr.* events", { timeout: 90_000 }, async () => {
  // The Worker does not emit these yet: the snapshot gets the fields on its way to the page, and
  // the events are handed to the app's live socket as the server would send them.
  const ctx = await browser.newContext();
  await ctx.addInitScript(() => {
    const Real = window.WebSocket;
    window.WebSocket = class extends Real {
      constructor(...args) { super(...args); window.__live = this; }
    };
  });
  const page = await ctx.newPage();
  const violations = [];
  page.on("console", (m) => { if (/Content Security Policy/i.test(m.text())) violations.push(m.text()); });
  const compare = "https://github.com/acme/web/compare/main...nightshift/ses_x?expand=1";
  await page.route(/\/sessions\/ses_[0-9a-f]+$/, async (route) => {
    const res = await route.fetch();
    const snap = await res.json();
    await route.fulfill({ response: res, json: { ...snap, pull_request: null, pull_request_action: { kind: "create_pull_request", url: compare, reason: "Nightshift may not open pull requests in your name here <b>yet</b>" } } });
  });
  await signIn(page, server.base, "pia", "Pia Pull");
  await newSession(page, "Pull requests");
  await page.waitForSelector("#pr:not([hidden]) .pr-create");
  assert.equal(await page.textContent("#pr .pr-create"), "Create pull request");
  assert.equal(await page.getAttribute("#pr .pr-create", "href"), compare);
  assert.equal(await page.textContent("#pr .pr-reason"), "Nightshift may not open pull requests in your name here <b>yet</b>", "the reason is text, never markup");

  const pr = { repository: "acme/web", number: 12, url: "https://github.com/acme/web/pull/12", state: "open", draft: false, title: "Fix <the> login race", head: "nightshift/ses_x", base: "main" };
  const send = (events) => page.evaluate((evs) => window.__live.onmessage({ data: JSON.stringify({ type: "events", events: evs }) }), events);
  await send([{ seq: 100000, type: "pr.opened", pull_request: pr, at: Date.now() }]);
  await page.waitForSelector("#pr .pr-number");
  assert.equal(await page.textContent("#pr .pr-number"), "#12");
  assert.equal(await page.textContent("#pr .pr-title"), "Fix <the> login race");
  assert.equal(await page.textContent("#pr .pr-state"), "open");
  assert.equal(await page.getAttribute("#pr .pr-link", "href"), pr.url);
  assert.equal(await page.getAttribute("#pr .pr-checks", "href"), pr.url + "/checks");
  assert.equal(await page.$("#pr .pr-create"), null, "the pull request exists: no create link");
  await page.waitForSelector('#log .row:has-text("Pull request #12 opened")');

  await send([{ seq: 100001, type: "pr.updated", pull_request: { ...pr, title: "Fix the login race, take two" } }, { seq: 100002, type: "pr.merged", pull_request: { ...pr, state: "closed", title: "Fix the login race, take two" } }]);
  await page.waitForFunction(() => document.querySelector("#pr .pr-state")?.textContent === "merged");
  assert.equal(await page.textContent("#pr .pr-title"), "Fix the login race, take two");
  await page.waitForSelector('#log .row:has-text("Pull request #12 merged")');
  assert.deepEqual(violations, []);
  await ctx.close();
});

test("review comments on the pull request show beside the agent's work: who said what where, and the answers", { timeout: 90_000 }, async () => {
  // The events are handed to the app's live socket as the server would send them.
  const ctx = await browser.newContext();
  await ctx.addInitScript(() => {
    const Real = window.WebSocket;
    window.WebSocket = class extends Real {
      constructor(...args) { super(...args); window.__live = this; }
    };
  });
  const page = await ctx.newPage();
  const violations = [];
  page.on("console", (m) => { if (/Content Security Policy/i.test(m.text())) violations.push(m.text()); });
  await signIn(page, server.base, "rita", "Rita Review");
  await newSession(page, "Review comments");
  const send = (events) => page.evaluate((evs) => window.__live.onmessage({ data: JSON.stringify({ type: "events", events: evs }) }), events);
  const actor = { user: "carol", name: "carol" };
  await send([
    { seq: 200000, type: "pr.comment.received", at: Date.now(), actor, repository: "acme/web", number: 7, prompt: "prm_review", omitted: 2, comments: [
      { id: 101, root: 101, author: "carol", path: "src/a.rs", lines: "L3-L5", body: "Capitalise it. <img src=x id=injected>", url: "https://github.com/acme/web/pull/7#discussion_r101" },
      { id: 102, root: 102, author: "dave", body: "x".repeat(500), url: "javascript:alert(1)" },
    ] },
    { seq: 200001, type: "prompt.queued", at: Date.now(), prompt: { id: "prm_review", text: "Answer the review", priority: 0, arrival: 1, author: "carol", author_name: "carol" } },
  ]);
  await page.waitForSelector("#log .row.review.received");
  assert.equal(await page.textContent("#log .row.review.received .review-summary"), "Review on PR #7 — 2 comments from carol and dave (the prompt below answers them)");
  const comments = await page.$$eval("#log .row.review.received .review-comment", (els) => els.map((e) => ({ codes: [...e.querySelectorAll("code")].map((c) => c.textContent), body: e.querySelector(".review-body").textContent, link: e.querySelector("a")?.getAttribute("href") ?? null })));
  assert.deepEqual(comments[0], { codes: ["src/a.rs", "L3-L5"], body: "Capitalise it. <img src=x id=injected>", link: "https://github.com/acme/web/pull/7#discussion_r101" });
  assert.deepEqual(comments[1].codes, [], "a conversation comment has no place in the code");
  assert.equal(comments[1].body.length, 300, "a long comment is cut");
  assert.equal(comments[1].link, null, "a javascript: URL is no link");
  assert.equal(await page.$("#injected"), null, "comment text is text, never markup");
  assert.equal(await page.textContent("#log .row.review.received .review-omitted"), "2 more comments were left out of the prompt");
  assert.equal(await page.getAttribute("#log .row.review.received", "data-prompt"), "prm_review");
  await page.waitForSelector('#log .row.prompt.from-review[data-prompt="prm_review"] .review-tag');
  assert.equal(await page.textContent('#log .row.prompt[data-prompt="prm_review"] .review-tag'), "answers review on PR #7");

  await send([
    { seq: 200002, type: "pr.comment.addressed", at: Date.now(), actor, repository: "acme/web", number: 7, prompt: "prm_review", commit: "abc1234def567890", replies: [{ root: 101, body: "Addressed in `abc1234`: capitalised." }, { root: 102, body: "Addressed in `abc1234`: done." }] },
    { seq: 200003, type: "pr.comment.addressed", at: Date.now(), actor, repository: "acme/web", number: 7, prompt: "prm_review", replies: [{ root: 101, body: "Nothing to change." }] },
  ]);
  await page.waitForFunction(() => document.querySelectorAll("#log .row.review.addressed").length === 2);
  const answered = await page.$$eval("#log .row.review.addressed", (els) => els.map((e) => ({ summary: e.querySelector(".review-summary").textContent, replies: [...e.querySelectorAll(".review-body")].map((b) => b.textContent) })));
  assert.deepEqual(answered, [
    { summary: "Answered 2 threads on PR #7 in abc1234", replies: ["Addressed in `abc1234`: capitalised.", "Addressed in `abc1234`: done."] },
    { summary: "Answered 1 thread on PR #7; nothing changed", replies: ["Nothing to change."] },
  ]);
  assert.equal(await page.textContent("#log .row.review.addressed .review-summary code"), "abc1234");
  assert.deepEqual(violations, []);
  await ctx.close();
});

test("the Slack link page: a damaged link says so and asks nothing of the server, signed out or in", { timeout: 90_000 }, async () => {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  const asked = [];
  page.on("request", (r) => {
    const path = new URL(r.url()).pathname;
    if (path.startsWith("/slack") || path.startsWith("/auth/config")) asked.push(`${r.method()} ${path}`);
  });
  await page.goto(`${server.base}/#/slack/link/T0-TEAM/not-hex`);
  await page.waitForSelector("#slack-link-error");
  assert.match(await page.textContent("#slack-link-error"), /ask the Nightshift bot in Slack for a new one/);
  assert.equal(await page.$("#slack-link"), null, "no link button");
  assert.equal(await page.$("#signin"), null, "no sign-in for a link that cannot work");
  await signIn(page, server.base, "dana", "Dana Damaged");
  asked.length = 0;
  await page.goto(`${server.base}/#/slack/link/T0TEAM/${"a".repeat(65)}`);
  await page.waitForSelector("#slack-link-error");
  assert.match(await page.textContent("#slack-link-error"), /The code is not 1 to 64 hexadecimal characters/);
  assert.equal(await page.$("#slack-link"), null);
  await page.waitForTimeout(300);
  assert.deepEqual(asked, [], "no request for a damaged link");
  await ctx.close();
});

test("the Slack link page: signed out it explains and signs in back to the link; an unknown code says to ask the bot again", { timeout: 90_000 }, async () => {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  const code = "0123456789abcdef".repeat(2);
  const hash = `#/slack/link/T0TEAM/${code}`;
  await page.goto(`${server.base}/${hash}`);
  await page.waitForSelector("#signin");
  assert.equal(await page.textContent("main h1"), "Link your Slack account to Nightshift");
  assert.match(await page.textContent("#signin-why"), /Sign in, then link your Slack account/);
  // The dev sign-in comes back to the link, now with its button.
  await page.fill("input[name=name]", "Sam Slack");
  await page.fill("input[name=user]", "sam");
  await page.click("#signin button[type=submit]");
  await page.waitForSelector("#slack-link");
  assert.equal(new URL(page.url()).hash, hash);
  assert.equal(await page.textContent("#slack-link"), "Link my Slack account");
  const [req, res] = await Promise.all([
    page.waitForRequest((r) => new URL(r.url()).pathname === "/slack/link"),
    page.waitForResponse((r) => new URL(r.url()).pathname === "/slack/link"),
    page.click("#slack-link"),
  ]);
  assert.equal(req.method(), "POST");
  assert.deepEqual(req.postDataJSON(), { team: "T0TEAM", code });
  assert.equal(res.status(), 404);
  const { error } = await res.json();
  assert.equal(error.code, "slack_link_unknown");
  await page.waitForSelector("#slack-link-error");
  assert.equal(await page.textContent("#slack-link-error"), error.message);
  assert.match(await page.textContent("#slack-link-result"), /Ask the Nightshift bot again in Slack/);
  assert.equal(await page.$("#slack-linked"), null);
  await ctx.close();
});

test("Slack settings on a deployment without Slack: linked from the sessions list, it says Slack is not set up", { timeout: 90_000 }, async () => {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  await signIn(page, server.base, "nora", "Nora Notset");
  await page.click("#slack-settings-link");
  await page.waitForSelector("#slack-settings-error");
  assert.equal(new URL(page.url()).hash, "#/settings/slack");
  assert.equal(await page.textContent("#slack-settings-error"), "Slack is not set up for this deployment: see the README's Slack section.");
  assert.equal(await page.$("#slack-form"), null);
  await ctx.close();
});

test("the Slack settings form: rows from the settings, add and remove, mistakes caught before saving, the server's refusals shown with the form kept as typed", { timeout: 90_000 }, async () => {
  // Slack is not set up here: the settings arrive as the server would send them; saving reaches
  // the real server, which checks the repositories first and then says Slack is not set up.
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  await page.route((u) => u.pathname === "/slack/settings", async (route) => {
    if (route.request().method() !== "GET") return route.fallback();
    await route.fulfill({ json: { team: "T0TEAM", channel_defaults: { C0GHOST: "ghost" }, routing_rules: [{ pattern: "billing <b>now</b>", repository: "ghost" }] } });
  });
  const puts = [];
  page.on("request", (r) => { if (new URL(r.url()).pathname === "/slack/settings" && r.method() === "PUT") puts.push(r.postDataJSON()); });
  await signIn(page, server.base, "stan", "Stan Settings");
  await page.goto(`${server.base}/#/settings/slack`);
  await page.waitForSelector("#slack-form");
  assert.equal(await page.inputValue('#slack-channels input[name=channel]'), "C0GHOST");
  assert.equal(await page.inputValue('#slack-channels select[name=repository]'), "ghost");
  assert.match(await page.textContent("#slack-channels select[name=repository] option:checked"), /ghost \(not in your list\)/);
  assert.equal(await page.inputValue('#slack-rules input[name=pattern]'), "billing <b>now</b>", "a pattern is text, never markup");
  assert.match(await page.textContent("#slack-settings"), /first match wins/);
  assert.match(await page.textContent("#slack-settings"), /Rules never grant access/);

  // A second row for the same channel is caught before any request.
  await page.click("#slack-add-channel");
  await page.fill('#slack-channels li[data-i="1"] input[name=channel]', " C0GHOST ");
  await page.selectOption('#slack-channels li[data-i="1"] select[name=repository]', "ghost");
  await page.click("#slack-save");
  await page.waitForSelector("#slack-settings-error:not([hidden])");
  assert.match(await page.textContent("#slack-settings-error"), /C0GHOST is listed twice/);
  assert.deepEqual(puts, []);

  // Without the duplicate: the server refuses the unregistered repository; the form stays as typed.
  await page.click('#slack-channels li[data-i="1"] button[data-act="remove-channel"]');
  await page.click("#slack-add-rule");
  await page.fill('#slack-rules li[data-i="1"] input[name=pattern]', "  deploy ");
  await page.selectOption('#slack-rules li[data-i="1"] select[name=repository]', "ghost");
  await page.click("#slack-save");
  await page.waitForFunction(() => /no such repository/.test(document.querySelector("#slack-settings-error")?.textContent || ""));
  assert.deepEqual(puts.at(-1), { channel_defaults: { C0GHOST: "ghost" }, routing_rules: [{ pattern: "billing <b>now</b>", repository: "ghost" }, { pattern: "deploy", repository: "ghost" }] });
  assert.equal(await page.$$eval("#slack-rules li.slack-row", (els) => els.length), 2);
  assert.equal(await page.inputValue('#slack-rules li[data-i="1"] input[name=pattern]'), "  deploy ", "kept as typed");

  // Nothing left that names a repository: the check passes, and the server says Slack is not set up.
  await page.click('#slack-channels li[data-i="0"] button[data-act="remove-channel"]');
  await page.click('#slack-rules li[data-i="1"] button[data-act="up"]');
  assert.equal(await page.inputValue('#slack-rules li[data-i="0"] input[name=pattern]'), "  deploy ", "moved up");
  await page.click('#slack-rules li[data-i="0"] button[data-act="remove-rule"]');
  await page.click('#slack-rules li[data-i="0"] button[data-act="remove-rule"]');
  await page.click("#slack-save");
  await page.waitForFunction(() => document.querySelector("#slack-settings-error")?.textContent === "Slack is not set up for this deployment: see the README's Slack section.");
  assert.deepEqual(puts.at(-1), { channel_defaults: {}, routing_rules: [] });
  assert.ok(await page.$("#slack-form"), "the form is still there");
  await ctx.close();
});
