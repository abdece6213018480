//! Runtime floor for the bench: the same I/O as Nightshift's create, connect, broadcast, socket command and sandbox event, no rules.
import { DurableObject } from "cloudflare:workers";

// What this object does, per request or frame (and nothing else: no auth, validation, core state
// machine, presence, queue or alarm):
// - POST /create: the product's session schema, a meta row, an owner row, one event row.
// - POST /index: the person's index row (in another object, concurrently with /create).
// - GET /ws: a person's socket: a `clients` row, an accepted hibernatable socket tagged "people",
//   and a `hello` frame.
// - POST /lock (HTTP trigger): a lock row, one event row, one `events` frame to every person.
// - a person's `lock.acquire` frame (socket trigger): JSON parse, a lock row, one event row, one
//   `events` frame to every person (the sender included), then an `ack` to the sender.
// - GET /sandbox: the sandbox's socket (tagged "sandbox"; Nightshift checks a bearer token, this
//   does not); an `event` frame on it: JSON parse, one event row, one `events` frame to every
//   person, then `{"type":"ack","n":…}` to the sandbox.

// The product's session tables, so a create writes the same schema; plus the person's index.
import SESSION_SCHEMA from "../../src/session_schema.sql";
const SCHEMA = SESSION_SCHEMA + `
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, joined_at INTEGER NOT NULL, body TEXT NOT NULL);
`;

const json = (status, v) =>
  new Response(JSON.stringify(v), { status, headers: { "content-type": "application/json" } });

export class Room extends DurableObject {
  append(type, body) {
    const sql = this.ctx.storage.sql;
    const seq = (sql.exec("SELECT COALESCE(MAX(seq), 0) AS n FROM events").one().n || 0) + 1;
    const event = { seq, at: Date.now(), type, ...body };
    sql.exec("INSERT INTO events (seq, at, body) VALUES (?, ?, ?)", seq, event.at, JSON.stringify(event));
    return event;
  }

  // One `events` frame, encoded once, to every person's socket.
  broadcast(event) {
    const frame = JSON.stringify({ type: "events", events: [event] });
    for (const ws of this.ctx.getWebSockets("people")) ws.send(frame);
  }

  // A lock row and its event, broadcast; the lock is returned.
  lock(resource, ttl_ms) {
    const lock = { resource, holder: "ada", expires_at: Date.now() + ttl_ms };
    this.ctx.storage.sql.exec("INSERT OR REPLACE INTO locks (id, body) VALUES (?, ?)", resource, JSON.stringify(lock));
    this.broadcast(this.append("lock.acquired", { lock }));
    return lock;
  }

  async fetch(req) {
    const url = new URL(req.url);
    const sql = this.ctx.storage.sql;
    switch (url.pathname) {
      case "/create": {
        const body = await req.json();
        sql.exec(SCHEMA);
        sql.exec("INSERT INTO meta (k, body) VALUES ('session', ?)", JSON.stringify(body));
        sql.exec("INSERT INTO members (id, body) VALUES (?, ?)", body.owner, JSON.stringify({ user: body.owner, role: "owner" }));
        this.append("session.created", { by: body.owner });
        return json(201, { id: body.id, invite: body.invite });
      }
      case "/index": {
        const entry = await req.json();
        sql.exec(SCHEMA);
        sql.exec("INSERT OR REPLACE INTO sessions (id, joined_at, body) VALUES (?, ?, ?)", entry.id, entry.joined_at, JSON.stringify(entry));
        return json(200, entry);
      }
      case "/ws": {
        const client = url.searchParams.get("client") || crypto.randomUUID();
        const row = { id: client, user: "ada", connected_at: Date.now() };
        sql.exec("INSERT OR REPLACE INTO clients (id, body) VALUES (?, ?)", client, JSON.stringify(row));
        const pair = new WebSocketPair();
        this.ctx.acceptWebSocket(pair[1], [client, "people"]);
        pair[1].serializeAttachment({ client, user: "ada" });
        const seq = sql.exec("SELECT COALESCE(MAX(seq), 0) AS n FROM events").one().n;
        pair[1].send(JSON.stringify({ type: "hello", client, user: "ada", seq }));
        return new Response(null, { status: 101, webSocket: pair[0] });
      }
      case "/sandbox": {
        const pair = new WebSocketPair();
        this.ctx.acceptWebSocket(pair[1], ["sandbox"]);
        pair[1].serializeAttachment({ sandbox: true });
        return new Response(null, { status: 101, webSocket: pair[0] });
      }
      case "/lock": {
        const { resource, ttl_ms } = await req.json();
        return json(200, this.lock(resource, ttl_ms));
      }
    }
    return json(404, { error: { code: "not_found", message: "no route" } });
  }

  webSocketMessage(ws, message) {
    if (typeof message !== "string") return;
    let frame;
    try {
      frame = JSON.parse(message);
    } catch {
      return;
    }
    const att = ws.deserializeAttachment() || {};
    if (att.sandbox) {
      // One sandbox event: one row, one broadcast, then the ack.
      if (frame.type === "event" && frame.event) {
        const { kind, ...rest } = frame.event;
        this.broadcast(this.append(kind, rest));
        ws.send(JSON.stringify({ type: "ack", n: frame.n }));
      }
      return;
    }
    // A person's command: only `lock.acquire` (the bench's socket trigger) does anything.
    if (frame.type === "lock.acquire") {
      const lock = this.lock(frame.resource, frame.ttl_ms || 60000);
      ws.send(JSON.stringify(frame.ref === undefined ? { type: "ack", result: lock } : { type: "ack", ref: frame.ref, result: lock }));
    }
  }

  webSocketClose(ws) {
    ws.close(1000, "closed");
  }
}

export default {
  async fetch(req, env) {
    const url = new URL(req.url);
    const segs = url.pathname.split("/").filter(Boolean);
    const room = (name) => env.ROOM.get(env.ROOM.idFromName(name));
    if (segs[0] === "health") return json(200, { ok: true });
    if (segs[0] === "auth" && req.method === "POST") return json(200, { token: "floor" });
    if (segs[0] === "sessions" && req.method === "POST") {
      const { title } = await req.json();
      const id = "ses_" + crypto.randomUUID().replaceAll("-", "");
      const invite = crypto.randomUUID();
      const entry = { id, title, role: "owner", joined_at: Date.now(), status: "active" };
      const [created] = await Promise.all([
        room(id).fetch("http://room/create", { method: "POST", body: JSON.stringify({ id, title, owner: "ada", invite }) }),
        room("index:ada").fetch("http://room/index", { method: "POST", body: JSON.stringify(entry) }),
      ]);
      return created;
    }
    if (segs[0] === "multiplayer" && segs.length === 3) {
      const target = new URL(req.url);
      target.pathname = "/" + segs[2];
      return room(segs[1]).fetch(new Request(target, req));
    }
    // The sandbox's socket, at the same path as Nightshift's sandbox link.
    if (segs[0] === "sandbox-link" && segs.length === 2) {
      const target = new URL(req.url);
      target.pathname = "/sandbox";
      return room(segs[1]).fetch(new Request(target, req));
    }
    return json(404, { error: { code: "not_found", message: "no route" } });
  }
};
