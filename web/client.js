// Switchboard's JavaScript SDK: the HTTP account API and one socket session over the JSON
// subprotocol `sb.json.v1` (docs/protocol.md), with nothing of the page in it.
//
//   const sb = new Client();                      // base URL defaults to the page's origin
//   await sb.login('alice', 'password123');       // tokens kept in localStorage
//   sb.on('msg', m => ...); sb.on('state', s => ...);
//   sb.connect();                                 // GET /v1/gateways, auth, sync, reconnects
//   await sb.send({ to: 'bob', type: 'text', body: 'hi' });
//
// It owns: request/response by `rid`, pushes as events, reconnect with backoff (asking
// /v1/gateways again each time), catch-up with `sync` after every `auth.ok` and on any seq gap,
// de-duplication by (conv, seq), acks, pings, refresh-token rotation, and an outbox of sends
// that are retried with the same `cmid` after a reconnect. docs/client.md documents it.

const SUBPROTOCOL = 'sb.json.v1';
const PING_MS = 25000;
const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 8000];

/** An error answer from the server (HTTP or socket): `code`, `message`, maybe `retry_after_ms`. */
export class SbError extends Error {
  constructor(code, message, extra = {}) {
    super(message || code);
    this.code = code;
    Object.assign(this, extra);
  }
}

export class Client {
  /**
   * @param {object} [opts]
   * @param {string} [opts.baseUrl] HTTP API origin (default: the page's origin).
   * @param {Storage} [opts.storage] where the session is kept (default: localStorage).
   * @param {string} [opts.key] storage key (default 'sb.session').
   */
  constructor({ baseUrl = globalThis.location?.origin, storage = globalThis.localStorage, key = 'sb.session' } = {}) {
    this.baseUrl = baseUrl;
    this.storage = storage;
    this.key = key;
    this.session = this.#load(); // {user, device, access_token, refresh_token, expires_at}
    this.state = 'offline'; // offline | connecting | online | kicked | signed-out
    this.serverOffset = 0; // server clock minus ours, ms
    this.ws = null;
    this.rid = 0;
    this.pending = new Map(); // rid -> {resolve, reject}
    this.listeners = new Map(); // event -> Set<fn>
    this.seen = new Set(); // "conv\nseq" of every message delivered to the app
    this.top = new Map(); // conv -> highest seq up to which nothing is missing
    this.outbox = new Map(); // cmid -> {req, resolve, reject}
    this.attempt = 0;
    this.wanted = false; // connect() called and not disconnect()ed
    this.timer = null;
    this.pinger = null;
    this.syncing = null;
    this.opening = false;
  }

  // ---- events ------------------------------------------------------------------------------

  /** Subscribes to an event; returns the unsubscribe function. Events: every push op
   *  (`msg` after de-duplication, `read`, `recall`, `typing`, `presence`, `friend.request`,
   *  `friend.accepted`, `group.joined`, `call.*`, `kick`), plus `state` (the connection state),
   *  `ready` (after auth and catch-up), `session` (signed in or out) and `error`. */
  on(event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(fn);
    return () => this.listeners.get(event).delete(fn);
  }

  emit(event, data) {
    for (const fn of this.listeners.get(event) || []) {
      try {
        fn(data);
      } catch (e) {
        console.error(`listener of ${event}`, e);
      }
    }
  }

  setState(s, detail) {
    this.state = s;
    this.emit('state', { state: s, ...detail });
  }

  /** Server time now (ms), from the clock offset measured at auth. */
  now() {
    return Date.now() + this.serverOffset;
  }

  // ---- HTTP account API ----------------------------------------------------------------------

