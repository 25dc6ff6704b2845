// saescope feature map: every feature of an SAE as one point, drawn on one canvas (no DOM node per point).
// Data: /api/saes/ID/map (uint16 coordinates and uint8 colour codes in base64). Hover: a grid index finds the
// point under the pointer; its top tokens come from /api/saes/ID/list?f=N (debounced, cached). The view
// (colour, centre x/y, zoom, marked feature f) lives in the URL via history.replaceState.
// Token strings are untrusted: they only ever reach the page through textContent.
(() => {
  "use strict";
  const canvas = document.getElementById("map");
  if (!canvas) return;
  const d = canvas.dataset;
  const sae = d.sae;
  const MINZ = +d.minZoom, MAXZ = +d.maxZoom;
  const given = new Set(d.given ? d.given.split(",") : []);
  const view = { x: +d.x, y: +d.y, zoom: +d.zoom, color: d.color, f: d.f === "" ? null : +d.f };
  const tip = document.getElementById("map-tip");
  const status = document.getElementById("map-status");
  const colorSel = document.getElementById("map-color");
  const fInput = document.getElementById("map-f");
  const ctx = canvas.getContext("2d");
  const base = document.createElement("canvas"); // the points, redrawn only when the view changes
  const bctx = base.getContext("2d");
  const M = { n: 0, xs: null, ys: null, ids: null, pos: null, colors: {}, buckets: {}, grid: null, hover: -1, tipAt: [0, 0], ready: false };
  let W = 0, H = 0, dpr = 1;

  // ------------------------------------------------------------ data
  const bytes = (b64) => {
    const s = atob(b64), out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  };
  function load(p) {
    const n = p.n, raw = bytes(p.xy), dv = new DataView(raw.buffer);
    M.n = n; M.xs = new Float32Array(n); M.ys = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      M.xs[i] = dv.getUint16(4 * i, true) / p.scale;
      M.ys[i] = dv.getUint16(4 * i + 2, true) / p.scale;
    }
    if (p.features) {
      const fb = bytes(p.features), fv = new DataView(fb.buffer);
      M.ids = new Uint32Array(n);
      for (let i = 0; i < n; i++) M.ids[i] = fv.getUint32(4 * i, true);
      M.pos = new Map(); M.ids.forEach((f, i) => M.pos.set(f, i));
    }
    for (const [name, c] of Object.entries(p.colors)) {
      const codes = bytes(c.codes);
      M.colors[name] = { ...c, codes };
      M.buckets[name] = bucketize(codes);
    }
    M.grid = buildGrid();
  }
  const featureOf = (i) => (M.ids ? M.ids[i] : i);
  const pointOf = (f) => (M.pos ? (M.pos.has(f) ? M.pos.get(f) : -1) : (f >= 0 && f < M.n ? f : -1));

  // points sorted by colour code (counting sort): one fillStyle per code, higher codes drawn last (on top)
  function bucketize(codes) {
    const start = new Uint32Array(257), order = new Uint32Array(codes.length);
    for (let i = 0; i < codes.length; i++) start[codes[i] + 1]++;
    for (let c = 0; c < 256; c++) start[c + 1] += start[c];
    const fill = start.slice(0, 256);
    for (let i = 0; i < codes.length; i++) order[fill[codes[i]]++] = i;
    return { start, order };
  }

  // a uniform grid over [0,1]^2: cell -> the points inside it (CSR layout), for hit-testing
  function buildGrid() {
    const G = Math.max(1, Math.min(512, Math.ceil(Math.sqrt(M.n / 2))));
    const cell = new Uint32Array(M.n), start = new Uint32Array(G * G + 1), items = new Uint32Array(M.n);
    for (let i = 0; i < M.n; i++) {
      const c = Math.min(G - 1, Math.floor(M.xs[i] * G)) + G * Math.min(G - 1, Math.floor(M.ys[i] * G));
      cell[i] = c; start[c + 1]++;
    }
    for (let c = 0; c < G * G; c++) start[c + 1] += start[c];
    const fill = start.slice(0, G * G);
    for (let i = 0; i < M.n; i++) items[fill[cell[i]]++] = i;
    return { G, start, items };
  }
  // the point nearest to map position (mx, my) within map distance r, or -1
  function nearest(mx, my, r) {
    const { G, start, items } = M.grid;
    const c0 = Math.max(0, Math.floor((mx - r) * G)), c1 = Math.min(G - 1, Math.floor((mx + r) * G));
    const r0 = Math.max(0, Math.floor((my - r) * G)), r1 = Math.min(G - 1, Math.floor((my + r) * G));
    let best = -1, bd = r * r;
    for (let row = r0; row <= r1; row++) {
      for (let col = c0; col <= c1; col++) {
        const c = col + G * row;
        for (let k = start[c]; k < start[c + 1]; k++) {
          const i = items[k], dx = M.xs[i] - mx, dy = M.ys[i] - my, dd = dx * dx + dy * dy;
          if (dd <= bd) { bd = dd; best = i; }
        }
      }
    }
    return best;
  }

  // ------------------------------------------------------------ colours
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const ramp = (t) => {
    const s = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(s));
    const a = VIRIDIS[i], b = VIRIDIS[i + 1], u = s - i;
    return `rgb(${a.map((v, k) => Math.round(v + (b[k] - v) * u)).join(",")})`;
  };
  const LUT = Array.from({ length: 256 }, (_, c) => (c === 0 ? "rgba(140,146,153,0.55)" : ramp((c - 1) / 254)));

  // ------------------------------------------------------------ view
  const clampZoom = (z) => Math.max(MINZ, Math.min(MAXZ, z));
  const clamp01 = (v) => Math.max(0, Math.min(1, v));
  function transform() {
    const scale = Math.min(W, H) * 0.94 * view.zoom;
    return { scale, ox: W / 2 - view.x * scale, oy: H / 2 - view.y * scale };
  }
  const radius = () => Math.min(8, (M.n > 20000 ? 1.1 : M.n > 2000 ? 1.8 : 3.2) * Math.sqrt(view.zoom));

  function resize() {
    dpr = window.devicePixelRatio || 1;
    W = canvas.clientWidth; H = canvas.clientHeight;
    for (const c of [canvas, base]) { c.width = Math.round(W * dpr); c.height = Math.round(H * dpr); }
    render();
  }

  function render() {
    if (!M.n || !W) return;
    const t0 = performance.now(), { scale, ox, oy } = transform(), r = radius();
    const { start, order } = M.buckets[view.color];
    const round = M.n <= 20000; // discs for up to 20k points, squares (cheaper) beyond
    bctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    bctx.clearRect(0, 0, W, H);
    for (let c = 0; c < 256; c++) {
      if (start[c] === start[c + 1]) continue;
      bctx.fillStyle = LUT[c];
      bctx.beginPath();
      for (let k = start[c]; k < start[c + 1]; k++) {
        const i = order[k], sx = ox + M.xs[i] * scale, sy = oy + M.ys[i] * scale;
        if (sx < -r || sy < -r || sx > W + r || sy > H + r) continue;
        if (round) { bctx.moveTo(sx + r, sy); bctx.arc(sx, sy, r, 0, 2 * Math.PI); } else bctx.rect(sx - r, sy - r, 2 * r, 2 * r);
      }
      bctx.fill();
    }
    M.drawMs = performance.now() - t0;
    present();
    legend();
    syncUrl();
  }

  function ring(i, color, width, extra) {
    const { scale, ox, oy } = transform(), r = radius() + extra;
    ctx.beginPath();
    ctx.arc(ox + M.xs[i] * scale, oy + M.ys[i] * scale, r, 0, 2 * Math.PI);
    ctx.lineWidth = width; ctx.strokeStyle = color; ctx.stroke();
  }
  function present() {
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(base, 0, 0);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const mark = view.f === null ? -1 : pointOf(view.f);
    const fg = getComputedStyle(document.body).color;
    if (mark >= 0) { ring(mark, "#d6452b", 2.5, 5); ring(mark, fg, 1, 9); }
    if (M.hover >= 0) ring(M.hover, fg, 1.5, 3);
  }

  function legend() {
    const c = M.colors[view.color], rc = document.getElementById("map-ramp");
    if (!c || !rc) return;
    const g = rc.getContext("2d");
    for (let x = 0; x < rc.width; x++) { g.fillStyle = ramp(x / (rc.width - 1)); g.fillRect(x, 0, 1, rc.height); }
    const f = (v) => (c.log10 ? fmtPct(10 ** v) : fmtNum(v));
    document.getElementById("map-lo").textContent = f(c.lo);
    document.getElementById("map-hi").textContent = f(c.hi) + (view.color === "density" ? " (grey: dead)" : "");
  }
  const fmtNum = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(2));
  const fmtPct = (v) => (v >= 0.01 ? (100 * v).toFixed(1) : (100 * v).toPrecision(2)) + "%";

  let urlTimer = 0;
  function syncUrl() {
    clearTimeout(urlTimer);
    urlTimer = setTimeout(() => {
      const u = new URL(location.href), r4 = (v) => String(+v.toFixed(4));
      u.searchParams.set("color", view.color);
      u.searchParams.set("x", r4(view.x)); u.searchParams.set("y", r4(view.y)); u.searchParams.set("zoom", r4(view.zoom));
      if (view.f === null) u.searchParams.delete("f"); else u.searchParams.set("f", String(view.f));
      history.replaceState(null, "", u);
    }, 150);
  }

  function zoomAt(factor, px, py) { // keep the map point under (px, py) in place
    const t = transform(), mx = (px - t.ox) / t.scale, my = (py - t.oy) / t.scale;
    view.zoom = clampZoom(view.zoom * factor);
    const s2 = transform().scale; // solve W/2 - x' * s2 + mx * s2 = px for the new centre x'
    view.x = clamp01(mx + (W / 2 - px) / s2);
    view.y = clamp01(my + (H / 2 - py) / s2);
    render();
  }
  function pan(dxPx, dyPx) {
    const { scale } = transform();
    view.x = clamp01(view.x - dxPx / scale); view.y = clamp01(view.y - dyPx / scale);
    render();
  }

  // ------------------------------------------------------------ hover tooltip
  const cache = new Map();
  let hoverTimer = 0;
  const visible = (t) => (t === "" ? "∅" : t.replace(/^ +/, (m) => "·".repeat(m.length)).replace(/[\n\t\r]/g, (c) => ({ "\n": "↵", "\t": "⇥", "\r": "␍" })[c])
    .replace(/[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\uFFFD]/gu, (c) => {
      const n = c.codePointAt(0);
      return n < 256 ? "\\x" + n.toString(16).padStart(2, "0") : "\\u" + n.toString(16).padStart(4, "0");
    }));
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fetchFeature(f) {
    if (!cache.has(f)) {
      cache.set(f, fetch(`/api/saes/${encodeURIComponent(sae)}/list?f=${f}`, { headers: { accept: "application/json" } })
        .then((r) => (r.ok ? r.json() : Promise.reject(new Error(r.statusText))))
        .then((j) => j.features[0])
        .catch((e) => { cache.delete(f); throw e; }));
    }
    return cache.get(f);
  }
  function showTip(i, px, py) {
    const f = featureOf(i);
    tip.replaceChildren(el("strong", "", `feature ${f}`), el("span", "muted", " · loading…"));
    tip.dataset.feature = String(f);
    tip.hidden = false;
    placeTip(px, py);
    clearTimeout(hoverTimer);
    hoverTimer = setTimeout(() => fetchFeature(f).then((row) => {
      if (M.hover !== i) return;
      const chips = el("span", "chips");
      for (const t of row.top_tokens.slice(0, 8)) chips.append(el("code", "chip", visible(t)));
      tip.replaceChildren(el("strong", "", `feature ${f}`),
        el("span", "muted", row.density > 0 ? ` · density ${fmtPct(row.density)} · max ${fmtNum(row.max_act)}` : " · dead"),
        el("br"), row.top_tokens.length ? chips : el("span", "muted", "no top tokens"));
      tip.classList.add("loaded");
      placeTip(...M.tipAt);
    }).catch(() => { if (M.hover === i) tip.lastChild.textContent = " · could not load its tokens"; }), 120);
  }
  function placeTip(px, py) {
    M.tipAt = [px, py];
    const left = Math.min(px + 14, W - tip.offsetWidth - 4);
    const top = py + 14 + tip.offsetHeight > H ? py - tip.offsetHeight - 10 : py + 14;
    tip.style.left = `${Math.max(0, left)}px`; tip.style.top = `${Math.max(0, top)}px`;
  }
  function setHover(i, px, py) {
    if (i === M.hover) { if (i >= 0) placeTip(px, py); return; }
    M.hover = i;
    tip.classList.remove("loaded");
    canvas.style.cursor = i >= 0 ? "pointer" : "grab";
    if (i >= 0) showTip(i, px, py); else { tip.hidden = true; clearTimeout(hoverTimer); }
    present();
  }
  function hitAt(px, py) {
    const t = transform();
    return nearest((px - t.ox) / t.scale, (py - t.oy) / t.scale, Math.max(radius() + 3, 6) / t.scale);
  }
  const open = (i) => { location.href = `/sae/${encodeURIComponent(sae)}/feature/${featureOf(i)}`; };

  // ------------------------------------------------------------ input
  let drag = null;
  const local = (e) => { const b = canvas.getBoundingClientRect(); return [e.clientX - b.left, e.clientY - b.top]; };
  canvas.addEventListener("pointerdown", (e) => {
    const [px, py] = local(e);
    drag = { px, py, moved: false, id: e.pointerId };
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!M.ready) return;
    const [px, py] = local(e);
    if (drag) {
      if (!drag.moved && Math.hypot(px - drag.px, py - drag.py) < 4) return;
      drag.moved = true; canvas.style.cursor = "grabbing";
      pan(px - drag.px, py - drag.py); drag.px = px; drag.py = py;
      setHover(-1);
      return;
    }
    setHover(hitAt(px, py), px, py);
  });
  canvas.addEventListener("pointerup", (e) => {
    const d0 = drag; drag = null;
    if (!d0 || d0.moved || !M.ready) { canvas.style.cursor = "grab"; return; }
    const [px, py] = local(e), i = hitAt(px, py);
    if (i >= 0) open(i);
  });
  canvas.addEventListener("pointerleave", () => { if (!drag) setHover(-1); });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    if (!M.ready) return;
    const [px, py] = local(e);
    zoomAt(Math.exp(-e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.002)), px, py);
    setHover(hitAt(px, py), px, py);
  }, { passive: false });
  canvas.addEventListener("keydown", (e) => {
    if (!M.ready || e.altKey || e.ctrlKey || e.metaKey) return;
    const step = 60;
    const act = {
      "+": () => zoomAt(1.5, W / 2, H / 2), "=": () => zoomAt(1.5, W / 2, H / 2),
      "-": () => zoomAt(1 / 1.5, W / 2, H / 2), "_": () => zoomAt(1 / 1.5, W / 2, H / 2),
      ArrowLeft: () => pan(step, 0), ArrowRight: () => pan(-step, 0),
      ArrowUp: () => pan(0, step), ArrowDown: () => pan(0, -step),
      "0": () => reset(),
      Enter: () => { const i = M.hover >= 0 ? M.hover : view.f === null ? -1 : pointOf(view.f); if (i >= 0) open(i); },
    }[e.key];
    if (act) { e.preventDefault(); e.stopPropagation(); act(); }
  });
  function reset() { view.x = 0.5; view.y = 0.5; view.zoom = MINZ; render(); }
  document.getElementById("map-zoom-in").addEventListener("click", () => zoomAt(1.5, W / 2, H / 2));
  document.getElementById("map-zoom-out").addEventListener("click", () => zoomAt(1 / 1.5, W / 2, H / 2));
  document.getElementById("map-reset").addEventListener("click", reset);
  colorSel.addEventListener("change", () => { view.color = colorSel.value; render(); });
  fInput.addEventListener("change", () => {
    const f = fInput.value === "" ? null : Number(fInput.value), i = f === null ? -1 : pointOf(f);
    view.f = i >= 0 ? f : null;
    if (i >= 0) { view.x = M.xs[i]; view.y = M.ys[i]; }
    const a = document.getElementById("map-marked");
    if (a && i >= 0) { a.href = `/sae/${encodeURIComponent(sae)}/feature/${f}`; a.textContent = `open feature ${f}`; }
    render();
  });
  fInput.form.addEventListener("submit", (e) => { e.preventDefault(); fInput.dispatchEvent(new Event("change")); });

  // for tests and the curious: map position -> canvas pixel is (ox + x * scale, oy + y * scale), CSS pixels
  window.saescopeMap = {
    get ready() { return M.ready; }, get n() { return M.n; }, get drawMs() { return M.drawMs; }, view,
    transform() { const b = canvas.getBoundingClientRect(); return { ...transform(), left: b.left, top: b.top }; },
  };

  fetch(`/api/saes/${encodeURIComponent(sae)}/map`, { headers: { accept: "application/json" } })
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`${r.status} ${r.statusText}`))))
    .then((p) => {
      load(p);
      const mark = view.f === null ? -1 : pointOf(view.f);
      if (mark >= 0 && !given.has("x") && !given.has("y")) { view.x = M.xs[mark]; view.y = M.ys[mark]; }
      canvas.style.cursor = "grab";
      M.ready = true;
      new ResizeObserver(resize).observe(canvas);
      resize();
      status.textContent = "";
    })
    .catch((e) => { status.textContent = `the map could not be loaded (${e.message})`; });
})();
