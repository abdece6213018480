// Unit tests of the browser's session model (node --test).
import { test } from "node:test";
import assert from "node:assert/strict";
import { SessionModel, cut, editDiff, httpUrl, needsRenew, parseSignedIn, parseSlackLink, reviewAddressed, reviewReceived, safeReturn, slackRowsToSettings, slackSettingsToRows, REVIEW_CUT, RENEW_BEFORE_MS } from "../src/model.js";

const q = (seq, id, priority, arrival, author = "ada") => ({ seq, type: "prompt.queued", prompt: { id, text: id, priority, arrival, author, author_name: author } });

test("the queue orders by priority then arrival, and follows starts and ends", () => {
  const m = new SessionModel();
  m.apply(q(1, "a", 0, 0));
  m.apply({ seq: 2, type: "prompt.started", id: "a" });
  m.apply(q(3, "b", 0, 1));
  m.apply(q(4, "c", 5, 2));
  m.apply(q(5, "d", 0, 3));
  assert.deepEqual(m.queued().map((p) => p.id), ["c", "b", "d"]);
  m.apply({ seq: 6, type: "prompt.reprioritized", id: "d", priority: 9 });
  assert.deepEqual(m.queued().map((p) => p.id), ["d", "c", "b"]);
  m.apply({ seq: 7, type: "prompt.cancelled", id: "c" });
  m.apply({ seq: 8, type: "prompt.finished", id: "a", ok: true });
  assert.equal(m.running, null);
  m.apply({ seq: 9, type: "prompt.started", id: "d" });
  assert.equal(m.running, "d");
  assert.deepEqual(m.queued().map((p) => p.id), ["b"]);
});

test("agent text merges into one growing block until something else happens", () => {
  const m = new SessionModel();
  const t = (seq, text) => m.apply({ seq, type: "agent.text", prompt: "p", text });
  const a = t(1, "Hel");
  const b = t(2, "lo");
  assert.equal(a.key, b.key);
  assert.equal(b.text, "Hello");
  m.apply({ seq: 3, type: "agent.tool", prompt: "p", call: "c1", tool: "read", status: "running", input: { filePath: "x" } });
  const c = t(4, "Next");
  assert.notEqual(c.key, a.key);
  const done = m.apply({ seq: 5, type: "agent.tool", prompt: "p", call: "c1", tool: "read", status: "completed", output: "ok" });
  assert.equal(done.key, "tool:c1");
  assert.deepEqual(done.tool.input, { filePath: "x" });
  assert.equal(done.tool.output, "ok");
});

test("an event seen twice is ignored; locks and stage follow the log", () => {
  const m = new SessionModel();
  assert.ok(m.apply({ seq: 1, type: "lock.acquired", resource: "a.rs", holder: "ada", expires_at: 1 }) === null);
  assert.equal(m.apply({ seq: 1, type: "lock.released", resource: "a.rs" }), null);
  assert.equal(m.locks.size, 1);
  m.apply({ seq: 2, type: "lock.released", resource: "a.rs" });
  assert.equal(m.locks.size, 0);
  m.apply({ seq: 3, type: "sandbox.status", stage: "ready", detail: "" });
  assert.equal(m.stage, "ready");
});

test("files changed per prompt, and edit diffs", () => {
  const m = new SessionModel();
  const tool = (seq, call, tool, status, input) => m.apply({ seq, type: "agent.tool", prompt: "p", call, tool, status, input });
  tool(1, "c1", "write", "running", { filePath: "a.txt", content: "x" });
  tool(2, "c1", "write", "completed", null);
  tool(3, "c2", "read", "completed", { filePath: "b.txt" });
  tool(4, "c3", "edit", "error", { filePath: "c.txt", oldString: "a", newString: "b" });
  assert.deepEqual(m.filesOf("p"), ["a.txt"], "reads and failed edits change nothing");
  assert.deepEqual(editDiff("one\ntwo\nthree", "one\n2\nthree").map((l) => l.kind + l.text), [" one", "-two", "+2", " three"]);
});

