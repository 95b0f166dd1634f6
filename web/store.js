// The page's state: what the views draw. Plain data plus a change notification; the app
// (app.js) writes it from the SDK's replies and pushes, the views (views.js) read it.

export function createStore() {
  const subs = new Set();
  let queued = false;
  const state = {
    me: null, // user id when signed in
    conn: { state: 'offline' }, // from the SDK's `state` event
    notice: null, // {text, kind} shown in the banner (errors, kicks)
    friends: new Map(), // user -> {user, nickname, online}
    pending: [], // incoming friend requests [{from, note}]
    groups: new Map(), // group id -> {group, name, role}
    convs: new Map(), // conv -> {conv, last, readSeq, peerRead, ts}; unread is last.seq - readSeq
    messages: new Map(), // conv -> Map(seq or cmid -> message), see putMessage
    older: new Map(), // conv -> {loading, done} state of history scroll-back
    typing: new Map(), // conv -> {user, until}
    open: null, // the conversation on screen
    members: null, // {group, list} when the members panel is open
    call: null, // {id, peer, dir, state, video, reason}
    editing: null, // {conv, mid} of the message the composer is editing
    replying: null, // {conv, mid, from, preview} of the message the next send answers
    search: null, // {q, results, next} of the last search
  };

  /** Notifies subscribers once per task (a microtask later), however many changes were made. */
  function changed() {
    if (queued) return;
    queued = true;
    queueMicrotask(() => {
      queued = false;
      for (const fn of subs) fn(state);
    });
  }

  function conv(id) {
    if (!state.convs.has(id)) {
      state.convs.set(id, { conv: id, last: null, readSeq: 0, peerRead: 0, ts: 0, mentioned: false, muted: false });
    }
    return state.convs.get(id);
  }

  /** Adds or replaces a message. Stored messages are keyed by seq; one still being sent by its
   *  cmid, and it moves to its seq once the server has it. */
  function putMessage(m) {
    if (!state.messages.has(m.conv)) state.messages.set(m.conv, new Map());
    const list = state.messages.get(m.conv);
    if (m.seq) list.delete(`c:${m.cmid}`);
    list.set(m.seq ? m.seq : `c:${m.cmid}`, m);
    const c = conv(m.conv);
    if (m.seq && (!c.last || m.seq >= c.last.seq)) {
      c.last = m;
      c.ts = m.ts;
    } else if (!m.seq && !c.last) {
      c.ts = m.ts;
    }
    changed();
  }

  /** Messages of a conversation: stored ones by seq, then the ones still being sent. */
  function messagesOf(id) {
    const list = [...(state.messages.get(id)?.values() || [])];
    return list.sort((a, b) => (a.seq || Infinity) - (b.seq || Infinity) || a.ts - b.ts);
  }

  /** Conversations, newest activity first. */
  function convList() {
    return [...state.convs.values()].sort((a, b) => b.ts - a.ts || a.conv.localeCompare(b.conv));
  }

  return { state, subscribe: (fn) => (subs.add(fn), () => subs.delete(fn)), changed, conv, putMessage, messagesOf, convList };
}
