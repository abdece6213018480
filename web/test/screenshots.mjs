// Takes the README's screenshots of the real app (desktop and phone): `bash scripts/screenshots.sh`.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { root, startServer, launchBrowser, signIn, newSession, shareLink, sendPrompt } from "./harness.mjs";

const out = join(root, "docs", "screenshots");
mkdirSync(out, { recursive: true });
const server = await startServer({ ECHO_RUN_MS: "2500" });
const browser = await launchBrowser();
try {
  const a = await (await browser.newContext({ viewport: { width: 1280, height: 820 } })).newPage();
  const b = await (await browser.newContext()).newPage();
  await signIn(a, server.base, "ada", "Ada Lovelace");
  await signIn(b, server.base, "grace", "Grace Hopper");
  await newSession(a, "Fix the flaky login test", "Find why login_test fails one run in ten");
  await b.goto(await shareLink(a));
  await b.waitForSelector("#conn.ok");
  await a.click("#share");
  await a.keyboard.press("Escape");
  await sendPrompt(b, "Then add a regression test for the race");
  await sendPrompt(a, "Update the changelog");
  await b.fill("#prompt", "Also check the retry logic");
  await b.dispatchEvent("#prompt", "input");
  await a.waitForSelector('#presence .avatar.is-typing[data-user="grace"]');
  await a.waitForSelector("#log .row.done");
  await a.screenshot({ path: join(out, "session-desktop.png") });
  const phone = await (await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, deviceScaleFactor: 2 })).newPage();
  await signIn(phone, server.base, "grace", "Grace Hopper");
  await phone.goto(`${server.base}/#/s/${a.url().split("/s/")[1]}`);
  await phone.waitForSelector("#log .row.prompt");
  await phone.screenshot({ path: join(out, "session-phone.png") });
  console.log(`screenshots written to ${out}`);
} finally {
  await browser.close();
  server.stop();
}
