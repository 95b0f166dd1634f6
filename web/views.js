// The views: draw the store's state into the page's skeleton (index.html). Every piece of user
// content (names, notes, messages, URLs) goes in through textContent or a checked attribute,
// never as HTML.

const $ = (id) => document.getElementById(id);
const RECALL_WINDOW_MS = 120000; // the server's default (--recall-window-ms)
const EDIT_WINDOW_MS = 24 * 3600 * 1000; // the server's default (--edit-window-ms)
/** Message types that change another message instead of being one (docs/protocol.md §7.3). */
const EVENTS = new Set(['edit', 'reaction', 'pin', 'void']);

/** Builds an element: h('li', {class: 'x', onclick}, 'text', child, ...). Strings become text. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return el;
}

/** A conversation's display name: the peer's nickname, or the group's name. */
export function convName(state, conv) {
  if (conv.startsWith('g:')) return state.groups.get(conv.slice(2))?.name || conv.slice(2);
  const peer = peerOf(state, conv);
  const f = state.friends.get(peer);
  return f && f.nickname && f.nickname !== peer ? `${f.nickname} (${peer})` : peer;
}

export function peerOf(state, conv) {
  if (!conv.startsWith('d:')) return null;
  const [, a, b] = conv.split(':');
  return a === state.me ? b : a;
}

