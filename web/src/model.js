// Nightshift web app: the session as the browser knows it, rebuilt from the ordered event log (pure; no DOM).

export class SessionModel {
  constructor() {
    this.prompts = new Map();
    this.running = null;
    this.locks = new Map();
    this.stage = null; // the latest sandbox.status stage, sync stages included
    this.lifecycle = null; // the latest stage of the sandbox itself (spawning … ready, lost …), sync stages aside
    this.lifecycleSeq = 0;
    this.runStartedAt = null; // server time the running prompt started
    this.runSeq = 0;
    this.heard = false; // the running prompt has had agent output
    this.tools = new Map();
    this.lastSeq = 0;
    this.files = new Map(); // prompt id -> Set of files its completed write/edit tools changed
    this.children = new Map(); // background agent id -> what the parent knows of it
    this.textBlock = null; // { key, prompt, text } while agent text keeps coming
    this.blocks = 0;
    this.pullRequest = null; // the session's pull request: {repository, number, url, state, draft, title, head, base}
    this.prAction = null; // what the person can do when it could not be opened in their name: {kind, url, reason}
    this.prSeq = 0; // the log position the pull request state is as of (the snapshot's, then each pr.* event's)
    this.reviews = new Map(); // prompt id -> the review comments it answers: {number, count, authors}
  }

  /** Takes the pull request state of a `GET /sessions/:id` snapshot (as of its `last_seq`). */
  seed(snap) {
    this.pullRequest = snap?.pull_request ?? null;
    this.prAction = snap?.pull_request_action ?? null;
    this.prSeq = snap?.last_seq ?? 0;
  }

  /** Queued prompts in the order they will run: priority (high first), then arrival. */
  queued() {
    return [...this.prompts.values()]
      .filter((p) => p.status === "queued")
      .sort((a, b) => b.priority - a.priority || a.arrival - b.arrival);
  }

  /**
   * Applies one event (in sequence order; an event already seen is ignored). Returns what the
   * view should draw: `{key?, ...}` for a row (a `key` row replaces the earlier row with that
   * key), `{statusOf, status}` to restate a prompt's status, or null when nothing is drawn.
   */
  apply(e) {
    if (e.seq <= this.lastSeq) return null;
    this.lastSeq = e.seq;
    if (e.type !== "agent.text") this.textBlock = null;
    if (e.type.startsWith("agent.") && this.running && (e.prompt == null || e.prompt === this.running)) this.heard = true;
    switch (e.type) {
      case "prompt.queued": {
        const p = { ...e.prompt, status: "queued" };
        this.prompts.set(p.id, p);
        return { key: "p:" + p.id, status: "queued" };
      }
      case "prompt.started":
        return this.status(e.id, "running", () => {
          this.running = e.id;
          this.runStartedAt = e.at ?? null;
          this.runSeq = e.seq;
          this.heard = false;
        });
      case "prompt.reprioritized": {
        const p = this.prompts.get(e.id);
        if (p) p.priority = e.priority;
        return null;
      }
      case "prompt.cancelled":
        return this.status(e.id, "cancelled");
      case "prompt.stopped":
        return this.status(e.id, "stopped");
      case "prompt.finished":
        return this.status(e.id, e.ok ? "done" : "failed");
      case "agent.text": {
        if (this.textBlock && this.textBlock.prompt === e.prompt) {
          this.textBlock.text += e.text;
        } else {
          this.blocks += 1;
          this.textBlock = { key: `t:${this.blocks}`, prompt: e.prompt, text: e.text };
        }
        return { key: this.textBlock.key, text: this.textBlock.text };
      }
      case "agent.tool": {
        const t = { ...(this.tools.get(e.call) || {}), ...stripNull(e) };
        this.tools.set(e.call, t);
        const path = t.input?.filePath;
        if (t.status === "completed" && path && WRITES.includes(t.tool)) {
          if (!this.files.has(e.prompt)) this.files.set(e.prompt, new Set());
          this.files.get(e.prompt).add(path);
        }
        return { key: "tool:" + e.call, tool: t };
      }
      case "lock.acquired":
        this.locks.set(e.resource, { resource: e.resource, holder: e.holder, expires_at: e.expires_at });
        return null;
      case "lock.released":
        this.locks.delete(e.resource);
        return null;
      case "sandbox.status":
        this.stage = e.stage;
        if (!SYNC_STAGES.includes(e.stage)) {
          this.lifecycle = e.stage;
          this.lifecycleSeq = e.seq;
        }
        return {};
      case "background.child": {
        const c = { ...(this.children.get(e.id) || {}), ...stripNull(e) };
        this.children.set(e.id, c);
        return { key: "bg:" + e.id, child: c };
      }
      case "pr.opened":
      case "pr.updated":
      case "pr.merged":
      case "pr.closed":
        if (e.seq > this.prSeq && e.pull_request) {
          this.prSeq = e.seq;
          const state = e.type === "pr.merged" ? "merged" : e.type === "pr.closed" && e.pull_request.state !== "merged" ? "closed" : e.pull_request.state;
          this.pullRequest = { ...e.pull_request, state };
          if (e.type === "pr.opened") this.prAction = null;
        }
        return { pr: true };
      case "pr.action":
        if (e.seq > this.prSeq) {
          this.prSeq = e.seq;
          this.prAction = { kind: e.kind, url: e.url, reason: e.reason ?? null };
        }
        return { pr: true };
      case "pr.comment.received": {
        const review = reviewReceived(e);
        if (e.prompt) this.reviews.set(e.prompt, { number: review.number, count: review.comments.length, authors: review.authors });
        return { review };
      }
      case "pr.comment.addressed":
        return { answered: reviewAddressed(e) };
      case "session.created":
      case "presence":
        return null;
      default:
        return {};
    }
  }

