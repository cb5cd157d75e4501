// Risk gateway dashboard: plain JavaScript, no build step, no external resources.
//
// Protocol (PROTOCOL.md sections 1, 2, 4, 5):
// - connect to ws(s)://<this host>/v1/ws, send `session.auth` first, then
//   `session.hello`, then `subscribe` to emergency-related channels;
// - per channel keep the last seq; a snapshot replaces the state; an event
//   whose seq is not last + 1 re-subscribes that channel without `resume` (a
//   fresh snapshot). A trader's `exposure` seq jumps by design (other
//   accounts' pushes), so there only a step backwards is ignored;
// - the heartbeat carries every channel's last seq: a lost last event shows
//   up there too;
// - on disconnect: reconnect with exponential backoff and jitter, then
//   subscribe with `resume` (the last seqs) unless the gateway restarted
//   (new `epoch`), in which case seqs restarted and snapshots are needed;
// - no frame for 3 x heartbeat_s marks the view stale; a silence much longer
//   than that drops the connection and reconnects.
// - cluster mode (section 10: the EMERGENCY document has a `cluster` object):
//   a panel lists the members from `cluster.get`, asked every 2 s and
//   whenever an EMERGENCY arrives; hidden for a gateway that is not a member.
"use strict";

(() => {
  const TOKEN_KEY = "risk-gateway.token";
  const MAX_ALERTS = 200;
  const MAX_DECISIONS = 100;
  const REQUEST_TIMEOUT_MS = 10000;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  const CLUSTER_REFRESH_MS = 2000;
  const STALE_FACTOR = 3; // heartbeats missed before the view is stale
  const DEAD_FACTOR = 10; // heartbeats missed before the connection is dropped
  const SEQ_CHANNELS = ["emergency", "alerts", "exposure", "decisions"];
  const MODE_SUMMARY = {
    normal: "Trading open: every risk check active.",
    reducing: "Reduce-only: only orders that shrink a position pass.",
    halted: "Halted: every order is rejected.",
  };
  const LEVEL_RANK = { info: 0, warning: 1, critical: 2 };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ state

  const st = {
    token: null,
    ws: null,
    gen: 0, // connection generation: events of an old socket are ignored
    phase: "signed-out", // signed-out | signing-in | connecting | live | reconnecting
    authed: false,
    everLive: false, // a session of this token has been live (else a failure goes to login)
    principal: null, // {role, accounts, name}
    heartbeatS: 1,
    epoch: null,
    lastFrameAt: 0,
    stale: false,
    nextId: 1,
    pending: new Map(), // id -> {resolve, reject, timer}
    attempt: 0,
    reconnectAt: 0,
    reconnectTimer: null,
    seq: {}, // channel -> last seq (null: no state yet)
    awaitingSnapshot: {}, // channel -> true: events ignored until a snapshot
    subscribing: {}, // channel -> true between a subscribe and its response
    subscribed: new Set(),
    emergency: null,
    alerts: [], // newest first
    exposure: { accounts: new Map(), global: null, global_limit: null },
    decisions: [], // newest first
    resyncs: 0, // gap-triggered re-subscriptions
    wasLive: false, // this page had a live connection (a new one is a reconnect)
    clusterMode: false, // the gateway is a member of a cluster
    cluster: null, // the last cluster.get result
    clusterError: "",
    clusterBusy: false, // a cluster.get is in flight
    clusterAgain: false, // ask again once it is answered
  };

  function resetChannels() {
    for (const ch of SEQ_CHANNELS) {
      st.seq[ch] = null;
      st.awaitingSnapshot[ch] = false;
      st.subscribing[ch] = false;
    }
    st.subscribed = new Set();
  }

  function resetData() {
    resetChannels();
    st.wasLive = false;
    st.emergency = null;
    st.alerts = [];
    st.exposure = { accounts: new Map(), global: null, global_limit: null };
    st.decisions = [];
    st.epoch = null;
    st.principal = null;
    st.clusterMode = false;
    st.cluster = null;
    st.clusterError = "";
  }

  resetChannels();

  // ------------------------------------------------------------ formatting

  // Decimal strings stay strings: group the integer digits, never go through a float.
  function fmtDecimal(value) {
    if (value === null || value === undefined) return "—";
    const s = String(value);
    const m = /^(-?)(\d+)(\.\d+)?$/.exec(s);
    if (!m) return s;
    return m[1] + m[2].replace(/\B(?=(\d{3})+(?!\d))/g, ",") + (m[3] || "");
  }

  // The exact sum of decimal strings (null when there is none), through BigInt.
  function sumDecimals(values) {
    const parsed = [];
    let scale = 0;
    for (const value of values) {
      if (value === null || value === undefined) continue;
      const m = /^(-?)(\d+)(?:\.(\d+))?$/.exec(String(value));
      if (!m) continue;
      parsed.push(m);
      scale = Math.max(scale, (m[3] || "").length);
    }
    if (!parsed.length) return null;
    let total = 0n;
    for (const m of parsed) {
      const units = BigInt(m[2] + (m[3] || "").padEnd(scale, "0"));
      total += m[1] === "-" ? -units : units;
    }
    const negative = total < 0n;
    const digits = (negative ? -total : total).toString().padStart(scale + 1, "0");
    const whole = digits.slice(0, digits.length - scale);
    const fraction = scale ? digits.slice(digits.length - scale).replace(/0+$/, "") : "";
    return (negative ? "-" : "") + whole + (fraction ? `.${fraction}` : "");
  }

  // Utilisation for display only (a bar width): a float is fine here.
  function ratio(numerator, denominator) {
    const n = Number(numerator);
    const d = Number(denominator);
    if (!Number.isFinite(n) || !Number.isFinite(d) || d <= 0) return null;
    return n / d;
  }

  function fmtPct(r) {
    if (r === null) return "—";
    const pct = r * 100;
    return (pct >= 10 || pct === 0 ? pct.toFixed(0) : pct.toFixed(1)) + "%";
  }

  function parseTs(ts) {
    const t = Date.parse(ts);
    return Number.isFinite(t) ? t : null;
  }

  function fmtClock(ts) {
    const t = parseTs(ts);
    if (t === null) return ts ? String(ts) : "—";
    return new Date(t).toISOString().slice(11, 19);
  }

  function fmtSince(ts) {
    const t = parseTs(ts);
    if (t === null) return "—";
    const iso = new Date(t).toISOString();
    return `${iso.slice(0, 10)} ${iso.slice(11, 19)} UTC (${fmtAge(Date.now() - t)})`;
  }

  function fmtAge(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 5) return "just now";
    if (s < 60) return `${s} s ago`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ago`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${m % 60} min ago`;
    return `${Math.floor(h / 24)} days ago`;
  }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null) continue;
        if (key === "className") node.className = value;
        else if (key === "text") node.textContent = value;
        else if (key === "dataset") Object.assign(node.dataset, value);
        else node.setAttribute(key, value);
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child);
    }
    return node;
  }

  // ------------------------------------------------------------- transport

  function wsUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/v1/ws`;
  }

  function request(method, params) {
    const ws = st.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new Error("not connected to the gateway"));
    }
    const id = st.nextId++;
    const frame = { id, method };
    if (params !== undefined) frame.params = params;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        st.pending.delete(id);
        reject(new Error(`${method}: no answer within ${REQUEST_TIMEOUT_MS / 1000} s`));
      }, REQUEST_TIMEOUT_MS);
      st.pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify(frame));
    });
  }

  function failPending(reason) {
    for (const { reject, timer } of st.pending.values()) {
      clearTimeout(timer);
      reject(new Error(reason));
    }
    st.pending.clear();
  }

  function connect() {
    clearTimeout(st.reconnectTimer);
    st.reconnectTimer = null;
    const gen = ++st.gen;
    st.authed = false;
    st.subscribed = new Set(); // a new connection has no subscription yet
    if (st.phase !== "signing-in") setPhase("connecting");
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (err) {
      onSocketGone(gen, 0, String(err));
      return;
    }
    st.ws = ws;
    ws.onopen = () => {
      if (gen !== st.gen) return;
      st.lastFrameAt = Date.now();
      authenticate(gen);
    };
    ws.onmessage = (event) => {
      if (gen !== st.gen) return;
      onFrame(event.data);
    };
    ws.onclose = (event) => {
      if (gen !== st.gen) return;
      onSocketGone(gen, event.code, event.reason);
    };
    ws.onerror = () => {
      // A close event follows; it decides what to do.
    };
  }

  function dropSocket(code, reason) {
    const ws = st.ws;
    st.ws = null;
    st.gen++; // whatever this socket still says is ignored
    failPending(reason || "connection closed");
    if (ws && ws.readyState <= WebSocket.OPEN) {
      try {
        ws.close(code, reason);
      } catch (err) {
        ws.close();
      }
    }
  }

  async function authenticate(gen) {
    let response;
    try {
      response = await request("session.auth", { token: st.token });
    } catch (err) {
      return; // the close handler deals with it
    }
    if (gen !== st.gen) return;
    if (response.status !== "ok") {
      const error = response.error || {};
      if (error.code === "UNAUTHENTICATED") {
        authRefused(error.message || "invalid token");
      } else {
        dropSocket(1000, "authentication failed");
        scheduleReconnect(`authentication failed: ${error.message || error.code}`);
      }
      return;
    }
    st.authed = true;
    const firstSignIn = st.phase === "signing-in";
    st.principal = response.result;
    if (firstSignIn) {
      try {
        sessionStorage.setItem(TOKEN_KEY, st.token);
      } catch (err) {
        // Storage may be unavailable (private mode): the session still works.
      }
    }
    showDashboard();
    let hello;
    try {
      hello = await request("session.hello", {});
    } catch (err) {
      return;
    }
    if (gen !== st.gen) return;
    if (hello.status !== "ok") {
      showNotice(`session.hello refused: ${hello.error.message}`);
      return;
    }
    const result = hello.result;
    st.heartbeatS = Number(result.heartbeat_s) > 0 ? Number(result.heartbeat_s) : 1;
    if (st.epoch !== null && st.epoch !== result.epoch) {
      // The gateway restarted: its seqs restarted, a resume would be meaningless.
      for (const ch of SEQ_CHANNELS) {
        if (ch !== "emergency") st.seq[ch] = null;
      }
    }
    st.epoch = result.epoch;
    if (result.emergency && st.seq.emergency === null) {
      st.emergency = result.emergency;
      renderEmergency();
    }
    st.attempt = 0;
    st.everLive = true;
    st.wasLive = true;
    setPhase("live");
    renderRole();
    subscribeAll();
    noteCluster(result.emergency);
    loadHistory(gen);
  }

  // The charts' last 15 minutes, kept by the gateway: a reloaded page (or a
  // phone opening it) starts with them. Asked after subscribing (see charts.js).
  async function loadHistory(gen) {
    let answer;
    try {
      answer = await request("history.get", {});
    } catch (err) {
      return; // the charts fill from the channels alone
    }
    if (gen !== st.gen || answer.status !== "ok") return;
    window.RiskCharts.seed(answer.result);
  }

  function channelsForRole() {
    const channels = ["alerts", "exposure"];
    const role = st.principal && st.principal.role;
    if (role !== "trader") channels.push("decisions"); // viewers, feeds and admins
    return channels;
  }

  function subscribeAll() {
    const channels = channelsForRole();
    const resume = {};
    for (const ch of channels) {
      if (st.seq[ch] !== null && !st.awaitingSnapshot[ch]) resume[ch] = st.seq[ch];
    }
    subscribe(channels, resume);
  }

  // Subscribe to `channels`; `resume` maps channel -> last seq (omitted: snapshot).
  function subscribe(channels, resume) {
    const params = { channels };
    if (resume && Object.keys(resume).length) params.resume = resume;
    for (const ch of channels) {
      st.subscribing[ch] = true;
      if (!params.resume || !(ch in params.resume)) {
        st.awaitingSnapshot[ch] = true;
        st.seq[ch] = null;
      }
    }
    const gen = st.gen;
    request("subscribe", params).then(
      (response) => {
        if (gen !== st.gen) return;
        for (const ch of channels) st.subscribing[ch] = false;
        if (response.status === "ok") {
          for (const ch of channels) st.subscribed.add(ch);
        } else {
          showNotice(`subscribe ${channels.join(", ")} refused: ${response.error.message}`);
        }
      },
      () => {
        for (const ch of channels) st.subscribing[ch] = false;
      },
    );
  }

  // A gap: take a fresh snapshot of that channel.
  function resync(channel) {
    st.resyncs++;
    subscribe([channel], null);
  }

  function onFrame(raw) {
    st.lastFrameAt = Date.now();
    if (st.stale) {
      st.stale = false;
      renderConnection();
    }
    let msg;
    try {
      msg = JSON.parse(typeof raw === "string" ? raw : new TextDecoder().decode(raw));
    } catch (err) {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    if (typeof msg.channel === "string") {
      onPush(msg);
      return;
    }
    const waiting = st.pending.get(msg.id);
    if (waiting) {
      st.pending.delete(msg.id);
      clearTimeout(waiting.timer);
      waiting.resolve(msg);
    }
  }

  function sequenceJumpsExpected(channel) {
    // A trader receives only its own accounts' exposure and alerts: the shared seq jumps.
    return (channel === "exposure" || channel === "alerts") && st.principal && st.principal.role === "trader";
  }

  function onPush(msg) {
    const ch = msg.channel;
    if (ch === "heartbeat") {
      checkHeartbeat(msg.data || {});
      return;
    }
    if (!SEQ_CHANNELS.includes(ch) || !Number.isInteger(msg.seq)) return; // unknown: ignore
    if (msg.snapshot) {
      st.seq[ch] = msg.seq;
      st.awaitingSnapshot[ch] = false;
      applySnapshot(ch, msg.data || {});
      return;
    }
    const last = st.seq[ch];
    if (st.awaitingSnapshot[ch] || last === null) return; // the snapshot will cover it
    if (msg.seq <= last) return; // already applied
    if (msg.seq !== last + 1 && !sequenceJumpsExpected(ch)) {
      resync(ch);
      return;
    }
    st.seq[ch] = msg.seq;
    applyEvent(ch, msg.data || {});
  }

  function checkHeartbeat(data) {
    const seqs = data.seqs || {};
    for (const ch of SEQ_CHANNELS) {
      if (ch !== "emergency" && !st.subscribed.has(ch)) continue;
      if (st.subscribing[ch] || st.awaitingSnapshot[ch] || st.seq[ch] === null) continue;
      if (sequenceJumpsExpected(ch)) continue;
      const latest = seqs[ch];
      if (Number.isInteger(latest) && latest > st.seq[ch]) resync(ch);
    }
  }

  function onSocketGone(gen, code, reason) {
    st.ws = null;
    st.gen++;
    failPending("connection closed");
    if (st.phase === "signed-out") return;
    if (st.phase === "signing-in" && !st.authed) {
      // First sign-in with a token never accepted: report it on the form.
      const detail = code ? ` (close code ${code}${reason ? `: ${reason}` : ""})` : "";
      loginFailed(`Could not reach the gateway${detail}.`);
      return;
    }
    scheduleReconnect(code ? `closed with code ${code}${reason ? `: ${reason}` : ""}` : "");
  }

  function scheduleReconnect(why) {
    clearTimeout(st.reconnectTimer);
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** st.attempt);
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2)); // jitter
    st.attempt = Math.min(st.attempt + 1, 16);
    st.reconnectAt = Date.now() + delay;
    st.disconnectReason = why || "";
    st.reconnectTimer = setTimeout(connect, delay);
    setPhase("reconnecting");
  }

  function authRefused(message) {
    dropSocket(1000, "signing out");
    clearTimeout(st.reconnectTimer);
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch (err) {
      // nothing stored
    }
    const wasLive = st.everLive;
    st.token = null;
    st.everLive = false;
    resetData();
    showLogin(
      wasLive
        ? `The gateway no longer accepts this token: ${message}. Sign in again.`
        : `Sign-in refused: ${message}.`,
    );
  }

  function loginFailed(message) {
    clearTimeout(st.reconnectTimer);
    st.token = null;
    showLogin(message);
  }

  // ----------------------------------------------------------- the channels

  function applySnapshot(ch, data) {
    if (ch === "emergency") {
      st.emergency = data;
      renderEmergency();
      noteCluster(data);
    } else if (ch === "alerts") {
      const list = Array.isArray(data.alerts) ? data.alerts.slice() : [];
      st.alerts = list.reverse().slice(0, MAX_ALERTS);
      renderAlerts(0);
    } else if (ch === "exposure") {
      const accounts = new Map();
      for (const [name, entry] of Object.entries(data.accounts || {})) {
        accounts.set(name, { ...entry, account: name });
      }
      st.exposure = { accounts, global: data.global ?? null, global_limit: data.global_limit ?? null };
      renderExposure();
      window.RiskCharts.exposure(st.exposure);
    } else if (ch === "decisions") {
      const list = Array.isArray(data.decisions) ? data.decisions.slice() : [];
      st.decisions = list.reverse().slice(0, MAX_DECISIONS);
      renderDecisions();
      for (const d of list) window.RiskCharts.decision(d);
    }
  }

  function applyEvent(ch, data) {
    if (ch === "emergency") {
      st.emergency = data;
      renderEmergency();
      noteCluster(data);
    } else if (ch === "alerts") {
      st.alerts.unshift(data);
      st.alerts.length = Math.min(st.alerts.length, MAX_ALERTS);
      renderAlerts(1);
    } else if (ch === "exposure") {
      if (typeof data.account === "string") st.exposure.accounts.set(data.account, data);
      if (data.global !== undefined) st.exposure.global = data.global;
      if (data.global_limit !== undefined) st.exposure.global_limit = data.global_limit;
      renderExposure();
      window.RiskCharts.exposure(st.exposure);
    } else if (ch === "decisions") {
      st.decisions.unshift(data);
      st.decisions.length = Math.min(st.decisions.length, MAX_DECISIONS);
      renderDecisions();
      window.RiskCharts.decision(data);
    }
  }

  // ---------------------------------------------------------------- cluster

  // An EMERGENCY (from the hello or the channel) tells whether this gateway is
  // a member of a cluster; each one is also a reason to look at the members.
  function noteCluster(emergency) {
    if (emergency && typeof emergency.cluster === "object" && emergency.cluster !== null) {
      st.clusterMode = true;
    }
    renderCluster();
    refreshCluster();
  }

  function refreshCluster() {
    if (!st.clusterMode || st.phase !== "live") return;
    if (st.clusterBusy) {
      st.clusterAgain = true;
      return;
    }
    st.clusterBusy = true;
    const gen = st.gen;
    request("cluster.get")
      .then(
        (response) => {
          if (gen !== st.gen) return;
          if (response.status === "ok") {
            st.cluster = response.result;
            st.clusterError = "";
          } else {
            const error = response.error || {};
            if (error.code === "NOT_FOUND") {
              st.clusterMode = false; // not (or no longer) a member
              st.cluster = null;
            } else {
              st.clusterError = `cluster.get refused (${error.code}): ${error.message}`;
            }
          }
          renderCluster();
        },
        (err) => {
          if (gen !== st.gen) return;
          st.clusterError = `cluster.get: ${err.message}`;
          renderCluster();
        },
      )
      .finally(() => {
        st.clusterBusy = false;
        if (st.clusterAgain) {
          st.clusterAgain = false;
          refreshCluster();
        }
      });
  }

  function clusterRow(member, self) {
    const alive = member.alive === true;
    return el(
      "tr",
      { dataset: { testid: "cluster-member", member: member.name, alive: String(alive) } },
      el(
        "th",
        { scope: "row" },
        el("span", { className: "member", text: member.name }),
        member.name === self ? el("span", { className: "badge member-self", text: "this gateway" }) : null,
        el("span", { className: "url", text: member.url || "" }),
      ),
      el("td", { className: "accounts", text: (member.accounts || []).join(", ") || "—" }),
      el(
        "td",
        null,
        el("span", {
          className: `badge member-${alive ? "alive" : "down"}`,
          dataset: { testid: "cluster-alive" },
          text: alive ? "alive" : "down",
        }),
      ),
      el("td", { className: "num", dataset: { testid: "cluster-credit" }, text: fmtDecimal(member.credit) }),
      el("td", { className: "num", dataset: { testid: "cluster-exposure" }, text: fmtDecimal(member.exposure) }),
    );
  }

  function renderCluster() {
    const panel = $("cluster-panel");
    panel.hidden = !st.clusterMode;
    if (!st.clusterMode) return;
    const view = st.cluster;
    const members = view && Array.isArray(view.members) ? view.members : [];
    $("cluster-rows").replaceChildren(...members.map((m) => clusterRow(m, view.name)));
    setText($("cluster-gross"), fmtDecimal(sumDecimals(members.map((m) => m.exposure))));
    const down = members.filter((m) => m.alive !== true).map((m) => m.name);
    let summary = "Loading…";
    if (view) {
      summary = `${members.length} member${members.length === 1 ? "" : "s"}`;
      summary += down.length ? `, down: ${down.join(", ")}` : ", all alive";
    }
    setText($("cluster-summary"), summary);

    const c = st.emergency && st.emergency.cluster;
    const fenced = $("cluster-fenced");
    const fencedText =
      c && c.reachable === false
        ? `This gateway cannot reach the cluster's shared state${c.since ? ` since ${fmtSince(c.since)}` : ""}: it rejects every order until it can.`
        : "";
    setText(fenced, fencedText);
    fenced.hidden = !fencedText;

    let note = st.clusterError;
    if (!note && st.principal && st.principal.role === "trader") {
      note = "Credit and exposure are shown to viewers and admins.";
    }
    const p = $("cluster-note");
    setText(p, note);
    p.hidden = !note;
  }

  // -------------------------------------------------------------- rendering

  function setPhase(phase) {
    st.phase = phase;
    renderConnection();
  }

  function renderConnection() {
    const box = document.querySelector("[data-testid=connection-status]");
    const text = $("conn-text");
    const again = $("reconnect-now");
    let state = st.phase;
    let label;
    again.hidden = true;
    switch (st.phase) {
      case "signed-out":
        label = "Signed out";
        break;
      case "signing-in":
      case "connecting":
        if (st.wasLive) {
          state = "disconnected";
          label = "Disconnected — reconnecting…";
        } else {
          state = "connecting";
          label = "Connecting…";
        }
        break;
      case "reconnecting": {
        state = "disconnected";
        const secs = Math.max(0, Math.ceil((st.reconnectAt - Date.now()) / 1000));
        label = `Disconnected — reconnecting in ${secs} s`;
        again.hidden = false;
        break;
      }
      case "live":
        if (st.stale) {
          state = "stale";
          label = `Stale — nothing from the gateway for ${Math.round((Date.now() - st.lastFrameAt) / 1000)} s`;
        } else {
          label = "Live";
        }
        break;
      default:
        label = st.phase;
    }
    box.dataset.state = state;
    box.title = st.disconnectReason ? `Last disconnect: ${st.disconnectReason}` : "";
    if (text.textContent !== label) text.textContent = label;
    renderStaleNote();
  }

  function renderStaleNote() {
    const banner = $("banner");
    let note = "";
    if (st.phase === "reconnecting" || st.phase === "connecting") {
      note = "Disconnected — reconnecting. This is the last known state, it may be out of date.";
    } else if (st.phase === "live" && st.stale) {
      note = "Stale — no heartbeat from the gateway. This is the last known state.";
    }
    banner.classList.toggle("is-stale", note !== "");
    const p = $("banner-stale");
    if (p.textContent !== note) p.textContent = note;
    p.hidden = note === "";
  }

  function showNotice(text) {
    const p = $("notice");
    p.textContent = text;
    p.hidden = !text;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function renderEmergency() {
    const e = st.emergency;
    const banner = $("banner");
    const mode = e && MODE_SUMMARY[e.mode] ? e.mode : "unknown";
    banner.classList.remove("mode-normal", "mode-reducing", "mode-halted", "mode-unknown");
    banner.classList.add(`mode-${mode}`);
    banner.dataset.mode = mode;
    setText($("mode-text"), e ? String(e.mode).toUpperCase() : "—");
    setText($("mode-summary"), e ? MODE_SUMMARY[e.mode] || "" : "Waiting for the gateway…");
    setText($("mode-announce"), e && e.reason ? `Reason: ${e.reason}` : "");
    setText($("mode-reason"), e && e.reason ? e.reason : "—");
    setText($("mode-actor"), e && e.actor ? e.actor : "—");
    setText($("mode-since"), e ? fmtSince(e.since) : "—");
    $("mode-since").dataset.ts = e && e.since ? e.since : "";
    setText($("mode-version"), e && e.version !== undefined ? String(e.version) : "—");
    document.title = e ? `${String(e.mode).toUpperCase()} · Risk gateway` : "Risk gateway";

    const list = $("account-modes");
    list.replaceChildren();
    const accounts = (e && e.accounts) || {};
    const names = Object.keys(accounts).sort();
    for (const name of names) {
      const a = accounts[name];
      list.append(
        el(
          "li",
          { className: `mode-${a.mode}`, dataset: { testid: "account-mode", account: name, mode: a.mode } },
          el("span", { className: "acct", text: name }),
          el("span", { className: `badge mode-${a.mode}`, text: a.mode }),
          el("span", {
            className: "detail",
            text: `${a.reason || "no reason"} — ${a.actor || "?"}, ${fmtSince(a.since)}`,
          }),
        ),
      );
    }
    $("account-modes-empty").hidden = names.length > 0;
    renderExposure(); // the per-account mode column
    renderKnownAccounts();
  }

  function accountMode(name) {
    const e = st.emergency;
    const a = e && e.accounts && e.accounts[name];
    return a ? a.mode : "normal";
  }

  // What binds the account's orders: the stricter of the gateway's mode and
  // its own (a halted gateway halts an account whose own mode is normal).
  const STRICTNESS = { normal: 0, reducing: 1, halted: 2 };

  function effectiveMode(name) {
    const own = accountMode(name);
    const e = st.emergency;
    const gateway = e && e.mode in STRICTNESS ? e.mode : "normal";
    return (STRICTNESS[own] ?? 0) >= STRICTNESS[gateway] ? own : gateway;
  }

  function barLevel(r) {
    if (r === null) return "";
    if (r > 1) return "level-over";
    if (r >= 0.8) return "level-warn";
    return "level-ok";
  }

  function setBar(bar, fill, r) {
    bar.classList.remove("level-ok", "level-warn", "level-over");
    const level = barLevel(r);
    if (level) bar.classList.add(level);
    const pct = r === null ? 0 : Math.min(100, Math.max(0, r * 100));
    fill.style.width = `${pct}%`;
    bar.setAttribute("aria-valuenow", String(Math.round(r === null ? 0 : r * 100)));
  }

  const exposureRows = new Map(); // account -> {row, mode, gross, limit, bar, pct}

  function exposureRow(name) {
    const bar = el(
      "div",
      {
        className: "bar",
        role: "meter",
        "aria-label": `Account ${name} utilisation`,
        "aria-valuemin": "0",
        "aria-valuemax": "100",
      },
      el("span", { className: "bar-fill" }),
    );
    const cells = {
      mode: el("span", { className: "badge", dataset: { testid: "exposure-mode" } }),
      gross: el("td", { className: "num", dataset: { testid: "exposure-gross" } }),
      limit: el("td", { className: "num muted", dataset: { testid: "exposure-limit" } }),
      bar,
      pct: el("span", { className: "pct", dataset: { testid: "exposure-pct" } }),
    };
    cells.row = el(
      "tr",
      { dataset: { testid: "exposure-row", account: name } },
      el("th", { scope: "row", className: "acct", text: name }),
      el("td", null, cells.mode),
      cells.gross,
      cells.limit,
      el("td", null, el("div", { className: "util" }, bar, cells.pct)),
    );
    return cells;
  }

  function renderExposure() {
    const x = st.exposure;
    const rg = ratio(x.global, x.global_limit);
    setText($("global-gross"), fmtDecimal(x.global));
    setText($("global-limit"), fmtDecimal(x.global_limit));
    setText($("global-pct"), rg === null ? "" : fmtPct(rg));
    setBar($("global-bar"), $("global-fill"), rg);

    const body = $("exposure-rows");
    const names = [...x.accounts.keys()].sort();
    for (const [name, cells] of exposureRows) {
      if (!x.accounts.has(name)) {
        cells.row.remove();
        exposureRows.delete(name);
      }
    }
    let previous = null;
    for (const name of names) {
      const entry = x.accounts.get(name);
      let cells = exposureRows.get(name);
      if (!cells) {
        cells = exposureRow(name);
        exposureRows.set(name, cells);
      }
      const r = ratio(entry.gross, entry.limit);
      const mode = effectiveMode(name);
      cells.mode.className = `badge mode-${mode}`;
      cells.mode.dataset.mode = mode;
      cells.mode.title = `account ${accountMode(name)}, gateway ${st.emergency ? st.emergency.mode : "?"}`;
      setText(cells.mode, mode);
      setText(cells.gross, fmtDecimal(entry.gross));
      setText(cells.limit, fmtDecimal(entry.limit));
      setText(cells.pct, fmtPct(r));
      setBar(cells.bar, cells.bar.firstChild, r);
      const expected = previous ? previous.nextSibling : body.firstChild;
      if (expected !== cells.row) body.insertBefore(cells.row, expected);
      previous = cells.row;
    }
    $("exposure-empty").hidden = names.length > 0;
    renderKnownAccounts();
  }

  function alertVisible(alert) {
    const min = LEVEL_RANK[$("alert-filter").value] ?? 0;
    return (LEVEL_RANK[alert.level] ?? 0) >= min;
  }

  function alertItem(alert, isNew) {
    const level = LEVEL_RANK[alert.level] !== undefined ? alert.level : "info";
    const where = [alert.account, alert.symbol].filter(Boolean).join(" · ");
    const item = el(
      "li",
      {
        className: `level-${level}${isNew ? " is-new" : ""}`,
        dataset: { testid: "alert-item", code: alert.code || "", level },
      },
      el("time", { className: "time", datetime: alert.ts, title: alert.ts, text: fmtClock(alert.ts) }),
      el("span", { className: `badge level-${level}`, text: level }),
      el(
        "span",
        null,
        el("span", { className: "code", text: alert.code || "?" }),
        where ? el("span", { className: "where", text: where }) : null,
      ),
      el("span", { className: "message", text: alert.message || "" }),
    );
    item.alert = alert;
    return item;
  }

  // `fresh`: how many of the newest alerts just arrived. They are added in
  // front of the list (a screen reader announces only them); anything else
  // rebuilds the list, marked busy so that it is not read out as new.
  function renderAlerts(fresh) {
    const list = $("alerts-list");
    if (fresh > 0) {
      for (let i = fresh - 1; i >= 0; i--) {
        const alert = st.alerts[i];
        if (alertVisible(alert)) list.prepend(alertItem(alert, true));
      }
      const kept = new Set(st.alerts);
      while (list.lastElementChild && !kept.has(list.lastElementChild.alert)) {
        list.lastElementChild.remove();
      }
    } else {
      list.setAttribute("aria-busy", "true");
      list.replaceChildren(...st.alerts.filter(alertVisible).map((a) => alertItem(a, false)));
      list.setAttribute("aria-busy", "false");
    }
    $("alerts-empty").hidden = list.children.length > 0;
    setText($("alerts-empty"), st.alerts.length ? "No alerts at this level." : "No alerts.");
  }

  function renderDecisions() {
    const rows = st.decisions.map((d) => {
      const reasons = (d.reasons || []).map((r) => r.code).join(", ");
      const decision = d.decision === "accept" ? "accept" : "reject";
      return el(
        "tr",
        { dataset: { testid: "decision-row", decision } },
        el("td", { className: "time", title: d.ts, text: fmtClock(d.ts) }),
        el("td", { className: "acct", text: d.account || "" }),
        el("td", { text: `${d.side || ""} ${fmtDecimal(d.qty)} ${d.symbol || ""} @ ${fmtDecimal(d.price)}` }),
        el(
          "td",
          null,
          el("span", { className: `badge decision-${decision}`, text: decision }),
          reasons ? el("span", { className: "reasons", text: reasons }) : null,
        ),
      );
    });
    $("decisions-rows").replaceChildren(...rows);
    $("decisions-empty").hidden = rows.length > 0;
  }

  function renderKnownAccounts() {
    const names = new Set(st.exposure.accounts.keys());
    const e = st.emergency;
    if (e && e.accounts) for (const name of Object.keys(e.accounts)) names.add(name);
    const list = $("known-accounts");
    const wanted = [...names].sort();
    const have = [...list.options].map((o) => o.value);
    if (wanted.join("\n") === have.join("\n")) return;
    list.replaceChildren(...wanted.map((name) => el("option", { value: name })));
  }

  function renderRole() {
    const p = st.principal;
    const role = p ? p.role : null;
    $("identity").hidden = !p;
    if (p) {
      const scope =
        role === "trader" ? ` · accounts ${(p.accounts || []).join(", ") || "none"}` : "";
      $("identity-text").textContent = `${p.name} (${role})${scope}`;
    }
    $("controls").hidden = role !== "admin";
    $("decisions-panel").hidden = !role || role === "trader";
  }

  function tick() {
    const now = Date.now();
    if (st.phase === "live" && st.authed) {
      const silentMs = now - st.lastFrameAt;
      const hbMs = st.heartbeatS * 1000;
      if (silentMs > DEAD_FACTOR * hbMs && silentMs > 10000) {
        // Half-open connection: nothing arrives and nothing will.
        dropSocket(4000, "no heartbeat");
        scheduleReconnect(`no heartbeat for ${Math.round(silentMs / 1000)} s`);
      } else if (silentMs > STALE_FACTOR * hbMs) {
        st.stale = true;
      }
    }
    renderConnection();
    const since = $("mode-since");
    if (since.dataset.ts) since.textContent = fmtSince(since.dataset.ts);
  }

  // -------------------------------------------------------------- views

  function showLogin(error) {
    st.phase = "signed-out";
    renderConnection();
    $("dashboard").hidden = true;
    $("identity").hidden = true;
    $("login").hidden = false;
    $("login-submit").disabled = false;
    $("login-submit").textContent = "Sign in";
    const err = $("login-error");
    err.textContent = error || "";
    err.hidden = !error;
    $("token-input").setAttribute("aria-invalid", error ? "true" : "false");
    $("token-input").focus();
    if (error) $("token-input").select();
  }

  function showDashboard() {
    $("login").hidden = true;
    $("login-error").hidden = true;
    $("dashboard").hidden = false;
    renderRole();
  }

  function signIn(token) {
    dropSocket(1000, "new sign-in");
    resetData();
    st.token = token;
    st.everLive = false;
    st.attempt = 0;
    setPhase("signing-in");
    $("login-submit").disabled = true;
    $("login-submit").textContent = "Signing in…";
    $("login-error").hidden = true;
    connect();
  }

  function signOut() {
    clearTimeout(st.reconnectTimer);
    dropSocket(1000, "signed out");
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch (err) {
      // nothing stored
    }
    st.token = null;
    st.everLive = false;
    st.disconnectReason = "";
    resetData();
    renderEmergency();
    renderAlerts(0);
    renderDecisions();
    renderCluster();
    $("token-input").value = "";
    showNotice("");
    showLogin("");
  }

  // ------------------------------------------------------- mode controls

  let proposal = null;

  function setMessage(node, text, isError) {
    node.textContent = text;
    node.hidden = !text;
    node.classList.toggle("is-error", Boolean(text) && isError);
    node.classList.toggle("is-ok", Boolean(text) && !isError);
    node.setAttribute("role", isError ? "alert" : "status");
  }

  function syncModeForm() {
    const scope = $("mode-scope").value;
    $("account-field").hidden = scope !== "account";
    const needsReason = $("mode-select").value !== "normal";
    $("reason-hint").textContent = needsReason ? "(required)" : "(optional for normal)";
    $("mode-reason-input").required = needsReason;
  }

  function reviewChange(event) {
    event.preventDefault();
    const message = $("mode-message");
    const mode = $("mode-select").value;
    const reason = $("mode-reason-input").value.trim();
    const scopeAccount = $("mode-scope").value === "account";
    const account = $("mode-account").value.trim();
    if (scopeAccount && !account) {
      setMessage(message, "Name the account whose mode you want to change.", true);
      $("mode-account").focus();
      return;
    }
    if (mode !== "normal" && !reason) {
      setMessage(message, `A reason is required to set ${mode}.`, true);
      $("mode-reason-input").focus();
      return;
    }
    setMessage(message, "", false);
    proposal = { mode, reason, account: scopeAccount ? account : null };
    const target = proposal.account ? `account ${proposal.account}` : "the whole gateway";
    const text = $("confirm-text");
    text.replaceChildren(
      "Set ",
      el("strong", { text: target }),
      " to ",
      el("strong", { text: mode.toUpperCase() }),
      reason ? `, reason: “${reason}”` : "",
      "?",
    );
    const confirm = $("confirm-button");
    confirm.className = `button button-danger to-${mode}`;
    confirm.textContent = `Set ${mode}`;
    confirm.disabled = false;
    $("confirm-dialog").showModal();
    $("confirm-cancel").focus();
  }

  async function confirmChange() {
    const dialog = $("confirm-dialog");
    const message = $("mode-message");
    const chosen = proposal;
    proposal = null;
    dialog.close();
    if (!chosen) return;
    const params = { mode: chosen.mode, reason: chosen.reason };
    if (chosen.account) params.account = chosen.account;
    $("mode-apply").disabled = true;
    setMessage(message, "Sending…", false);
    const before = st.emergency ? st.emergency.version : null;
    try {
      const response = await request("emergency.set", params);
      if (response.status === "ok") {
        const r = response.result;
        const target = chosen.account ? `Account ${chosen.account}` : "Gateway";
        const text =
          r.version === before
            ? `${target} already ${chosen.mode}: nothing changed (version ${r.version}).`
            : `${target} set to ${chosen.mode} (version ${r.version}).`;
        setMessage(message, text, false);
        if (!chosen.account || chosen.mode === "normal") $("mode-reason-input").value = "";
      } else {
        const error = response.error || {};
        setMessage(message, `Refused by the gateway (${error.code}): ${error.message}`, true);
      }
    } catch (err) {
      setMessage(message, `Not sent: ${err.message}`, true);
    } finally {
      $("mode-apply").disabled = false;
    }
  }

  // ---------------------------------------------------------------- wiring

  function init() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) {
        showLogin("Paste a token first.");
        return;
      }
      signIn(token);
    });
    $("sign-out").addEventListener("click", signOut);
    $("reconnect-now").addEventListener("click", () => {
      st.attempt = 0;
      connect();
    });
    $("mode-form").addEventListener("submit", reviewChange);
    $("mode-scope").addEventListener("change", syncModeForm);
    $("mode-select").addEventListener("change", syncModeForm);
    $("confirm-button").addEventListener("click", confirmChange);
    $("confirm-cancel").addEventListener("click", () => {
      proposal = null;
      $("confirm-dialog").close();
      setMessage($("mode-message"), "Cancelled: nothing was sent.", false);
    });
    $("confirm-dialog").addEventListener("cancel", () => {
      proposal = null;
    });
    $("alert-filter").addEventListener("change", () => renderAlerts(0));
    syncModeForm();
    setInterval(tick, 500);
    setInterval(() => {
      if (st.exposure) window.RiskCharts.exposure(st.exposure);
      window.RiskCharts.redraw();
    }, 1000);
    setInterval(refreshCluster, CLUSTER_REFRESH_MS);

    let saved = null;
    try {
      saved = sessionStorage.getItem(TOKEN_KEY);
    } catch (err) {
      saved = null;
    }
    if (saved) {
      // A token of this tab: go straight to the dashboard (it returns to the
      // form if the gateway no longer accepts the token).
      st.token = saved;
      st.everLive = true;
      showDashboard();
      connect();
    } else {
      showLogin("");
    }
  }

  // For tests and troubleshooting: a read-only view of the client's sequence state.
  window.riskDashboard = {
    seqs: () => ({ ...st.seq }),
    resyncs: () => st.resyncs,
    phase: () => st.phase,
    cluster: () => (st.clusterMode ? st.cluster : null),
  };

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
