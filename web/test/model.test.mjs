// Unit tests of the browser's session model (node --test).
import { test } from "node:test";
import assert from "node:assert/strict";
import { SessionModel, editDiff } from "../src/model.js";

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