test("background children are one row each, updated in place as their status moves", () => {
  const m = new SessionModel();
  const a = m.apply({ seq: 1, type: "background.child", id: "bg_default_1", status: "queued", title: "Background: A" });
  const b = m.apply({ seq: 2, type: "background.child", id: "bg_default_1", status: "running", session: "ses_c" });
  const c = m.apply({ seq: 3, type: "background.child", id: "bg_default_1", status: "completed", branch: "nightshift/ses_c" });
  assert.equal(a.key, "bg:bg_default_1");
  assert.equal(b.key, a.key);
  assert.deepEqual(
    { title: c.child.title, status: c.child.status, session: c.child.session, branch: c.child.branch },
    { title: "Background: A", status: "completed", session: "ses_c", branch: "nightshift/ses_c" },
  );
  assert.equal(m.apply({ seq: 3, type: "background.child", id: "bg_default_1", status: "failed" }), null, "seen already");
});

test("the wait between a prompt's start and its first agent output: the sandbox's stage, then the model, with the seconds", () => {
  const m = new SessionModel();
  assert.equal(m.waiting(0), null, "nothing runs");
  m.apply({ ...q(1, "p", 0, 0), at: 1000 });
  assert.equal(m.waiting(1000), null, "queued is not running yet");
  m.apply({ seq: 2, type: "prompt.started", id: "p", at: 1000 });
  assert.deepEqual(m.waiting(1400), { prompt: "p", since: 1000, seconds: 0, phase: "model", stage: null, label: "Waiting for the model" }, "no sandbox (the echo runner)");
  m.apply({ seq: 3, type: "sandbox.status", stage: "spawning", detail: "asking the provider", at: 1010 });
  assert.deepEqual([m.waiting(3500).label, m.waiting(3500).seconds, m.waiting(3500).phase], ["Starting a sandbox", 2, "sandbox"]);
  m.apply({ seq: 4, type: "sandbox.status", stage: "syncing", detail: "fetching origin/main", at: 1100 });
  assert.equal(m.waiting(4000).label, "Syncing the repository");
  m.apply({ seq: 5, type: "sandbox.status", stage: "starting", detail: "starting OpenCode", at: 1200 });
  m.apply({ seq: 6, type: "sandbox.status", stage: "synced", detail: "abc", at: 1300 });
  assert.equal(m.waiting(5000).label, "Starting the agent", "synced beside a starting agent is not ready");
  m.apply({ seq: 7, type: "sandbox.status", stage: "ready", detail: "the agent is ready", at: 1400 });
  assert.deepEqual([m.waiting(13_999).phase, m.waiting(13_999).label, m.waiting(13_999).seconds], ["model", "Waiting for the model", 12]);
  assert.equal(m.waiting(500).seconds, 0, "never negative");
  m.apply({ seq: 8, type: "agent.text", prompt: "other", text: "stray" });
  assert.ok(m.waiting(14_000), "output of another prompt is not this one's");
  m.apply({ seq: 9, type: "agent.text", prompt: "p", text: "Hi" });
  assert.equal(m.waiting(14_000), null, "the first output ends the wait");
  m.apply({ seq: 10, type: "prompt.finished", id: "p", ok: true });
  assert.equal(m.waiting(15_000), null);
});

test("a follow-up waits for the model at once; after a lost sandbox it waits for a new one; any agent event ends the wait", () => {
  const m = new SessionModel();
  m.apply({ seq: 1, type: "sandbox.status", stage: "ready", detail: "" });
  m.apply(q(2, "a", 0, 0));
  m.apply({ seq: 3, type: "prompt.started", id: "a", at: 0 });
  assert.equal(m.waiting(10).label, "Waiting for the model");
  m.apply({ seq: 4, type: "agent.tool", prompt: "a", call: "c", tool: "read", status: "running" });
  assert.equal(m.waiting(10), null, "a tool call is output too");
  m.apply({ seq: 5, type: "prompt.finished", id: "a", ok: true });
  m.apply({ seq: 6, type: "sandbox.status", stage: "lost", detail: "" });
  m.apply(q(7, "b", 0, 1));
  m.apply({ seq: 8, type: "prompt.started", id: "b", at: 100 });
  assert.deepEqual([m.waiting(200).phase, m.waiting(200).label], ["sandbox", "Getting a sandbox"]);
  m.apply({ seq: 9, type: "sandbox.status", stage: "failed", detail: "clone failed" });
  assert.equal(m.waiting(300).label, "Sandbox failed", "a failure during the wait is shown as it is");
  m.apply({ seq: 10, type: "prompt.finished", id: "b", ok: false, reason: "sandbox_failed" });
  assert.equal(m.waiting(400), null);
  // Stopping a prompt before any output ends the wait too.
  m.apply(q(11, "c", 0, 2));
  m.apply({ seq: 12, type: "prompt.started", id: "c", at: 500 });
  assert.ok(m.waiting(600));
  m.apply({ seq: 13, type: "prompt.stopped", id: "c" });
  assert.equal(m.waiting(700), null);
});

