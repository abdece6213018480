// Nightshift web app: sign-in (GitHub or local dev), sessions list, new session, the live session view, and the Slack pages (account link, settings).

import { api, auth, ApiError, SessionSocket, keepSignedIn, renewIfDue, signOut } from "./api.js";
import { SessionModel, STAGES, editDiff, parseSignedIn, parseSlackLink, slackRowsToSettings, slackSettingsToRows } from "./model.js";

const $ = (sel, root = document) => root.querySelector(sel);
const main = $("#main");

export function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function toast(msg, kind = "info") {
  const t = $("#toast");
  t.textContent = msg;
  t.className = `toast show ${kind}`;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.className = "toast"), 5000);
}

function explain(e) {
  if (e instanceof ApiError) return `${e.message} (${e.code})`;
  return String(e?.message || e);
}

/** Runs an action with a busy state on its button and a clear error if it fails. */
async function act(button, fn) {
  const label = button?.textContent;
  if (button) { button.disabled = true; button.setAttribute("aria-busy", "true"); }
  try { return await fn(); } catch (e) { toast(explain(e), "error"); if (e.status === 401) route(); } finally {
    if (button) { button.disabled = false; button.removeAttribute("aria-busy"); if (label) button.textContent = label; }
  }
}

let current = null; // the open session view (closed on navigation)
let routed = 0; // counts navigations: a page still loading when another began draws nothing

function parseHash() {
  const h = location.hash.replace(/^#/, "") || "/";
  const [path, query] = h.split("?");
  return { parts: path.split("/").filter(Boolean), query: new URLSearchParams(query || "") };
}

async function route() {
  routed += 1;
  current?.close();
  current = null;
  const landed = parseSignedIn(location.hash);
  if (landed) return signedIn(landed);
  renderWho();
  const { parts, query } = parseHash();
  if (parts[0] === "installed") return installed(query);
  const slack = parseSlackLink(location.hash);
  if (slack) return slackLink(slack);
  if (!auth.token) return signIn();
  if (parts[0] === "s" && parts[1]) return openSession(parts[1], query.get("invite"));
  if (parts[0] === "settings" && parts[1] === "slack") return slackSettings();
  return sessionsList();
}

/**
 * The landing page of the GitHub sign-in (`#/signed-in?token&expires_at&return`): keeps the
 * token, learns who it is for, takes the token out of the address (and history), goes on.
 */
async function signedIn({ token, expiresAt, returnTo }) {
  history.replaceState(null, "", "/#/signed-in");
  main.innerHTML = `<section class="card narrow"><p aria-busy="true" class="muted">Signing you in…</p></section>`;
  auth.set(token, null, expiresAt);
  try {
    auth.setUser(await api("GET", "/auth/me"));
  } catch (e) {
    auth.clear();
    history.replaceState(null, "", "/#/");
    await route();
    toast(`Sign-in did not finish: ${explain(e)}`, "error");
    return;
  }
  history.replaceState(null, "", returnTo);
  renewIfDue();
  route();
}

function renderWho() {
  const u = auth.token ? auth.user : null;
  $("#whoami").innerHTML = u
    ? `<span class="avatar sm" data-color="${esc(colorFor(u.user))}">${esc(initials(u.name || u.user))}</span><span id="me" data-user="${esc(u.user)}">${esc(u.name || u.user)}</span> <button class="link" id="signout">Sign out</button>`
    : "";
  $("#signout")?.addEventListener("click", (ev) => act(ev.currentTarget, async () => {
    await signOut();
    history.replaceState(null, "", "/#/");
    route();
  }));
}

/** The path to come back to after signing in: the page the person asked for. */
function hereAsReturn() {
  const h = location.hash;
  return h && h !== "#" && h !== "#/" ? "/" + h : "/";
}

/**
 * Where GitHub's Setup URL lands (`/github/setup` → `#/installed?installation=&action=`): the App
 * is on the organisation now; what is left is registering a repository.
 */
function installed(query) {
  const id = query.get("installation");
  const updated = query.get("action") === "update";
  const next = auth.token
    ? `<a class="button primary" href="#/">Go to your sessions</a>`
    : `<a class="button primary" href="#/">Sign in</a>`;
  main.innerHTML = `<section class="card narrow" id="installed"><h1>${updated ? "Installation updated" : "Nightshift is installed"}</h1>
    <p>${updated ? "GitHub saved the repositories Nightshift may use" : "GitHub installed the Nightshift App"}${id ? ` (installation <code>${esc(id)}</code>)` : ""}.</p>
    <p>Next, someone with admin or maintain permission registers each repository: <code>POST /repositories</code> with <code>{"name": "web", "github": "owner/repo"}</code> (the README's "Deploy for a team", step 8). Sessions can then start on it.</p>
    ${next}</section>`;
}

/**
 * The sign-in page; it comes back to the page asked for (`intro`: `{title, text}` says why a
 * page needs it, above the options).
 */
async function signIn(intro = null) {
  const title = esc(intro?.title || "Sign in");
  const why = intro ? `<p id="signin-why">${esc(intro.text)}</p>` : "";
  main.innerHTML = `<section class="card narrow"><h1>${title}</h1>${why}<p class="muted" aria-busy="true">Loading the sign-in options…</p></section>`;
  const at = routed;
  let options;
  try { options = await api("GET", "/auth/config"); } catch (e) {
    if (at !== routed) return;
    main.innerHTML = `<section class="card narrow"><h1>${title}</h1>${why}<p>${esc(explain(e))}</p><button class="button" id="retry">Try again</button></section>`;
    $("#retry").addEventListener("click", () => route());
    return;
  }
  if (at !== routed) return;
  if (auth.token) return route(); // signed in meanwhile (another tab)
  const github = options.github
    ? `<a class="button primary github" id="github-signin" href="/auth/github/start?return=${encodeURIComponent(hereAsReturn())}">Sign in with GitHub</a>`
    : "";
  const none = !options.github && !options.dev
    ? `<p>No sign-in is configured on this deployment: its operator sets up the GitHub App (see the README).</p>`
    : "";
  main.innerHTML = `
    <section class="card narrow">
      <h1>${title}</h1>${why}
      ${github}${none}
      ${options.dev ? `<h2>Local development</h2>
      <p class="muted">Dev sign-in (this machine only): pick any name.</p>
      <form id="signin" class="stack">
        <label>Your name <input name="name" required maxlength="60" autocomplete="name" placeholder="Ada Lovelace"></label>
        <label>Handle <input name="user" required maxlength="40" pattern="[a-zA-Z0-9_.\\-]+" placeholder="ada" title="letters, digits, . _ -"></label>
        <label>Email (for your commits) <input name="email" type="email" maxlength="120" placeholder="ada@example.com"></label>
        <button class="${options.github ? "" : "primary"}" type="submit">Sign in</button>
      </form>` : ""}
    </section>`;
  if (!options.dev) { $("#github-signin")?.focus(); return; }
  $("#signin").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    act(ev.submitter, async () => {
      const body = { user: f.get("user"), name: f.get("name") };
      if (f.get("email")) body.email = f.get("email");
      const r = await api("POST", "/auth/dev", body);
      auth.set(r.token, r.user, r.expires_at);
      renewIfDue();
      route();
    });
  });
  $("input[name=name]").focus();
}

