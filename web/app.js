// The app: wires the SDK (client.js) to the store (store.js), the views (views.js) and calls
// (call.js). SDK events and replies become store changes; controls become SDK requests.

import { Client, directConv } from './client.js';
import { createStore } from './store.js';
import { render, peerOf, convName } from './views.js';
import { createCalls } from './call.js';

const PAGE = 30; // messages per history page
const $ = (id) => document.getElementById(id);

const sb = new Client();
const store = createStore();
const { state } = store;
const calls = createCalls(sb, store);
// For the browser tests and the console: the SDK and the state.
globalThis.switchboard = { sb, store, calls };

// ---- helpers -----------------------------------------------------------------------------------

let noticeTimer = null;
function notice(text, kind = 'error', sticky = false) {
  state.notice = { text, kind };
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => ((state.notice = null), store.changed()), 6000);
  store.changed();
}

/** Runs an action, showing its failure in the banner. */
function attempt(fn) {
  return async (...args) => {
    try {
      return await fn(...args);
    } catch (e) {
      if (e.code === 'disconnected') return notice('Not connected: try again once back online.');
      notice(e.code ? `${e.code}: ${e.message}` : String(e.message || e));
    }
  };
}

/** Puts a message into the store with what it tells about read positions: the sender has read
 *  everything up to a message they sent (the server marks it so). */
function put(m) {
  store.putMessage(m);
  if (m.seq && m.from) {
    const c = store.conv(m.conv);
    if (m.from === state.me) c.readSeq = Math.max(c.readSeq, m.seq);
    else c.peerRead = Math.max(c.peerRead, m.seq);
  }
}

function markRead() {
  const conv = state.open;
  if (!conv || document.visibilityState !== 'visible' || sb.state !== 'online') return;
  const c = state.convs.get(conv);
  if (c?.last && c.last.seq > c.readSeq) {
    c.readSeq = c.last.seq;
    c.mentioned = false;
    sb.read(conv, c.last.seq).catch(() => {});
    store.changed();
  }
}

function reset() {
  state.me = null;
  state.friends.clear();
  state.pending = [];
  state.groups.clear();
  state.convs.clear();
  state.messages.clear();
  state.older.clear();
  state.typing.clear();
  state.open = null;
  state.members = null;
  state.call = null;
  state.replying = null;
  state.search = null;
}

// ---- loading -----------------------------------------------------------------------------------

async function loadFriends() {
  const r = await sb.friends();
  state.friends = new Map((r.friends || []).map((f) => [f.user, f]));
  state.pending = r.pending || [];
  store.changed();
}

async function loadGroups() {
  const groups = await sb.groups();
  state.groups = new Map(groups.map((g) => [g.group, g]));
  for (const g of groups) store.conv(`g:${g.group}`); // groups without messages are listed too
  for (const id of [...state.convs.keys()]) {
    if (id.startsWith('g:') && !state.groups.has(id.slice(2))) forgetConv(id);
  }
  store.changed();
}

async function loadConvs() {
  for (const c of await sb.convs()) {
    const s = store.conv(c.conv);
    s.readSeq = Math.max(s.readSeq, c.read_seq || 0);
    s.mentioned = !!c.mentioned;
    s.muted = !!c.muted;
    if (c.last) {
      sb.markSeen(c.last);
      put(c.last);
    }
  }
  store.changed();
}

/** Loads the page of messages before the oldest one held (the newest page first). */
async function loadOlder(conv) {
  const o = state.older.get(conv) || {};
  if (o.loading || o.done) return;
  const held = [...(state.messages.get(conv)?.values() || [])].filter((m) => m.seq).map((m) => m.seq);
  const before = o.loaded && held.length ? Math.min(...held) : undefined;
  if (before === 1) return state.older.set(conv, { ...o, done: true }), store.changed();
  state.older.set(conv, { ...o, loading: true });
  store.changed();
  try {
    const msgs = await sb.history(conv, before, PAGE);
    for (const m of msgs) put(m);
    const min = Math.min(...msgs.map((m) => m.seq));
    const done = msgs.length < PAGE || min <= 1;
    state.older.set(conv, { loaded: true, done });
    // A page that does not fill the list gives nothing to scroll: fetch the next one.
    if (!done) {
      requestAnimationFrame(() => {
        const box = $('messages');
        if (state.open === conv && box.scrollHeight <= box.clientHeight + 60) attempt(loadOlder)(conv);
      });
    }
  } catch (e) {
    state.older.set(conv, o);
    throw e;
  } finally {
    store.changed();
  }
}