  /**
   * What the person waits for between the running prompt's start and its first agent output, or
   * null when nothing is awaited: `{prompt, phase, stage, label, since, seconds}`. `phase` is
   * "sandbox" while the sandbox is on its way (label: its current stage) and "model" once it is
   * ready (or when prompts run without one) — "Waiting for the model". `now` is the clock in ms.
   */
  waiting(now) {
    if (!this.running || this.heard) return null;
    const since = this.runStartedAt;
    const seconds = since == null ? 0 : Math.max(0, Math.floor((now - since) / 1000));
    const base = { prompt: this.running, since, seconds };
    const stage = this.lifecycle;
    if (stage == null || stage === "ready") {
      return { ...base, phase: "model", stage, label: "Waiting for the model" };
    }
    // A sandbox that was gone before this prompt started is being replaced.
    if (GONE_STAGES.includes(stage) && this.lifecycleSeq < this.runSeq) {
      return { ...base, phase: "sandbox", stage: "spawning", label: "Getting a sandbox" };
    }
    const shown = this.stage === "syncing" ? "syncing" : stage;
    return { ...base, phase: "sandbox", stage: shown, label: STAGES[shown] || shown };
  }

  status(id, status, also) {
    const p = this.prompts.get(id);
    if (p) p.status = status;
    if (this.running === id && status !== "running") this.running = null;
    also?.();
    return { statusOf: id, status };
  }
}

/**
 * What the pull request card shows, or null when there is neither a pull request nor an action:
 * `{pr: {number, title, state, tone, draft, url, checks, repository, head, base} | null, action: {label, url, reason} | null}`.
 * Links are only http(s) URLs (anything else shows no link).
 */
SessionModel.prototype.prCard = function () {
  const p = this.pullRequest;
  const a = this.prAction;
  const pr = p ? {
    number: p.number,
    title: p.title || "",
    state: p.state,
    tone: p.state === "merged" ? "merged" : p.state === "closed" ? "bad" : p.draft ? "subtle" : "ok",
    draft: !!p.draft,
    url: httpUrl(p.url),
    checks: httpUrl(p.url) ? httpUrl(p.url).replace(/\/+$/, "") + "/checks" : null,
    repository: p.repository || "",
    head: p.head || "",
    base: p.base || "",
  } : null;
  const showAction = a && a.kind === "create_pull_request" && httpUrl(a.url) && !(p && p.state === "open");
  const action = showAction ? { label: "Create pull request", url: httpUrl(a.url), reason: a.reason || "" } : null;
  return pr || action ? { pr, action } : null;
};

/** The review comments a prompt answers (from the `pr.comment.received` before it), or null. */
SessionModel.prototype.reviewOf = function (prompt) {
  return this.reviews.get(prompt) || null;
};

/** How much of a review comment's (or reply's) text the log shows. */
export const REVIEW_CUT = 300;

/** `s` as text, at most `n` characters (whole code points; "…" marks a cut). */
export function cut(s, n = REVIEW_CUT) {
  const chars = Array.from(String(s ?? "").trim());
  return chars.length <= n ? chars.join("") : chars.slice(0, Math.max(0, n - 1)).join("").trimEnd() + "…";
}

/** "1 comment", "3 comments". */
function count(n, one, many = one + "s") {
  return `${n} ${n === 1 ? one : many}`;
}

/** "carol", "carol and dave", "carol, dave and erin". */
function names(list) {
  return list.length <= 1 ? list.join("") : `${list.slice(0, -1).join(", ")} and ${list[list.length - 1]}`;
}

/**
 * What the log shows of a `pr.comment.received`: `{number, repository, prompt, authors, summary,
 * comments: [{id, author, path, lines, body, url}], omitted, omittedNote}`. Bodies are cut, `path`
 * and `lines` are null on a conversation comment, `url` is null unless it is http(s); all text
 * is still untrusted (the view escapes it).
 */