async function sessionsList() {
  main.innerHTML = `<section class="card"><h1>Sessions</h1><p class="muted" aria-busy="true">Loading your sessions…</p></section>`;
  let list;
  // Registered repositories start sessions on warm sandboxes; suggest them first.
  const registered = api("GET", "/repositories").then((r) => r.repositories || [], () => []);
  try { list = (await api("GET", "/sessions")).sessions || []; } catch (e) { toast(explain(e), "error"); if (e.status === 401) return route(); list = []; }
  const repos = await registered;
  const mine = list.filter((s) => s.role === "owner");
  const shared = list.filter((s) => s.role !== "owner");
  const byRepo = new Map();
  for (const s of list) {
    const k = s.repository || "(no repository)";
    byRepo.set(k, (byRepo.get(k) || 0) + 1);
  }
  const item = (s) => `<li><a href="#/s/${esc(s.id)}"><strong>${esc(s.title)} <span class="pill ${s.status === "ended" ? "subtle" : "ok"}">${esc(s.status || "active")}</span></strong><span class="muted">${esc(s.repository || "no repository")}</span></a></li>`;
  main.innerHTML = `
    <section class="card">
      <h1>New session</h1>
      <form id="new" class="stack">
        <label>Title <input name="title" required maxlength="200" placeholder="Fix the flaky login test"></label>
        <label>Repository (a registered name, a clone URL or a local path) <input name="repository" maxlength="1000" placeholder="/path/to/repo" list="repos"></label>
        <datalist id="repos">${repos.map((r) => `<option value="${esc(r.repository.name)}" label="registered · ${r.pool.ready} warm">`).join("")}${[...byRepo.keys()].filter((r) => r !== "(no repository)" && !repos.some((x) => x.repository.name === r)).map((r) => `<option value="${esc(r)}">`).join("")}</datalist>
        <label>First prompt <textarea name="prompt" rows="3" maxlength="20000" placeholder="What should the agent do?"></textarea></label>
        <button class="primary" type="submit">Start session</button>
      </form>
    </section>
    <section class="card">
      <h2>Mine <span class="count">${mine.length}</span></h2>
      ${mine.length ? `<ul class="sessions">${mine.map(item).join("")}</ul>` : `<p class="muted">No sessions yet: start one above.</p>`}
      <h2>Shared with me <span class="count">${shared.length}</span></h2>
      ${shared.length ? `<ul class="sessions">${shared.map(item).join("")}</ul>` : `<p class="muted">Nobody has shared a session with you yet.</p>`}
      <h2>By repository</h2>
      <ul class="repos">${[...byRepo].map(([r, n]) => `<li><code>${esc(r)}</code> <span class="count">${n}</span></li>`).join("") || `<li class="muted">—</li>`}</ul>
      <p class="muted page-links"><a id="slack-settings-link" href="#/settings/slack">Slack settings</a></p>
    </section>`;
  $("#new").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    act(ev.submitter, async () => {
      const body = { title: f.get("title") };
      if (f.get("repository")) body.repository = f.get("repository");
      const s = await api("POST", "/sessions", body);
      const text = String(f.get("prompt") || "").trim();
      if (text) await api("POST", `/multiplayer/${s.id}/prompt`, { text });
      location.hash = `#/s/${s.id}`;
    });
  });
}

// ---- Slack ---------------------------------------------------------------------------

/**
 * The page the Slack bot's one-time link opens (`#/slack/link/<team>/<code>`): signed out, why
 * and the sign-in (which comes back here); signed in, the button that links the Slack account.
 */
