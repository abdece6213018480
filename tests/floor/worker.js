//! Runtime floor for the bench: the same I/O as Nightshift's create, connect and broadcast, no rules.
import { DurableObject } from "cloudflare:workers";

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
      case "/lock": {
        const { resource, ttl_ms } = await req.json();
        const lock = { resource, holder: "ada", expires_at: Date.now() + ttl_ms };
        sql.exec("INSERT OR REPLACE INTO locks (id, body) VALUES (?, ?)", resource, JSON.stringify(lock));
        const event = this.append("lock.acquired", { lock });
        const frame = JSON.stringify({ type: "events", events: [event] });
        for (const ws of this.ctx.getWebSockets("people")) ws.send(frame);
        return json(200, lock);
      }
    }
    return json(404, { error: { code: "not_found", message: "no route" } });
  }

  webSocketMessage() {}
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
    return json(404, { error: { code: "not_found", message: "no route" } });
  }
};