  async http(method, path, body, token) {
    const headers = { 'Content-Type': 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    const res = await fetch(this.baseUrl + path, { method, headers, body: body ? JSON.stringify(body) : undefined });
    if (res.status === 204) return null;
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new SbError(data.code || `http_${res.status}`, data.message, data);
    return data;
  }

  register(username, password, nickname) {
    return this.http('POST', '/v1/auth/register', { username, password, nickname: nickname || undefined });
  }

  /** Logs in and keeps the tokens. The device name is stable per browser profile, so acks
   *  carry over between logins and a second sign-in of the same device replaces this one. */
  async login(username, password) {
    const device = this.storage?.getItem('sb.device') || `web-${Math.random().toString(36).slice(2, 10)}`;
    this.storage?.setItem('sb.device', device);
    const t = await this.http('POST', '/v1/auth/login', { username, password, device });
    this.#keep({ user: username, device, ...this.#tokens(t) });
    this.emit('session', this.session);
    return this.session;
  }

  /** Rotates the refresh token. Serialised across tabs (Web Locks) and re-reading storage
   *  first, so two tabs never present the same refresh token twice (which revokes the session). */
  async refresh() {
    const run = async () => {
      const stored = this.#load();
      if (stored && stored.refresh_token !== this.session?.refresh_token && stored.expires_at > Date.now() + 30000) {
        this.session = stored; // another tab rotated already
        return stored;
      }
      if (!this.session) throw new SbError('bad_token', 'not signed in');
      try {
        const t = await this.http('POST', '/v1/auth/refresh', { refresh_token: this.session.refresh_token });
        this.#keep({ ...this.session, ...this.#tokens(t) });
        return this.session;
      } catch (e) {
        if (e.code === 'bad_token') this.#forget('session expired');
        throw e;
      }
    };
    return globalThis.navigator?.locks ? navigator.locks.request('sb.refresh', run) : run();
  }

  /** Signs out on the server (best effort) and forgets the tokens. */
  async logout() {
    this.disconnect();
    if (this.session && this.session.expires_at < Date.now() + 5000) await this.refresh().catch(() => {});
    const token = this.session?.access_token;
    if (token) await this.http('POST', '/v1/auth/logout', null, token).catch(() => {});
    this.#forget('signed out');
  }

  #tokens(t) {
    return { access_token: t.access_token, refresh_token: t.refresh_token, expires_at: Date.now() + t.expires_in * 1000 };
  }