export function reviewReceived(e) {
  const comments = (Array.isArray(e?.comments) ? e.comments : []).map((c) => ({
    id: c?.id ?? null,
    author: String(c?.author ?? ""),
    path: c?.path ? String(c.path) : null,
    lines: c?.path && c?.lines ? String(c.lines) : null,
    body: cut(c?.body),
    url: httpUrl(c?.url),
  }));
  const authors = [...new Set(comments.map((c) => c.author).filter(Boolean))];
  const omitted = Number.isFinite(e?.omitted) && e.omitted > 0 ? e.omitted : 0;
  const from = authors.length ? ` from ${names(authors)}` : "";
  return {
    number: e?.number ?? null,
    repository: String(e?.repository ?? ""),
    prompt: e?.prompt ?? null,
    authors,
    summary: `Review on PR #${e?.number ?? "?"} — ${count(comments.length, "comment")}${from} (the prompt below answers them)`,
    comments,
    omitted,
    omittedNote: omitted ? `${omitted === 1 ? "1 more comment was" : `${omitted} more comments were`} left out of the prompt` : null,
  };
}

/**
 * What the log shows of a `pr.comment.addressed`: `{number, prompt, threads, commit, summary,
 * replies: [{root, body}]}`. `commit` is the short (7) hash or null when nothing changed;
 * `threads` is "Answered 3 threads on PR #7" and `summary` the whole line as plain text.
 */
export function reviewAddressed(e) {
  const replies = (Array.isArray(e?.replies) ? e.replies : []).map((r) => ({ root: r?.root ?? null, body: cut(r?.body) }));
  const commit = e?.commit ? String(e.commit).slice(0, 7) : null;
  const threads = `Answered ${count(replies.length, "thread")} on PR #${e?.number ?? "?"}`;
  return {
    number: e?.number ?? null,
    prompt: e?.prompt ?? null,
    threads,
    commit,
    summary: commit ? `${threads} in \`${commit}\`` : `${threads}; nothing changed`,
    replies,
  };
}

/** `u` when it is an http(s) URL, else null (never a `javascript:` link). */
export function httpUrl(u) {
  try {
    const url = new URL(String(u));
    return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
  } catch {
    return null;
  }
}

/** Where to go after signing in: a local path ("/…", not "//…" nor with a backslash), else "/". */
export function safeReturn(path) {
  const p = String(path ?? "");
  return p.startsWith("/") && !p.startsWith("//") && !p.includes("\\") ? p : "/";
}

/**
 * Reads the GitHub sign-in's landing fragment `#/signed-in?token=…&expires_at=…&return=…`:
 * `{token, expiresAt, returnTo}`, or null when `hash` is not that page (or has no token).
 */
export function parseSignedIn(hash) {
  const h = String(hash ?? "").replace(/^#/, "");
  const [path, query] = h.split(/\?(.*)/s);
  if (path !== "/signed-in") return null;
  const q = new URLSearchParams(query || "");
  const token = q.get("token");
  if (!token) return null;
  const exp = Number(q.get("expires_at"));
  return { token, expiresAt: Number.isFinite(exp) && exp > 0 ? exp : null, returnTo: safeReturn(q.get("return")) };
}

/** How long before its expiry a token is renewed. */
export const RENEW_BEFORE_MS = 10 * 60 * 1000;

/** Whether a token expiring at `expiresAt` (ms; null: not known) should be renewed at `now`. */
export function needsRenew(expiresAt, now) {
  return expiresAt != null && expiresAt - now < RENEW_BEFORE_MS;
}

/** What each `sandbox.status` stage means to a person. */
export const STAGES = { spawning: "Starting a sandbox", starting: "Starting the agent", syncing: "Syncing the repository", synced: "Repository synced", sync_failed: "Repository sync failed", ready: "Ready", stopped: "Sandbox stopped", terminated: "Sandbox terminated", lost: "Sandbox lost", failed: "Sandbox failed" };

/** Stages about the checkout's sync, which runs beside the agent's start. */
const SYNC_STAGES = ["syncing", "synced", "sync_failed"];

/** Stages after which the next prompt needs another sandbox (or the stopped one started again). */
const GONE_STAGES = ["stopped", "terminated", "lost", "failed"];

/** Tools whose input names a file they change. */
const WRITES = ["write", "edit", "patch", "multiedit"];

/** The files a prompt changed, in the order they were first changed. */
SessionModel.prototype.filesOf = function (prompt) {
  return [...(this.files.get(prompt) || [])];
};

/** A unified-style diff of an edit's old and new text (lines only; enough to review at a glance). */
export function editDiff(oldText, newText) {
  const a = String(oldText ?? "").split("\n");
  const b = String(newText ?? "").split("\n");
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) start++;
  let endA = a.length - 1;
  let endB = b.length - 1;
  while (endA >= start && endB >= start && a[endA] === b[endB]) { endA--; endB--; }
  const out = [];
  for (const l of a.slice(Math.max(0, start - 1), start)) out.push({ kind: " ", text: l });
  for (const l of a.slice(start, endA + 1)) out.push({ kind: "-", text: l });
  for (const l of b.slice(start, endB + 1)) out.push({ kind: "+", text: l });
  for (const l of a.slice(endA + 1, endA + 2)) out.push({ kind: " ", text: l });
  return out;
}