function slackLink(link) {
  if (!link.ok) {
    main.innerHTML = `<section class="card narrow" id="slack-link-page"><h1>Link your Slack account to Nightshift</h1>
      <p class="bad" id="slack-link-error" role="alert">${esc(link.error)}</p>
      <a class="button" href="#/">Go to your sessions</a></section>`;
    return;
  }
  const why = "The Nightshift bot in Slack does not know who you are yet. Sign in, then link your Slack account: what you ask the bot then runs as you, on the repositories you may use.";
  if (!auth.token) return signIn({ title: "Link your Slack account to Nightshift", text: why });
  const { team, code } = link;
  const u = auth.user;
  main.innerHTML = `<section class="card narrow" id="slack-link-page"><h1>Link your Slack account to Nightshift</h1>
    <p>This links the Slack account that got this link (workspace <code>${esc(team)}</code>) to you${u ? `, <strong>${esc(u.name || u.user)}</strong>` : ""}: what it asks the bot then runs as you, on the repositories you may use.</p>
    <div id="slack-link-result" aria-live="polite"></div>
    <button class="primary" id="slack-link">Link my Slack account</button></section>`;
  const out = $("#slack-link-result");
  $("#slack-link").addEventListener("click", (ev) => {
    const button = ev.currentTarget;
    act(button, async () => {
      let r;
      try {
        r = await api("POST", "/slack/link", { team, code });
      } catch (e) {
        if (e.status === 401) throw e; // signed out meanwhile: act signs in again
        const next = e.code === "slack_link_unknown"
          ? "Ask the Nightshift bot again in Slack: it answers with a fresh link."
          : "Try again in a moment; if it keeps failing, ask the bot in Slack for a new link.";
        out.innerHTML = `<p class="bad" id="slack-link-error" role="alert">${esc(e.code === "slack_link_unknown" ? e.message : explain(e))}</p><p class="muted">${esc(next)}</p>`;
        return;
      }
      button.remove(); // the code works once
      out.innerHTML = `<p class="ok" id="slack-linked" role="status">${r?.resumed ? "Linked. Go back to Slack: your request is starting." : "Linked."}</p>
        <p class="muted">Slack account <code>${esc(r?.slack_user)}</code> in workspace <code>${esc(r?.team || team)}</code> is now yours in Nightshift.</p>
        <a class="button" href="#/">Go to your sessions</a>`;
    });
  });
}

const SLACK_NOT_CONFIGURED = "Slack is not set up for this deployment: see the README's Slack section.";

/** `#/settings/slack`: each channel's default repository and the ordered routing rules. */
async function slackSettings() {
  main.innerHTML = `<section class="card" id="slack-settings"><h1>Slack settings</h1><p class="muted" aria-busy="true">Loading the Slack settings…</p></section>`;
  const at = routed;
  const registered = api("GET", "/repositories").then((r) => r.repositories || [], () => []);
  let settings;
  try { settings = await api("GET", "/slack/settings"); } catch (e) {
    if (at !== routed) return;
    if (e.status === 401) return route();
    const text = e.code === "slack_not_configured" ? SLACK_NOT_CONFIGURED : explain(e);
    main.innerHTML = `<section class="card narrow" id="slack-settings"><h1>Slack settings</h1>
      <p class="bad" id="slack-settings-error" role="alert">${esc(text)}</p>
      ${e.code === "slack_not_configured" ? "" : `<button class="button" id="retry">Try again</button> `}<a class="button" href="#/">All sessions</a></section>`;
    $("#retry")?.addEventListener("click", () => route());
    return;
  }
  const names = (await registered).map((r) => r.repository?.name).filter(Boolean);
  if (at !== routed) return;
  new SlackSettingsForm(settings, names);
}

class SlackSettingsForm {
  constructor(settings, repositories) {
    this.repositories = repositories;
    this.rows = slackSettingsToRows(settings);
    this.team = settings?.team || "";
    this.render();
  }

  render() {
    const none = this.repositories.length ? "" : `<p class="muted">No repository is registered yet (or none you may use): register one first (<code>POST /repositories</code>).</p>`;
    main.innerHTML = `
      <section class="card" id="slack-settings">
        <h1>Slack settings</h1>
        <p class="muted">${this.team ? `Workspace <code>${esc(this.team)}</code>. ` : ""}Rules never grant access: a person only ever gets a repository they may use.</p>
        ${none}
        <form id="slack-form" class="stack" novalidate>
          <h2>Channel defaults</h2>
          <p class="muted">Where requests in that channel go unless they name a repository.</p>
          <ul id="slack-channels" class="slack-rows"></ul>
          <div><button type="button" class="button" id="slack-add-channel">Add a channel</button></div>
          <h2>Routing rules</h2>
          <p class="muted">A request containing these words goes to that repository (first match wins).</p>
          <ol id="slack-rules" class="slack-rows"></ol>
          <div><button type="button" class="button" id="slack-add-rule">Add a rule</button></div>
          <p class="bad" id="slack-settings-error" role="alert" hidden></p>
          <div class="row"><button class="primary" type="submit" id="slack-save">Save</button> <a href="#/">All sessions</a></div>
        </form>
      </section>`;
    this.renderRows();
    const form = $("#slack-form");
    $("#slack-add-channel").addEventListener("click", () => { this.read(); this.rows.channels.push({ channel: "", repository: "" }); this.renderRows(); $("#slack-channels li:last-child input")?.focus(); });
    $("#slack-add-rule").addEventListener("click", () => { this.read(); this.rows.rules.push({ pattern: "", repository: "" }); this.renderRows(); $("#slack-rules li:last-child input")?.focus(); });
    form.addEventListener("click", (ev) => this.onRowClick(ev));
    form.addEventListener("submit", (ev) => { ev.preventDefault(); this.save(ev.submitter || $("#slack-save")); });
  }

