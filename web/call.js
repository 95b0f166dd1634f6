// 1:1 audio/video calls: the browser's WebRTC, signalled through call.offer/answer/ice/hangup
// (docs/protocol.md §7.7). The server only relays; the ring timeout is the gateway's, which ends
// a call nobody answered with `call.hangup {reason: "timeout"}`.
//
// Candidates are sent as the JSON of RTCIceCandidate; SDP as the plain description text.

export function createCalls(sb, store) {
  const { state } = store;
  let pc = null;
  let local = null;
  let queued = []; // remote candidates that came before the remote description

  function set(fields) {
    state.call = state.call ? { ...state.call, ...fields } : fields;
    store.changed();
  }

  async function media(video) {
    local = await navigator.mediaDevices.getUserMedia({ audio: true, video });
    document.getElementById('local-video').srcObject = local;
  }

  function peerConnection(call) {
    pc = new RTCPeerConnection({ iceServers: [] });
    for (const t of local?.getTracks() || []) pc.addTrack(t, local);
    pc.onicecandidate = (e) => {
      if (e.candidate) sb.call('ice', { to: call.peer, call_id: call.id, candidate: JSON.stringify(e.candidate) }).catch(() => {});
    };
    pc.ontrack = (e) => {
      document.getElementById('remote-video').srcObject = e.streams[0];
    };
    pc.onconnectionstatechange = () => {
      if (!state.call || state.call.id !== call.id) return;
      if (pc.connectionState === 'connected') set({ state: 'connected' });
      if (pc.connectionState === 'failed') end('connection failed', true);
    };
    return pc;
  }

  async function drain() {
    for (const c of queued) await pc.addIceCandidate(c).catch(() => {});
    queued = [];
  }

  function cleanup() {
    pc?.close();
    pc = null;
    for (const t of local?.getTracks() || []) t.stop();
    local = null;
    queued = [];
    document.getElementById('local-video').srcObject = null;
    document.getElementById('remote-video').srcObject = null;
  }

  /** Ends the call here; tells the peer unless it ended there. */
  function end(reason, tell) {
    const call = state.call;
    if (!call || call.state === 'ended') return;
    if (tell) sb.call('hangup', { to: call.peer, call_id: call.id, reason }).catch(() => {});
    cleanup();
    set({ state: 'ended', reason });
  }

  async function start(peer, video) {
    if (state.call && state.call.state !== 'ended') return;
    const call = { id: `k${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`, peer, video, dir: 'out', state: 'calling' };
    state.call = null;
    set(call);
    try {
      await media(video);
      peerConnection(call);
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      await sb.call('offer', { to: peer, call_id: call.id, sdp: offer.sdp, reason: video ? 'video' : 'audio' });
    } catch (e) {
      end(e.message || 'failed', false);
    }
  }

  async function accept() {
    const call = state.call;
    if (!call || call.state !== 'ringing') return;
    set({ state: 'connecting' });
    try {
      await media(call.video);
      peerConnection(call);
      await pc.setRemoteDescription({ type: 'offer', sdp: call.offerSdp });
      await drain();
      const answer = await pc.createAnswer();
      await pc.setLocalDescription(answer);
      await sb.call('answer', { to: call.peer, call_id: call.id, sdp: answer.sdp });
    } catch (e) {
      end(e.message || 'failed', true);
    }
  }

  function hangup() {
    if (!state.call) return;
    if (state.call.state === 'ended') {
      state.call = null;
      store.changed();
      return;
    }
    end(state.call.state === 'ringing' ? 'declined' : 'hung up', true);
  }

  // Signalling pushes. Copies for this user's other devices carry `to`: another device
  // answered or hung up, so this one stops ringing.
  sb.on('call.offer', (f) => {
    if (f.to) return;
    if (state.call && state.call.state !== 'ended') {
      sb.call('hangup', { to: f.from, call_id: f.call_id, reason: 'busy' }).catch(() => {});
      return;
    }
    state.call = null;
    set({ id: f.call_id, peer: f.from, video: f.reason === 'video' || /^m=video /m.test(f.sdp || ''), dir: 'in', state: 'ringing', offerSdp: f.sdp });
  });
  sb.on('call.answer', async (f) => {
    const call = state.call;
    if (!call || call.id !== f.call_id) return;
    if (f.to) return end('answered on another device', false);
    set({ state: 'connecting' });
    try {
      await pc.setRemoteDescription({ type: 'answer', sdp: f.sdp });
      await drain();
    } catch (e) {
      end(e.message, true);
    }
  });
  sb.on('call.ice', async (f) => {
    const call = state.call;
    if (!call || call.id !== f.call_id) return;
    let cand;
    try {
      cand = JSON.parse(f.candidate);
    } catch {
      return;
    }
    if (pc && pc.remoteDescription) await pc.addIceCandidate(cand).catch(() => {});
    else queued.push(cand);
  });
  sb.on('call.hangup', (f) => {
    const call = state.call;
    if (!call || call.id !== f.call_id) return;
    end(f.reason || 'hung up', false);
  });

  /** The addresses of the candidate pair in use (for the tests and the console). */
  async function route() {
    if (!pc) return null;
    const stats = [...(await pc.getStats()).values()];
    const pair = stats.find((s) => s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded');
    const cand = (id) => stats.find((s) => s.id === id);
    return pair ? { local: cand(pair.localCandidateId)?.address, remote: cand(pair.remoteCandidateId)?.address } : null;
  }

  return { start, accept, hangup, end, route };
}