function stripNull(o) {
  const out = {};
  for (const [k, v] of Object.entries(o)) if (v !== null && v !== undefined) out[k] = v;
  return out;
}

// ---- Slack ---------------------------------------------------------------------------

/** A Slack workspace (`T…`) or channel (`C…`) id as the link and the settings take it. */
const SLACK_ID = /^[A-Za-z0-9]{1,32}$/;
/** A one-time link code: the bot's random hex. */
const SLACK_CODE = /^[0-9a-fA-F]{1,64}$/;

/**
 * Reads the Slack bot's one-time link `#/slack/link/<team>/<code>`: null when `hash` is not that
 * page, `{ok: true, team, code}` when the link is well formed, else `{ok: false, error}` (what is
 * wrong with it, to show without asking the server).
 */
export function parseSlackLink(hash) {
  const path = String(hash ?? "").replace(/^#/, "").split("?")[0];
  const parts = path.split("/");
  if (parts[0] !== "" || parts[1] !== "slack" || parts[2] !== "link") return null;
  const rest = parts.slice(3);
  if (rest.length === 3 && rest[2] === "") rest.pop(); // a trailing slash
  const broken = "This link is incomplete or damaged: ask the Nightshift bot in Slack for a new one.";
  if (rest.length !== 2) return { ok: false, error: broken };
  const [team, code] = rest;
  if (!SLACK_ID.test(team)) return { ok: false, error: `${broken} (The workspace id is not 1 to 32 letters and digits.)` };
  if (!SLACK_CODE.test(code)) return { ok: false, error: `${broken} (The code is not 1 to 64 hexadecimal characters.)` };
  return { ok: true, team, code };
}

/**
 * The form rows of `GET /slack/settings`' answer: `{channels: [{channel, repository}], rules:
 * [{pattern, repository}]}`, channels in the answer's order, rules in theirs (which matters).
 */
export function slackSettingsToRows(settings) {
  const defaults = settings?.channel_defaults && typeof settings.channel_defaults === "object" ? settings.channel_defaults : {};
  const rules = Array.isArray(settings?.routing_rules) ? settings.routing_rules : [];
  return {
    channels: Object.entries(defaults).map(([channel, repository]) => ({ channel: String(channel), repository: String(repository ?? "") })),
    rules: rules.map((r) => ({ pattern: String(r?.pattern ?? ""), repository: String(r?.repository ?? "") })),
  };
}

/**
 * The body of `PUT /slack/settings` from the form rows: each field trimmed, rows left wholly empty
 * dropped, rules kept in order. `{ok: true, settings}`, or `{ok: false, error}` for a row half
 * filled in, a channel id that is not one, or a channel listed twice.
 */
export function slackRowsToSettings(rows) {
  const text = (v) => String(v ?? "").trim();
  const channel_defaults = {};
  let n = 0;
  for (const row of rows?.channels || []) {
    n += 1;
    const channel = text(row?.channel);
    const repository = text(row?.repository);
    if (!channel && !repository) continue;
    if (!channel) return { ok: false, error: `Channel default ${n}: write the channel id (C…).` };
    if (!SLACK_ID.test(channel)) return { ok: false, error: `Channel default ${n}: "${channel}" is not a Slack channel id (letters and digits, like C0123ABCD).` };
    if (!repository) return { ok: false, error: `Channel ${channel}: choose its repository.` };
    if (Object.hasOwn(channel_defaults, channel)) return { ok: false, error: `Channel ${channel} is listed twice: keep one row for it.` };
    channel_defaults[channel] = repository;
  }
  const routing_rules = [];
  n = 0;
  for (const row of rows?.rules || []) {
    n += 1;
    const pattern = text(row?.pattern);
    const repository = text(row?.repository);
    if (!pattern && !repository) continue;
    if (!pattern) return { ok: false, error: `Rule ${n}: write the words a request must contain.` };
    if (!repository) return { ok: false, error: `Rule ${n} ("${pattern}"): choose its repository.` };
    routing_rules.push({ pattern, repository });
  }
  return { ok: true, settings: { channel_defaults, routing_rules } };
}