  /** A repository picker: the listed names (registered, and yours to use), then any others the rows name. */
  picker(value, label) {
    const used = [...this.rows.channels, ...this.rows.rules].map((r) => r.repository).filter(Boolean);
    const names = [...new Set([...this.repositories, ...used])];
    return `<select name="repository" aria-label="${esc(label)}"><option value="">Choose a repository…</option>${names.map((n) => `<option value="${esc(n)}"${n === value ? " selected" : ""}>${esc(n)}${this.repositories.includes(n) ? "" : " (not in your list)"}</option>`).join("")}</select>`;
  }

  renderRows() {
    const { channels, rules } = this.rows;
    $("#slack-channels").innerHTML = channels.length
      ? channels.map((c, i) => `<li class="slack-row" data-i="${i}">
          <input name="channel" value="${esc(c.channel)}" maxlength="32" placeholder="C0123ABCD" aria-label="Channel id ${i + 1}" autocomplete="off" spellcheck="false">
          <span class="muted" aria-hidden="true">→</span>${this.picker(c.repository, `Repository for channel ${i + 1}`)}
          <button type="button" class="icon" data-act="remove-channel" aria-label="Remove channel ${i + 1}">✕</button></li>`).join("")
      : `<li class="muted empty">No channel default.</li>`;
    $("#slack-rules").innerHTML = rules.length
      ? rules.map((r, i) => `<li class="slack-row" data-i="${i}">
          <input name="pattern" value="${esc(r.pattern)}" maxlength="200" placeholder="billing" aria-label="Words of rule ${i + 1}" autocomplete="off">
          <span class="muted" aria-hidden="true">→</span>${this.picker(r.repository, `Repository for rule ${i + 1}`)}
          <span class="actions">
            <button type="button" class="icon" data-act="up" aria-label="Move rule ${i + 1} up"${i === 0 ? " disabled" : ""}>↑</button>
            <button type="button" class="icon" data-act="down" aria-label="Move rule ${i + 1} down"${i === rules.length - 1 ? " disabled" : ""}>↓</button>
            <button type="button" class="icon" data-act="remove-rule" aria-label="Remove rule ${i + 1}">✕</button></span></li>`).join("")
      : `<li class="muted empty">No routing rule.</li>`;
  }

  /** Takes the rows as typed (the page is the state while it is edited). */
  read() {
    const rowsOf = (sel, key) => [...document.querySelectorAll(`${sel} li.slack-row`)].map((li) => ({ [key]: li.querySelector(`input[name=${key}]`).value, repository: li.querySelector("select[name=repository]").value }));
    this.rows = { channels: rowsOf("#slack-channels", "channel"), rules: rowsOf("#slack-rules", "pattern") };
  }

  onRowClick(ev) {
    const b = ev.target.closest("button[data-act]");
    if (!b) return;
    const i = Number(b.closest("li")?.dataset.i);
    if (!Number.isInteger(i)) return;
    this.read();
    const { channels, rules } = this.rows;
    const act_ = b.dataset.act;
    if (act_ === "remove-channel") channels.splice(i, 1);
    else if (act_ === "remove-rule") rules.splice(i, 1);
    else if (act_ === "up" && i > 0) [rules[i - 1], rules[i]] = [rules[i], rules[i - 1]];
    else if (act_ === "down" && i < rules.length - 1) [rules[i + 1], rules[i]] = [rules[i], rules[i + 1]];
    else return;
    this.renderRows();
    const focus = act_ === "up" ? i - 1 : act_ === "down" ? i + 1 : -1;
    if (focus >= 0) $(`#slack-rules li[data-i="${focus}"] button[data-act="${act_}"]:not(:disabled)`)?.focus();
  }

  showError(text) {
    const el = $("#slack-settings-error");
    if (!el) return;
    el.textContent = text || "";
    el.hidden = !text;
  }

  save(button) {
    this.read();
    const built = slackRowsToSettings(this.rows);
    if (!built.ok) { this.showError(built.error); return; }
    this.showError("");
    const at = routed;
    act(button, async () => {
      let saved;
      try {
        saved = await api("PUT", "/slack/settings", built.settings);
      } catch (e) {
        if (e.status === 401) throw e;
        if (at !== routed) return;
        // The form stays as typed: fix it and save again.
        this.showError(e.code === "slack_not_configured" ? SLACK_NOT_CONFIGURED : ["repository_not_found", "invalid_input"].includes(e.code) ? e.message : explain(e));
        return;
      }
      if (at !== routed) return;
      if (saved && typeof saved === "object") {
        this.rows = slackSettingsToRows(saved);
        this.team = saved.team || this.team;
        this.renderRows();
      }
      toast("Slack settings saved.");
    });
  }
}

// ---- session view --------------------------------------------------------------------

const PALETTE = ["#e06c75", "#61afef", "#98c379", "#c678dd", "#e5c07b", "#56b6c2", "#d19a66", "#be5046"];
export function colorFor(user) {
  let h = 0;
  for (const ch of String(user)) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}
function initials(name) {
  return String(name).split(/\s+/).filter(Boolean).slice(0, 2).map((w) => w[0].toUpperCase()).join("") || "?";
}

async function openSession(id, invite) {
  main.innerHTML = `<section class="card"><p aria-busy="true" class="muted">Opening the session…</p></section>`;
  let snap;
  try {
    snap = invite ? await api("POST", `/multiplayer/${id}/join`, { invite }) : await api("GET", `/sessions/${id}`);
  } catch (e) {
    main.innerHTML = `<section class="card narrow"><h1>Cannot open this session</h1><p>${esc(explain(e))}</p>
      <p class="muted">${e.code === "not_member" ? "Ask a member for the share link (it carries the invite)." : "Check the link, or go back to your sessions."}</p>
      <a class="button" href="#/">All sessions</a></section>`;
    return;
  }
  if (invite) history.replaceState(null, "", `#/s/${id}`);
  current = new SessionView(id, snap);
}

