// Switchboard's web client in a real browser: headless Chromium driven through playwright-core,
// against an all-in-one server this script starts (free ports, embedded storage in a temp dir).
// Run by scripts/browser-test.sh; environment:
//   SWITCHBOARD_BIN  the switchboard binary (required)
//   CHROMIUM         the browser (default /usr/bin/chromium)
//   ARTIFACTS        where screenshots and the server log go (default $TMPDIR/switchboard-browser)
// Tests wait for conditions (generous timeouts), never for durations.

import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, openSync } from 'node:fs';
import { createServer } from 'node:net';
import { createServer as createHttpServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const BIN = process.env.SWITCHBOARD_BIN;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ART = process.env.ARTIFACTS || join(process.env.TMPDIR || tmpdir(), 'switchboard-browser');
const WAIT = 20000; // generous: every wait is for a condition
const RING_MS = 10000; // the server's ring timeout in these tests
const PASSWORD = 'password123';

assert.ok(BIN, 'SWITCHBOARD_BIN must name the switchboard binary');
mkdirSync(ART, { recursive: true });

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function startServer() {
  const dir = mkdtempSync(join(process.env.TMPDIR || tmpdir(), 'sb-browser-'));
  const [http, ws] = [await freePort(), await freePort()];
  const log = openSync(join(ART, 'server.log'), 'w');
  const args = ['all-in-one', '--data-dir', dir, '--http-addr', `127.0.0.1:${http}`, '--ws-addr', `127.0.0.1:${ws}`,
    '--tcp-addr', 'off', '--ring-timeout-ms', String(RING_MS), '--auth-burst', '200', '--user-burst', '1000',
    '--argon2-memory-kib', '1024', '--argon2-iterations', '1'];
  const proc = spawn(BIN, args, { stdio: ['ignore', log, log] });
  const url = `http://127.0.0.1:${http}`;
  for (let i = 0; ; i++) {
    if (proc.exitCode !== null) throw new Error(`server exited (${proc.exitCode}); see ${ART}/server.log`);
    try {
      if ((await fetch(`${url}/healthz`)).ok) break;
    } catch {}
    if (i > 600) {
      proc.kill('SIGTERM');
      throw new Error(`server did not come up in 60 s; see ${ART}/server.log`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  let stopped = false;
  const stop = () => {
    if (stopped) return;
    stopped = true;
    proc.kill('SIGTERM');
    try {
      rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
    } catch {}
  };
  return { url, stop };
}

// ---- page helpers ------------------------------------------------------------------------------

const pageErrors = [];

async function newPage(browser, ctx) {
  const context = ctx || (await browser.newContext({ viewport: { width: 1100, height: 720 } }));
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('pageerror', (e) => pageErrors.push(`${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/WebSocket|ERR_INTERNET_DISCONNECTED|Failed to fetch|net::/.test(m.text())) {
      pageErrors.push(`console: ${m.text()}`);
    }
  });
  page.on('dialog', (d) => d.accept());
  await page.goto(server.url);
  return { page, context };
}

async function register(browser, name) {
  const { page, context } = await newPage(browser);
  await page.fill('#login-user', name);
  await page.fill('#login-pass', PASSWORD);
  await page.click('#register-btn');
  await online(page);
  return { name, page, context };
}

const online = (page) => page.waitForSelector('#conn[data-state="online"]');

async function befriend(a, b, note) {
  await a.page.fill('#friend-to', b.name);
  if (note) await a.page.fill('#friend-note', note);
  await a.page.click('#friend-add');
  await b.page.click(`.pending[data-from="${a.name}"] .accept`);
  await a.page.waitForSelector(`.friend[data-user="${b.name}"]`);
  await b.page.waitForSelector(`.friend[data-user="${a.name}"]`);
}

async function sendText(u, text) {
  await u.page.fill('#text', text);
  await u.page.press('#text', 'Enter');
}

/** Texts of the messages on screen, in screen order. */
const texts = (u) => u.page.$$eval('#messages .msg .text', (els) => els.map((e) => e.textContent));

const waitText = (u, text) =>
  u.page.waitForFunction((t) => [...document.querySelectorAll('#messages .msg .text')].some((e) => e.textContent === t), text);

/** A PNG drawn in the page (a sunset), as bytes. */
async function picture(page) {
  const data = await page.evaluate(() => {
    const c = document.createElement('canvas');
    [c.width, c.height] = [480, 320];
    const g = c.getContext('2d');
    const sky = g.createLinearGradient(0, 0, 0, 320);
    sky.addColorStop(0, '#2f6fed');
    sky.addColorStop(1, '#f7b267');
    g.fillStyle = sky;
    g.fillRect(0, 0, 480, 320);
    g.fillStyle = '#ffe8a3';
    g.beginPath();
    g.arc(360, 200, 50, 0, Math.PI * 2);
    g.fill();
    g.fillStyle = '#1d2330';
    g.fillRect(0, 250, 480, 70);
    return c.toDataURL('image/png');
  });
  return Buffer.from(data.split(',')[1], 'base64');
}

const shot = (u, name) => u.page.screenshot({ path: join(ART, `${name}.png`) });

const direct = (a, b) => (a.name < b.name ? `d:${a.name}:${b.name}` : `d:${b.name}:${a.name}`);

// ---- tests -------------------------------------------------------------------------------------

const tests = [];
const test = (name, fn) => tests.push({ name, fn });
const users = {};

test('two users register, befriend, chat both ways; unread badge, read receipt, typing, recall', async (browser) => {
  const { page } = await newPage(browser);
  await shot({ page }, '01-login');
  await page.context().close();
  const alice = (users.alice = await register(browser, 'alice'));
  const bob = (users.bob = await register(browser, 'bob'));
  await befriend(alice, bob, 'hi, it is alice');
  // Presence: bob is online in alice's list.
  await alice.page.waitForSelector('.friend[data-user="bob"][data-online="true"]');

  await alice.page.click('.friend[data-user="bob"]');
  await sendText(alice, 'hello bob');
  await alice.page.waitForSelector('.msg.mine .status[data-status="sent"]');
  // Bob has not opened the chat: an unread badge.
  const conv = direct(alice, bob);
  const badge = await bob.page.waitForSelector(`.conv[data-conv="${conv}"] .badge`);
  assert.equal(await badge.textContent(), '1');
  await shot(bob, '02-unread-badge');

  await bob.page.click(`.conv[data-conv="${conv}"]`);
  await waitText(bob, 'hello bob');
  await bob.page.waitForSelector(`.conv[data-conv="${conv}"]:not(:has(.badge))`);
  // Read receipt on alice's screen.
  await alice.page.waitForSelector('.msg.mine .status[data-status="read"]');

  // Typing shows on the other side while bob types.
  await bob.page.fill('#text', 'hi ali');
  await alice.page.waitForFunction(() => document.getElementById('typing').textContent.includes('bob is typing'));
  await bob.page.fill('#text', 'hi alice!');
  await bob.page.press('#text', 'Enter');
  await waitText(alice, 'hi alice!');
  await alice.page.waitForFunction(() => document.getElementById('typing').textContent === '');

  // Recall: gone on both screens, replaced by the recalled marker.
  await sendText(alice, 'oops, wrong chat');
  await waitText(bob, 'oops, wrong chat');
  await alice.page.click('.msg.mine:has-text("oops, wrong chat") .recall');
  for (const u of [alice, bob]) {
    await u.page.waitForFunction(() => ![...document.querySelectorAll('#messages .text')].some((e) => e.textContent === 'oops, wrong chat'));
    await u.page.waitForSelector('.msg .recalled');
  }
  assert.deepEqual(await texts(bob), ['hello bob', 'hi alice!', 'This message was recalled']);
  await shot(alice, '02-chat');
});

test('the receiving page goes offline; messages sent meanwhile arrive once each, in order, after it reconnects by itself; its own message waits in the outbox', async () => {
  const { alice, bob } = users;
  // Cut bob's network and close his socket: the client must notice and keep retrying.
  await bob.context.setOffline(true);
  await bob.page.evaluate(() => globalThis.switchboard.sb.ws.close());
  await bob.page.waitForSelector('#conn:not([data-state="online"])');
  const sent = ['while away 1', 'while away 2', 'while away 3', 'while away 4', 'while away 5'];
  for (const t of sent) await sendText(alice, t);
  await alice.page.waitForFunction((n) => document.querySelectorAll('.msg.mine .status[data-status="sent"]').length >= n, 5);
  // Still cut off: none of them reached bob's screen yet.
  assert.equal((await texts(bob)).filter((t) => t.startsWith('while away')).length, 0);
  assert.notEqual(await bob.page.getAttribute('#conn', 'data-state'), 'online');
  // Bob writes meanwhile: it waits in the outbox, shown as sending.
  await sendText(bob, 'written offline');
  await bob.page.waitForSelector('.msg.mine:has-text("written offline") .status[data-status="sending"]');
  await shot(bob, '04-offline');
  await bob.context.setOffline(false);
  await online(bob.page);
  await waitText(bob, 'while away 5');
  await bob.page.waitForSelector('.msg.mine:has-text("written offline") .status:is([data-status="sent"], [data-status="read"])');
  await waitText(alice, 'written offline');
  assert.equal((await texts(alice)).filter((t) => t === 'written offline').length, 1);
  const got = (await texts(bob)).filter((t) => t !== 'written offline');
  assert.deepEqual(got.slice(-5), sent, 'in order');
  assert.equal(new Set(got).size, got.length, `no duplicates: ${JSON.stringify(got)}`);
  // Read by bob once he is back on the open chat.
  await alice.page.waitForSelector('.msg.mine:has-text("while away 5") .status[data-status="read"]');
  // The same after a second cut, closed by the test only (no network change).
  await bob.page.evaluate(() => globalThis.switchboard.sb.ws.close());
  await sendText(alice, 'after the blip');
  await waitText(bob, 'after the blip');
  const again = await texts(bob);
  assert.equal(new Set(again).size, again.length, `no duplicates: ${JSON.stringify(again)}`);
});

test('a message with HTML renders as text (no element created, nothing run)', async () => {
  const { alice, bob } = users;
  const evil = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b>';
  await sendText(alice, evil);
  await waitText(bob, evil);
  for (const u of [alice, bob]) {
    assert.equal(await u.page.$$eval('#messages img, #messages script, #messages b, #conv-list img, #conv-list b', (e) => e.length), 0);
    assert.equal(await u.page.evaluate(() => window.__pwned), undefined);
  }
  const preview = await bob.page.textContent(`.conv[data-conv="${direct(alice, bob)}"] .conv-last`);
  assert.equal(preview, evil);
});

test('media messages by URL: an image shows inline, a file as a link', async () => {
  const { alice, bob } = users;
  // A media host on another port, serving a picture cut from a screenshot and a "file".
  const png = await picture(alice.page);
  const host = createHttpServer((req, res) => {
    res.writeHead(200, { 'Content-Type': req.url.endsWith('.png') ? 'image/png' : 'application/pdf' });
    res.end(req.url.endsWith('.png') ? png : '%PDF-1.4 not really');
  });
  await new Promise((r) => host.listen(0, '127.0.0.1', r));
  const base = `http://127.0.0.1:${host.address().port}`;
  try {
    for (const path of ['/sunset.png', '/notes%20v2.pdf']) {
      await alice.page.click('#attach-btn');
      await alice.page.fill('#attach-url', base + path);
      await alice.page.click('#attach-send');
    }
    await bob.page.waitForFunction(() => {
      const img = document.querySelector('#messages .msg img.image');
      return img && img.complete && img.naturalWidth > 0;
    });
    assert.equal(await bob.page.getAttribute('#messages .msg img.image', 'src'), `${base}/sunset.png`);
    await bob.page.waitForSelector('#messages a.file:has-text("notes v2.pdf")');
    await sendText(bob, 'nice picture, thanks');
    await waitText(alice, 'nice picture, thanks');
    await bob.page.waitForFunction(() => {
      const b = document.getElementById('messages');
      return b.scrollHeight - b.scrollTop - b.clientHeight < 5;
    });
    await shot(bob, '03-media');
  } finally {
    host.close();
  }
});

test('uploads, reactions and edits: a picture and a file through /v1/files; a reaction and an edit on both screens', async () => {
  const { alice, bob } = users;
  const png = await picture(alice.page);
  await alice.page.setInputFiles('#attach-file', { name: 'upload sunset.png', mimeType: 'image/png', buffer: png });
  await bob.page.waitForFunction(() =>
    [...document.querySelectorAll('#messages .msg img.image')].some((i) => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0),
  );
  await alice.page.setInputFiles('#attach-file', { name: 'minutes.txt', mimeType: 'text/plain', buffer: Buffer.from('the minutes') });
  const link = await bob.page.waitForSelector('#messages a.file:has-text("minutes.txt")');
  assert.match(await link.getAttribute('href'), /^blob:/, 'fetched with the access token');
  // The file as the server serves it to bob, and refuses it without a token.
  const [url, token] = await bob.page.evaluate(() => {
    const { sb, store } = globalThis.switchboard;
    const m = store.messagesOf(store.state.open).find((x) => x.body?.name === 'minutes.txt');
    return [m.body.url, sb.session.access_token];
  });
  const served = await fetch(server.url + url, { headers: { Authorization: `Bearer ${token}` } });
  assert.equal(served.headers.get('content-type'), 'text/plain; charset=utf-8');
  assert.equal(await served.text(), 'the minutes');
  assert.equal((await fetch(server.url + url)).status, 401);

  await sendText(alice, 'see you at 5');
  await waitText(bob, 'see you at 5');
  await bob.page.click('.msg.theirs:has-text("see you at 5") .react');
  for (const u of [alice, bob]) await u.page.waitForSelector('.msg:has-text("see you at 5") .reaction[data-emoji="👍"]:has-text("👍 1")');
  await alice.page.click('.msg.mine:has-text("see you at 5") .edit');
  await alice.page.waitForFunction(() => document.getElementById('send-btn').textContent === 'Save');
  await alice.page.fill('#text', 'see you at 6');
  await alice.page.press('#text', 'Enter');
  for (const u of [alice, bob]) {
    await waitText(u, 'see you at 6');
    await u.page.waitForSelector('.msg:has-text("see you at 6") .edited');
    await u.page.waitForSelector('.msg:has-text("see you at 6") .reaction:has-text("👍 1")');
  }
  assert.equal((await texts(bob)).filter((t) => t.startsWith('see you at')).length, 1, 'the edit changes the message, it adds none');
  // Taking the reaction back.
  await bob.page.click('.msg:has-text("see you at 6") .reaction.mine');
  await alice.page.waitForSelector('.msg:has-text("see you at 6"):not(:has(.reaction))');
  await shot(bob, '03b-uploads-reactions');
});

test('a friend request can be rejected', async (browser) => {
  const { alice } = users;
  const dave = (users.dave = await register(browser, 'dave'));
  await dave.page.fill('#friend-to', 'alice');
  await dave.page.fill('#friend-note', 'remember me?');
  await dave.page.click('#friend-add');
  await alice.page.waitForSelector('.pending[data-from="dave"] .note:has-text("remember me?")');
  await alice.page.click('.pending[data-from="dave"] .reject');
  await alice.page.waitForSelector('.pending[data-from="dave"]', { state: 'detached' });
  assert.equal(await alice.page.$('.friend[data-user="dave"]'), null);
  await dave.context.close();
  delete users.dave;
});

test('a group of three across contexts; members; history scroll-back loads older messages; leave and join by id', async (browser) => {
  const { alice, bob } = users;
  const carol = (users.carol = await register(browser, 'carol'));
  await befriend(alice, carol, '<b>note</b> from alice');
  // The group: alice creates it with bob and carol.
  await alice.page.check('#group-pick input[value="bob"]');
  await alice.page.check('#group-pick input[value="carol"]');
  await alice.page.fill('#group-name', 'Trio <i>chat</i>');
  await alice.page.click('#group-create');
  await alice.page.waitForSelector('.chat-title:has-text("Trio <i>chat</i>")');
  const conv = await alice.page.evaluate(() => globalThis.switchboard.store.state.open);
  assert.match(conv, /^g:/);
  for (const u of [bob, carol]) await u.page.click(`.conv[data-conv="${conv}"]`);
  await sendText(alice, 'group hello from alice');
  await sendText(bob, 'bob here');
  await sendText(carol, 'carol too');
  for (const u of [alice, bob, carol]) {
    for (const t of ['group hello from alice', 'bob here', 'carol too']) await waitText(u, t);
  }
  await alice.page.click('#members-btn');
  await alice.page.waitForFunction(() => document.querySelectorAll('#members .member').length === 3);
  await shot(alice, '05-group');

  // Enough messages that the first page (30) does not hold them all.
  await alice.page.evaluate(async (group) => {
    for (let i = 1; i <= 45; i++) await globalThis.switchboard.sb.send({ group, type: 'text', body: `bulk ${i}` });
  }, conv.slice(2));
  await waitText(carol, 'bulk 45');
  // Newest activity first: bob's list now starts with the group, then alice.
  await bob.page.waitForFunction((c) => document.querySelector('#conv-list .conv')?.dataset.conv === c, conv);
  assert.deepEqual(await bob.page.$$eval('#conv-list .conv', (els) => els.map((e) => e.dataset.conv)), [conv, direct(alice, bob)]);
  // Carol reloads: she stays logged in, and the chat opens with the newest page only.
  await carol.page.reload();
  await online(carol.page);
  await carol.page.click(`.conv[data-conv="${conv}"]`);
  await waitText(carol, 'bulk 45');
  const first = await texts(carol);
  assert.ok(!first.includes('group hello from alice'), 'the first page holds only the newest messages');
  // Scroll up until the beginning is there.
  await carol.page.waitForFunction(() => {
    const box = document.getElementById('messages');
    box.scrollTop = 0;
    box.dispatchEvent(new Event('scroll'));
    return [...box.querySelectorAll('.text')].some((e) => e.textContent === 'group hello from alice');
  }, null, { polling: 250 });
  const all = await texts(carol);
  const expected = ['group hello from alice', 'bob here', 'carol too', ...Array.from({ length: 45 }, (_, i) => `bulk ${i + 1}`)];
  assert.deepEqual(all, expected);
  await carol.page.waitForSelector('.older:has-text("Beginning of the conversation")');

  // Carol leaves: the group goes from her list.
  await carol.page.click('#leave-btn');
  await carol.page.waitForSelector(`.conv[data-conv="${conv}"]`, { state: 'detached' });
  await alice.page.click('#members-btn'); // close
  await alice.page.click('#members-btn'); // and open again: carol is gone
  await alice.page.waitForFunction(() => document.querySelectorAll('#members .member').length === 2);
  // ... and joins again by the group's id, with the history readable.
  await carol.page.fill('#join-id', conv.slice(2));
  await carol.page.click('#group-join');
  await carol.page.waitForSelector(`.conv.active[data-conv="${conv}"]`);
  await waitText(carol, 'bulk 45');
});

test('replies quote their target, a mention flags the conversation, search finds and opens it, a mute shows and survives a reload', async () => {
  const { alice, bob, carol } = users;
  const group = await alice.page.evaluate(() => globalThis.switchboard.store.state.open);
  // carol looks at another chat, so the mention is news to her
  await carol.page.click('.friend[data-user="alice"]');
  await alice.page.click('.msg.theirs:has-text("bob here") .reply');
  await alice.page.waitForSelector('#replying:not([hidden]):has-text("Replying to bob: bob here")');
  await sendText(alice, '@carol look at this');
  await bob.page.waitForSelector('.msg:has-text("@carol look at this") .quote:has-text("bob here")');
  await alice.page.waitForSelector('#replying', { state: 'hidden' });
  await carol.page.waitForSelector(`.conv[data-conv="${group}"] .badge.mention`);
  await carol.page.click(`.conv[data-conv="${group}"]`);
  await carol.page.waitForSelector('.msg.mentions-me:has-text("@carol look at this") .quote:has-text("bob here")');
  await carol.page.waitForSelector(`.conv[data-conv="${group}"]:not(:has(.badge.mention))`);
  // search from bob's page: the hit names the group, marks the word, and opens the chat
  await bob.page.click(`.friend[data-user="alice"]`);
  await bob.page.fill('#search-q', 'LOOK');
  await bob.page.press('#search-q', 'Enter');
  // Through locators, which find the element again if the list is drawn anew meanwhile (an
  // element handle would point at the detached old one).
  const hit = bob.page.locator(`.search-hit[data-conv="${group}"]`).first();
  assert.equal(await hit.locator('mark').first().textContent(), 'look');
  await hit.click();
  await bob.page.waitForSelector(`.conv.active[data-conv="${group}"]`);
  await bob.page.fill('#search-q', 'nothing-like-this');
  await bob.page.press('#search-q', 'Enter');
  await bob.page.waitForSelector('.search-none');
  // bob mutes the group; it stays muted across a reload (the server keeps it)
  await bob.page.click('#mute-btn');
  await bob.page.waitForSelector('#mute-btn:has-text("Unmute")');
  await bob.page.waitForSelector(`.conv[data-conv="${group}"] .muted`);
  await bob.page.reload();
  await online(bob.page);
  await bob.page.waitForSelector(`.conv[data-conv="${group}"] .muted`);
  await bob.page.click(`.conv[data-conv="${group}"]`);
  await bob.page.click('#mute-btn:has-text("Unmute")');
  await bob.page.waitForSelector(`.conv[data-conv="${group}"]:not(:has(.muted))`);
  await shot(carol, '05b-replies-search');
});

test('a video call between two contexts with fake media reaches "connected"; an unanswered one rings out', async () => {
  const { alice, bob, carol } = users;
  await bob.page.click(`.conv[data-conv="${direct(alice, bob)}"]`);
  await bob.page.click('#call-video');
  await alice.page.waitForSelector('#call-state[data-state="ringing"]');
  await alice.page.click('#call-accept');
  await alice.page.waitForSelector('#call-state[data-state="connected"]');
  await bob.page.waitForSelector('#call-state[data-state="connected"]');
  await bob.page.waitForFunction(() => document.getElementById('remote-video').readyState >= 2);
  const route = await bob.page.evaluate(() => globalThis.switchboard.calls.route());
  console.log(`     call media went ${JSON.stringify(route)}`);
  await shot(bob, '06-call');
  await bob.page.click('#call-hangup');
  await alice.page.waitForSelector('#call-state[data-state="ended"]');
  for (const u of [alice, bob]) await u.page.click('#call-hangup'); // close the panels

  // Nobody answers: the gateway's ring timeout ends it on both sides.
  await carol.page.click('.friend[data-user="alice"]');
  await carol.page.click('#call-audio');
  await alice.page.waitForSelector('#call-state[data-state="ringing"]');
  for (const u of [carol, alice]) {
    await u.page.waitForSelector('#call-state[data-state="ended"]', { timeout: RING_MS + WAIT });
    assert.match(await u.page.textContent('#call-state'), /rang out/);
  }
  await shot(carol, '07-call-rang-out');
  for (const u of [alice, carol]) await u.page.click('#call-hangup');
});

test('a second sign-in of the same device (another tab) kicks the first, which says so; presence goes offline', async (browser) => {
  const { bob } = users;
  const second = await newPage(browser, bob.context); // same profile: same session and device
  await online(second.page);
  await bob.page.waitForSelector('#conn[data-state="kicked"]');
  assert.match(await bob.page.textContent('#banner'), /signed in again on this device/);
  await shot(bob, '08-kicked');
  await second.page.close();
  // Bob has no connection left: alice sees him go offline.
  await users.alice.page.waitForSelector('.friend[data-user="bob"][data-online="false"]');
});

test('stay logged in: a reload with an expired access token rotates the refresh token; log out, log in again', async () => {
  const { alice } = users;
  const before = await alice.page.evaluate(() => {
    const s = JSON.parse(localStorage.getItem('sb.session'));
    localStorage.setItem('sb.session', JSON.stringify({ ...s, expires_at: 0 }));
    return s.refresh_token;
  });
  await alice.page.reload();
  await online(alice.page);
  const after = await alice.page.evaluate(() => JSON.parse(localStorage.getItem('sb.session')));
  assert.notEqual(after.refresh_token, before);
  assert.ok(after.expires_at > Date.now());
  await alice.page.waitForSelector('.conv');
  await alice.page.click('#logout-btn');
  await alice.page.waitForSelector('#login:not([hidden])');
  assert.equal(await alice.page.evaluate(() => localStorage.getItem('sb.session')), null);
  await alice.page.fill('#login-user', 'alice');
  await alice.page.fill('#login-pass', PASSWORD);
  await alice.page.click('#login-btn');
  await online(alice.page);
  await alice.page.waitForSelector('.conv');
});

// ---- runner ------------------------------------------------------------------------------------

const server = await startServer();
// The server goes with this script, however it ends.
process.on('exit', () => server.stop());
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
    '--allow-loopback-in-peer-connection', '--disable-features=WebRtcHideLocalIpsWithMdns'],
});
let failed = 0;
let passed = 0;
const t0 = Date.now();
for (const { name, fn } of tests) {
  const start = Date.now();
  pageErrors.length = 0;
  try {
    await fn(browser);
    assert.deepEqual(pageErrors, [], 'no errors in the pages');
    passed++;
    console.log(`ok   ${name} (${((Date.now() - start) / 1000).toFixed(1)} s)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}\n${e.stack || e}`);
    for (const [who, u] of Object.entries(users)) {
      await shot(u, `fail-${passed + 1}-${who}`).catch(() => {});
      const seen = await u.page
        .evaluate(() => ({ conn: document.getElementById('conn').dataset.state, open: globalThis.switchboard.store.state.open,
          texts: [...document.querySelectorAll('#messages .msg .text')].map((e) => e.textContent) }))
        .catch((e) => e.message);
      console.log(`  ${who}: ${JSON.stringify(seen)}`);
    }
    if (pageErrors.length) console.log(`  page errors: ${JSON.stringify(pageErrors)}`);
    break; // later tests build on the earlier ones' users
  }
}
await browser.close();
console.log(`browser tests: ${passed} passed, ${failed} failed, ${tests.length - passed - failed} not run in ${((Date.now() - t0) / 1000).toFixed(1)} s; screenshots in ${ART}`);
process.exit(failed ? 1 : 0);