const pr = (over = {}) => ({ repository: "acme/web", number: 7, url: "https://github.com/acme/web/pull/7", state: "open", draft: false, title: "Fix the login race", head: "nightshift/ses_1", base: "main", ...over });

test("the pull request card starts from the snapshot and follows pr.* events live", () => {
  const m = new SessionModel();
  m.seed({ last_seq: 0, pull_request: null, pull_request_action: null });
  assert.equal(m.prCard(), null, "no pull request, no action: no card");
  assert.deepEqual(m.apply({ seq: 1, type: "pr.opened", pull_request: pr() }), { pr: true });
  let c = m.prCard();
  assert.equal(c.pr.number, 7);
  assert.equal(c.pr.state, "open");
  assert.equal(c.pr.tone, "ok");
  assert.equal(c.pr.url, "https://github.com/acme/web/pull/7");
  assert.equal(c.pr.checks, "https://github.com/acme/web/pull/7/checks");
  assert.equal(c.action, null);
  m.apply({ seq: 2, type: "pr.updated", pull_request: pr({ title: "Fix the login race (v2)", draft: true }) });
  c = m.prCard();
  assert.equal(c.pr.title, "Fix the login race (v2)");
  assert.equal(c.pr.tone, "subtle", "a draft is subdued");
  // pr.merged says merged even when the object's state still says closed (GitHub's merged PRs are closed).
  m.apply({ seq: 3, type: "pr.merged", pull_request: pr({ state: "closed" }) });
  assert.equal(m.prCard().pr.state, "merged");
  assert.equal(m.prCard().pr.tone, "merged");
  // A replay of what was already applied changes nothing.
  assert.equal(m.apply({ seq: 2, type: "pr.updated", pull_request: pr() }), null);
  assert.equal(m.pullRequest.state, "merged");
});

test("pr.closed closes, a new pr.opened replaces it and clears the create-pull-request action", () => {
  const m = new SessionModel();
  m.apply({ seq: 1, type: "pr.opened", pull_request: pr() });
  m.apply({ seq: 2, type: "pr.closed", pull_request: pr() });
  assert.equal(m.prCard().pr.state, "closed");
  assert.equal(m.prCard().pr.tone, "bad");
  m.apply({ seq: 3, type: "pr.action", kind: "create_pull_request", url: "https://github.com/acme/web/compare/main...nightshift/ses_1?expand=1", reason: "Nightshift may not open pull requests in your name here" });
  let c = m.prCard();
  assert.equal(c.action.label, "Create pull request");
  assert.equal(c.action.url, "https://github.com/acme/web/compare/main...nightshift/ses_1?expand=1");
  assert.match(c.action.reason, /in your name/);
  m.apply({ seq: 4, type: "pr.opened", pull_request: pr({ number: 8, url: "https://github.com/acme/web/pull/8" }) });
  c = m.prCard();
  assert.equal(c.pr.number, 8);
  assert.equal(c.action, null, "the pull request exists now");
  assert.equal(m.prAction, null);
});

test("the snapshot's pull request is not undone by the replay of older events", () => {
  const m = new SessionModel();
  m.seed({ last_seq: 5, pull_request: pr({ state: "merged" }), pull_request_action: null });
  m.apply({ seq: 2, type: "pr.opened", pull_request: pr() });
  assert.equal(m.prCard().pr.state, "merged", "seq 2 is older than the snapshot");
  m.apply({ seq: 6, type: "pr.closed", pull_request: pr({ state: "closed" }) });
  assert.equal(m.prCard().pr.state, "closed", "newer than the snapshot: applied");
  const a = new SessionModel();
  a.seed({ last_seq: 3, pull_request: null, pull_request_action: { kind: "create_pull_request", url: "https://github.com/acme/web/compare/x", reason: "no permission" } });
  assert.equal(a.prCard().pr, null);
  assert.equal(a.prCard().action.url, "https://github.com/acme/web/compare/x");
});