function time(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function day(ts) {
  const d = new Date(ts);
  const today = new Date();
  const yesterday = new Date(Date.now() - 86400000);
  if (d.toDateString() === today.toDateString()) return 'Today';
  if (d.toDateString() === yesterday.toDateString()) return 'Yesterday';
  return d.toLocaleDateString([], { weekday: 'short', year: 'numeric', month: 'short', day: 'numeric' });
}

/** One line of text for a message (conversation list, notifications). */
export function preview(m) {
  if (!m) return '';
  switch (m.type) {
    case 'text':
      return m.body;
    case 'recalled':
      return 'message recalled';
    case 'edit':
      return `edited: ${m.body?.text || ''}`;
    case 'reaction':
      return m.body?.on ? `reacted ${m.body?.emoji || ''}` : 'removed a reaction';
    case 'pin':
      return m.body?.on ? 'pinned a message' : 'unpinned a message';
    case 'image':
      return `[image] ${m.body?.name || ''}`;
    case 'file':
    case 'audio':
    case 'video':
      return `[${m.type}] ${m.body?.name || ''}`;
    default:
      return `[${m.type}]`;
  }
}

function safeUrl(u) {
  try {
    const url = new URL(u, location.href);
    return ['http:', 'https:'].includes(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

const CONN_TEXT = {
  online: 'online',
  connecting: 'connecting…',
  offline: 'offline, reconnecting…',
  kicked: 'disconnected',
  'signed-out': 'signed out',
};

/** Draws everything from the state; `act` holds the app's actions for the controls. */
export function render(state, store, act) {
  const signedIn = !!state.me;
  $('login').hidden = signedIn;
  $('main').hidden = !signedIn;
  const banner = $('banner');
  banner.hidden = !state.notice;
  banner.textContent = state.notice?.text || '';
  banner.className = `banner ${state.notice?.kind || ''}`;
  if (!signedIn) return;

  $('me-name').textContent = state.me;
  const conn = $('conn');
  conn.textContent = CONN_TEXT[state.conn.state] || state.conn.state;
  conn.className = `conn ${state.conn.state}`;
  conn.dataset.state = state.conn.state;

  renderSearch(state, act);
  renderConvs(state, store, act);
  renderFriends(state, act);
  renderChat(state, store, act);
  renderCall(state, act);
}

/** The last search's results: each names its conversation and shows its text with the query's
 *  words marked (the server's highlights, counted in code points). */
function renderSearch(state, act) {
  const s = state.search;
  const items = !s
    ? []
    : s.results.length === 0
      ? [h('li', { class: 'search-none' }, `Nothing found for “${s.q}”`)]
      : s.results.map((r) =>
          h(
            'li',
            { class: 'search-hit', dataset: { conv: r.conv, mid: r.mid }, onclick: () => act.open(r.conv) },
            h('span', { class: 'conv-name' }, `${convName(state, r.conv)} · ${r.from}`),
            h('span', { class: 'hit-text' }, ...highlighted(r.text, r.highlights || [])),
          ),
        );
  $('search-results').replaceChildren(...items);
}

/** `text` as nodes, the `[start, end)` code-point ranges in <mark>. */
function highlighted(text, spans) {
  const chars = Array.from(text);
  const out = [];
  let at = 0;
  for (const [start, end] of spans) {
    if (start < at || end > chars.length) continue;
    out.push(chars.slice(at, start).join(''), h('mark', {}, chars.slice(start, end).join('')));
    at = end;
  }
  out.push(chars.slice(at).join(''));
  return out;
}

function renderConvs(state, store, act) {
  const items = store.convList().map((c) => {
    const unread = c.last ? Math.max(0, c.last.seq - c.readSeq) : 0;
    return h(
      'li',
      { class: c.conv === state.open ? 'conv active' : 'conv', dataset: { conv: c.conv }, onclick: () => act.open(c.conv) },
      h('span', { class: 'conv-name' }, convName(state, c.conv)),
      c.muted ? h('span', { class: 'muted', title: 'muted' }, '🔕') : null,
      c.mentioned && unread > 0 && c.conv !== state.open ? h('span', { class: 'badge mention', title: 'you were mentioned' }, '@') : null,
      unread > 0 && c.conv !== state.open ? h('span', { class: 'badge' }, String(unread)) : null,
      h('span', { class: 'conv-last' }, preview(c.last)),
    );
  });
  $('conv-list').replaceChildren(...items);
  const unread = store.convList().reduce((n, c) => n + (c.last && c.conv !== state.open ? Math.max(0, c.last.seq - c.readSeq) : 0), 0);
  document.title = unread ? `(${unread}) Switchboard` : 'Switchboard';
}

function renderFriends(state, act) {
  $('pending-list').replaceChildren(
    ...state.pending.map((p) =>
      h(
        'li',
        { class: 'pending', dataset: { from: p.from } },
        h('span', { class: 'pending-from' }, p.from),
        p.note ? h('span', { class: 'note' }, p.note) : null,
        h('button', { class: 'accept', onclick: () => act.accept(p.from) }, 'Accept'),
        h('button', { class: 'reject secondary', onclick: () => act.reject(p.from) }, 'Reject'),
      ),
    ),
  );
  const friends = [...state.friends.values()].sort((a, b) => a.user.localeCompare(b.user));
  $('friend-list').replaceChildren(
    ...friends.map((f) =>
      h(
        'li',
        { class: 'friend', dataset: { user: f.user, online: String(!!f.online) }, onclick: () => act.openDirect(f.user) },
        h('span', { class: f.online ? 'dot on' : 'dot', title: f.online ? 'online' : 'offline' }),
        h('span', { class: 'friend-name' }, f.nickname && f.nickname !== f.user ? `${f.nickname} (${f.user})` : f.user),
      ),
    ),
  );
  // Friends to add to the next group.
  const pick = $('group-pick');
  const chosen = new Set([...pick.querySelectorAll('input:checked')].map((i) => i.value));
  pick.replaceChildren(
    ...friends.map((f) =>
      h('label', { class: 'pick' }, h('input', { type: 'checkbox', value: f.user, checked: chosen.has(f.user) }), f.user),
    ),
  );
}

function renderChat(state, store, act) {
  const open = state.open;
  $('empty').hidden = !!open;
  $('chat').hidden = !open;
  if (!open) return;
  const isGroup = open.startsWith('g:');
  $('chat-title').textContent = convName(state, open);
  const peer = peerOf(state, open);
  const f = peer && state.friends.get(peer);
  $('chat-sub').textContent = isGroup ? `group ${open.slice(2)}` : f ? (f.online ? 'online' : 'offline') : '';
  $('call-audio').hidden = isGroup;
  $('call-video').hidden = isGroup;
  $('members-btn').hidden = !isGroup;
  $('mute-btn').textContent = state.convs.get(open)?.muted ? 'Unmute' : 'Mute';
  const replying = state.replying?.conv === open ? state.replying : null;
  $('replying').hidden = !replying;
  $('replying-text').textContent = replying ? `Replying to ${replying.from}: ${replying.preview}` : '';
  $('leave-btn').hidden = !isGroup;

  const members = $('members');
  members.hidden = !(state.members && state.members.conv === open);
  if (!members.hidden) {
    members.replaceChildren(
      h('strong', {}, `Members (${state.members.list.length})`),
      h('ul', {}, ...state.members.list.map((m) => h('li', { class: 'member' }, m.user, m.role !== 'member' ? ` · ${m.role}` : ''))),
    );
  }

  renderMessages(state, store, act);
  $('send-btn').textContent = state.editing?.conv === open ? 'Save' : 'Send';

  const t = state.typing.get(open);
  $('typing').textContent = t && t.until > Date.now() ? `${t.user} is typing…` : '';
}

function renderMessages(state, store, act) {
  const box = $('messages');
  const open = state.open;
  const c = state.convs.get(open);
  const older = state.older.get(open) || {};
  // Keep the reader's place: stick to the bottom if there, else keep the distance from it.
  const fromBottom = box.scrollHeight - box.scrollTop - box.clientHeight;
  const sameConv = box.dataset.conv === open;
  const rows = [];
  rows.push(h('div', { class: 'older' }, older.done ? 'Beginning of the conversation' : older.loading ? 'Loading…' : ''));
  let lastDay = null;
  const list = store.messagesOf(open);
  const folded = fold(list);
  for (const m of list) {
    if (EVENTS.has(m.type)) continue;
    const d = day(m.ts);
    if (d !== lastDay) {
      rows.push(h('div', { class: 'day' }, d));
      lastDay = d;
    }
    rows.push(messageRow(state, c, m, act, folded.get(m.mid)));
  }
  box.replaceChildren(...rows);
  box.dataset.conv = open;
  if (!sameConv || fromBottom < 40) box.scrollTop = box.scrollHeight;
  else box.scrollTop = box.scrollHeight - box.clientHeight - fromBottom;
}

/** What the events among `list` (seq order) say of each message, by mid: its current text and
 *  edit time, who holds which reaction, whether it is pinned. */
function fold(list) {
  const out = new Map();
  const of = (mid) => {
    if (!out.has(mid)) out.set(mid, { text: null, editedTs: 0, reactions: new Map(), pinned: false });
    return out.get(mid);
  };
  const senders = new Map(list.filter((m) => m.mid && !EVENTS.has(m.type)).map((m) => [m.mid, m.from]));
  for (const e of list) {
    const target = e.body?.mid;
    if (!target || !EVENTS.has(e.type)) continue;
    const f = of(target);
    if (e.type === 'edit' && senders.get(target) === e.from && typeof e.body.text === 'string') {
      f.text = e.body.text;
      f.editedTs = e.ts;
    } else if (e.type === 'reaction' && typeof e.body.emoji === 'string') {
      const users = f.reactions.get(e.body.emoji) || new Set();
      if (e.body.on) users.add(e.from);
      else users.delete(e.from);
      f.reactions.set(e.body.emoji, users);
    } else if (e.type === 'pin') {
      f.pinned = !!e.body.on;
    }
  }
  return out;
}

function messageRow(state, c, m, act, f) {
  const mine = m.from === state.me;
  const live = m.seq && m.type !== 'recalled';
  const body = messageBody(f?.text != null && m.type === 'text' ? { ...m, body: f.text } : m, act);
  let status = null;
  if (mine && m.type !== 'recalled') {
    const s = m.failed ? 'failed' : !m.seq ? 'sending' : c && c.peerRead >= m.seq ? 'read' : 'sent';
    status = h('span', { class: `status ${s}`, dataset: { status: s } }, s === 'read' ? 'read ✓✓' : s === 'sent' ? 'sent ✓' : s);
  }
  const canRecall = mine && live && act.now() - m.ts <= RECALL_WINDOW_MS;
  const canEdit = mine && live && m.type === 'text' && act.now() - m.ts <= EDIT_WINDOW_MS;
  const reactions = live
    ? [...(f?.reactions || new Map()).entries()]
        .filter(([, users]) => users.size > 0)
        .map(([emoji, users]) =>
          h(
            'button',
            { class: users.has(state.me) ? 'reaction mine' : 'reaction', dataset: { emoji }, onclick: () => act.react(m, emoji, !users.has(state.me)) },
            `${emoji} ${users.size}`,
          ),
        )
    : [];
  const liked = f?.reactions.get('👍')?.has(state.me);
  const mentionsMe = live && (m.mentions || []).includes(state.me);
  const quote = live && m.reply_to
    ? h('div', { class: 'quote', dataset: { mid: m.reply_to.mid } }, h('strong', {}, m.reply_to.from), ' ', m.reply_to.preview || `[${m.reply_to.type}]`)
    : null;
  return h(
    'div',
    {
      class: `msg ${mine ? 'mine' : 'theirs'} type-${m.type}${mentionsMe ? ' mentions-me' : ''}`,
      dataset: { seq: m.seq || '', cmid: m.cmid || '', mid: m.mid || '' },
    },
    !mine && state.open.startsWith('g:') ? h('span', { class: 'from' }, m.from) : null,
    quote,
    body,
    reactions.length ? h('span', { class: 'reactions' }, ...reactions) : null,
    h(
      'span',
      { class: 'meta' },
      f?.pinned && live ? h('span', { class: 'pinned', title: 'pinned' }, '📌') : null,
      f?.text != null && live ? h('span', { class: 'edited', title: new Date(f.editedTs).toLocaleString() }, 'edited') : null,
      h('span', { class: 'time' }, time(m.ts)),
      status,
      live && !liked ? h('button', { class: 'react link', title: 'react 👍', onclick: () => act.react(m, '👍', true) }, '👍') : null,
      live ? h('button', { class: 'reply link', onclick: () => act.reply(m, f?.text ?? null) }, 'reply') : null,
      canEdit ? h('button', { class: 'edit link', onclick: () => act.edit(m, f?.text ?? m.body) }, 'edit') : null,
      canRecall ? h('button', { class: 'recall link', onclick: () => act.recall(m) }, 'recall') : null,
    ),
  );
}

/** The same-origin path of a file uploaded to this server (`/v1/files/<id>`), else null. */
function uploadedPath(u) {
  try {
    const url = new URL(u, location.href);
    return url.origin === location.origin && url.pathname.startsWith('/v1/files/') ? url.pathname : null;
  } catch {
    return null;
  }
}

function messageBody(m, act) {
  if (m.type === 'text') return h('span', { class: 'text' }, m.body);
  if (m.type === 'recalled') return h('span', { class: 'text recalled' }, 'This message was recalled');
  if (['image', 'file', 'audio', 'video'].includes(m.type) && m.body && typeof m.body === 'object') {
    const name = m.body.name || m.body.url;
    const uploaded = uploadedPath(m.body.url);
    // An uploaded file needs the access token: fetched once, shown from an object URL.
    const url = uploaded ? act.fileUrl(uploaded) : safeUrl(m.body.url);
    if (uploaded && !url) return h('span', { class: 'media loading' }, `[${m.type}] ${name}`);
    if (!url) return h('span', { class: 'text' }, `[${m.type}] ${name}`);
    const link = h('a', { href: url, target: '_blank', rel: 'noopener noreferrer', class: 'file' }, name);
    if (m.type === 'image') return h('span', { class: 'media' }, h('img', { src: url, alt: name, class: 'image', loading: 'lazy' }), link);
    return link;
  }
  return h('span', { class: 'text custom' }, typeof m.body === 'string' ? m.body : JSON.stringify(m.body));
}

const CALL_TEXT = {
  calling: 'Calling…',
  ringing: 'Incoming call',
  connecting: 'Connecting…',
  connected: 'Connected',
  ended: 'Call ended',
};

function renderCall(state, act) {
  const call = state.call;
  $('call').hidden = !call;
  if (!call) return;
  $('call-title').textContent = `${call.video ? 'Video call' : 'Call'} with ${call.peer}`;
  document.querySelector('#call .videos').hidden = !call.video;
  const st = $('call-state');
  let text = CALL_TEXT[call.state] || call.state;
  if (call.state === 'ended' && call.reason) text += call.reason === 'timeout' ? ': no answer (rang out)' : `: ${call.reason}`;
  st.textContent = text;
  st.dataset.state = call.state;
  $('call-accept').hidden = call.state !== 'ringing';
  $('call-hangup').textContent = call.state === 'ended' ? 'Close' : call.state === 'ringing' ? 'Decline' : 'Hang up';
}
