// Nightshift web app: the sign-in (short-lived tokens, renewed in time), the HTTP API, and the session socket (reconnects and resumes from the last event).

import { needsRenew } from "./model.js";

const TOKEN_KEY = "nightshift.token";
const USER_KEY = "nightshift.user";
const EXPIRES_KEY = "nightshift.expires_at";

export const auth = {
  get token() { return localStorage.getItem(TOKEN_KEY); },
  get user() {
    try { return JSON.parse(localStorage.getItem(USER_KEY) || "null"); } catch { return null; }
  },
  /** When the token stops working (ms since the epoch), or null when not known. */
  get expiresAt() {
    const v = Number(localStorage.getItem(EXPIRES_KEY));
    return Number.isFinite(v) && v > 0 ? v : null;
  },
  set(token, user, expiresAt) {
    localStorage.setItem(TOKEN_KEY, token);
    if (user) localStorage.setItem(USER_KEY, JSON.stringify(user));
    if (expiresAt) localStorage.setItem(EXPIRES_KEY, String(expiresAt));
    else localStorage.removeItem(EXPIRES_KEY);
  },
  setUser(user) { localStorage.setItem(USER_KEY, JSON.stringify(user)); },
  clear() { for (const k of [TOKEN_KEY, USER_KEY, EXPIRES_KEY]) localStorage.removeItem(k); },
};

/** An API error with the server's stable code and a message that says what to do. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function request(method, path, body, token) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "offline", "Nightshift cannot be reached. Check your connection; this page retries when you act again.");
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { raw: text }; }
  if (!res.ok) {
    const e = data && data.error ? data.error : { code: "http_" + res.status, message: text || res.statusText };
    throw new ApiError(res.status, e.code, e.message);
  }
  return data;
}

/**
 * Calls the API as the signed-in person. A 401 `token_expired` is answered by one renewal and
 * one retry; any other 401 (or a failed renewal) ends the sign-in on this device.
 */
export async function api(method, path, body) {
  const token = auth.token;
  try {
    return await request(method, path, body, token);
  } catch (e) {
    if (e.status !== 401 || !token) throw e;
    if (e.code === "token_expired" && (await renew())) return request(method, path, body, auth.token).catch(signedOutOn401);
    if (auth.token === token) auth.clear();
    throw e;
  }
}

function signedOutOn401(e) {
  if (e.status === 401) auth.clear();
  throw e;
}

let renewing = null;

/** Exchanges the token for a fresh one of the same sign-in (one at a time); true when it worked. */
export function renew() {
  renewing ||= (async () => {
    const token = auth.token;
    if (!token) return false;
    try {
      const r = await request("POST", "/auth/renew", undefined, token);
      if (auth.token === token) auth.set(r.token, r.user, r.expires_at);
      return true;
    } catch (e) {
      // Offline or a server hiccup: keep the token (it may still work); refused: signed out.
      if (e.status === 401 && auth.token === token) auth.clear();
      return false;
    }
  })().finally(() => { renewing = null; });
  return renewing;
}

/** Renews the token if less than ten minutes remain (resolves when done; false when nothing was renewed). */
export async function renewIfDue() {
  return !!auth.token && needsRenew(auth.expiresAt, Date.now()) && renew();
}

/** Renews the token in time: now, every minute, and when the tab comes back. */
export function keepSignedIn() {
  renewIfDue();
  setInterval(renewIfDue, 60_000);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) renewIfDue(); });
}

/** Ends the sign-in on the server (every token and ticket of it stops working), then on this device. */
export async function signOut() {
  const token = auth.token;
  try { if (token) await request("POST", "/auth/logout", undefined, token); } catch {}
  auth.clear();
}

/**
 * The live connection to one session. Keeps the highest sequence number seen and, after a
 * drop, reconnects with `since` so it gets exactly the missed events (never twice).
 */
export class SessionSocket {
  constructor(sessionId, handlers) {
    this.sessionId = sessionId;
    this.handlers = handlers;
    this.lastSeq = 0;
    this.client = sessionStorage.getItem("nightshift.client") || "web-" + Math.random().toString(36).slice(2, 10);
    sessionStorage.setItem("nightshift.client", this.client);
    this.retry = 250;
    this.closed = false;
    this.pending = new Map(); // ref -> { resolve, reject, timer }
    this.refs = 0;
    this.open();
  }

  /** Opens the socket with a fresh one-time ticket (a minute, this session only); never the token in the URL. */
  async open() {
    this.handlers.status?.("connecting");
    let ticket;
    try {
      ticket = (await api("POST", "/auth/ticket", { session: this.sessionId })).ticket;
    } catch (e) {
      if (this.closed) return;
      if (e.status === 401) { this.handlers.status?.("signedout"); return; }
      return this.again();
    }
    if (this.closed) return;
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const q = new URLSearchParams({ ticket, client: this.client, since: String(this.lastSeq), kind: "web" });
    const ws = new WebSocket(`${proto}://${location.host}/multiplayer/${this.sessionId}/ws?${q}`);
    this.ws = ws;
    ws.onopen = () => { this.retry = 250; this.handlers.status?.("live"); };
    ws.onmessage = (m) => {
      let f;
      try { f = JSON.parse(m.data); } catch { return; }
      const waiting = f.ref != null && this.pending.get(f.ref);
      if (waiting && (f.type === "ack" || f.type === "error")) {
        this.pending.delete(f.ref);
        clearTimeout(waiting.timer);
        if (f.type === "ack") waiting.resolve(f.result ?? null);
        else waiting.reject(new ApiError(400, f.error?.code || "error", f.error?.message || "refused"));
        return;
      }
      if (f.type === "events") {
        const fresh = f.events.filter((e) => e.seq > this.lastSeq);
        for (const e of fresh) this.lastSeq = e.seq;
        if (fresh.length) this.handlers.events(fresh);
      } else {
        this.handlers.frame?.(f);
      }
    };
    ws.onclose = (ev) => {
      if (this.closed) return;
      if (ev.code === 4000) { this.handlers.status?.("removed"); return; }
      // 4003: GitHub access to the session's repository ended; reconnecting would be refused.
      if (ev.code === 4003) { this.handlers.status?.("access ended"); return; }
      // 4002: the replay of a long log continues from lastSeq on a new connect, at once.
      if (ev.code === 4002) { this.open(); return; }
      this.again();
    };
  }

  /** Tries again after a growing pause (250 ms doubling to 5 s). */
  again() {
    this.handlers.status?.("reconnecting");
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.open(), this.retry);
    this.retry = Math.min(this.retry * 2, 5000);
  }

  send(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  /**
   * Sends a command over the socket and waits for its `ack` (or `error`) — one hop instead of
   * an HTTP request. Rejects with code "not_sent" when the socket is not open (nothing was
   * sent: the caller may use HTTP instead), "no_answer" when no answer came in time.
   */
  request(frame, timeoutMs = 5000) {
    return new Promise((resolve, reject) => {
      const ref = "r" + ++this.refs;
      if (!this.send({ ...frame, ref })) return reject(new ApiError(0, "not_sent", "the live connection is not open"));
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        // It may have been taken: never resend (that could queue it twice); the log will show it.
        reject(new ApiError(0, "no_answer", "no answer yet on the live connection; the queue will show whether it was taken"));
      }, timeoutMs);
      this.pending.set(ref, { resolve, reject, timer });
    });
  }

  close() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    for (const p of this.pending.values()) clearTimeout(p.timer);
    this.pending.clear();
    this.ws?.close();
  }
}
