// Nightshift web app: the session as the browser knows it, rebuilt from the ordered event log (pure; no DOM).

export class SessionModel {
  constructor() {
    this.prompts = new Map();
    this.running = null;
    this.locks = new Map();
    this.stage = null;
    this.tools = new Map();
    this.lastSeq = 0;
    this.textBlock = null; // { key, prompt, text } while agent text keeps coming
    this.blocks = 0;
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
    switch (e.type) {
      case "prompt.queued": {
        const p = { ...e.prompt, status: "queued" };
        this.prompts.set(p.id, p);
        return { key: "p:" + p.id, status: "queued" };
      }
      case "prompt.started":
        return this.status(e.id, "running", () => (this.running = e.id));
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
        return {};
      case "session.created":
      case "presence":
        return null;
      default:
        return {};
    }
  }

  status(id, status, also) {
    const p = this.prompts.get(id);
    if (p) p.status = status;
    if (this.running === id && status !== "running") this.running = null;
    also?.();
    return { statusOf: id, status };
  }
}

function stripNull(o) {
  const out = {};
  for (const [k, v] of Object.entries(o)) if (v !== null && v !== undefined) out[k] = v;
  return out;
}