  #load() {
    try {
      return JSON.parse(this.storage?.getItem(this.key) || 'null');
    } catch {
      return null;
    }
  }

  #keep(s) {
    this.session = s;
    this.storage?.setItem(this.key, JSON.stringify(s));
  }

  #forget(reason) {
    this.session = null;
    this.storage?.removeItem(this.key);
    this.wanted = false;
    this.seen.clear();
    this.top.clear();
    for (const o of this.outbox.values()) o.reject(new SbError('signed_out', reason));
    this.outbox.clear();
    this.setState('signed-out', { reason });
    this.emit('session', null);
  }

  // ---- the socket session --------------------------------------------------------------------

  /** Starts (and keeps) a socket session: reconnects by itself until disconnect() or a kick. */
  connect() {
    this.wanted = true;
    if (!this.ws && !this.timer && !this.opening) this.#open();
  }

  /** Closes the socket and stops reconnecting. */
  disconnect() {
    this.wanted = false;
    clearTimeout(this.timer);
    this.timer = null;
    if (this.ws) this.ws.close(1000);
  }

  /** Reconnects now instead of waiting for the backoff (e.g. when the browser comes online). */
  retryNow() {
    if (!this.wanted || this.ws || this.opening) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.#open();
  }

  async #open() {
    this.timer = null;
    if (!this.session) return this.#forget('not signed in');
    this.setState('connecting', { attempt: this.attempt });
    let ws;
    this.opening = true;
    try {
      if (this.session.expires_at < Date.now() + 30000) await this.refresh();
      const { gateways } = await this.http('GET', '/v1/gateways');
      if (!gateways?.length) throw new SbError('unavailable', 'no gateway');
      ws = new WebSocket(gateways[0].ws, SUBPROTOCOL);
    } catch (e) {
      if (this.session) this.#retryLater(e);
      return;
    } finally {
      this.opening = false;
    }
    if (!this.wanted) return ws.close();
    this.ws = ws;
    ws.onmessage = (ev) => this.ws === ws && this.#frame(ev.data); // never a stale socket's frames
    ws.onclose = () => this.#closed(ws);
    ws.onopen = () => this.#authenticate();
  }

  async #authenticate() {
    try {
      const ok = await this.request('auth', { token: this.session.access_token });
      this.serverOffset = ok.server_ts - Date.now();
      this.attempt = 0;
      clearInterval(this.pinger);
      this.pinger = setInterval(() => this.request('ping').catch(() => {}), PING_MS);
      this.setState('online');
      await this.sync().catch(() => {}); // a gap left here is filled by the next sync
      this.#flushOutbox();
      this.emit('ready', { user: this.session.user });
    } catch (e) {
      if (e.code === 'bad_token' && this.session) {
        // Expired or revoked access token: rotate once; a refused refresh signs out.
        this.session.expires_at = 0;
      }
    }
  }

  #retryLater(err) {
    if (!this.wanted) return;
    const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    const delay = base / 2 + Math.random() * base;
    this.attempt++;
    this.setState('offline', { retryInMs: Math.round(delay), error: err?.message });
    this.timer = setTimeout(() => this.#open(), delay);
  }

  #closed(ws) {
    if (this.ws !== ws) return;
    this.ws = null;
    clearInterval(this.pinger);
    for (const p of this.pending.values()) p.reject(new SbError('disconnected', 'connection closed'));
    this.pending.clear();
    if (this.state === 'kicked' || this.state === 'signed-out') return;
    if (this.wanted) this.#retryLater();
    else this.setState('offline');
  }

  /** Sends one request; resolves with the `<op>.ok` reply, rejects with an SbError. */
  request(op, fields = {}) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        return reject(new SbError('disconnected', 'not connected'));
      }
      const rid = ++this.rid;
      this.pending.set(rid, { resolve, reject });
      this.ws.send(JSON.stringify({ op, rid, ...fields }));
    });
  }

  #frame(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    if (f.rid !== undefined && this.pending.has(f.rid)) {
      const p = this.pending.get(f.rid);
      this.pending.delete(f.rid);
      if (f.op === 'error') p.reject(new SbError(f.code, f.message, f));
      else p.resolve(f);
      return;
    }
    switch (f.op) {
      case 'msg':
        return this.#deliver([f.msg], true);
      case 'kick':
        // "signed out" and "session revoked" end the session; any other reason (a second
        // sign-in of this device, a ban) only this connection.
        this.wanted = false;
        if (f.reason === 'signed out' || f.reason === 'session revoked') this.#forget(f.reason);
        else this.setState('kicked', { reason: f.reason });
        return this.emit('kick', f);
      case 'drain':
        return; // the close follows; reconnecting goes through /v1/gateways again
      case 'error':
        return this.emit('error', new SbError(f.code, f.message, f));
      default:
        return this.emit(f.op, f);
    }
  }

  // ---- messages ------------------------------------------------------------------------------

  /** Hands new messages to the app once each (by conv and seq), acks them, and fetches any gap. */
  #deliver(msgs, live) {
    const acks = new Map();
    let gap = false;
    for (const m of msgs) {
      const k = `${m.conv}\n${m.seq}`;
      const top = this.top.get(m.conv);
      if (top === undefined || m.seq === top + 1) this.top.set(m.conv, m.seq);
      else if (m.seq > top + 1) gap = true;
      acks.set(m.conv, Math.max(acks.get(m.conv) || 0, this.top.get(m.conv)));
      if (this.seen.has(k)) continue;
      this.seen.add(k);
      if (m.type !== 'void') this.emit('msg', m);
    }
    for (const [conv, seq] of acks) this.request('ack', { conv, seq }).catch(() => {});
    if (gap && live) this.sync().catch(() => {});
  }

  /** Catches up: `sync` from the highest gap-free seq known per conversation (the device's
   *  acked position for the others), page after page. Called after every auth. */
  sync() {
    if (this.syncing) return this.syncing;
    this.syncing = (async () => {
      try {
        for (;;) {
          const r = await this.request('sync', { since: Object.fromEntries(this.top), limit: 500 });
          this.#deliver(r.msgs || [], false);
          if (!r.more) break;
        }
      } finally {
        this.syncing = null;
      }
    })();
    return this.syncing;
  }

  /** Records a message the app got another way (`history`, its own `send.ok`) as seen. */
  markSeen(m) {
    this.seen.add(`${m.conv}\n${m.seq}`);
    if (this.top.get(m.conv) === m.seq - 1) this.top.set(m.conv, m.seq);
  }

  /** Sends a message: `{to | group, type, body, cmid?}`. Kept in an outbox until `send.ok`,
   *  and sent again with the same cmid after a reconnect (the server stores it once). */
  send(req) {
    const full = { cmid: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`, ...req };
    return new Promise((resolve, reject) => {
      this.outbox.set(full.cmid, { req: full, resolve, reject });
      if (this.state === 'online') this.#trySend(full.cmid);
    });
  }

  #trySend(cmid) {
    const o = this.outbox.get(cmid);
    if (!o || o.inflight) return;
    o.inflight = true;
    this.request('send', o.req).then(
      (ok) => {
        this.outbox.delete(cmid);
        const m = { conv: ok.conv, mid: ok.mid, seq: ok.seq, ts: ok.ts, from: this.session?.user, cmid };
        this.markSeen(m);
        o.resolve({ ...o.req, ...m });
      },
      (e) => {
        o.inflight = false;
        if (e.code === 'disconnected') return; // sent again after the reconnect
        if (e.code === 'rate_limited' || e.code === 'unavailable') {
          setTimeout(() => this.#trySend(cmid), e.retry_after_ms || 1000);
          return;
        }
        this.outbox.delete(cmid);
        o.reject(e);
      },
    );
  }

  #flushOutbox() {
    for (const cmid of this.outbox.keys()) this.#trySend(cmid);
  }

  // ---- thin wrappers over the remaining ops --------------------------------------------------

  history(conv, beforeSeq, limit = 50) {
    return this.request('history', { conv, before_seq: beforeSeq, limit }).then((r) => {
      for (const m of r.msgs || []) this.markSeen(m);
      return r.msgs || [];
    });
  }
  convs() {
    return this.request('convs').then((r) => r.convs || []);
  }
  read(conv, seq) {
    return this.request('read', { conv, seq });
  }
  recall(conv, mid) {
    return this.request('recall', { conv, mid });
  }
  typing(conv) {
    return this.request('typing', { conv });
  }
  /** Events in the conversation's sequence (docs/protocol.md §7.3): each reply names its seq. */
  edit(conv, mid, cmid, text) {
    return this.request('edit', { conv, mid, cmid, text });
  }
  react(conv, mid, cmid, emoji, on = true) {
    return this.request(on ? 'react' : 'unreact', { conv, mid, cmid, emoji });
  }
  pin(conv, mid, cmid, on = true) {
    return this.request(on ? 'pin' : 'unpin', { conv, mid, cmid });
  }
  /** Messages of the caller's conversations holding every word of `q` (docs/protocol.md §7.3):
   *  `{results: [{conv, mid, seq, from, ts, type, text, highlights, score}], next_offset?}`. */
  search(q, { conv, from, before, limit, offset } = {}) {
    return this.request('search', { q, conv, from, before, limit, offset });
  }
  /** Stops offline notifications of a conversation (until `until`, ms; for good without it). */
  mute(conv, until) {
    return this.request('mute', { conv, until });
  }
  unmute(conv) {
    return this.request('unmute', { conv });
  }
  /** Registers this device's push-service token for offline notifications. */
  pushRegister(platform, token) {
    return this.request('push.register', { platform, token });
  }
  pushUnregister() {
    return this.request('push.unregister');
  }

  /** Uploads a file (a File or Blob) to `POST /v1/files`; resolves to {file, url, name, mime, size}.
   *  The server reads the type from the bytes, so none is declared. */
  async upload(file, name) {
    if (this.session && this.session.expires_at < Date.now() + 5000) await this.refresh().catch(() => {});
    const path = `/v1/files?name=${encodeURIComponent(name || file.name || 'file')}`;
    const headers = { Authorization: `Bearer ${this.session?.access_token}`, 'Content-Type': 'application/octet-stream' };
    const res = await fetch(this.baseUrl + path, { method: 'POST', headers, body: file });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new SbError(data.code || `http_${res.status}`, data.message, data);
    return data;
  }

  /** An uploaded file's bytes (fetched with the access token), as an object URL. */
  async fileUrl(url) {
    if (this.session && this.session.expires_at < Date.now() + 5000) await this.refresh().catch(() => {});
    const res = await fetch(this.baseUrl + url, { headers: { Authorization: `Bearer ${this.session?.access_token}` } });
    if (!res.ok) throw new SbError(`http_${res.status}`, 'file not available');
    return URL.createObjectURL(await res.blob());
  }
  presence(users) {
    return this.request('presence', { users }).then((r) => r.online || {});
  }
  friendRequest(to, note) {
    return this.request('friend.request', { to, note });
  }
  friendAccept(from) {
    return this.request('friend.accept', { from });
  }
  friendReject(from) {
    return this.request('friend.reject', { from });
  }
  friendDelete(user) {
    return this.request('friend.delete', { user });
  }
  friends() {
    return this.request('friend.list');
  }
  groupCreate(name, members) {
    return this.request('group.create', { name, members });
  }
  groupJoin(group) {
    return this.request('group.join', { group });
  }
  groupLeave(group) {
    return this.request('group.leave', { group });
  }
  groupMembers(group) {
    return this.request('group.members', { group }).then((r) => r.members || []);
  }
  groups() {
    return this.request('group.list').then((r) => r.groups || []);
  }
  /** Call signalling: op is 'offer' | 'answer' | 'ice' | 'hangup'. */
  call(op, fields) {
    return this.request(`call.${op}`, fields);
  }
}

/** The conversation id of a direct chat between two users (docs/protocol.md §3). */
export function directConv(a, b) {
  return a < b ? `d:${a}:${b}` : `d:${b}:${a}`;
}