test("links on the card are only http(s): a javascript: URL shows no link", () => {
  const m = new SessionModel();
  m.apply({ seq: 1, type: "pr.opened", pull_request: pr({ url: "javascript:alert(1)" }) });
  assert.equal(m.prCard().pr.url, null);
  assert.equal(m.prCard().pr.checks, null);
  m.apply({ seq: 2, type: "pr.action", kind: "create_pull_request", url: "javascript:alert(1)", reason: "x" });
  assert.equal(m.prCard().action, null);
  assert.equal(httpUrl("http://127.0.0.1:9/acme/web/pull/1"), "http://127.0.0.1:9/acme/web/pull/1");
  assert.equal(httpUrl("data:text/html,hi"), null);
  assert.equal(httpUrl(null), null);
});

test("the GitHub sign-in's landing fragment: token, expiry, and a return that stays on this site", () => {
  const hash = "#/signed-in?token=eyJ.sig&expires_at=1700000000000&return=%2F%23%2Fs%2Fses_1%3Finvite%3Dabc";
  assert.deepEqual(parseSignedIn(hash), { token: "eyJ.sig", expiresAt: 1700000000000, returnTo: "/#/s/ses_1?invite=abc" });
  assert.equal(parseSignedIn("#/signed-in?token=t&expires_at=1&return=%2F%2Fevil.example%2F").returnTo, "/");
  assert.equal(parseSignedIn("#/signed-in?token=t&return=https%3A%2F%2Fevil.example%2F").returnTo, "/");
  assert.equal(parseSignedIn("#/signed-in?token=t").expiresAt, null);
  assert.equal(parseSignedIn("#/signed-in?expires_at=1"), null, "no token: not a sign-in");
  assert.equal(parseSignedIn("#/s/ses_1"), null);
  assert.equal(parseSignedIn(""), null);
  for (const bad of ["", null, undefined, "relative", "//evil.example", "/\\evil.example", "https://evil.example/"]) assert.equal(safeReturn(bad), "/", String(bad));
  for (const ok of ["/", "/#/", "/#/s/ses_1?invite=x"]) assert.equal(safeReturn(ok), ok);
});

test("a token is renewed when less than ten minutes remain", () => {
  const now = 1_000_000_000;
  assert.equal(needsRenew(now + RENEW_BEFORE_MS + 1000, now), false);
  assert.equal(needsRenew(now + RENEW_BEFORE_MS - 1000, now), true);
  assert.equal(needsRenew(now - 1, now), true, "expired: try (the server decides)");
  assert.equal(needsRenew(null, now), false, "unknown expiry: wait for a 401");
  assert.equal(RENEW_BEFORE_MS, 600_000);
});

const received = (over = {}) => ({
  seq: 20, type: "pr.comment.received", at: 1, actor: { user: "carol", name: "carol" }, repository: "acme/web", number: 7, prompt: "prm_r",
  comments: [
    { id: 101, root: 101, author: "carol", path: "src/a.rs", lines: "L3-L5", body: "Capitalise it.", url: "https://github.com/acme/web/pull/7#discussion_r101" },
    { id: 102, root: 101, author: "dave", path: "src/a.rs", body: "Agreed.", url: "https://github.com/acme/web/pull/7#discussion_r102" },
    { id: 103, root: 103, author: "carol", body: "And the README, please.", url: "javascript:alert(1)" },
  ],
  ...over,
});

