// Nightshift web app: the HTTP API and the session socket (reconnects and resumes from the last event).

const TOKEN_KEY = "nightshift.token";
const USER_KEY = "nightshift.user";

export const auth = {
  get token() { return localStorage.getItem(TOKEN_KEY); },
  get user() {
    try { return JSON.parse(localStorage.getItem(USER_KEY) || "null"); } catch { return null; }
  },
  set(token, user) {
    localStorage.setItem(TOKEN_KEY, token);
    localStorage.setItem(USER_KEY, JSON.stringify(user));
  },
  clear() { localStorage.removeItem(TOKEN_KEY); localStorage.removeItem(USER_KEY); },
};

/** An API error with the server's stable code and a message that says what to do. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function api(method, path, body) {
  const headers = { "content-type": "application/json" };
  if (auth.token) headers.authorization = `Bearer ${auth.token}`;
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
    if (res.status === 401) auth.clear();
    throw new ApiError(res.status, e.code, e.message);
  }
  return data;
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

  open() {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const q = new URLSearchParams({ token: auth.token || "", client: this.client, since: String(this.lastSeq), kind: "web" });
    const ws = new WebSocket(`${proto}://${location.host}/multiplayer/${this.sessionId}/ws?${q}`);
    this.ws = ws;
    this.handlers.status?.("connecting");
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
      // 4002: the replay of a long log continues from lastSeq on a new connect, at once.
      if (ev.code === 4002) { this.open(); return; }
      this.handlers.status?.("reconnecting");
      setTimeout(() => this.open(), this.retry);
      this.retry = Math.min(this.retry * 2, 5000);
    };
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
    for (const p of this.pending.values()) clearTimeout(p.timer);
    this.pending.clear();
    this.ws?.close();
  }
}
