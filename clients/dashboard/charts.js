// The dashboard's charts, drawn with uPlot (vendor/uPlot.iife.min.js, served
// by the gateway): the gross exposure against its limit, each account's
// utilisation, and decisions per second (accept / reject) with the top
// reject reasons, over the last 15 minutes. The data comes from the channel
// pushes app.js receives, on top of the gateway's own last 15 minutes
// (`history.get`, asked once connected); it is kept here in bounded rings,
// one point per second at most, and redrawn once a second.
"use strict";

(function () {
  const WINDOW_S = 15 * 60;
  const rings = {
    exposure: [], // [t, gross, limit]
    util: new Map(), // account -> [[t, pct]]
    decisions: new Map(), // t -> {accept, reject, reasons: Map}
  };
  const charts = { exposure: null, util: null, decisions: null };
  let utilAccounts = "";

  const now = () => Math.floor(Date.now() / 1000);
  const num = (text) => (text === null || text === undefined ? null : Number(text));

  function trim(list) {
    const oldest = now() - WINDOW_S;
    while (list.length && list[0][0] < oldest) list.shift();
  }

  function put(list, point) {
    const last = list[list.length - 1];
    if (last && last[0] === point[0]) list[list.length - 1] = point;
    else list.push(point);
    trim(list);
  }

  function exposure(state) {
    if (!state) return;
    const t = now();
    put(rings.exposure, [t, num(state.global), num(state.global_limit)]);
    for (const [name, entry] of state.accounts) {
      const gross = num(entry.gross);
      const limit = num(entry.limit);
      const pct = limit ? (100 * gross) / limit : null;
      if (!rings.util.has(name)) rings.util.set(name, []);
      put(rings.util.get(name), [t, pct]);
    }
  }

  function decision(data) {
    const t = data && data.ts ? Math.floor(Date.parse(data.ts) / 1000) : now();
    if (!(t >= now() - WINDOW_S)) return;
    let slot = rings.decisions.get(t);
    if (!slot) {
      slot = { accept: 0, reject: 0, reasons: new Map() };
      rings.decisions.set(t, slot);
    }
    if (data.decision === "accept") slot.accept += 1;
    else {
      slot.reject += 1;
      for (const r of data.reasons || []) {
        slot.reasons.set(r.code, (slot.reasons.get(r.code) || 0) + 1);
      }
    }
  }

  // The gateway's last 15 minutes (`history.get`), so that a page opened or
  // reloaded starts with the history. Asked for after subscribing: every
  // decision push that arrived before the answer is in its counts, so its
  // seconds replace ours; exposure points merge, ours winning a tie.
  function seed(history) {
    if (!history) return;
    const toS = (ts) => Math.floor(Date.parse(ts) / 1000);
    const exposurePoints = (history.gateway || []).map(([ts, g, l]) => [toS(ts), num(g), num(l)]);
    merge(rings.exposure, exposurePoints);
    for (const [name, points] of Object.entries(history.accounts || {})) {
      if (!rings.util.has(name)) rings.util.set(name, []);
      const pct = ([ts, g, l]) => [toS(ts), num(l) ? (100 * num(g)) / num(l) : null];
      merge(rings.util.get(name), points.map(pct));
    }
    const oldest = now() - WINDOW_S;
    for (const [ts, accept, reject, reasons] of history.decisions || []) {
      const t = toS(ts);
      if (!(t >= oldest)) continue;
      rings.decisions.set(t, { accept, reject, reasons: new Map(Object.entries(reasons || {})) });
    }
    redraw();
  }

  function merge(list, points) {
    const byTime = new Map(points.map((p) => [p[0], p]));
    for (const p of list) byTime.set(p[0], p);
    const merged = [...byTime.values()].sort((a, b) => a[0] - b[0]);
    list.splice(0, list.length, ...merged);
    trim(list);
  }

  function chart(key, host, series, data) {
    const width = Math.max(host.clientWidth - 4, 200);
    if (!charts[key]) {
      charts[key] = new uPlot(
        {
          width,
          height: 150,
          series: [{}, ...series],
          axes: [{ stroke: "#8895a4" }, { stroke: "#8895a4", size: 90 }],
          legend: { show: true },
          cursor: { drag: { x: false, y: false } },
        },
        data,
        host,
      );
    } else {
      if (Math.abs(charts[key].width - width) > 8) charts[key].setSize({ width, height: 150 });
      charts[key].setData(data);
    }
  }

  function columns(list, count) {
    const cols = [[]];
    for (let i = 0; i < count; i++) cols.push([]);
    for (const point of list) point.forEach((v, i) => cols[i].push(v));
    return cols;
  }

  const COLORS = ["#6ea8fe", "#3fb27f", "#e0a526", "#ef5b5b", "#b48ef0", "#5cc8d0"];

  function redraw() {
    const host = document.getElementById("charts-panel");
    if (!host || host.hidden || typeof uPlot === "undefined") return;
    trim(rings.exposure);
    chart(
      "exposure",
      document.getElementById("chart-exposure"),
      [
        { label: "gross", stroke: "#6ea8fe", width: 2 },
        { label: "limit", stroke: "#ef5b5b", dash: [6, 4] },
      ],
      columns(rings.exposure, 2),
    );
    const names = [...rings.util.keys()].sort();
    if (names.join(",") !== utilAccounts && charts.util) {
      charts.util.destroy();
      charts.util = null;
    }
    utilAccounts = names.join(",");
    if (names.length) {
      const times = [...new Set(names.flatMap((n) => rings.util.get(n).map((p) => p[0])))].sort(
        (a, b) => a - b,
      );
      const data = [times];
      for (const name of names) {
        const byTime = new Map(rings.util.get(name));
        data.push(times.map((t) => (byTime.has(t) ? byTime.get(t) : null)));
      }
      chart(
        "util",
        document.getElementById("chart-util"),
        names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], spanGaps: true })),
        data,
      );
    }
    const oldest = now() - WINDOW_S;
    const times = [];
    const accepts = [];
    const rejects = [];
    const reasons = new Map();
    for (const t of [...rings.decisions.keys()].sort((a, b) => a - b)) {
      const slot = rings.decisions.get(t);
      if (t < oldest) {
        rings.decisions.delete(t);
        continue;
      }
      times.push(t);
      accepts.push(slot.accept);
      rejects.push(slot.reject);
      for (const [code, n] of slot.reasons) reasons.set(code, (reasons.get(code) || 0) + n);
    }
    chart(
      "decisions",
      document.getElementById("chart-decisions"),
      [
        { label: "accept/s", stroke: "#3fb27f", width: 2 },
        { label: "reject/s", stroke: "#ef5b5b", width: 2 },
      ],
      [times, accepts, rejects],
    );
    const top = [...reasons.entries()].sort((a, b) => b[1] - a[1]).slice(0, 5);
    const list = document.getElementById("top-reasons");
    list.replaceChildren(
      ...top.map(([code, n]) => {
        const li = document.createElement("li");
        li.dataset.testid = "top-reason";
        li.dataset.code = code;
        li.textContent = `${code} ${n}`;
        return li;
      }),
    );
    document.getElementById("top-reasons-empty").hidden = top.length > 0;
  }

  function summary() {
    let accepts = 0;
    let rejects = 0;
    for (const slot of rings.decisions.values()) {
      accepts += slot.accept;
      rejects += slot.reject;
    }
    return {
      exposurePoints: rings.exposure.length,
      accounts: [...rings.util.keys()],
      accepts,
      rejects,
      drawn: Object.values(charts).filter(Boolean).length,
    };
  }

  window.RiskCharts = { exposure, decision, seed, redraw, summary };
})();