function forgetConv(conv) {
  state.convs.delete(conv);
  state.messages.delete(conv);
  state.older.delete(conv);
  if (state.open === conv) state.open = null;
}

// ---- SDK events --------------------------------------------------------------------------------

sb.on('state', (s) => {
  state.conn = s;
  if (s.state === 'kicked') notice(`Disconnected: ${s.reason}. Reload the page to use this tab again.`, 'error', true);
  else if (s.state === 'online' && state.notice?.kind === 'error') state.notice = null;
  store.changed();
});
sb.on('session', (s) => {
  if (!s) {
    reset();
    store.changed();
  }
});
sb.on('ready', attempt(async () => {
  await Promise.all([loadFriends(), loadGroups(), loadConvs()]);
  if (state.open && !state.older.get(state.open)?.loaded) await loadOlder(state.open);
  markRead();
}));
sb.on('msg', (m) => {
  put(m);
  if ((m.mentions || []).includes(state.me) && m.conv !== state.open) store.conv(m.conv).mentioned = true;
  const t = state.typing.get(m.conv);
  if (t && t.user === m.from) state.typing.delete(m.conv);
  if (m.conv === state.open) markRead();
});
sb.on('read', (f) => {
  if (f.user === state.me) return;
  const c = store.conv(f.conv);
  c.peerRead = Math.max(c.peerRead, f.seq);
  store.changed();
});
sb.on('recall', (f) => {
  for (const m of state.messages.get(f.conv)?.values() || []) {
    if (m.mid === f.mid) put({ ...m, type: 'recalled', body: '' });
  }
  const c = state.convs.get(f.conv);
  if (c?.last?.mid === f.mid) c.last = { ...c.last, type: 'recalled', body: '' };
  store.changed();
});
sb.on('typing', (f) => {
  state.typing.set(f.conv, { user: f.user, until: Date.now() + 4000 });
  setTimeout(() => store.changed(), 4100);
  store.changed();
});
sb.on('presence', (f) => {
  const fr = state.friends.get(f.user);
  if (fr) fr.online = f.online;
  store.changed();
});
sb.on('friend.request', (f) => {
  state.pending = [...state.pending.filter((p) => p.from !== f.from), { from: f.from, note: f.note }];
  store.changed();
});
sb.on('friend.accepted', attempt(loadFriends));
sb.on('group.joined', attempt(loadGroups));

// ---- actions -----------------------------------------------------------------------------------

const act = {
  now: () => sb.now(),
  open: attempt(async (conv) => {
    state.open = conv;
    state.members = null;
    store.conv(conv);
    store.changed();
    if (!state.older.get(conv)?.loaded) await loadOlder(conv);
    markRead();
  }),
  openDirect: (user) => act.open(directConv(state.me, user)),
  accept: attempt(async (from) => {
    await sb.friendAccept(from);
    await loadFriends();
  }),
  reject: attempt(async (from) => {
    await sb.friendReject(from);
    await loadFriends();
  }),
  recall: attempt(async (m) => {
    await sb.recall(m.conv, m.mid);
    put({ ...m, type: 'recalled', body: '' });
  }),
  /** Reacts (or takes the reaction back); the event is shown at once from the reply. */
  react: attempt(async (m, emoji, on) => {
    const cmid = newCmid();
    const r = await sb.react(m.conv, m.mid, cmid, emoji, on);
    put({ conv: m.conv, mid: r.mid, seq: r.seq, ts: r.ts, cmid, from: state.me, type: 'reaction', body: { mid: m.mid, emoji, on } });
  }),
  /** The next message sent in this conversation answers `m` (quoting its current `text`). */
  reply: (m, text) => {
    const body = text ?? (m.type === 'text' ? m.body : m.body?.name || `[${m.type}]`);
    state.replying = { conv: m.conv, mid: m.mid, from: m.from, preview: String(body).slice(0, 100) };
    $('text').focus();
    store.changed();
  },
  /** Mutes the open conversation's offline notifications, or unmutes them. */
  toggleMute: attempt(async () => {
    const conv = state.open;
    const c = store.conv(conv);
    if (c.muted) await sb.unmute(conv);
    else await sb.mute(conv);
    c.muted = !c.muted;
    store.changed();
  }),
  /** Puts a message's text in the composer; the next submit saves it as an edit. */
  edit: (m, text) => {
    state.editing = { conv: m.conv, mid: m.mid };
    $('text').value = text;
    $('text').focus();
    store.changed();
  },
  /** An uploaded file's object URL, or null while it is being fetched (the page redraws then). */
  fileUrl: (path) => {
    const known = fileUrls.get(path);
    if (known !== undefined) return known;
    fileUrls.set(path, null);
    sb.fileUrl(path).then(
      (u) => (fileUrls.set(path, u), store.changed()),
      () => fileUrls.delete(path),
    );
    return null;
  },
};

