// Browser tests: Chromium (headless) drives the real app served by the Worker under wrangler dev.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startServer, launchBrowser, signIn, newSession, shareLink, sendPrompt } from "./harness.mjs";

let server;
let browser;

before(async () => {
  server = await startServer({ ECHO_RUN_MS: "4000" });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  server?.stop();
});

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
  await b.waitForSelector('#log .row.done:has-text("Done")');
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

test("between a prompt's start and its first output the session shows the wait: what is awaited and the seconds ticking", { timeout: 90_000 }, async () => {
  const page = await (await browser.newContext()).newPage();
  await signIn(page, server.base, "wes", "Wes Wait");
  // The echo runner answers after ECHO_RUN_MS (4 s here) with no sandbox: the wait is for the model.
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