class SessionView {
  constructor(id, snap) {
    this.id = id;
    this.snap = snap;
    this.me = auth.user?.user;
    this.model = new SessionModel();
    this.model.seed(snap);
    this.presence = new Map();
    this.typingTimer = null;
    this.typing = false;
    this.waitTimer = null;
    this.clockBehind = 0; // how far this device's clock is behind the server's (events are never from the future)
    this.render();
    this.socket = new SessionSocket(id, {
      events: (evs) => this.onEvents(evs),
      frame: (f) => this.onFrame(f),
      status: (s) => this.onStatus(s),
    });
  }

  close() { this.socket?.close(); clearTimeout(this.typingTimer); clearInterval(this.waitTimer); }

  render() {
    const s = this.snap;
    main.innerHTML = `
      <div class="session">
        <section class="head card">
          <div class="title">
            <h1>${esc(s.title)}</h1>
            <p class="muted"><code>${esc(s.repository || "no repository")}</code>${s.model ? ` · model <code>${esc(s.model)}</code>` : ""}</p>
          </div>
          <div class="meta">
            <span id="stage" class="pill" aria-live="polite">No sandbox yet</span>
            <span id="conn" class="pill subtle">connecting</span>
            <div id="presence" class="presence" aria-label="People here"></div>
            <button id="share" class="button" aria-controls="share-box">Share</button>
          </div>
          <div id="share-box" class="share" hidden>
            <label>Anyone with this link can join <input id="share-url" readonly></label>
          </div>
        </section>
        <section class="stream card" aria-label="Session activity">
          <ol id="log" class="log" aria-live="polite"></ol>
          <div id="wait" class="wait" hidden><span class="spinner" aria-hidden="true"></span> <span class="wait-label" role="status"></span> <span class="wait-secs muted"></span></div>
        </section>
        <aside class="side">
          <section id="pr" class="card pr" aria-live="polite" hidden></section>
          <section class="card"><h2>Queue</h2><div id="queue"></div></section>
          <section class="card"><h2>Edit locks</h2><ul id="locks" class="locks"></ul></section>
        </aside>
        <form id="composer" class="composer card">
          <label class="sr" for="prompt">Prompt</label>
          <textarea id="prompt" rows="2" maxlength="20000" placeholder="Ask the agent… (Enter sends, Shift+Enter for a new line)"></textarea>
          <div class="row">
            <label class="prio">Priority <select id="prio">${[10, 5, 0, -5, -10].map((p) => `<option value="${p}"${p === 0 ? " selected" : ""}>${p > 0 ? "+" + p : p}</option>`).join("")}</select></label>
            <span id="typing" class="muted typing" aria-live="polite"></span>
            <button class="primary" type="submit">Send</button>
          </div>
        </form>
      </div>`;
    $("#composer").addEventListener("submit", (ev) => { ev.preventDefault(); this.sendPrompt(ev.submitter); });
    const box = $("#prompt");
    box.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); this.sendPrompt($("#composer button[type=submit]")); }
    });
    box.addEventListener("input", () => this.onTyping());
    $("#share").addEventListener("click", () => this.share());
    $("#queue").addEventListener("click", (ev) => this.onQueueClick(ev));
    this.renderQueue();
    this.renderLocks();
    this.renderPr();
  }

  onStatus(s) {
    if (s === "signedout") { toast("Your sign-in ended: sign in again.", "error"); route(); return; }
    const c = $("#conn");
    if (!c) return;
    c.textContent = s === "live" ? "live" : s === "removed" ? "removed from session" : s === "access ended" ? "your GitHub access to this repository ended" : s;
    c.className = `pill ${s === "live" ? "ok" : "subtle"}`;
  }

  onFrame(f) {
    if (f.type === "presence") {
      this.presence = new Map(f.clients.map((c) => [c.client, c]));
      this.presenceTotal = f.total;
      this.renderPresence();
    } else if (f.type === "presence.delta") {
      for (const c of f.updated) this.presence.set(c.client, c);
      for (const c of f.left) this.presence.delete(c);
      this.presenceTotal = f.total;
      this.renderPresence();
    } else if (f.type === "error") {
      toast(`${f.error.message} (${f.error.code})`, "error");
    }
  }

  onEvents(evs) {
    const log = $("#log");
    let pr = false;
    for (const e of evs) {
      if (typeof e.at === "number") this.clockBehind = Math.max(this.clockBehind, e.at - Date.now());
      const change = this.model.apply(e);
      if (change) this.paint(log, e, change);
      pr ||= !!change?.pr;
    }
    if (pr) this.renderPr();
    this.renderQueue();
    this.renderLocks();
    this.renderWait();
    const atBottom = log.parentElement.scrollHeight - log.parentElement.scrollTop - log.parentElement.clientHeight < 120;
    if (atBottom) log.parentElement.scrollTop = log.parentElement.scrollHeight;
  }

  /** Draws one log change: a new row, or an update of an earlier one (text grows, tool finishes). */
  paint(log, e, change) {
    if (change.statusOf) {
      const pill = log.querySelector(`[data-key="${CSS.escape("p:" + change.statusOf)}"] [data-status]`);
      if (pill) pill.textContent = change.status;
    }
    const row = change.key ? log.querySelector(`[data-key="${CSS.escape(change.key)}"]`) : null;
    const html = this.rowHtml(e, change);
    if (!html) return;
    if (row) {
      row.outerHTML = html;
    } else {
      log.insertAdjacentHTML("beforeend", html);
    }
  }

  rowHtml(e, change) {
    const key = change.key ? ` data-key="${esc(change.key)}"` : "";
    const who = (u, name) => `<span class="avatar sm" data-color="${esc(colorFor(u))}" aria-hidden="true">${esc(initials(name || u))}</span><strong>${esc(name || u)}</strong>`;
    switch (e.type) {
      case "prompt.queued": {
        const review = this.model.reviewOf(e.prompt.id);
        const tag = review ? ` <span class="pill review-tag">answers review on PR #${esc(review.number)}</span>` : "";
        return `<li class="row prompt${review ? " from-review" : ""}" data-seq="${e.seq}" data-prompt="${esc(e.prompt.id)}"${key}>${who(e.prompt.author, e.prompt.author_name)}${tag} <span class="text">${esc(e.prompt.text)}</span> <span class="pill subtle" data-status>${esc(change.status || "queued")}</span></li>`;
      }
      case "agent.text":
        return `<li class="row agent" data-seq="${e.seq}"${key}><div class="agent-text">${esc(change.text)}</div></li>`;
      case "agent.tool": {
        const t = change.tool;
        const i = t.input || {};
        let detail;
        if (t.tool === "edit" && i.oldString != null) {
          detail = `<pre class="diff">${editDiff(i.oldString, i.newString).map((l) => `<span class="d${l.kind === "+" ? "add" : l.kind === "-" ? "del" : "ctx"}">${esc(l.kind + " " + l.text)}</span>`).join("\n")}</pre>`;
        } else if (t.tool === "write" && i.content != null) {
          detail = `<pre class="diff">${String(i.content).split("\n").map((l) => `<span class="dadd">${esc("+ " + l)}</span>`).join("\n")}</pre>`;
        } else {
          const body = t.error != null ? t.error : t.output != null ? t.output : t.input != null ? JSON.stringify(t.input, null, 2) : "";
          detail = `<pre>${esc(typeof body === "string" ? body : JSON.stringify(body, null, 2))}</pre>`;
        }
        if (t.error != null && detail.startsWith('<pre class="diff"')) detail = `<p class="bad">${esc(t.error)}</p>` + detail;
        return `<li class="row tool ${esc(t.status)}" data-seq="${e.seq}"${key}><details><summary><span class="tool-name">${esc(t.tool)}</span> ${esc(summaryOf(t))} <span class="pill subtle">${esc(t.status)}</span></summary>${detail}</details></li>`;
      }
      case "agent.step":
        return `<li class="row step muted" data-seq="${e.seq}">step · ${esc(e.tokens?.output ?? "?")} tokens out${e.cost ? ` · $${esc(e.cost)}` : ""}</li>`;
      case "agent.error":
        return `<li class="row error" data-seq="${e.seq}">Agent error: ${esc(e.message)}</li>`;
      case "agent.blocked":
        return `<li class="row blocked" data-seq="${e.seq}">${esc(e.message)}</li>`;
      case "egress.changed":
        return `<li class="row stage muted" data-seq="${e.seq}">${esc(e.actor?.name)} set the session's extra network hosts: ${e.allow?.length ? e.allow.map((h) => `<code>${esc(h)}</code>`).join(", ") : "none"}</li>`;
      case "egress.blocked":
        return `<li class="row blocked" data-seq="${e.seq}">Network: ${esc(e.host)} is not on this sandbox's allowlist${e.tool ? ` (tried by ${esc(e.tool)})` : ""}; the repository's owner can allow it in its <code>egress</code> setting</li>`;
      case "sandbox.status":
        return `<li class="row stage muted" data-seq="${e.seq}">${esc(STAGES[e.stage] || e.stage)}${e.detail && !/^[0-9a-f]{40}$/.test(e.detail) ? ` — ${esc(e.detail)}` : ""}</li>`;
      case "prompt.finished": {
        const files = this.model.filesOf(e.id);
        return `<li class="row done ${e.ok ? "ok" : "bad"}" data-seq="${e.seq}">${e.ok ? "Done" : "Failed"}${e.reason ? `: ${esc(e.reason)}` : ""}${e.branch ? ` · branch <code class="branch">${esc(e.branch)}</code> <code>${esc((e.commit || "").slice(0, 10))}</code>` : ""}${files.length ? `<div class="files">Files changed: ${files.map((f) => `<code>${esc(f)}</code>`).join(", ")}</div>` : ""}</li>`;
      }
      case "background.child": {
        const c = change.child;
        const tone = c.status === "completed" ? "ok" : ["failed", "cancelled"].includes(c.status) ? "bad" : "subtle";
        return `<li class="row child" data-seq="${e.seq}"${key}>Background agent <strong>${esc(c.title || c.id)}</strong> <span class="pill ${tone}">${esc(c.status)}</span>${c.session ? ` · <a href="#/s/${esc(c.session)}">open its session</a>` : ""}${c.branch ? ` · branch <code class="branch">${esc(c.branch)}</code>` : ""}</li>`;
      }
      case "prompt.stopped":
        return `<li class="row stage" data-seq="${e.seq}">Stopped by ${esc(e.actor?.name)}</li>`;
      case "prompt.cancelled":
        return `<li class="row stage muted" data-seq="${e.seq}">${esc(e.actor?.name)} cancelled a queued prompt</li>`;
      case "member.joined":
        return `<li class="row stage muted" data-seq="${e.seq}">${esc(e.name)} joined</li>`;
      case "member.left":
        return `<li class="row stage muted" data-seq="${e.seq}">${esc(e.user)} left</li>`;
      case "session.ended":
        return `<li class="row stage" data-seq="${e.seq}">The session was ended</li>`;
      case "pr.opened":
      case "pr.merged":
      case "pr.closed": {
        const p = e.pull_request;
        if (!p) return "";
        const what = { "pr.opened": "opened", "pr.merged": "merged", "pr.closed": "closed" }[e.type];
        return `<li class="row stage pr-row" data-seq="${e.seq}">Pull request <strong>#${esc(p.number)}</strong> ${what}${p.title ? `: ${esc(p.title)}` : ""}</li>`;
      }
      case "pr.comment.received": {
        const r = change.review;
        const items = r.comments.map((c) => `<li class="review-comment"><strong>${esc(c.author || "someone")}</strong>${c.path ? ` <code>${esc(c.path)}</code>${c.lines ? ` <code>${esc(c.lines)}</code>` : ""}` : ""}
          <div class="review-body">${esc(c.body)}</div>${c.url ? `<a class="review-link" href="${esc(c.url)}" target="_blank" rel="noopener noreferrer">view on GitHub</a>` : ""}</li>`).join("");
        return `<li class="row review received" data-seq="${e.seq}"${r.prompt ? ` data-prompt="${esc(r.prompt)}"` : ""}><div class="review-summary">${esc(r.summary)}</div>${items ? `<ul class="review-comments">${items}</ul>` : ""}${r.omittedNote ? `<p class="muted review-omitted">${esc(r.omittedNote)}</p>` : ""}</li>`;
      }
      case "pr.comment.addressed": {
        const a = change.answered;
        const items = a.replies.map((r) => `<li class="review-reply"><div class="review-body">${esc(r.body)}</div></li>`).join("");
        return `<li class="row review addressed" data-seq="${e.seq}"${a.prompt ? ` data-prompt="${esc(a.prompt)}"` : ""}><div class="review-summary">${esc(a.threads)}${a.commit ? ` in <code>${esc(a.commit)}</code>` : "; nothing changed"}</div>${items ? `<ul class="review-comments">${items}</ul>` : ""}</li>`;
      }
      case "pr.action":
        return `<li class="row blocked" data-seq="${e.seq}">The pull request could not be opened in your name${e.reason ? `: ${esc(e.reason)}` : ""}</li>`;
      default:
        return "";
    }
  }

  /** Between a prompt's start and its first agent output: what is happening, and for how long (ticks every second). */
  renderWait() {
    const el = $("#wait");
    if (!el) return;
    const w = this.model.waiting(Date.now() + this.clockBehind);
    this.renderStage(w);
    if (!w) {
      el.hidden = true;
      clearInterval(this.waitTimer);
      this.waitTimer = null;
      return;
    }
    el.hidden = false;
    el.dataset.phase = w.phase;
    const label = el.querySelector(".wait-label");
    if (label.textContent !== w.label) label.textContent = w.label;
    el.querySelector(".wait-secs").textContent = `${w.seconds} s`;
    if (!this.waitTimer) this.waitTimer = setInterval(() => this.renderWait(), 1000);
  }

  /** The stage pill in the header: the wait while there is one, else the sandbox's stage. */
  renderStage(w) {
    const el = $("#stage");
    if (!el) return;
    const stage = this.model.stage;
    let text = "No sandbox yet";
    let tone = "";
    if (w) {
      text = w.label;
      tone = "busy";
    } else if (stage) {
      text = this.model.running && stage === "ready" ? "Running" : STAGES[stage] || stage;
      tone = ["failed", "lost"].includes(stage) ? "bad" : stage === "ready" ? "ok" : "";
    } else if (this.model.running) {
      text = "Running";
      tone = "ok";
    }
    if (el.textContent !== text) el.textContent = text;
    el.className = `pill ${tone}`;
  }

  renderPresence() {
    const el = $("#presence");
    if (!el) return;
    const people = new Map();
    for (const c of this.presence.values()) {
      const p = people.get(c.user) || { ...c, clients: 0, typing: false };
      p.clients += 1;
      p.typing = p.typing || c.typing;
      people.set(c.user, p);
    }
    el.innerHTML = [...people.values()].map((p) =>
      `<span class="avatar${p.typing ? " is-typing" : ""}" data-color="${esc(p.color || colorFor(p.user))}" title="${esc(p.name)}${p.typing ? " is typing" : ""}" data-user="${esc(p.user)}">${esc(initials(p.name))}</span>`).join("")
      + (this.presenceTotal > this.presence.size ? `<span class="count">+${this.presenceTotal - this.presence.size}</span>` : "");
    const typers = [...people.values()].filter((p) => p.typing && p.user !== this.me).map((p) => p.name);
    const t = $("#typing");
    if (t) t.textContent = typers.length ? `${typers.join(", ")} ${typers.length > 1 ? "are" : "is"} typing…` : "";
  }

  renderQueue() {
    const el = $("#queue");
    if (!el) return;
    const m = this.model;
    const run = m.running ? m.prompts.get(m.running) : null;
    const mine = (p) => p.author === this.me || this.snap.role === "owner";
    el.innerHTML = `
      ${run ? `<div class="running"><span class="pill ok">running</span> <span>${esc(run.text)}</span> <span class="muted">— ${esc(run.author_name)}</span>
        <button class="button danger" data-act="stop">Stop</button></div>` : `<p class="muted">Nothing running.</p>`}
      <ol class="queued">${m.queued().map((p, i, all) => `
        <li data-id="${esc(p.id)}"><span class="prio-badge" title="priority">${p.priority > 0 ? "+" : ""}${p.priority}</span>
          <span class="text">${esc(p.text)}</span> <span class="muted">— ${esc(p.author_name)}</span>
          ${mine(p) ? `<span class="actions">
            <button class="icon" data-act="up" aria-label="Move up" ${i === 0 ? "disabled" : ""}>↑</button>
            <button class="icon" data-act="down" aria-label="Move down" ${i === all.length - 1 ? "disabled" : ""}>↓</button>
            <button class="icon" data-act="cancel" aria-label="Cancel">✕</button></span>` : ""}
        </li>`).join("")}</ol>`;
  }

  onQueueClick(ev) {
    const b = ev.target.closest("button[data-act]");
    if (!b) return;
    const act_ = b.dataset.act;
    if (act_ === "stop") return act(b, () => api("POST", `/multiplayer/${this.id}/stop`));
    const id = b.closest("li")?.dataset.id;
    if (!id) return;
    if (act_ === "cancel") return act(b, () => api("DELETE", `/multiplayer/${this.id}/prompt/${id}`));
    const q = this.model.queued();
    const i = q.findIndex((p) => p.id === id);
    // Moving above (below) a neighbour: take a priority just past it (the queue's order is priority, then arrival).
    const target = act_ === "up" ? q[i - 1] : q[i + 1];
    if (!target) return;
    const priority = Math.max(-10, Math.min(10, act_ === "up" ? target.priority + 1 : target.priority - 1));
    return act(b, () => api("PATCH", `/multiplayer/${this.id}/prompt/${id}`, { priority }));
  }

  /** The pull request card: number, title, state, links to it and its checks; or the "Create pull request" link. */
  renderPr() {
    const el = $("#pr");
    if (!el) return;
    const card = this.model.prCard();
    el.hidden = !card;
    if (!card) { el.innerHTML = ""; return; }
    const { pr, action } = card;
    const link = (url, text, cls = "") => url ? `<a${cls ? ` class="${cls}"` : ""} href="${esc(url)}" target="_blank" rel="noopener noreferrer">${text}</a>` : text;
    el.innerHTML = `<h2>Pull request</h2>${pr ? `
      <p class="pr-head">${link(pr.url, `<strong class="pr-number">#${esc(pr.number)}</strong>`, "pr-link")} <span class="pill pr-state ${esc(pr.tone)}" data-state="${esc(pr.state)}">${esc(pr.draft && pr.state === "open" ? "draft" : pr.state)}</span></p>
      <p class="pr-title">${esc(pr.title)}</p>
      ${pr.head ? `<p class="muted pr-branches"><code class="branch">${esc(pr.head)}</code> → <code>${esc(pr.base)}</code></p>` : ""}
      ${pr.checks ? `<p>${link(pr.checks, "checks", "pr-checks")}</p>` : ""}` : ""}
      ${action ? `<p class="muted pr-reason">${esc(action.reason)}</p>${link(action.url, esc(action.label), "button primary pr-create")}` : ""}`;
  }

  renderLocks() {
    const el = $("#locks");
    if (!el) return;
    const locks = [...this.model.locks.values()];
    el.innerHTML = locks.length
      ? locks.map((l) => `<li><span aria-hidden="true">🔒</span> <code>${esc(l.resource)}</code> <span class="muted">held by ${esc(l.holder)}</span></li>`).join("")
      : `<li class="muted">No file is locked.</li>`;
  }

  onTyping() {
    if (!this.typing) {
      this.typing = this.socket.send({ type: "typing", typing: true });
    }
    clearTimeout(this.typingTimer);
    this.typingTimer = setTimeout(() => this.stopTyping(), 2500);
  }

  stopTyping() {
    clearTimeout(this.typingTimer);
    if (this.typing) this.socket.send({ type: "typing", typing: false });
    this.typing = false;
  }

  sendPrompt(button) {
    const box = $("#prompt");
    const text = box.value.trim();
    if (!text) { toast("Write a prompt first."); box.focus(); return; }
    const priority = Number($("#prio").value);
    act(button, async () => {
      // Over the live socket when it is open (faster for everyone watching); HTTP otherwise.
      try {
        await this.socket.request({ type: "prompt", text, priority });
      } catch (e) {
        if (e.code !== "not_sent") throw e;
        await api("POST", `/multiplayer/${this.id}/prompt`, { text, priority });
      }
      box.value = "";
      this.stopTyping();
    });
  }

  async share() {
    const url = `${location.origin}/#/s/${this.id}?invite=${encodeURIComponent(this.snap.invite || "")}`;
    const box = $("#share-box");
    const input = $("#share-url");
    input.value = url;
    box.hidden = false;
    input.focus();
    input.select();
    try {
      await navigator.clipboard.writeText(url);
      toast("Share link copied: anyone with it can join this session.");
    } catch {
      toast("Copy the link shown under the title to invite a colleague.");
    }
  }
}

function summaryOf(t) {
  const i = t.input || {};
  return i.filePath || i.command || i.pattern || i.path || "";
}

// Colours come from data (a person's colour): set through the CSSOM, which the CSP allows,
// never as inline style attributes, which it refuses.
function paintColors(root) {
  if (root.nodeType !== 1) return;
  const els = root.matches("[data-color]") ? [root, ...root.querySelectorAll("[data-color]")] : root.querySelectorAll("[data-color]");
  for (const el of els) el.style.setProperty("--c", el.dataset.color);
}
new MutationObserver((records) => {
  for (const r of records) {
    if (r.type === "attributes") paintColors(r.target);
    for (const n of r.addedNodes) paintColors(n);
  }
}).observe(document.body, { childList: true, subtree: true, attributes: true, attributeFilter: ["data-color"] });

window.addEventListener("hashchange", route);
// Signed out (or in) in another tab: follow it.
window.addEventListener("storage", (e) => { if (e.key === "nightshift.token" && !e.newValue !== !e.oldValue) route(); });
keepSignedIn();
route();

if ("serviceWorker" in navigator && location.protocol !== "file:") {
  navigator.serviceWorker.register("/sw.js").catch(() => {});
}