/** Object URLs of uploaded files shown on this page, by path. */
const fileUrls = new Map();

function newCmid() {
  return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

async function saveEdit(text) {
  const { conv, mid } = state.editing;
  state.editing = null;
  store.changed();
  const cmid = newCmid();
  try {
    const r = await sb.edit(conv, mid, cmid, text);
    put({ conv, mid: r.mid, seq: r.seq, ts: r.ts, cmid, from: state.me, type: 'edit', body: { mid, text } });
  } catch (e) {
    notice(`not edited: ${e.code}: ${e.message}`);
  }
}

function target(conv) {
  return conv.startsWith('g:') ? { group: conv.slice(2) } : { to: peerOf(state, conv) };
}

/** The users a group message names as `@user` (the server checks that they are members). */
function mentionsIn(conv, text) {
  if (!conv.startsWith('g:') || typeof text !== 'string') return [];
  const users = [...text.matchAll(/(?:^|\s)@([a-z0-9_.-]{3,32})/g)].map((m) => m[1]);
  return [...new Set(users)].filter((u) => u !== state.me);
}

async function sendMessage(type, body) {
  const conv = state.open;
  if (!conv) return;
  const cmid = newCmid();
  const replying = state.replying?.conv === conv ? state.replying : null;
  state.replying = null;
  const refs = {};
  if (replying) refs.reply_to = replying.mid;
  const mentions = mentionsIn(conv, body);
  if (mentions.length) refs.mentions = mentions;
  const quote = replying ? { mid: replying.mid, from: replying.from, preview: replying.preview, type: 'text' } : undefined;
  const local = { conv, cmid, from: state.me, type, body, ts: sb.now(), reply_to: quote, mentions };
  put(local);
  try {
    const sent = await sb.send({ ...target(conv), cmid, type, body, ...refs });
    put({ ...local, mid: sent.mid, seq: sent.seq, ts: sent.ts });
  } catch (e) {
    put({ ...local, failed: true });
    notice(`not sent: ${e.code}: ${e.message}`);
  }
}

const MIME = { png: 'image/png', jpg: 'image/jpeg', jpeg: 'image/jpeg', gif: 'image/gif', webp: 'image/webp', svg: 'image/svg+xml' };

function bind() {
  const form = $('login-form');
  const creds = () => ({ user: $('login-user').value.trim(), pass: $('login-pass').value, nick: $('login-nick').value.trim() });
  const signIn = async (register) => {
    $('login-error').textContent = '';
    if (!form.reportValidity()) return;
    const { user, pass, nick } = creds();
    try {
      if (register) await sb.register(user, pass, nick);
      await sb.login(user, pass);
      state.me = user;
      state.notice = null;
      sb.connect();
      store.changed();
    } catch (e) {
      $('login-error').textContent = `${e.code || 'error'}: ${e.message}`;
    }
  };
  form.addEventListener('submit', (e) => (e.preventDefault(), signIn(false)));
  $('register-btn').addEventListener('click', () => signIn(true));
  $('logout-btn').addEventListener('click', attempt(() => sb.logout()));

  $('friend-form').addEventListener('submit', attempt(async (e) => {
    e.preventDefault();
    await sb.friendRequest($('friend-to').value.trim(), $('friend-note').value || undefined);
    notice(`Friend request sent to ${$('friend-to').value.trim()}`, 'info');
    $('friend-to').value = '';
    $('friend-note').value = '';
  }));
  $('group-form').addEventListener('submit', attempt(async (e) => {
    e.preventDefault();
    const members = [...$('group-pick').querySelectorAll('input:checked')].map((i) => i.value);
    const r = await sb.groupCreate($('group-name').value, members);
    $('group-name').value = '';
    for (const i of $('group-pick').querySelectorAll('input:checked')) i.checked = false;
    await loadGroups();
    await act.open(r.conv);
  }));
  $('join-form').addEventListener('submit', attempt(async (e) => {
    e.preventDefault();
    const r = await sb.groupJoin($('join-id').value.trim());
    $('join-id').value = '';
    await loadGroups();
    await act.open(r.conv);
  }));
  $('leave-btn').addEventListener('click', attempt(async () => {
    const conv = state.open;
    if (!conv?.startsWith('g:') || !confirm(`Leave ${convName(state, conv)}?`)) return;
    await sb.groupLeave(conv.slice(2));
    state.groups.delete(conv.slice(2));
    forgetConv(conv);
    store.changed();
  }));
  $('members-btn').addEventListener('click', attempt(async () => {
    const conv = state.open;
    if (state.members?.conv === conv) state.members = null;
    else state.members = { conv, list: await sb.groupMembers(conv.slice(2)) };
    store.changed();
  }));

  let lastTyping = 0;
  $('text').addEventListener('input', () => {
    if (!state.open || Date.now() - lastTyping < 2000 || sb.state !== 'online') return;
    lastTyping = Date.now();
    sb.typing(state.open).catch(() => {});
  });
  $('composer').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = $('text').value;
    if (!text.trim()) return;
    $('text').value = '';
    lastTyping = 0;
    if (state.editing && state.editing.conv === state.open) saveEdit(text);
    else sendMessage('text', text);
  });
  $('reply-cancel').addEventListener('click', () => ((state.replying = null), store.changed()));
  $('mute-btn').addEventListener('click', () => act.toggleMute());
  $('search-form').addEventListener('submit', attempt(async (e) => {
    e.preventDefault();
    const q = $('search-q').value.trim();
    if (!q) return;
    const r = await sb.search(q);
    state.search = { q, results: r.results || [], next: r.next_offset };
    store.changed();
  }));
  $('text').addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && state.replying) {
      state.replying = null;
      store.changed();
    }
    if (e.key === 'Escape' && state.editing) {
      state.editing = null;
      $('text').value = '';
      store.changed();
    }
  });
  $('file-btn').addEventListener('click', () => $('attach-file').click());
  $('attach-file').addEventListener('change', attempt(async () => {
    const file = $('attach-file').files[0];
    $('attach-file').value = '';
    if (!file || !state.open) return;
    const up = await sb.upload(file);
    const media = { url: up.url, name: up.name, size: up.size, mime: up.mime };
    await sendMessage(up.mime.startsWith('image/') ? 'image' : 'file', media);
  }));
  $('attach-btn').addEventListener('click', () => {
    $('attach').hidden = false;
    $('attach-url').focus();
  });
  $('attach-cancel').addEventListener('click', () => ($('attach').hidden = true));
  $('attach').addEventListener('submit', (e) => {
    e.preventDefault();
    const url = $('attach-url').value.trim();
    const name = decodeURIComponent(new URL(url).pathname.split('/').pop() || url);
    const ext = name.split('.').pop().toLowerCase();
    const mime = MIME[ext] || 'application/octet-stream';
    $('attach-url').value = '';
    $('attach').hidden = true;
    sendMessage(mime.startsWith('image/') ? 'image' : 'file', { url, name, size: 0, mime });
  });

  $('messages').addEventListener('scroll', (e) => {
    if (e.target.scrollTop < 60 && state.open) attempt(loadOlder)(state.open);
  });
  document.addEventListener('visibilitychange', markRead);
  window.addEventListener('online', () => sb.retryNow());

  $('call-audio').addEventListener('click', () => calls.start(peerOf(state, state.open), false));
  $('call-video').addEventListener('click', () => calls.start(peerOf(state, state.open), true));
  $('call-accept').addEventListener('click', () => calls.accept());
  $('call-hangup').addEventListener('click', () => calls.hangup());
}

store.subscribe((s) => render(s, store, act));
bind();
if (sb.session) {
  state.me = sb.session.user;
  sb.connect();
}
store.changed();