test("review comments received: the summary, where each comment is, cut bodies, only http(s) links", () => {
  const r = reviewReceived(received());
  assert.equal(r.summary, "Review on PR #7 — 3 comments from carol and dave (the prompt below answers them)");
  assert.deepEqual(r.authors, ["carol", "dave"]);
  assert.deepEqual(r.comments.map((c) => [c.author, c.path, c.lines]), [["carol", "src/a.rs", "L3-L5"], ["dave", "src/a.rs", null], ["carol", null, null]], "a conversation comment has no place");
  assert.equal(r.comments[0].url, "https://github.com/acme/web/pull/7#discussion_r101");
  assert.equal(r.comments[2].url, null, "a javascript: URL is no link");
  assert.equal(r.omitted, 0);
  assert.equal(r.omittedNote, null, "omitted is absent when nothing was left out");
  const one = reviewReceived(received({ comments: [{ id: 1, author: "carol", body: "x".repeat(1000), url: "http://127.0.0.1:9/x" }], omitted: 4 }));
  assert.equal(one.summary, "Review on PR #7 — 1 comment from carol (the prompt below answers them)");
  assert.equal(one.comments[0].body.length, REVIEW_CUT);
  assert.ok(one.comments[0].body.endsWith("…"));
  assert.equal(one.comments[0].url, "http://127.0.0.1:9/x");
  assert.equal(one.omittedNote, "4 more comments were left out of the prompt");
  assert.equal(reviewReceived(received({ omitted: 1 })).omittedNote, "1 more comment was left out of the prompt");
  const three = reviewReceived(received({ comments: ["a", "b", "c", "a"].map((author, id) => ({ id, author, body: "hi" })) }));
  assert.match(three.summary, /4 comments from a, b and c \(/);
  assert.equal(reviewReceived({ number: 7, comments: null }).comments.length, 0, "a malformed event draws an empty list, not an exception");
});

test("review comments addressed: the threads answered, in which commit or that nothing changed", () => {
  const a = reviewAddressed({ seq: 30, type: "pr.comment.addressed", number: 7, prompt: "prm_r", commit: "abc1234def5678", replies: [{ root: 101, body: "Addressed in `abc1234`: capitalised." }, { root: 103, body: "y".repeat(400) }] });
  assert.equal(a.summary, "Answered 2 threads on PR #7 in `abc1234`");
  assert.equal(a.threads, "Answered 2 threads on PR #7");
  assert.equal(a.commit, "abc1234");
  assert.deepEqual(a.replies[0], { root: 101, body: "Addressed in `abc1234`: capitalised." });
  assert.equal(a.replies[1].body.length, REVIEW_CUT);
  const none = reviewAddressed({ number: 7, prompt: "prm_r", replies: [{ root: 101, body: "Nothing to change: it already says so." }] });
  assert.equal(none.summary, "Answered 1 thread on PR #7; nothing changed");
  assert.equal(none.commit, null);
});

test("cut keeps short text, cuts long text on whole characters with an ellipsis", () => {
  assert.equal(cut("  short  "), "short");
  assert.equal(cut(null), "");
  assert.equal(cut("abcdef", 4), "abc…");
  assert.equal(cut("😀😀😀😀😀", 3), "😀😀…", "never half a surrogate pair");
  assert.equal(cut("x".repeat(REVIEW_CUT)).length, REVIEW_CUT, "exactly the limit is not cut");
});

test("the session model ties review comments to the prompt that answers them", () => {
  const m = new SessionModel();
  const r = m.apply(received());
  assert.equal(r.review.prompt, "prm_r");
  assert.deepEqual(m.reviewOf("prm_r"), { number: 7, count: 3, authors: ["carol", "dave"] });
  assert.equal(m.reviewOf("prm_other"), null);
  assert.equal(m.apply(q(21, "prm_r", 0, 0, "carol")).key, "p:prm_r");
  const a = m.apply({ seq: 22, type: "pr.comment.addressed", number: 7, prompt: "prm_r", replies: [{ root: 101, body: "done" }] });
  assert.equal(a.answered.summary, "Answered 1 thread on PR #7; nothing changed");
  assert.equal(m.apply(received({ seq: 20 })), null, "seen already");
});

test("the Slack link page: the workspace and the code from the hash, a damaged link refused before any request", () => {
  const code = "0123456789abcdef0123456789ABCDEF";
  assert.deepEqual(parseSlackLink(`#/slack/link/T0TEAM/${code}`), { ok: true, team: "T0TEAM", code });
  assert.deepEqual(parseSlackLink(`#/slack/link/T0TEAM/${code}/`), { ok: true, team: "T0TEAM", code }, "a trailing slash is fine");
  assert.deepEqual(parseSlackLink(`#/slack/link/T0TEAM/${code}?utm=x`), { ok: true, team: "T0TEAM", code }, "a query is ignored");
  assert.deepEqual(parseSlackLink(`/slack/link/T/${"f".repeat(64)}`), { ok: true, team: "T", code: "f".repeat(64) });
  assert.equal(parseSlackLink(`#/slack/link/${"T".repeat(32)}/ab`).ok, true, "32 characters of team");
  // Not this page at all.
  for (const h of ["", "#", "#/", "#/s/ses_1", "#/slack", "#/slack/linked/T/ab", "#/x/slack/link/T/ab", null, undefined]) assert.equal(parseSlackLink(h), null, String(h));
  // This page, but the link is damaged.
  for (const h of [
    "#/slack/link", "#/slack/link/", "#/slack/link/T0TEAM", "#/slack/link/T0TEAM/", "#/slack/link//abcd",
    `#/slack/link/T0TEAM/${code}/extra`, "#/slack/link/T0-TEAM/abcd", `#/slack/link/${"T".repeat(33)}/abcd`,
    "#/slack/link/T%20X/abcd", "#/slack/link/Tëam/abcd", "#/slack/link/T0TEAM/xyz", `#/slack/link/T0TEAM/${"a".repeat(65)}`,
    "#/slack/link/T0TEAM/ab%63", "#/slack/link/T0TEAM/<img>",
  ]) {
    const r = parseSlackLink(h);
    assert.equal(r?.ok, false, h);
    assert.match(r.error, /ask the Nightshift bot in Slack for a new one/, h);
  }
});

test("Slack settings to form rows: channel defaults in the answer's order, rules in theirs, missing parts empty", () => {
  assert.deepEqual(slackSettingsToRows({ team: "T1", channel_defaults: { C2: "api", C1: "web" }, routing_rules: [{ pattern: "billing", repository: "api" }, { pattern: "login page", repository: "web" }] }), {
    channels: [{ channel: "C2", repository: "api" }, { channel: "C1", repository: "web" }],
    rules: [{ pattern: "billing", repository: "api" }, { pattern: "login page", repository: "web" }],
  });
  assert.deepEqual(slackSettingsToRows({ team: "T1" }), { channels: [], rules: [] });
  assert.deepEqual(slackSettingsToRows(null), { channels: [], rules: [] });
  assert.deepEqual(slackSettingsToRows({ channel_defaults: [], routing_rules: {} }).rules, []);
});

test("form rows to Slack settings: trimmed, empty rows dropped, rule order kept, half rows and duplicate channels refused", () => {
  const ok = slackRowsToSettings({
    channels: [{ channel: " C123 ", repository: " web " }, { channel: "", repository: "" }, { channel: "  ", repository: " " }, { channel: "C9", repository: "api" }],
    rules: [{ pattern: "  billing  ", repository: "api" }, { pattern: "", repository: "" }, { pattern: "login page", repository: " web" }],
  });
  assert.deepEqual(ok, { ok: true, settings: { channel_defaults: { C123: "web", C9: "api" }, routing_rules: [{ pattern: "billing", repository: "api" }, { pattern: "login page", repository: "web" }] } });
  assert.equal("team" in ok.settings, false, "the team is the server's to set");
  assert.deepEqual(slackRowsToSettings({ channels: [], rules: [] }), { ok: true, settings: { channel_defaults: {}, routing_rules: [] } });
  assert.deepEqual(slackRowsToSettings({}), { ok: true, settings: { channel_defaults: {}, routing_rules: [] } });
  // Round trip.
  const s = { channel_defaults: { C1: "web" }, routing_rules: [{ pattern: "billing", repository: "api" }] };
  assert.deepEqual(slackRowsToSettings(slackSettingsToRows({ team: "T1", ...s })), { ok: true, settings: s });

  const refused = (rows, re) => {
    const r = slackRowsToSettings(rows);
    assert.equal(r.ok, false, JSON.stringify(rows));
    assert.match(r.error, re);
  };
  refused({ channels: [{ channel: "C1", repository: "web" }, { channel: " C1", repository: "api" }] }, /C1 is listed twice/);
  refused({ channels: [{ channel: "C1", repository: "" }] }, /Channel C1: choose its repository/);
  refused({ channels: [{ channel: "", repository: "web" }] }, /Channel default 1: write the channel id/);
  refused({ channels: [{ channel: "#general", repository: "web" }] }, /"#general" is not a Slack channel id/);
  refused({ channels: [{ channel: "C".repeat(33), repository: "web" }] }, /is not a Slack channel id/);
  refused({ channels: [{ channel: "__proto__", repository: "web" }] }, /is not a Slack channel id/);
  refused({ rules: [{ pattern: "billing", repository: "api" }, { pattern: "deploy", repository: " " }] }, /Rule 2 \("deploy"\): choose its repository/);
  refused({ rules: [{ pattern: " ", repository: "api" }] }, /Rule 1: write the words/);
});
